// Fused CPU kernels of the CMPE-SE layer: the torch-free interface.
//
// The kernels work on one sample at a time (the caller runs them under at::parallel_for over the
// batch) and see plain pointers only. Every full-size tensor of one sample is a dense block of
// C*P elements in one of two layouts:
//   NCHW:          index = c*P + p        (cl == false)
//   channels_last: index = p*C + c        (cl == true)
// Small tensors (pools, gate, hidden, weights, pair-view maps) are contiguous, in the acc dtype A
// (double for double inputs, float otherwise).
//
// The implementation (kernels_impl.h) is compiled twice: once for the x86-64 baseline
// (kernels_default.cpp) and once with AVX2+FMA+F16C enabled by a target pragma (kernels_avx2.cpp).
// stream_kernels<S>() / small_kernels<A>() pick the best table the running CPU supports, once.
// CMPE_SE_CPU_ISA=default in the environment forces the baseline table (tests, debugging).
#pragma once

#include <cstdint>

namespace cmpe_se {
namespace cpu {

// Storage types of the 16-bit inputs (bit patterns; same layout as c10::BFloat16 / c10::Half).
struct Bf16 { uint16_t bits; };
struct Fp16 { uint16_t bits; };

template <class S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Streaming passes over the full-size tensors of one sample, templated on the storage type S.
template <class S>
struct StreamKernels {
  using A = typename AccOf<S>::type;
  // pool_u[c] = mean_p U[c,p], pool_x[c] = mean_p X[c,p] (x may be null: U only). scratch: 2*C values of A.
  void (*squeeze)(const S* u, const S* x, int64_t C, int64_t P, bool cl, A* pool_u, A* pool_x, A* scratch);
  // Y = gate[c] * U + X, computed in A, rounded once to S.
  void (*rescale)(const S* u, const S* x, const A* gate, S* y, int64_t C, int64_t P, bool cl);
  // rescale, and pool_x[c] = mean_p X[c,p] on the way (X read once). scratch: C values of A.
  void (*rescale_pool)(const S* u, const S* x, const A* gate, S* y, int64_t C, int64_t P, bool cl, A* pool_x,
                       A* scratch);
  // G[c] = sum_p dY[c,p] * U[c,p]. scratch: C values of A.
  void (*grad_reduce)(const S* dy, const S* u, int64_t C, int64_t P, bool cl, A* G, A* scratch);
  // dU = gate[c] * dY + bias_u[c], dX = dY + bias_x[c].
  void (*grad_write)(const S* dy, const A* gate, const A* bias_u, const A* bias_x, S* du, S* dx, int64_t C,
                     int64_t P, bool cl);
  // dU[c,p] = vu[c], dX[c,p] = vx[c] at every pixel (dY constant over H, W: a broadcast gradient).
  void (*grad_fill)(const A* vu, const A* vx, S* du, S* dx, int64_t C, int64_t P, bool cl);
};

// The pair view as a one-channel image (stored with its zero padding) cross-correlated by a kh x kw
// filter: folded_3x3 -> the fold F (2C/m rows, m columns) padded by pad; pair_2x1 / pair_1x1 -> the
// pair map [C][2] (u, x interleaved). Tap k = a*kw + b at map position d = oi*Wo + oj reads
// image[(oi + a)*Wp + oj + b]; the map has D = Ho*Wo positions.
struct PairGeom {
  bool folded = false;
  int64_t C = 0, m = 0, pad = 0;  // m, pad: folded_3x3 only
  int64_t Hp = 0, Wp = 0;         // padded image
  int64_t kh = 1, kw = 1, K = 1;  // filter, K = kh*kw taps
  int64_t Ho = 0, Wo = 0, D = 0;  // map
};

// Small per-sample math (the excitation network and the pair view), templated on the acc type A.
template <class A>
struct SmallKernels {
  A (*dot)(const A* a, const A* b, int64_t n);
  void (*axpy)(A alpha, const A* x, A* y, int64_t n);  // y += alpha * x
  // out[k] = sum_i coef[i*cs] * rows[i*len + k] (i < n, in order): GEMV / GEMM rows, deterministic
  void (*weighted_sum)(const A* coef, int64_t cs, const A* rows, int64_t n, int64_t len, A* out);
  // y[i] = max(0, W[i,:] . x), W: [rows, cols]
  void (*gemv_relu)(const A* W, const A* x, int64_t rows, int64_t cols, A* y);
  // gate = sigmoid(W2 h) with W2 given transposed: W2T [R, C]
  void (*excite_gate)(const A* W2T, const A* h, int64_t R, int64_t C, A* gate);
  // dg = G * s * (1 - s); dh_pre[j] = (W2T[j,:] . dg) * (h[j] > 0)
  void (*excite_backward)(const A* G, const A* gate, const A* h, const A* W2T, int64_t R, int64_t C, A* dg,
                          A* dh_pre);
  // y = W^T x, W: [rows, cols] (y has cols entries, overwritten)
  void (*gemv_t)(const A* W, const A* x, int64_t rows, int64_t cols, A* y);
  // Qc[k*D + d] = (tap k of the pair view at position d) - ref[k]. scratch: Hp*Wp values.
  void (*gather_patches)(const A* pool_u, const A* pool_x, const PairGeom& geo, const A* ref, A* Qc, A* scratch);
  // c2[k*K + l] = Qc[k,:] . Qc[l,:]
  void (*patch_moments)(const A* Qc, int64_t K, int64_t D, A* c2);
  // v[d] = b + sum_k w[k] * Qc[k,d]
  void (*patch_combine)(const A* Qc, const A* w, A b, int64_t K, int64_t D, A* v);
  // v[d] = b + sum_k w[k] * (tap k of the pair view at position d): patch_combine with ref = 0,
  // without the patch matrix. scratch: conv_scratch(geo) values.
  void (*pair_conv)(const A* pool_u, const A* pool_x, const PairGeom& geo, const A* w, A b, A* v, A* scratch);
  int64_t (*conv_scratch)(const PairGeom& geo);
  // dq[k,d] = w[k]*dv[d] + cvec[k] - sum_l B[k,l]*Qc[l,d] (B may be null), scattered back onto the pair
  // view (a transposed conv) and accumulated into dpool_u / dpool_x (C each). scratch: K*D + Hp*Wp values.
  void (*patch_scatter)(const A* dv, const A* Qc, const A* w, const A* cvec, const A* B, const PairGeom& geo,
                        A* dpool_u, A* dpool_x, A* scratch);
};

template <class S> const StreamKernels<S>& stream_kernels();
template <class A> const SmallKernels<A>& small_kernels();
const char* isa_name();  // "avx2" or "default"

// Per-ISA tables (defined in kernels_default.cpp / kernels_avx2.cpp).
namespace isa_default {
template <class S> const StreamKernels<S>& stream_table();
template <class A> const SmallKernels<A>& small_table();
}  // namespace isa_default
namespace isa_avx2 {
template <class S> const StreamKernels<S>& stream_table();
template <class A> const SmallKernels<A>& small_table();
}  // namespace isa_avx2

}  // namespace cpu
}  // namespace cmpe_se
