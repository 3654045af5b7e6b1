// The op schemas of cmpe_se (docs/ARCHITECTURE.md; the strings here and FORWARD_SCHEMA /
// BACKWARD_SCHEMA in cmpe_se_fused/ops.py must stay identical: unnamed returns, as there), the CPU
// registrations, and the stub module so that `import cmpe_se_fused._C`
// loads this library (and runs the registrations), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_ops.h"

#include "cpu/kernels.h"

namespace {
// cmpe_se_fused._C.cpu_isa(): which build of the CPU kernels this machine runs ("avx2" or "default").
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cmpe_se::cpu::isa_name()); }

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction-set build of the CPU kernels in use: 'avx2' or 'default'."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// The ops themselves are reached through torch.ops.cmpe_se.*; importing this module registers them.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
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
}

TORCH_LIBRARY_IMPL(cmpe_se, CPU, m) {
  m.impl("forward", &cmpe_se::cpu::forward);
  m.impl("backward", &cmpe_se::cpu::backward);
}
