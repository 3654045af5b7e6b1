// CMPE-SE forward, resident path: U and X stay on chip between the squeeze and the apply.
//
// For the modes whose samples are independent (se, double_fc, evaluation-mode pair views) one
// thread-block cluster of CL blocks owns one sample (grid = N * CL, no grid barrier, no
// persistence). Block `rank` of the cluster owns a contiguous slice of the sample:
//   NCHW:          channels [o0, o1), whole rows of P pixels;
//   channels_last: pixels [o0, o1), whole rows of C channels.
//
//   1  load      the slice of U and of X, global -> shared memory           (reads 2T once)
//   2  partial   per-channel sums of the slice from shared memory, kept in this block's
//                shared memory (NCHW: complete sums of its own channels; channels_last: sums
//                over its pixels for every channel)
//   -- cluster barrier --
//   3  pools     each block gathers the sample's pools from the partials of every block of the
//                cluster through distributed shared memory (channels_last: summed in rank
//                order), then runs the whole small network itself (O(C * r) work: cheaper
//                than another exchange); rank 0 writes the saved outputs
//   4  apply     Y = gate * U + X from shared memory                          (writes T)
//   -- cluster barrier -- (no block leaves while another may still read its partials)
//
// Traffic: the 3T floor of SPEC section 3. Deterministic: every sum in a fixed order. The
// launcher picks CL so that a block's slices fit in shared memory (docs/CUDA.md); CL = 1 is a
// plain launch (no cluster barrier, any architecture).
#pragma once

#include "kernels/common.cuh"
#include "kernels/excite.cuh"
#include "kernels/forward.cuh"

namespace cmpe_se {

// This block's place in the resident grid: sample n, rank in its cluster of CL blocks, its slice
// [o0, o1) of the split axis (rows of `inner` elements: resident_outer / resident_inner), which
// starts at element `base` of the full-size tensors and holds nvec vectors of V elements.
struct ResidentSlice {
  int CL, n, rank, per, o0, o1, nvec;
  long long base;
  template <int V>
  __device__ static ResidentSlice make(const Geometry& g, int cluster) {
    ResidentSlice s;
    s.CL = cluster;
    s.n = blockIdx.x / cluster;
    s.rank = blockIdx.x - s.n * cluster;
    const int outer = resident_outer(g), inner = resident_inner(g);
    s.per = resident_per_block(g, cluster);
    s.o0 = min(outer, s.rank * s.per);
    s.o1 = min(outer, s.o0 + s.per);
    s.base = (long long)s.n * g.C * g.P + (long long)s.o0 * inner;
    s.nvec = (s.o1 - s.o0) * inner / V;  // a slice fits in shared memory: far below 2^31
    return s;
  }
  // Channel c's total of the per-block partials `part` (this block's shared array; the same
  // array in the other blocks through distributed shared memory): NCHW from the block that owns
  // the channel, channels_last summed over the ranks in rank order. After a cluster barrier.
  template <typename A>
  __device__ A gather(const Geometry& g, A* part, int c) const {
    if (CL == 1) return part[c];
    if (!g.channels_last) return *CMPE_SE_CLUSTER_MAP(part + c, c / per);
    A s = A(0);
    for (int r = 0; r < CL; ++r) s += *CMPE_SE_CLUSTER_MAP(part + c, r);
    return s;
  }
  // Barrier after the partials are written: the cluster's, or the block's when CL == 1.
  __device__ void sync() const {
    if (CL > 1)
      CMPE_SE_CLUSTER_SYNC();
    else
      __syncthreads();
  }
};

template <typename A, typename T>
struct ResidentSmem {
  A *pu, *px, *gate;
  T *u, *x;
  __device__ ResidentSmem(unsigned char* base, const ResidentPlan& r)
      : pu(reinterpret_cast<A*>(base + r.pu)),
        px(reinterpret_cast<A*>(base + r.px)),
        gate(reinterpret_cast<A*>(base + r.gate)),
        u(reinterpret_cast<T*>(base + r.u)),
        x(reinterpret_cast<T*>(base + r.x)) {}
};

// Vectors i = threadIdx.x, +blockDim.x, ... < nvec of a slice made of rows of `per_row` vectors:
// f(i, row, col) with row = i / per_row, col = i % per_row tracked incrementally (no integer
// division per vector; slices are far below 2^31 elements, so 32-bit indices).
template <typename F>
__device__ __forceinline__ void for_each_vector(int nvec, int per_row, F&& f) {
  const int bd = blockDim.x, dq = bd / per_row, dr = bd - (bd / per_row) * per_row;
  int row = threadIdx.x / per_row, col = threadIdx.x - (threadIdx.x / per_row) * per_row;
  for (int i = threadIdx.x; i < nvec; i += bd) {
    f(i, row, col);
    row += dq;
    col += dr;
    if (col >= per_row) {
      col -= per_row;
      ++row;
    }
  }
}

// Phase 1: copy `nvec` vectors of V elements from a, b (global) to sa, sb (shared), kUnroll
// independent 16-byte loads of each in flight per thread.
template <typename T, int V>
__device__ __forceinline__ void resident_load(const T* a, const T* b, T* sa, T* sb, int nvec) {
  const int bd = blockDim.x;
  int i = threadIdx.x;
  for (; i + bd * (kUnroll - 1) < nvec; i += bd * kUnroll) {
    Vec<T, V> va[kUnroll], vb[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      va[k] = load_raw<T, V>(a + (i + bd * k) * V);
      vb[k] = load_raw<T, V>(b + (i + bd * k) * V);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      *reinterpret_cast<Vec<T, V>*>(sa + (i + bd * k) * V) = va[k];
      *reinterpret_cast<Vec<T, V>*>(sb + (i + bd * k) * V) = vb[k];
    }
  }
  for (; i < nvec; i += bd) {
    *reinterpret_cast<Vec<T, V>*>(sa + i * V) = load_raw<T, V>(a + i * V);
    *reinterpret_cast<Vec<T, V>*>(sb + i * V) = load_raw<T, V>(b + i * V);
  }
}

// Phase 2, NCHW: rows [0, rows) of P elements in shared memory; one warp per row, lanes along
// the row, a fixed-order warp reduction. pu[c0 + row] = sum of the row of su, px[...] of sx;
// DOT (backward): pu[c0 + row] = sum of su * sx (px unused).
template <bool DOT, typename T, int V>
__device__ void resident_partial_nchw(const T* su, const T* sx, int rows, int P, int c0, acc_t<T>* pu,
                                      acc_t<T>* px) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int nv = P / V;
  for (int row = threadIdx.x >> 5; row < rows; row += nwarps) {
    const T* ru = su + row * P;
    const T* rx = sx + row * P;
    A s0 = A(0), s1 = A(0);
    for (int i = lane; i < nv; i += 32) {
      A va[V], vb[V];
      load_vec<T, V>(ru + i * V, va);
      load_vec<T, V>(rx + i * V, vb);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (DOT) {
          s0 += va[j] * vb[j];
        } else {
          s0 += va[j];
          s1 += vb[j];
        }
      }
    }
    s0 = warp_sum(s0);
    if (!DOT) s1 = warp_sum(s1);
    if (lane == 0) {
      pu[c0 + row] = s0;
      if (!DOT) px[c0 + row] = s1;
    }
  }
}

// Phase 2, channels_last: `pix` rows of C elements in shared memory. Threads (cv, py): cv runs
// over channel vectors, py over pixel rows (stride PY); the PY partials of each channel are
// then added in py order. red: (DOT ? 1 : 2) * blockDim * V accumulators (aliases the
// small-network region, unused until phase 3). DOT: pu[c] = partial sum of su * sx.
template <bool DOT, typename T, int V>
__device__ void resident_partial_cl(const T* su, const T* sx, int pix, int C, acc_t<T>* pu, acc_t<T>* px,
                                    acc_t<T>* red) {
  using A = acc_t<T>;
  const int nvc = C / V;
  const int cvt = nvc < (int)blockDim.x ? nvc : (int)blockDim.x;
  const int PY = blockDim.x / cvt;
  const int cv = threadIdx.x % cvt, py = threadIdx.x / cvt;
  A* red1 = red + blockDim.x * V;
  for (int cb = 0; cb < nvc; cb += cvt) {
    A s0[V], s1[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s0[j] = s1[j] = A(0);
    const int vc = cb + cv;
    if (py < PY && vc < nvc) {
      for (int p = py; p < pix; p += PY) {
        A va[V], vb[V];
        load_vec<T, V>(su + p * C + vc * V, va);
        load_vec<T, V>(sx + p * C + vc * V, vb);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (DOT) {
            s0[j] += va[j] * vb[j];
          } else {
            s0[j] += va[j];
            s1[j] += vb[j];
          }
        }
      }
    }
    if (py < PY) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        red[(py * cvt + cv) * V + j] = s0[j];
        if (!DOT) red1[(py * cvt + cv) * V + j] = s1[j];
      }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < cvt * V; t += blockDim.x) {
      const int c = cb * V + t;
      A t0 = A(0), t1 = A(0);
      for (int y = 0; y < PY; ++y) {
        t0 += red[y * cvt * V + t];
        if (!DOT) t1 += red1[y * cvt * V + t];
      }
      if (c < C) {
        pu[c] = t0;
        if (!DOT) px[c] = t1;
      }
    }
    __syncthreads();
  }
}

// Phase 4: o[i] = gate[c(i)] * a[i] + b[i] over `nvec` vectors of the slice (a, b in shared
// memory, o in global). NCHW: rows of P/V vectors, c = c0 + row (V divides P); channels_last:
// rows of C/V vectors, channels col*V .. col*V + V - 1 (V divides C).
template <typename T, int V>
__device__ void resident_apply(const Geometry& g, const T* sa, const T* sb, T* o, const acc_t<T>* gate, int c0,
                               int nvec) {
  using A = acc_t<T>;
  const int per_row = g.channels_last ? g.C / V : g.P / V;
  for_each_vector(nvec, per_row, [&](int i, int row, int col) {
    const int off = i * V;
    A k[V];
    if (g.channels_last) {
#pragma unroll
      for (int j = 0; j < V; ++j) k[j] = gate[col * V + j];
    } else {
      const A kk = gate[c0 + row];
#pragma unroll
      for (int j = 0; j < V; ++j) k[j] = kk;
    }
    A va[V], vb[V], r[V];
    load_vec<T, V>(sa + off, va);
    load_vec<T, V>(sb + off, vb);
#pragma unroll
    for (int j = 0; j < V; ++j) r[j] = k[j] * va[j] + vb[j];
    store_vec<T, V>(o + off, r);
  });
}

template <int MODE, typename T, int V>
__device__ void resident_body(const ForwardParams& p, const Launch& l, const Smem<acc_t<T>>& sm,
                              const ResidentSmem<acc_t<T>, T>& rs, unsigned char* smem) {
  using A = acc_t<T>;
  constexpr bool kPair = MODE >= (int)Mode::PAIR_2X1;
  constexpr bool kNeedX = kPair || MODE == (int)Mode::DOUBLE_FC;
  const Geometry& g = p.g;
  const ResidentSlice sl = ResidentSlice::make<V>(g, l.cluster);
  const T* u = static_cast<const T*>(p.u) + sl.base;
  const T* x = static_cast<const T*>(p.x) + sl.base;
  T* y = static_cast<T*>(p.y) + sl.base;
  const int n = sl.n, rank = sl.rank;
  if (kPair && blockIdx.x == 0) fwd_stats_eval<T>(p);  // the saved statistics (global only)

  resident_load<T, V>(u, x, rs.u, rs.x, sl.nvec);
  __syncthreads();
  if (g.channels_last)
    resident_partial_cl<false, T, V>(rs.u, rs.x, sl.o1 - sl.o0, g.C, rs.pu, rs.px, reinterpret_cast<A*>(smem));
  else
    resident_partial_nchw<false, T, V>(rs.u, rs.x, sl.o1 - sl.o0, g.P, sl.o0, rs.pu, rs.px);
  sl.sync();

  A* pool_u = static_cast<A*>(p.pool_u) + (long long)n * g.C;
  A* pool_x = static_cast<A*>(p.pool_x) + (long long)n * g.C;
  for (int c = threadIdx.x; c < g.C; c += blockDim.x) {
    const A su = sl.gather(g, rs.pu, c) / A(g.P);
    const A sx = sl.gather(g, rs.px, c) / A(g.P);
    sm.su[c] = su;
    if (kNeedX) sm.sx[c] = sx;  // sm.sx has no room in se mode (SmemPlan)
    if (rank == 0) {
      pool_u[c] = su;
      pool_x[c] = sx;
    }
  }
  if constexpr (kPair)
    stage_filters_running<MODE, A>(g, sm, static_cast<const A*>(p.pair_w), p.running_mean, p.running_var,
                                   p.stat_dtype, p.eps, static_cast<const A*>(p.bn_w), static_cast<const A*>(p.bn_b));
  __syncthreads();
  fwd_excite_staged<MODE, T>(p, n, sm, rank == 0, rs.gate);  // ends with a block barrier

  resident_apply<T, V>(g, rs.u, rs.x, y, rs.gate, sl.o0, sl.nvec);
  if (sl.CL > 1) CMPE_SE_CLUSTER_SYNC();  // the other blocks have read this block's partials
}

template <typename T, int V>
__global__ void __launch_bounds__(512, 1) cmpe_se_forward_resident_kernel(ForwardParams p, Launch l) {
  CMPE_SE_DYNAMIC_SMEM(smem);
  const SmemPlan pl = smem_plan(p.g, (int)sizeof(acc_t<T>), false, l.threads, l.vec);
  const ResidentPlan rp = resident_plan(p.g, (int)sizeof(acc_t<T>), (int)sizeof(T), l.threads, l.vec, l.cluster);
  const Smem<acc_t<T>> sm(smem, pl, p.g);
  const ResidentSmem<acc_t<T>, T> rs(smem, rp);
  switch (p.g.mode) {
    case Mode::SE: resident_body<(int)Mode::SE, T, V>(p, l, sm, rs, smem); break;
    case Mode::DOUBLE_FC: resident_body<(int)Mode::DOUBLE_FC, T, V>(p, l, sm, rs, smem); break;
    case Mode::PAIR_2X1: resident_body<(int)Mode::PAIR_2X1, T, V>(p, l, sm, rs, smem); break;
    case Mode::PAIR_1X1: resident_body<(int)Mode::PAIR_1X1, T, V>(p, l, sm, rs, smem); break;
    default: resident_body<(int)Mode::FOLDED_3X3, T, V>(p, l, sm, rs, smem); break;
  }
}

}  // namespace cmpe_se
