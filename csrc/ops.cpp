// The op schemas of cmpe_se (docs/ARCHITECTURE.md; the strings here and FORWARD_SCHEMA /
// BACKWARD_SCHEMA / INFER_SCHEMA in cmpe_se_fused/ops.py must stay identical: unnamed returns, as there) and the CPU
// registrations. No Python: cmpe_se_fused/_loader.py loads this library with torch.ops.load_library, and so
// can a process that never imports cmpe_se_fused, or a C++ program without libpython (docs/DEPLOY.md);
// the static registrations below run when it is loaded.
#include <torch/library.h>

#include "cpu/cpu_ops.h"

#include "cpu/kernels.h"

// Which build of the CPU kernels this machine runs: "avx2" or "default" (CMPE_SE_CPU_ISA chooses).
// A plain C symbol so that it needs no Python module: cmpe_se_fused._C.cpu_isa() calls it through ctypes.
extern "C" __attribute__((visibility("default"))) const char* cmpe_se_cpu_isa() {
  return cmpe_se::cpu::isa_name();
}

TORCH_LIBRARY(cmpe_se, m) {
  m.def(
      "forward(Tensor u, Tensor x, Tensor fc1_weight, Tensor? fc1_identity_weight, Tensor fc2_weight, "
      "Tensor? pair_weight, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor(a!) running_mean, Tensor(b!) running_var, "
      "str se_mode, bool training, float momentum, float eps, int fold_width, int padding) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_y, Tensor u, Tensor pool_u, Tensor pool_x, Tensor gate, Tensor hidden, "
      "Tensor bn_mean, Tensor bn_invstd, "
      "Tensor fc1_weight, Tensor? fc1_identity_weight, Tensor fc2_weight, "
      "Tensor? pair_weight, Tensor? bn_weight, Tensor? bn_bias, "
      "str se_mode, bool training, int fold_width, int padding) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // forward(..., training=False) without the saved outputs: what an inference call needs (nothing mutated,
  // one output); the layer's call plans use it when no gradient can be needed (docs/ARCHITECTURE.md)
  m.def(
      "infer(Tensor u, Tensor x, Tensor fc1_weight, Tensor? fc1_identity_weight, Tensor fc2_weight, "
      "Tensor? pair_weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, "
      "str se_mode, float eps, int fold_width, int padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(cmpe_se, CPU, m) {
  m.impl("forward", &cmpe_se::cpu::forward);
  m.impl("backward", &cmpe_se::cpu::backward);
  m.impl("infer", &cmpe_se::cpu::infer);
}
