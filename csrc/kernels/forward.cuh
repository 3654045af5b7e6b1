// CMPE-SE forward: one persistent, cooperative launch.
//
//   A  squeeze         U, X -> per-(n, c, split) partial sums            (reads 2T)
//   -- grid barrier -- (training pair modes: + per-block patch moments, then a barrier whose
//                       last block reduces them: batch mean/var, running stats)
//   B  excite          per sample: pools, pair map, BN, average, fc1, relu, fc2, sigmoid
//   -- grid barrier --
//   C  apply           Y = s*U + X                                       (reads 2T, writes T)
//
// Y depends on the batch only through the BN statistics, so each barrier is a real data
// dependency; the grid is sized to be co-resident (launcher).
#pragma once

#include "kernels/common.cuh"
#include "kernels/excite.cuh"
#include "kernels/stream.cuh"

namespace cmpe_se {

template <typename T>
struct FwdWork {
  using A = acc_t<T>;
  A* part_u;
  A* part_x;
  __device__ FwdWork(const ForwardParams& p, int S)
      : part_u(static_cast<A*>(p.part)), part_x(static_cast<A*>(p.part) + (long long)p.g.N * S * p.g.C) {}
};

// Pools of sample n from the split partials (fixed s order); optionally write the saved outputs.
template <typename T>
__device__ void fwd_stage_pools(const ForwardParams& p, const FwdWork<T>& w, int S, int n, const Smem<acc_t<T>>& sm,
                                bool need_x, bool write_out) {
  using A = acc_t<T>;
  const Geometry& g = p.g;
  for (int c = threadIdx.x; c < g.C; c += blockDim.x) {
    A su = A(0), sx = A(0);
    for (int s = 0; s < S; ++s) {
      const long long o = ((long long)n * S + s) * g.C + c;
      su += w.part_u[o];
      sx += w.part_x[o];
    }
    su = su / A(g.P);
    sx = sx / A(g.P);
    sm.su[c] = su;
    if (need_x) sm.sx[c] = sx;
    if (write_out) {
      static_cast<A*>(p.pool_u)[(long long)n * g.C + c] = su;
      static_cast<A*>(p.pool_x)[(long long)n * g.C + c] = sx;
    }
  }
}

// Last block of the statistics barrier: batch mean / biased variance per filter from the
// patch moments, the saved statistics and the running-statistics update (nn.BatchNorm2d).
template <int MODE, typename T>
__device__ void fwd_stats_last(const ForwardParams& p, const Smem<acc_t<T>>& sm) {
  using A = acc_t<T>;
  constexpr int K = PatchSize<MODE>::K;
  const Geometry& g = p.g;
  const int count = moment_count(K);
  reduce_moment_slots(static_cast<const double*>(p.stat_part), gridDim.x, count, sm.mom);
  const double M = (double)g.N * g.L;
  const double* Q = sm.mom + 1 + K;
  double* cov = sm.mom + 1 + 2 * K;  // QQ, turned in place into the biased patch covariance
  for (int t = threadIdx.x; t < K * K; t += blockDim.x) cov[t] = cov[t] / M - (Q[t / K] / M) * (Q[t % K] / M);
  __syncthreads();
  const A* pw = static_cast<const A*>(p.pair_w);
  for (int i = threadIdx.x; i < g.e; i += blockDim.x) {
    double mu = 0.0, var = 0.0;
#pragma unroll 1
    for (int k1 = 0; k1 < K; ++k1) {
      const double w1 = (double)pw[i * K + k1];
      mu += w1 * Q[k1] / M;
      double row = 0.0;
#pragma unroll 1
      for (int k2 = 0; k2 < K; ++k2) row += (double)pw[i * K + k2] * cov[k1 * K + k2];
      var += w1 * row;
    }
    var = var < 0.0 ? 0.0 : var;  // rounding can go below 0; NaN propagates
    static_cast<A*>(p.bn_mean)[i] = (A)mu;
    static_cast<A*>(p.bn_invstd)[i] = (A)(1.0 / sqrt(var + p.eps));
    const double rm = load_stat(p.running_mean, p.stat_dtype, i);
    const double rv = load_stat(p.running_var, p.stat_dtype, i);
    store_stat(p.running_mean, p.stat_dtype, i, (1.0 - p.momentum) * rm + p.momentum * mu);
    store_stat(p.running_var, p.stat_dtype, i, (1.0 - p.momentum) * rv + p.momentum * var * M / (M - 1.0));
  }
}

// Evaluation: the running statistics are the statistics (in the acc dtype, like the reference).
template <typename T>
__device__ void fwd_stats_eval(const ForwardParams& p) {
  using A = acc_t<T>;
  for (int i = threadIdx.x; i < p.g.e; i += blockDim.x) {
    const A mu = (A)load_stat(p.running_mean, p.stat_dtype, i);
    const A var = (A)load_stat(p.running_var, p.stat_dtype, i);
    static_cast<A*>(p.bn_mean)[i] = mu;
    static_cast<A*>(p.bn_invstd)[i] = A(1) / sqrt(var + (A)p.eps);
  }
}

// Phase B for one sample, pools already staged in sm.su / sm.sx (and the filter table in pair
// modes): relation vector z, hidden, gate. write_out: store hidden and gate to the saved outputs;
// sgate (may be null): also keep the gate in shared memory.
template <int MODE, typename T>
__device__ void fwd_excite_staged(const ForwardParams& p, int n, const Smem<acc_t<T>>& sm, bool write_out,
                                  acc_t<T>* sgate) {
  using A = acc_t<T>;
  const Geometry& g = p.g;
  constexpr bool kPair = MODE >= (int)Mode::PAIR_2X1;
  const A* z = sm.su;
  if constexpr (kPair) {
    for (int l = threadIdx.x; l < g.L; l += blockDim.x) sm.sz[l] = averaged_map<MODE, false, A>(g, sm, l);
    z = sm.sz;
    __syncthreads();
  }
  A* hidden = static_cast<A*>(p.hidden) + (long long)n * g.Rh;
  auto put_h = [&](int o, A s) {
    s = s < A(0) ? A(0) : s;  // relu; NaN propagates, as torch.relu
    sm.sh[o] = s;
    if (write_out) hidden[o] = s;
  };
  const A* W1 = static_cast<const A*>(p.fc1_w);
  warp_dots(W1, g.Dz, 1, z, g.Dz, g.r, put_h);
  if constexpr (MODE == (int)Mode::DOUBLE_FC) {
    warp_dots(static_cast<const A*>(p.fc1_id_w), g.C, 1, sm.sx, g.C, g.r,
              [&](int o, A s) { put_h(g.r + o, s); });
  }
  __syncthreads();
  A* gate = static_cast<A*>(p.gate) + (long long)n * g.C;
  thread_dots(static_cast<const A*>(p.fc2_w), g.Rh, 1, sm.sh, g.Rh, g.C, [&](int o, A s) {
    const A v = sigmoid_acc(s);
    if (write_out) gate[o] = v;
    if (sgate) sgate[o] = v;
  });
  __syncthreads();
}

// Phase B for one sample from the squeeze partials: pools (saved), then fwd_excite_staged.
template <int MODE, typename T>
__device__ void fwd_excite(const ForwardParams& p, const FwdWork<T>& w, int S, int n, const Smem<acc_t<T>>& sm) {
  constexpr bool kPair = MODE >= (int)Mode::PAIR_2X1;
  const bool need_x = kPair || MODE == (int)Mode::DOUBLE_FC;
  fwd_stage_pools<T>(p, w, S, n, sm, need_x, true);
  __syncthreads();
  fwd_excite_staged<MODE, T>(p, n, sm, true, nullptr);
}

template <int MODE, typename T, int V>
__device__ void forward_body(const ForwardParams& p, const Launch& l, const Smem<acc_t<T>>& sm, unsigned char* smem) {
  using A = acc_t<T>;
  const Geometry& g = p.g;
  const int S = l.splits;
  FwdWork<T> w(p, S);
  const T* u = static_cast<const T*>(p.u);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  GridBarrier bar{p.counter, 0u};

  const long long ips = items_per_sample(g, S, l.cv, V);
  const bool per_warp = !g.channels_last;
  const A* gate = static_cast<const A*>(p.gate);
  auto squeeze = [&](const ItemRange& r) {
    if (g.channels_last)
      squeeze_cl<false, T, V>(g, S, l.cv, u, x, w.part_u, w.part_x, reinterpret_cast<A*>(smem), r.it0, r.it1, r.wid,
                              r.nw);
    else
      squeeze_nchw<false, T, V>(g, S, l.gw, u, x, w.part_u, w.part_x, r.it0, r.it1, r.wid, r.nw);
  };
  auto apply = [&](const ItemRange& r) {
    if (g.channels_last)
      apply_cl<false, T, V>(g, S, l.cv, u, x, y, y, gate, gate, gate, r.it0, r.it1, r.wid, r.nw);
    else
      apply_nchw<false, T, V>(g, S, l.gw, u, x, y, y, gate, gate, gate, r.it0, r.it1, r.wid, r.nw);
  };

  constexpr bool kPair = MODE >= (int)Mode::PAIR_2X1;
  if (l.per_sample && !(kPair && p.training)) {
    // Samples are independent (no batch statistics): each block owns whole samples, squeeze,
    // excite and apply with block barriers only. Launch option CMPE_SE_CUDA_PATH=per_sample.
    if (kPair && blockIdx.x == 0) fwd_stats_eval<T>(p);
    for (int n = blockIdx.x; n < g.N; n += gridDim.x) {
      squeeze(ItemRange::sample(ips, n, per_warp));
      __syncthreads();
      if constexpr (kPair)  // after the squeeze: its channels_last scratch aliases the table
        stage_filters_running<MODE, A>(g, sm, static_cast<const A*>(p.pair_w), p.running_mean, p.running_var,
                                       p.stat_dtype, p.eps, static_cast<const A*>(p.bn_w),
                                       static_cast<const A*>(p.bn_b));
      fwd_excite<MODE, T>(p, w, S, n, sm);  // starts with a block barrier after its own staging
      apply(ItemRange::sample(ips, n, per_warp));
    }
    return;
  }

  squeeze(ItemRange::grid(g.N * ips, per_warp));

  if constexpr (kPair) {
    if (p.training) {
      bar.sync();  // partial pools complete
      constexpr int K = PatchSize<MODE>::K;
      for (int t = threadIdx.x; t < kMomMax; t += blockDim.x) sm.mom[t] = 0.0;
      __syncthreads();
      for (int n = blockIdx.x; n < g.N; n += gridDim.x) {
        fwd_stage_pools<T>(p, w, S, n, sm, true, false);
        __syncthreads();
        accumulate_moments<MODE, A>(g, sm, nullptr, true);
      }
      double* slot = static_cast<double*>(p.stat_part) + (long long)blockIdx.x * moment_count(K);
      for (int t = threadIdx.x; t < moment_count(K); t += blockDim.x) slot[t] = sm.mom[t];
      bar.sync([&] { fwd_stats_last<MODE, T>(p, sm); });
    } else {
      bar.sync([&] { fwd_stats_eval<T>(p); });
    }
    stage_filters<MODE, A>(g, sm, static_cast<const A*>(p.pair_w), static_cast<const A*>(p.bn_mean),
                           static_cast<const A*>(p.bn_invstd), static_cast<const A*>(p.bn_w),
                           static_cast<const A*>(p.bn_b), nullptr);
    __syncthreads();
  } else {
    bar.sync();
  }

  for (int n = blockIdx.x; n < g.N; n += gridDim.x) fwd_excite<MODE, T>(p, w, S, n, sm);
  bar.sync();

  apply(ItemRange::grid(g.N * ips, per_warp));
}

template <typename T, int V>
__global__ void __launch_bounds__(512, 1) cmpe_se_forward_kernel(ForwardParams p, Launch l) {
  CMPE_SE_DYNAMIC_SMEM(smem);
  const SmemPlan pl = smem_plan(p.g, (int)sizeof(acc_t<T>), false, l.threads, l.vec);
  const Smem<acc_t<T>> sm(smem, pl, p.g);
  switch (p.g.mode) {
    case Mode::SE: forward_body<(int)Mode::SE, T, V>(p, l, sm, smem); break;
    case Mode::DOUBLE_FC: forward_body<(int)Mode::DOUBLE_FC, T, V>(p, l, sm, smem); break;
    case Mode::PAIR_2X1: forward_body<(int)Mode::PAIR_2X1, T, V>(p, l, sm, smem); break;
    case Mode::PAIR_1X1: forward_body<(int)Mode::PAIR_1X1, T, V>(p, l, sm, smem); break;
    default: forward_body<(int)Mode::FOLDED_3X3, T, V>(p, l, sm, smem); break;
  }
}

}  // namespace cmpe_se
