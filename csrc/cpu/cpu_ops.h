// CPU implementations of the two ops (csrc/cpu/cmpe_se_cpu.cpp), registered in csrc/ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace cmpe_se {
namespace cpu {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// (y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& u, const Tensor& x, const Tensor& fc1_weight, const OptTensor& fc1_identity_weight,
    const Tensor& fc2_weight, const OptTensor& pair_weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
    Tensor& running_mean, Tensor& running_var, std::string_view mode, bool training, double momentum, double eps,
    int64_t fold_width, int64_t padding);

// y of forward(..., training=False, ...): the inference form, nothing saved, the running statistics only read
Tensor infer(const Tensor& u, const Tensor& x, const Tensor& fc1_weight, const OptTensor& fc1_identity_weight,
             const Tensor& fc2_weight, const OptTensor& pair_weight, const OptTensor& bn_weight,
             const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
             std::string_view mode, double eps, int64_t fold_width, int64_t padding);

// (grad_u, grad_x, grad_fc1_weight, grad_fc1_identity_weight, grad_fc2_weight, grad_pair_weight,
//  grad_bn_weight, grad_bn_bias)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_y, const Tensor& u, const Tensor& pool_u, const Tensor& pool_x, const Tensor& gate,
    const Tensor& hidden, const Tensor& bn_mean, const Tensor& bn_invstd, const Tensor& fc1_weight,
    const OptTensor& fc1_identity_weight, const Tensor& fc2_weight, const OptTensor& pair_weight,
    const OptTensor& bn_weight, const OptTensor& bn_bias, std::string_view mode, bool training, int64_t fold_width,
    int64_t padding);

}  // namespace cpu
}  // namespace cmpe_se
