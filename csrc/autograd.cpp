// The Autograd-key kernel of cmpe_se::forward (every device: CPU and CUDA kernels share the op), in
// C++ so that neither an eval nor a training call runs Python autograd (docs/ARCHITECTURE.md, "The
// host path"). It redispatches below autograd to the device kernel, saves what cmpe_se::backward
// reads, and gives the saved outputs back as plain tensors: only y is differentiable, so only y is an
// output of the autograd Function (a call wraps one output, not seven). The backward op is
// once-differentiable: with create_graph=True its gradients carry a node whose backward raises.
// cmpe_se_fused/ops.py registers the Python equivalent only where this kernel is missing (the Triton ops).
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "op_handles.h"

namespace cmpe_se {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ops::Bwd8;
using ops::Fwd7;

constexpr int kForwardArgs = 17;  // the op's 16 arguments and the outs pointer

// Whether a call could need a gradient: grad mode on and one of the differentiable inputs requiring grad.
bool any_needs_grad(const Tensor& u, const Tensor& x, const Tensor& fc1, const OptTensor& fc1_id, const Tensor& fc2,
                    const OptTensor& pair_w, const OptTensor& bn_w, const OptTensor& bn_b) {
  if (!at::GradMode::is_enabled()) return false;
  const auto opt = [](const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  return u.requires_grad() || x.requires_grad() || fc1.requires_grad() || opt(fc1_id) || fc2.requires_grad() ||
         opt(pair_w) || opt(bn_w) || opt(bn_b);
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Identity on a gradient; differentiating through it raises (what the Python autograd's
// _NoDoubleBackward does).
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  static Tensor forward(AutogradContext*, const Tensor& grad, const Tensor& /*anchor*/) { return grad.clone(); }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "cmpe_se: double backward is not supported; the CMPE-SE op is once-differentiable "
                       "(use backend='reference' for higher-order gradients)");
  }
};

// The Function's only output is y: the six saved outputs of the op, not differentiable, leave through
// `outs` as plain tensors (what mark_non_differentiable made of them, without wrapping each one).
struct CMPESEFunction : public torch::autograd::Function<CMPESEFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& u, const Tensor& x, const Tensor& fc1,
                        const OptTensor& fc1_id, const Tensor& fc2, const OptTensor& pair_w, const OptTensor& bn_w,
                        const OptTensor& bn_b, Tensor running_mean, Tensor running_var, std::string_view mode,
                        bool training, double momentum, double eps, int64_t fold_width, int64_t padding, Fwd7* outs) {
    {
      at::AutoDispatchBelowADInplaceOrView below;
      *outs = ops::forward().call(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, running_mean, running_var, mode, training,
                                momentum, eps, fold_width, padding);
    }
    auto& [y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd] = *outs;
    ctx->save_for_backward({u, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, fc1, fc1_id.value_or(Tensor()), fc2,
                            pair_w.value_or(Tensor()), bn_w.value_or(Tensor()), bn_b.value_or(Tensor())});
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["training"] = training;
    ctx->saved_data["fold_width"] = fold_width;
    ctx->saved_data["padding"] = padding;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list out(kForwardArgs);
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;  // only the non-differentiable outputs were used
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    Bwd8 g;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      g = ops::backward().call(grad_y, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7],
                             opt(saved[8]), saved[9], opt(saved[10]), opt(saved[11]), opt(saved[12]), mode,
                             ctx->saved_data["training"].toBool(), ctx->saved_data["fold_width"].toInt(),
                             ctx->saved_data["padding"].toInt());
    }
    variable_list gl = {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g),
                        std::get<4>(g), std::get<5>(g), std::get<6>(g), std::get<7>(g)};
    if (at::GradMode::is_enabled()) {  // create_graph=True: make a second backward fail loudly
      Tensor anchor;
      for (const auto& t : saved)
        if (t.defined() && t.requires_grad()) { anchor = t; break; }
      if (!anchor.defined() && grad_y.requires_grad()) anchor = grad_y;
      if (anchor.defined())
        for (auto& t : gl) t = NoDoubleBackward::apply(t, anchor);
    }
    // saved[7..12] are fc1, fc1_id, fc2, pair_w, bn_w, bn_b: absent weights get no gradient
    out[0] = gl[0];
    out[1] = gl[1];
    out[2] = gl[2];
    out[3] = saved[8].defined() ? gl[3] : Tensor();
    out[4] = gl[4];
    out[5] = saved[10].defined() ? gl[5] : Tensor();
    out[6] = saved[11].defined() ? gl[6] : Tensor();
    out[7] = saved[12].defined() ? gl[7] : Tensor();
    return out;
  }
};

Fwd7 forward_autograd(const Tensor& u, const Tensor& x, const Tensor& fc1, const OptTensor& fc1_id, const Tensor& fc2,
                      const OptTensor& pair_w, const OptTensor& bn_w, const OptTensor& bn_b, Tensor& running_mean,
                      Tensor& running_var, std::string_view mode, bool training, double momentum, double eps,
                      int64_t fold_width, int64_t padding) {
  if (!any_needs_grad(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b)) {
    // nothing to differentiate (no_grad, eval with frozen inputs): no graph node, no saved tensors
    at::AutoDispatchBelowADInplaceOrView below;
    return ops::forward().call(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, running_mean, running_var, mode, training,
                               momentum, eps, fold_width, padding);
  }
  Fwd7 outs;
  Tensor y = CMPESEFunction::apply(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, running_mean, running_var, mode,
                                   training, momentum, eps, fold_width, padding, &outs);
  std::get<0>(outs) = std::move(y);
  return outs;
}

// cmpe_se::infer has no backward: a call that could need one raises instead of returning a y cut off from the graph.
Tensor infer_autograd(const Tensor& u, const Tensor& x, const Tensor& fc1, const OptTensor& fc1_id, const Tensor& fc2,
                      const OptTensor& pair_w, const OptTensor& bn_w, const OptTensor& bn_b, const OptTensor& running_mean,
                      const OptTensor& running_var, std::string_view mode, double eps, int64_t fold_width,
                      int64_t padding) {
  TORCH_CHECK(!any_needs_grad(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b),
              "cmpe_se::infer: an input requires grad, but infer is the inference form of cmpe_se::forward and has "
              "no backward; call cmpe_se::forward (or run under torch.no_grad())");
  at::AutoDispatchBelowADInplaceOrView below;
  return ops::infer().call(u, x, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, running_mean, running_var, mode, eps, fold_width,
                         padding);
}

}  // namespace
}  // namespace cmpe_se

TORCH_LIBRARY_IMPL(cmpe_se, Autograd, m) {
  m.impl("forward", &cmpe_se::forward_autograd);
  m.impl("infer", &cmpe_se::infer_autograd);
}
