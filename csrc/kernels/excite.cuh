// The small per-sample network of CMPE-SE (SPEC sections 1-2): pair map / fold, pair-view conv,
// BatchNorm, filter average, fc1 -> relu -> fc2 -> sigmoid, and its backward. O(N*C) work,
// done by the persistent grid one sample per block (samples strided over blocks), operands
// staged in shared memory, every sum in a fixed order.
#pragma once

#include "kernels/common.cuh"

namespace cmpe_se {

template <int MODE> struct PatchSize { static constexpr int K = 1; };
template <> struct PatchSize<(int)Mode::PAIR_2X1> { static constexpr int K = 2; };
template <> struct PatchSize<(int)Mode::FOLDED_3X3> { static constexpr int K = 9; };

// Shared-memory views (SmemPlan in cmpe_se.h gives the offsets).
template <typename A>
struct Smem {
  double* red;
  double* mom;
  A *su, *sx, *sdg, *sz, *sh, *filt;
  int fs;
  __device__ Smem(unsigned char* base, const SmemPlan& pl, const Geometry& g)
      : red(reinterpret_cast<double*>(base + pl.red)),
        mom(reinterpret_cast<double*>(base + pl.mom)),
        su(reinterpret_cast<A*>(base + pl.su)),
        sx(reinterpret_cast<A*>(base + pl.sx)),
        sdg(reinterpret_cast<A*>(base + pl.sdg)),
        sz(reinterpret_cast<A*>(base + pl.sz)),
        sh(reinterpret_cast<A*>(base + pl.sh)),
        filt(reinterpret_cast<A*>(base + pl.filt)),
        fs(filt_stride(g)) {}
};

// filter table row: w[K], mu, invstd, gamma, beta, m2
enum FiltSlot { F_MU = 0, F_INV = 1, F_GAMMA = 2, F_BETA = 3, F_M2 = 4 };

__device__ __forceinline__ float sigmoid_acc(float v) { return 1.f / (1.f + __expf(-v)); }
__device__ __forceinline__ double sigmoid_acc(double v) { return 1.0 / (1.0 + exp(-v)); }

// The patch under the filter at map position l of one sample (pools staged in su, sx).
template <int MODE, typename A>
__device__ __forceinline__ void patch(const Geometry& g, const A* su, const A* sx, int l,
                                      A (&q)[PatchSize<MODE>::K]) {
  if constexpr (MODE == (int)Mode::PAIR_2X1) {
    q[0] = su[l];
    q[1] = sx[l];
  } else if constexpr (MODE == (int)Mode::PAIR_1X1) {
    q[0] = (l & 1) ? sx[l >> 1] : su[l >> 1];
  } else {
    const int orow = l / g.Wo, ocol = l - (l / g.Wo) * g.Wo;
    const int rows = 2 * (g.C / g.fold_m);
#pragma unroll
    for (int dr = 0; dr < 3; ++dr) {
#pragma unroll
      for (int dc = 0; dc < 3; ++dc) {
        const int fr = orow + dr - g.pad, fc = ocol + dc - g.pad;
        const bool in = fr >= 0 && fr < rows && fc >= 0 && fc < g.fold_m;
        const int c = (fr >> 1) * g.fold_m + fc;
        q[dr * 3 + dc] = in ? ((fr & 1) ? sx[c] : su[c]) : A(0);
      }
    }
  }
}

template <int K, typename A>
__device__ __forceinline__ A filt_dot(const A* f, const A (&q)[K]) {
  A a = A(0);
#pragma unroll
  for (int k = 0; k < K; ++k) a += f[k] * q[k];
  return a;
}

// v[l] = mean_i (gamma_i * (a_i - mu_i) * invstd_i + beta_i): the averaged BN map, z = v.
// fwd: b = (a - mu) * (invstd * gamma) + beta; bwd recompute: ((a - mu) * invstd) * gamma + beta
// (the reference's two spellings; both equal in exact arithmetic).
template <int MODE, bool BWD_ORDER, typename A>
__device__ __forceinline__ A averaged_map(const Geometry& g, const Smem<A>& sm, int l) {
  constexpr int K = PatchSize<MODE>::K;
  A q[K];
  patch<MODE, A>(g, sm.su, sm.sx, l, q);
  A s = A(0);
  for (int i = 0; i < g.e; ++i) {
    const A* f = sm.filt + i * sm.fs;
    const A a = filt_dot<K, A>(f, q);
    if (BWD_ORDER)
      s += ((a - f[K + F_MU]) * f[K + F_INV]) * f[K + F_GAMMA] + f[K + F_BETA];
    else
      s += (a - f[K + F_MU]) * (f[K + F_INV] * f[K + F_GAMMA]) + f[K + F_BETA];
  }
  return s / A(g.e);
}

// Stage the filter table: weights, the statistics used to normalise (written by the last block
// of a grid barrier: plain loads), affine parameters.
template <int MODE, typename A>
__device__ void stage_filters(const Geometry& g, const Smem<A>& sm, const A* pair_w, const A* bn_mean,
                              const A* bn_invstd, const A* bn_w, const A* bn_b, const double* m2) {
  constexpr int K = PatchSize<MODE>::K;
  for (int i = threadIdx.x; i < g.e; i += blockDim.x) {
    A* f = sm.filt + i * sm.fs;
#pragma unroll
    for (int k = 0; k < K; ++k) f[k] = pair_w[i * K + k];
    f[K + F_MU] = bn_mean[i];
    f[K + F_INV] = bn_invstd[i];
    f[K + F_GAMMA] = bn_w[i];
    f[K + F_BETA] = bn_b[i];
    f[K + F_M2] = m2 ? A(m2[i]) : A(0);
  }
}

// Evaluation-mode filter table straight from the running statistics (the per-sample path,
// which has no grid barrier to publish bn_mean / bn_invstd first; same arithmetic as the
// forward's saved statistics).
template <int MODE, typename A>
__device__ void stage_filters_running(const Geometry& g, const Smem<A>& sm, const A* pair_w, const void* rm,
                                      const void* rv, StatDtype t, double eps, const A* bn_w, const A* bn_b) {
  constexpr int K = PatchSize<MODE>::K;
  for (int i = threadIdx.x; i < g.e; i += blockDim.x) {
    A* f = sm.filt + i * sm.fs;
#pragma unroll
    for (int k = 0; k < K; ++k) f[k] = pair_w[i * K + k];
    const A var = (A)load_stat(rv, t, i);
    f[K + F_MU] = (A)load_stat(rm, t, i);
    f[K + F_INV] = A(1) / sqrt(var + (A)eps);
    f[K + F_GAMMA] = bn_w[i];
    f[K + F_BETA] = bn_b[i];
    f[K + F_M2] = A(0);
  }
}

// out(o, sum_t W[o*so + t*st] * vec[t]) for o < nout: one warp per output, lanes along t.
template <typename A, typename F>
__device__ __forceinline__ void warp_dots(const A* W, long long so, long long st, const A* vec, int len,
                                          int nout, F&& out) {
  const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int o = threadIdx.x >> 5; o < nout; o += nwarps) {
    A s = A(0);
    for (int t = lane; t < len; t += 32) s += W[o * so + t * st] * vec[t];
    s = warp_sum(s);
    if (lane == 0) out(o, s);
  }
}

// Same, one thread per output (for outputs that are contiguous across threads).
template <typename A, typename F>
__device__ __forceinline__ void thread_dots(const A* W, long long so, long long st, const A* vec, int len,
                                            int nout, F&& out) {
  for (int o = threadIdx.x; o < nout; o += blockDim.x) {
    A s = A(0);
    for (int t = 0; t < len; ++t) s += W[o * so + t * st] * vec[t];
    out(o, s);
  }
}

// Per-block partial moments over the map positions of samples n = blockIdx.x, +gridDim.x, ...
// Layout of dst (doubles): [D, T(K), Q(K), QQ(K*K)] where D = sum dv, T = sum dv*q,
// Q = sum q, QQ = sum q q^T. With dv == nullptr only Q, QQ are formed (forward statistics).
// Doubles: the variance and the BN weight gradients are formed from these uncentred moments,
// exact enough in double for any realistic mean/std ratio.
template <int MODE, typename A>
__device__ void accumulate_moments(const Geometry& g, const Smem<A>& sm, const A* dv, bool want_qq) {
  constexpr int K = PatchSize<MODE>::K;
  double* acc = sm.mom;
  if (dv) {
    double v[K + 1];
#pragma unroll
    for (int k = 0; k <= K; ++k) v[k] = 0.0;
    for (int l = threadIdx.x; l < g.L; l += blockDim.x) {
      A q[K];
      patch<MODE, A>(g, sm.su, sm.sx, l, q);
      const double d = (double)dv[l];
      v[0] += d;
#pragma unroll
      for (int k = 0; k < K; ++k) v[1 + k] += d * (double)q[k];
    }
    block_sum_add<K + 1>(v, sm.red, acc);
  }
  if (!want_qq) return;
  {
    double v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = 0.0;
    for (int l = threadIdx.x; l < g.L; l += blockDim.x) {
      A q[K];
      patch<MODE, A>(g, sm.su, sm.sx, l, q);
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += (double)q[k];
    }
    block_sum_add<K>(v, sm.red, acc + 1 + K);
  }
  for (int k1 = 0; k1 < K; ++k1) {
    double v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = 0.0;
    for (int l = threadIdx.x; l < g.L; l += blockDim.x) {
      A q[K];
      patch<MODE, A>(g, sm.su, sm.sx, l, q);
      double qk1 = 0.0;
#pragma unroll
      for (int k = 0; k < K; ++k) qk1 = (k == k1) ? (double)q[k] : qk1;
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += qk1 * (double)q[k];
    }
    block_sum_add<K>(v, sm.red, acc + 1 + 2 * K + k1 * K);
  }
}

constexpr int moment_count(int K) { return 1 + 2 * K + K * K; }

// Sum the per-block moment slots in slot order into sm.mom (whole block).
__device__ __forceinline__ void reduce_moment_slots(const double* slots, int nslots, int count, double* dst) {
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    double s = 0.0;
    for (int b = 0; b < nslots; ++b) s += slots[(long long)b * count + t];
    dst[t] = s;
  }
  __syncthreads();
}

}  // namespace cmpe_se
