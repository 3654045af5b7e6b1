// The C++ signatures of the cmpe_se ops (csrc/ops.cpp's schemas) and their typed dispatcher handles, for the
// C++ that calls the ops through the dispatcher: the Autograd kernels (csrc/autograd.cpp) and the call plans'
// entry (csrc/fastpath.cpp). Header only; each library that includes it looks the handles up once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace cmpe_se {
namespace ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using Fwd7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Bwd8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using ForwardSig = Fwd7(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                        const OptTensor&, const OptTensor&, Tensor&, Tensor&, std::string_view, bool, double, double,
                        int64_t, int64_t);
using BackwardSig = Bwd8(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, std::string_view, bool, int64_t, int64_t);
using InferSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, std::string_view, double,
                        int64_t, int64_t);

// looked up once; the handles stay valid while the library with the schemas (_C) is loaded
inline const c10::TypedOperatorHandle<ForwardSig>& forward() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cmpe_se::forward", "").typed<ForwardSig>();
  return op;
}

inline const c10::TypedOperatorHandle<BackwardSig>& backward() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cmpe_se::backward", "").typed<BackwardSig>();
  return op;
}

inline const c10::TypedOperatorHandle<InferSig>& infer() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cmpe_se::infer", "").typed<InferSig>();
  return op;
}

}  // namespace ops
}  // namespace cmpe_se
