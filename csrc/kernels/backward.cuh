// CMPE-SE backward: one persistent, cooperative launch.
//
//   A   G = sum_p dY*U per (n, c, split)                                   (reads 2T)
//   -- grid barrier --
//   B1  per sample: dg, dh_pre, then du/dx (se, double_fc) or dv = dz and the recomputed
//       z = v (pair modes) plus per-block patch moments of dv and q
//   -- grid barrier (pair: the last block reduces the moments: dgamma, dbeta, pair-weight
//      grads, and the batch means mean(db), mean(db*n_hat) of the BN backward) --
//   B2  pair modes, per sample: da_i, the transposed pair-view conv -> du, dx.
//       all modes: fc weight gradients, sum over n in order (grid-strided elements)
//   -- grid barrier (pair modes only) --
//   C   dU = s*dY + du/P, dX = dY + dx/P                                 (reads T, writes 2T)
#pragma once

#include "kernels/common.cuh"
#include "kernels/excite.cuh"
#include "kernels/stream.cuh"

namespace cmpe_se {

// B1 for one sample.
template <int MODE, typename T>
__device__ void bwd_excite(const BackwardParams& p, int S, int n, const Smem<acc_t<T>>& sm, bool moments) {
  using A = acc_t<T>;
  const Geometry& g = p.g;
  constexpr bool kPair = MODE >= (int)Mode::PAIR_2X1;
  const A* gpart = static_cast<const A*>(p.gpart);
  const A* gate = static_cast<const A*>(p.gate) + (long long)n * g.C;
  A* dg = static_cast<A*>(p.dg) + (long long)n * g.C;
  for (int c = threadIdx.x; c < g.C; c += blockDim.x) {
    A G = A(0);
    for (int s = 0; s < S; ++s) G += gpart[((long long)n * S + s) * g.C + c];
    const A sg = gate[c];
    const A d = G * sg * (A(1) - sg);
    sm.sdg[c] = d;
    dg[c] = d;
    if (kPair) {
      sm.su[c] = static_cast<const A*>(p.pool_u)[(long long)n * g.C + c];
      sm.sx[c] = static_cast<const A*>(p.pool_x)[(long long)n * g.C + c];
    }
  }
  __syncthreads();
  const A* hidden = static_cast<const A*>(p.hidden) + (long long)n * g.Rh;
  A* dhp = static_cast<A*>(p.dhp) + (long long)n * g.Rh;
  warp_dots(static_cast<const A*>(p.fc2_w), 1, g.Rh, sm.sdg, g.C, g.Rh, [&](int o, A s) {
    s = hidden[o] > A(0) ? s : A(0);
    sm.sh[o] = s;
    dhp[o] = s;
  });
  __syncthreads();
  const A* W1 = static_cast<const A*>(p.fc1_w);
  A* du = static_cast<A*>(p.dudx) + (long long)n * g.C;
  A* dx = du + (long long)g.N * g.C;
  if constexpr (MODE == (int)Mode::SE) {
    thread_dots(W1, 1, g.C, sm.sh, g.r, g.C, [&](int o, A s) {
      du[o] = s;
      dx[o] = A(0);
    });
  } else if constexpr (MODE == (int)Mode::DOUBLE_FC) {
    thread_dots(W1, 1, g.C, sm.sh, g.r, g.C, [&](int o, A s) { du[o] = s; });
    thread_dots(static_cast<const A*>(p.fc1_id_w), 1, g.C, sm.sh + g.r, g.r, g.C, [&](int o, A s) { dx[o] = s; });
  } else {
    A* dv = static_cast<A*>(p.dv) + (long long)n * g.L;
    A* z = static_cast<A*>(p.zbuf) + (long long)n * g.L;
    thread_dots(W1, 1, g.L, sm.sh, g.r, g.L, [&](int o, A s) {
      sm.sz[o] = s;
      dv[o] = s;
      z[o] = averaged_map<MODE, true, A>(g, sm, o);
    });
    __syncthreads();
    if (moments) accumulate_moments<MODE, A>(g, sm, sm.sz, p.training);
  }
  __syncthreads();
}

// Last block of the B1 barrier: moments -> BN and pair-weight gradients, and the batch means
// of the training-mode BN backward (fin[i] = mean(db_i * n_hat_i), fin[e] = mean(db)).
template <int MODE, typename T>
__device__ void bwd_stats_last(const BackwardParams& p, const Smem<acc_t<T>>& sm) {
  using A = acc_t<T>;
  constexpr int K = PatchSize<MODE>::K;
  const Geometry& g = p.g;
  reduce_moment_slots(static_cast<const double*>(p.part1), gridDim.x, moment_count(K), sm.mom);
  const double M = (double)g.N * g.L, e = (double)g.e;
  const double D = sm.mom[0];
  const double* Tm = sm.mom + 1;
  const double* Q = sm.mom + 1 + K;
  const double* QQ = sm.mom + 1 + 2 * K;
  const A* pw = static_cast<const A*>(p.pair_w);
  double* fin = static_cast<double*>(p.fin);
  const double S1 = D / e;  // sum(db), the same for every filter
  for (int i = threadIdx.x; i < g.e; i += blockDim.x) {
    double wt = 0.0;
#pragma unroll 1
    for (int k = 0; k < K; ++k) wt += (double)pw[i * K + k] * Tm[k];
    const double mu = (double)static_cast<const A*>(p.bn_mean)[i];
    const double inv = (double)static_cast<const A*>(p.bn_invstd)[i];
    const double c = (double)static_cast<const A*>(p.bn_w)[i] * inv;
    const double S2 = inv / e * (wt - mu * D);  // sum(db * n_hat)
    static_cast<A*>(p.d_bn_w)[i] = (A)S2;
    static_cast<A*>(p.d_bn_b)[i] = (A)S1;
    fin[i] = S2 / M;
#pragma unroll 1
    for (int k = 0; k < K; ++k) {
      double dw = Tm[k] / e;
      if (p.training) {
        double wqq = 0.0;
#pragma unroll 1
        for (int k2 = 0; k2 < K; ++k2) wqq += (double)pw[i * K + k2] * QQ[k2 * K + k];
        dw += -(S1 / M) * Q[k] - inv * (S2 / M) * (wqq - mu * Q[k]);
      }
      static_cast<A*>(p.d_pair)[i * K + k] = (A)(c * dw);
    }
  }
  if (threadIdx.x == 0) fin[g.e] = S1 / M;
}

// da_i at one map position (SPEC section 2), given the patch q and dv there.
template <int K, typename A>
__device__ __forceinline__ void accumulate_dq(const Geometry& g, const A* filt, int fs, const A (&q)[K], A dvl,
                                              A m1, bool training, A (&dq)[K]) {
  const A db = dvl / A(g.e);
  for (int i = 0; i < g.e; ++i) {
    const A* f = filt + i * fs;
    const A scale = f[K + F_GAMMA] * f[K + F_INV];
    A da;
    if (training) {
      const A nh = (filt_dot<K, A>(f, q) - f[K + F_MU]) * f[K + F_INV];
      da = scale * (db - m1 - nh * f[K + F_M2]);
    } else {
      da = scale * db;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) dq[k] += da * f[k];
  }
}

// B2 for one sample of a pair mode: the transposed pair-view conv, scattered onto du, dx.
template <int MODE, typename T>
__device__ void bwd_pair_dq(const BackwardParams& p, int n, const Smem<acc_t<T>>& sm, acc_t<T> m1) {
  using A = acc_t<T>;
  constexpr int K = PatchSize<MODE>::K;
  const Geometry& g = p.g;
  for (int c = threadIdx.x; c < g.C; c += blockDim.x) {
    sm.su[c] = static_cast<const A*>(p.pool_u)[(long long)n * g.C + c];
    sm.sx[c] = static_cast<const A*>(p.pool_x)[(long long)n * g.C + c];
  }
  const A* dvg = static_cast<const A*>(p.dv) + (long long)n * g.L;
  for (int l = threadIdx.x; l < g.L; l += blockDim.x) sm.sz[l] = dvg[l];
  __syncthreads();
  A* du = static_cast<A*>(p.dudx) + (long long)n * g.C;
  A* dx = du + (long long)g.N * g.C;
  if constexpr (MODE == (int)Mode::PAIR_2X1 || MODE == (int)Mode::PAIR_1X1) {
    for (int c = threadIdx.x; c < g.C; c += blockDim.x) {
      if constexpr (MODE == (int)Mode::PAIR_2X1) {
        A q[K], dq[K] = {A(0), A(0)};
        patch<MODE, A>(g, sm.su, sm.sx, c, q);
        accumulate_dq<K, A>(g, sm.filt, sm.fs, q, sm.sz[c], m1, p.training, dq);
        du[c] = dq[0];
        dx[c] = dq[1];
      } else {
        A qu[1] = {sm.su[c]}, qx[1] = {sm.sx[c]}, dqu[1] = {A(0)}, dqx[1] = {A(0)};
        accumulate_dq<1, A>(g, sm.filt, sm.fs, qu, sm.sz[2 * c], m1, p.training, dqu);
        accumulate_dq<1, A>(g, sm.filt, sm.fs, qx, sm.sz[2 * c + 1], m1, p.training, dqx);
        du[c] = dqu[0];
        dx[c] = dqx[0];
      }
    }
  } else {
    // dq per map position into this block's scratch, then gather onto the fold (a transposed
    // conv written as a gather: no atomics, fixed order).
    A* scratch = static_cast<A*>(p.dq) + (long long)blockIdx.x * g.L * K;
    for (int l = threadIdx.x; l < g.L; l += blockDim.x) {
      A q[K], dq[K];
#pragma unroll
      for (int k = 0; k < K; ++k) dq[k] = A(0);
      patch<MODE, A>(g, sm.su, sm.sx, l, q);
      accumulate_dq<K, A>(g, sm.filt, sm.fs, q, sm.sz[l], m1, p.training, dq);
#pragma unroll
      for (int k = 0; k < K; ++k) scratch[(long long)l * K + k] = dq[k];
    }
    __syncthreads();
    const int rows = 2 * (g.C / g.fold_m);
    for (int f = threadIdx.x; f < rows * g.fold_m; f += blockDim.x) {
      const int fr = f / g.fold_m, fc = f - (f / g.fold_m) * g.fold_m;
      A s = A(0);
#pragma unroll
      for (int dr = 0; dr < 3; ++dr) {
#pragma unroll
        for (int dc = 0; dc < 3; ++dc) {
          const int orow = fr - dr + g.pad, ocol = fc - dc + g.pad;
          if (orow >= 0 && orow < g.Ho && ocol >= 0 && ocol < g.Wo)
            s += scratch[(long long)(orow * g.Wo + ocol) * K + dr * 3 + dc];
        }
      }
      const int c = (fr >> 1) * g.fold_m + fc;
      if (fr & 1)
        dx[c] = s;
      else
        du[c] = s;
    }
  }
  __syncthreads();
}

// fc weight gradients: one grid thread per element, sum over the batch in order.
template <typename T>
__device__ void bwd_weight_grads(const BackwardParams& p) {
  using A = acc_t<T>;
  const Geometry& g = p.g;
  const long long n2 = (long long)g.C * g.Rh, n1 = (long long)g.r * g.Dz;
  const long long n1i = g.mode == Mode::DOUBLE_FC ? (long long)g.r * g.C : 0;
  const A* dg = static_cast<const A*>(p.dg);
  const A* dhp = static_cast<const A*>(p.dhp);
  const A* hidden = static_cast<const A*>(p.hidden);
  const bool pair = is_pair_mode(g.mode);
  const A* z = pair ? static_cast<const A*>(p.zbuf) : static_cast<const A*>(p.pool_u);
  const A* px = static_cast<const A*>(p.pool_x);
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n2 + n1 + n1i; idx += stride) {
    A s = A(0);
    if (idx < n2) {
      const int c = (int)(idx / g.Rh), j = (int)(idx - (idx / g.Rh) * g.Rh);
      for (int n = 0; n < g.N; ++n) s += dg[(long long)n * g.C + c] * hidden[(long long)n * g.Rh + j];
      static_cast<A*>(p.d_fc2)[idx] = s;
    } else if (idx < n2 + n1) {
      const long long k = idx - n2;
      const int j = (int)(k / g.Dz), t = (int)(k - (k / g.Dz) * g.Dz);
      for (int n = 0; n < g.N; ++n) s += dhp[(long long)n * g.Rh + j] * z[(long long)n * g.Dz + t];
      static_cast<A*>(p.d_fc1)[k] = s;
    } else {
      const long long k = idx - n2 - n1;
      const int j = (int)(k / g.C), c = (int)(k - (k / g.C) * g.C);
      for (int n = 0; n < g.N; ++n) s += dhp[(long long)n * g.Rh + g.r + j] * px[(long long)n * g.C + c];
      static_cast<A*>(p.d_fc1_id)[k] = s;
    }
  }
}

template <int MODE, typename T, int V>
__device__ void backward_body(const BackwardParams& p, const Launch& l, const Smem<acc_t<T>>& sm,
                              unsigned char* smem) {
  using A = acc_t<T>;
  const Geometry& g = p.g;
  const int S = l.splits;
  const T* dy = static_cast<const T*>(p.dy);
  const T* u = static_cast<const T*>(p.u);
  A* gpart = static_cast<A*>(p.gpart);
  GridBarrier bar{p.counter, 0u};

  const long long items = g.N * items_per_sample(g, S, l.cv, V);
  const ItemRange all = ItemRange::grid(items, !g.channels_last);
  if (g.channels_last)
    squeeze_cl<true, T, V>(g, S, l.cv, dy, u, gpart, gpart, reinterpret_cast<A*>(smem), all.it0, all.it1, all.wid,
                           all.nw);
  else
    squeeze_nchw<true, T, V>(g, S, l.gw, dy, u, gpart, gpart, all.it0, all.it1, all.wid, all.nw);
  bar.sync();

  constexpr bool kPair = MODE >= (int)Mode::PAIR_2X1;
  if constexpr (kPair) {
    constexpr int K = PatchSize<MODE>::K;
    stage_filters<MODE, A>(g, sm, static_cast<const A*>(p.pair_w), static_cast<const A*>(p.bn_mean),
                           static_cast<const A*>(p.bn_invstd), static_cast<const A*>(p.bn_w),
                           static_cast<const A*>(p.bn_b), nullptr);
    for (int t = threadIdx.x; t < kMomMax; t += blockDim.x) sm.mom[t] = 0.0;
    __syncthreads();
    for (int n = blockIdx.x; n < g.N; n += gridDim.x) bwd_excite<MODE, T>(p, S, n, sm, true);
    double* slot = static_cast<double*>(p.part1) + (long long)blockIdx.x * moment_count(K);
    for (int t = threadIdx.x; t < moment_count(K); t += blockDim.x) slot[t] = sm.mom[t];
    bar.sync([&] { bwd_stats_last<MODE, T>(p, sm); });
    const double* fin = static_cast<const double*>(p.fin);
    for (int i = threadIdx.x; i < g.e; i += blockDim.x) sm.filt[i * sm.fs + K + F_M2] = (A)fin[i];
    const A m1 = (A)fin[g.e];
    __syncthreads();
    for (int n = blockIdx.x; n < g.N; n += gridDim.x) bwd_pair_dq<MODE, T>(p, n, sm, m1);
    bwd_weight_grads<T>(p);
    bar.sync();
  } else {
    for (int n = blockIdx.x; n < g.N; n += gridDim.x) bwd_excite<MODE, T>(p, S, n, sm, false);
    bar.sync();
    bwd_weight_grads<T>(p);
  }

  const A* gate = static_cast<const A*>(p.gate);
  const A* du = static_cast<const A*>(p.dudx);
  const A* dx = du + (long long)g.N * g.C;
  T* o0 = static_cast<T*>(p.du_out);
  T* o1 = static_cast<T*>(p.dx_out);
  if (g.channels_last)
    apply_cl<true, T, V>(g, S, l.cv, dy, dy, o0, o1, gate, du, dx, all.it0, all.it1, all.wid, all.nw);
  else
    apply_nchw<true, T, V>(g, S, l.gw, dy, dy, o0, o1, gate, du, dx, all.it0, all.it1, all.wid, all.nw);
}

template <typename T, int V>
__global__ void __launch_bounds__(512, 1) cmpe_se_backward_kernel(BackwardParams p, Launch l) {
  CMPE_SE_DYNAMIC_SMEM(smem);
  const SmemPlan pl = smem_plan(p.g, (int)sizeof(acc_t<T>), true, l.threads, l.vec);
  const Smem<acc_t<T>> sm(smem, pl, p.g);
  switch (p.g.mode) {
    case Mode::SE: backward_body<(int)Mode::SE, T, V>(p, l, sm, smem); break;
    case Mode::DOUBLE_FC: backward_body<(int)Mode::DOUBLE_FC, T, V>(p, l, sm, smem); break;
    case Mode::PAIR_2X1: backward_body<(int)Mode::PAIR_2X1, T, V>(p, l, sm, smem); break;
    case Mode::PAIR_1X1: backward_body<(int)Mode::PAIR_1X1, T, V>(p, l, sm, smem); break;
    default: backward_body<(int)Mode::FOLDED_3X3, T, V>(p, l, sm, smem); break;
  }
}

}  // namespace cmpe_se
