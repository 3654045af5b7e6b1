// cmpe_se_fused._fastpath: the Python entry of a layer's call plan (cmpe_se_fused/hostpath.py).
//
// A HostPlan replays a validated call with the same weights, buffers and settings every time. Through
// torch.ops that costs the generic Python binding of a 16-argument schema on every call (each argument
// converted against the schema, each output wrapped): several microseconds, as much as the kernel at
// the shapes CIFAR networks train at. A Plan holds those arguments as C++ values once and calls the op
// through the dispatcher with the typed signature, so a call converts two tensors and wraps one.
//
// Everything a torch.ops call goes through below Python still applies: the dispatcher (autograd via the
// Autograd kernel of csrc/autograd.cpp, the CPU / CUDA kernels, dispatch modes, the profiler's record
// functions, the tracer). What it skips is Python's __torch_function__ handling: hostpath.py takes this
// entry only for plain tensors and with no torch function mode active, else torch.ops.
//
// Unlike _C and _C_cuda (plain shared libraries, loadable without Python: docs/DEPLOY.md) this is a
// Python extension module; nothing but the eager call path uses it, and without it the plans call
// torch.ops (what they did before it existed).
#include <torch/extension.h>

#include <optional>
#include <string>

#include "op_handles.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The recorded arguments of cmpe_se::forward (the order of its schema, u and x left out). The tensors are
// the layer's own Parameters and buffers (shared TensorImpls: in-place updates and `.data =` are seen).
class Plan {
 public:
  Plan(Tensor fc1, OptTensor fc1_id, Tensor fc2, OptTensor pair_w, OptTensor bn_w, OptTensor bn_b, Tensor running_mean,
       Tensor running_var, std::string mode, bool training, double momentum, double eps, int64_t fold_width,
       int64_t padding)
      : fc1_(std::move(fc1)), fc1_id_(std::move(fc1_id)), fc2_(std::move(fc2)), pair_w_(std::move(pair_w)),
        bn_w_(std::move(bn_w)), bn_b_(std::move(bn_b)), running_mean_(std::move(running_mean)),
        running_var_(std::move(running_var)), mode_(std::move(mode)), training_(training), momentum_(momentum),
        eps_(eps), fold_width_(fold_width), padding_(padding) {
    if (pair_w_.has_value()) {  // infer takes the running statistics in the pair modes only
      infer_mean_ = running_mean_;
      infer_var_ = running_var_;
    }
  }

  // torch.ops.cmpe_se.forward(u, x, *args)[0]; with a batch counter (num_batches_tracked of a training pair
  // mode), counter += 1 first, undone when the op's checks raise (they run before it writes anything), as
  // hostpath.HostPlan.replay does on the torch.ops path
  Tensor forward(const Tensor& u, const Tensor& x, const std::optional<Tensor>& counter) {
    const auto& op = cmpe_se::ops::forward();
    pybind11::gil_scoped_release no_gil;
    if (counter.has_value()) counter->add_(1);
    try {
      return std::get<0>(op.call(u, x, fc1_, fc1_id_, fc2_, pair_w_, bn_w_, bn_b_, running_mean_, running_var_, mode_,
                                 training_, momentum_, eps_, fold_width_, padding_));
    } catch (const c10::Error&) {  // the op's own checks (not, e.g., a Python exception from a saved-tensor
      if (counter.has_value()) counter->sub_(1);  // hook: checkpointing's early stop keeps its count)
      throw;
    }
  }

  // torch.ops.cmpe_se.infer(u, x, ...) with the same weights and statistics (evaluation mode)
  Tensor infer(const Tensor& u, const Tensor& x) {
    const auto& op = cmpe_se::ops::infer();
    pybind11::gil_scoped_release no_gil;
    return op.call(u, x, fc1_, fc1_id_, fc2_, pair_w_, bn_w_, bn_b_, infer_mean_, infer_var_, mode_, eps_,
                   fold_width_, padding_);
  }

 private:
  Tensor fc1_;
  OptTensor fc1_id_;
  Tensor fc2_;
  OptTensor pair_w_, bn_w_, bn_b_;
  Tensor running_mean_, running_var_;
  OptTensor infer_mean_, infer_var_;
  std::string mode_;
  bool training_;
  double momentum_, eps_;
  int64_t fold_width_, padding_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The C++ entry of the layers' call plans (cmpe_se_fused/hostpath.py): cmpe_se::forward / "
            "cmpe_se::infer with recorded arguments.";
  pybind11::class_<Plan>(m, "Plan")
      .def(pybind11::init<Tensor, OptTensor, Tensor, OptTensor, OptTensor, OptTensor, Tensor, Tensor, std::string, bool,
                          double, double, int64_t, int64_t>(),
           "The arguments of cmpe_se::forward after u and x, in its schema's order.")
      .def("forward", &Plan::forward, "y of cmpe_se::forward(u, x, *args), counting a batch first when counter is "
           "given", pybind11::arg("u"), pybind11::arg("x"), pybind11::arg("counter") = pybind11::none())
      .def("infer", &Plan::infer, "cmpe_se::infer(u, x, ...) with the recorded weights and statistics");
}
