// Helpers shared by forward.cpp and backward.cpp (tensor-level; kernels live in kernels_impl.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <memory>

#include "cpu/checks.h"
#include "cpu/kernels.h"
#include "cpu/pair_view.h"

namespace cmpe_se {
namespace cpu {

template <class T> struct StorageOf { using type = T; };
template <> struct StorageOf<c10::Half> { using type = Fp16; };
template <> struct StorageOf<c10::BFloat16> { using type = Bf16; };

inline at::MemoryFormat layout_of(const Config& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Fresh CPU tensors from at::empty's CPU kernel itself (at::detail::empty_cpu), without the dispatcher round
// trip (BackendSelect, then CPU) that costs a few hundred ns per output at host-bound shapes; the same
// tensors (key set, allocator) as at::empty gives on CPU.
inline at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype,
                          at::MemoryFormat mf = at::MemoryFormat::Contiguous) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype, false, mf));
}

// torch.empty_like(t) on CPU: t's strides when t is dense and non-overlapping (what empty_like preserves), else
// at::empty_like itself
inline at::Tensor new_cpu_like(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense())
    return at::Tensor(at::detail::empty_strided_cpu(t.sizes(), t.strides(), t.scalar_type()));
  return at::empty_like(t);
}

// The output as torch.empty_like(u) lays it out, and the dense buffer the kernels write: the output
// itself when it is dense in the kernel layout, else a temporary copied into it afterwards.
struct Output {
  at::Tensor out, buf;
  Output(const at::Tensor& u, at::MemoryFormat mf) : out(new_cpu_like(u)) {
    buf = out.is_contiguous(mf) ? out : new_cpu(u.sizes(), u.scalar_type(), mf);
  }
  void finish() { if (!buf.is_same(out)) out.copy_(buf); }
};

// Every element of t, in memory order of its contiguous form, as doubles (t is small: weights, statistics).
inline SmallVec<double> to_doubles(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  SmallVec<double> v(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "cmpe_se_read", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(p[i]);
  });
  return v;
}

// BN in evaluation form: the e normalised filters collapse to v = w . (q - mq) + b, with
// w = (1/e) sum_i gamma_i invstd_i w_i and b = (1/e) sum_i (beta_i + gamma_i invstd_i (w_i . mq - mu_i)).
struct PairFilters {
  int64_t e = 0, K = 0;
  SmallVec<double> w, gamma, beta, mu, invstd;  // w: [e][K]
  SmallVec<double> t;                           // t_i = w_i . mq - mu_i
  SmallVec<double> w_eff;                       // [K]
  double b_eff = 0.0;

  void collapse(const SmallVec<double>& mq) {
    t.assign(e, 0.0);
    w_eff.assign(K, 0.0);
    b_eff = 0.0;
    for (int64_t i = 0; i < e; ++i) {
      double wm = 0.0;
      for (int64_t k = 0; k < K; ++k) wm += w[i * K + k] * mq[k];
      t[i] = wm - mu[i];
      const double gs = gamma[i] * invstd[i];
      for (int64_t k = 0; k < K; ++k) w_eff[k] += gs * w[i * K + k] / e;
      b_eff += (beta[i] + gs * t[i]) / e;
    }
  }
};

inline PairFilters load_filters(const at::Tensor& pair_w, const at::Tensor& bn_w, const at::Tensor& bn_b) {
  PairFilters f;
  f.e = pair_w.size(0);
  f.K = pair_w.numel() / f.e;
  f.w = to_doubles(pair_w);  // [e][K], row-major
  f.gamma = to_doubles(bn_w);
  f.beta = to_doubles(bn_b);
  return f;
}

// An uninitialised work buffer (std::vector would zero-fill megabytes per call). Up to kInline elements
// live inside the object (on the stack: no allocation at the small sizes of a host-bound call), more on
// the heap. The patch buffers of the training pair modes take a larger kInline (kPatchInline).
template <class A, int64_t kInline = 256>
struct Buffer {
  A small[kInline];
  std::unique_ptr<A[]> heap;
  A* p;
  explicit Buffer(int64_t n) : heap(n > kInline ? new A[n] : nullptr), p(n > kInline ? heap.get() : small) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  A* data() const { return p; }
  A& operator[](int64_t i) const { return p[i]; }
};

// Inline capacity of the patch buffers (N*K*D and K*D + Hp*Wp values): a batch of 2 of C=64 at fold 8
// (1512 values) needs no heap allocation
constexpr int64_t kPatchInline = 2048;

// W^T of a row-major [rows, cols] matrix into t ([cols, rows]): cheaper than an ATen copy at the small
// sizes of the excitation weights, where a transposing at::Tensor copy costs microseconds
template <class A>
void transpose_into(const A* W, int64_t rows, int64_t cols, A* t) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = W[i * cols + j];
}

template <class A> SmallVec<A> cast_vec(const SmallVec<double>& v) { return SmallVec<A>(v.begin(), v.end()); }

}  // namespace cpu
}  // namespace cmpe_se
