// The two full-size passes of the layer, for both layouts: the squeeze (read two tensors, sum
// per (n, c)) and the apply (one FMA per element with per-(n, c) coefficients). These are the
// only phases that touch O(N*C*P) bytes; everything else is O(N*C).
//
// Work split: an item is (row, split) in NCHW, processed by GW lanes along P (a warp, or a
// power-of-two part of one for short rows), and
// (sample, channel chunk, split) in channels_last, processed by one block (CV vector lanes
// along C, blockDim/CV pixel rows). Items are strided over the persistent grid. Each thread
// keeps UNROLL independent 16-byte loads in flight. Partial sums land in fixed slots
// [N][S][C] that the consumers add in s order: deterministic.
//
// Each function processes items [it0, it1) with `nw` workers (NCHW: warps; channels_last:
// blocks), this one being worker `wid`: the whole grid (ItemRange::grid) or one block's share
// of one sample (ItemRange::sample, the per-sample path).
#pragma once

#include "kernels/common.cuh"

namespace cmpe_se {

constexpr int kUnroll = 4;

// Item ranges: a sample's items are contiguous in both layouts (n is the slowest index).
struct ItemRange {
  long long it0, it1, wid, nw;
  // every item of the tensor, spread over the whole grid
  __device__ static ItemRange grid(long long items, bool per_warp) {
    if (per_warp)
      return {0, items, ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5,
              ((long long)gridDim.x * blockDim.x) >> 5};
    return {0, items, (long long)blockIdx.x, (long long)gridDim.x};
  }
  // the items of sample n, spread over this block only
  __device__ static ItemRange sample(long long items_per_sample, int n, bool per_warp) {
    const long long b = (long long)n * items_per_sample;
    if (per_warp) return {b, b + items_per_sample, (long long)(threadIdx.x >> 5), (long long)(blockDim.x >> 5)};
    return {b, b + items_per_sample, 0, 1};
  }
};

// Items per sample: NCHW (c, split); channels_last (channel chunk, split).
__device__ __forceinline__ long long items_per_sample(const Geometry& g, int S, int CV, int V) {
  if (!g.channels_last) return (long long)g.C * S;
  const int nvc = g.C / V;
  return (long long)((nvc + CV - 1) / CV) * S;
}

// DOT = false: part0 += a, part1 += b (forward pools). DOT = true: part0 += a*b (backward G).
template <bool DOT, typename T, int V>
__device__ void squeeze_nchw(const Geometry& g, int S, int GW, const T* a, const T* b, acc_t<T>* part0,
                             acc_t<T>* part1, long long it0, long long it1, long long wid, long long nw) {
  using A = acc_t<T>;
  // GW lanes per item (a power of two <= 32): short rows (P/V < 32) share a warp.
  const int lane = threadIdx.x & 31, sub = lane & (GW - 1), grp = lane / GW, gpw = 32 / GW;
  const int nv = g.P / V;
  const int seg = (nv + S - 1) / S;
  for (long long base = it0 + wid * gpw; base < it1; base += nw * gpw) {
    const long long it = base + grp;
    const bool valid = it < it1;  // warp-uniform loop: every lane reaches the shuffles
    const long long row = valid ? it / S : 0;
    const int s = valid ? (int)(it - row * S) : 0;
    const int v1 = valid ? min(nv, (s + 1) * seg) : 0;
    const T* ra = a + row * g.P;
    const T* rb = b + row * g.P;
    A s0 = A(0), s1 = A(0);
    int i = s * seg + sub;
    for (; i + GW * (kUnroll - 1) < v1; i += GW * kUnroll) {
      Vec<T, V> va[kUnroll], vb[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        va[k] = load_raw<T, V>(ra + (long long)(i + GW * k) * V);
        vb[k] = load_raw<T, V>(rb + (long long)(i + GW * k) * V);
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (DOT) {
            s0 += to_acc(va[k].v[j]) * to_acc(vb[k].v[j]);
          } else {
            s0 += to_acc(va[k].v[j]);
            s1 += to_acc(vb[k].v[j]);
          }
        }
      }
    }
    for (; i < v1; i += GW) {
      A va[V], vb[V];
      load_vec<T, V>(ra + (long long)i * V, va);
      load_vec<T, V>(rb + (long long)i * V, vb);
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
    for (int o = GW >> 1; o > 0; o >>= 1) {
      s0 += __shfl_xor_sync(0xffffffffu, s0, o);
      if (!DOT) s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    }
    if (valid && sub == 0) {
      const long long n = row / g.C;
      const int c = (int)(row - n * g.C);
      part0[(n * S + s) * g.C + c] = s0;
      if (!DOT) part1[(n * S + s) * g.C + c] = s1;
    }
  }
}

// channels_last: red is shared scratch of (DOT ? 1 : 2) * blockDim * V accumulators.
template <bool DOT, typename T, int V>
__device__ void squeeze_cl(const Geometry& g, int S, int CV, const T* a, const T* b, acc_t<T>* part0,
                           acc_t<T>* part1, acc_t<T>* red, long long it0, long long it1, long long bid, long long nb) {
  using A = acc_t<T>;
  const int cv = threadIdx.x % CV, py = threadIdx.x / CV, PY = blockDim.x / CV;
  const int nvc = g.C / V;
  const int nch = (nvc + CV - 1) / CV;
  const int seg = (g.P + S - 1) / S;
  A* red1 = red + PY * CV * V;
  for (long long it = it0 + bid; it < it1; it += nb) {
    const int n = (int)(it / (nch * S));
    const int rem = (int)(it - (long long)n * nch * S);
    const int ch = rem / S, s = rem - (rem / S) * S;
    const int vc = ch * CV + cv;
    const int p1 = min(g.P, (s + 1) * seg);
    A s0[V], s1[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s0[j] = s1[j] = A(0);
    if (vc < nvc) {
      const T* pa = a + (long long)n * g.P * g.C + (long long)vc * V;
      const T* pb = b + (long long)n * g.P * g.C + (long long)vc * V;
      int p = s * seg + py;
      for (; p + PY * (kUnroll - 1) < p1; p += PY * kUnroll) {
        Vec<T, V> va[kUnroll], vb[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          va[k] = load_raw<T, V>(pa + (long long)(p + PY * k) * g.C);
          vb[k] = load_raw<T, V>(pb + (long long)(p + PY * k) * g.C);
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (DOT) {
              s0[j] += to_acc(va[k].v[j]) * to_acc(vb[k].v[j]);
            } else {
              s0[j] += to_acc(va[k].v[j]);
              s1[j] += to_acc(vb[k].v[j]);
            }
          }
        }
      }
      for (; p < p1; p += PY) {
        A va[V], vb[V];
        load_vec<T, V>(pa + (long long)p * g.C, va);
        load_vec<T, V>(pb + (long long)p * g.C, vb);
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
#pragma unroll
    for (int j = 0; j < V; ++j) {
      red[(py * CV + cv) * V + j] = s0[j];
      if (!DOT) red1[(py * CV + cv) * V + j] = s1[j];
    }
    __syncthreads();
    for (int t = threadIdx.x; t < CV * V; t += blockDim.x) {
      const int c = ch * CV * V + t;
      A t0 = A(0), t1 = A(0);
      for (int y = 0; y < PY; ++y) {
        t0 += red[y * CV * V + t];
        if (!DOT) t1 += red1[y * CV * V + t];
      }
      if (c < g.C) {
        part0[((long long)n * S + s) * g.C + c] = t0;
        if (!DOT) part1[((long long)n * S + s) * g.C + c] = t1;
      }
    }
    __syncthreads();
  }
}

// Apply (b and o1 are ignored where unused; pass valid pointers). BWD = false: o0 = k0*a + b (Y = s*U + X), k0 = gate.
// BWD = true: o0 = k0*a + k1 (dU = s*dY + du/P), o1 = a + k2 (dX = dY + dx/P).
// k0 = gate[n,c]; k1 = c1[n,c] / P; k2 = c2[n,c] / P. Coefficients were written by other
// blocks before the last grid barrier: plain (coherent) loads, never the read-only path.
template <bool BWD, typename T>
__device__ __forceinline__ void apply_coef(const Geometry& g, long long nc, const acc_t<T>* gate,
                                           const acc_t<T>* c1, const acc_t<T>* c2, acc_t<T>& k0,
                                           acc_t<T>& k1, acc_t<T>& k2) {
  k0 = gate[nc];
  if (BWD) {
    k1 = c1[nc] / acc_t<T>(g.P);
    k2 = c2[nc] / acc_t<T>(g.P);
  }
}

// U vectors at offsets off[0..U): all loads first (U * 16 bytes in flight), then the stores.
template <bool BWD, typename T, int V, int U>
__device__ __forceinline__ void apply_vecs(const T* a, const T* b, T* o0, T* o1, const long long (&off)[U],
                                           const acc_t<T> (&k0)[V], const acc_t<T> (&k1)[V],
                                           const acc_t<T> (&k2)[V]) {
  using A = acc_t<T>;
  Vec<T, V> va[U], vb[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    va[k] = load_raw<T, V>(a + off[k]);
    if (!BWD) vb[k] = load_raw<T, V>(b + off[k]);
  }
#pragma unroll
  for (int k = 0; k < U; ++k) {
    A r0[V], r1[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A av = to_acc(va[k].v[j]);
      if (BWD) {
        r0[j] = k0[j] * av + k1[j];
        r1[j] = av + k2[j];
      } else {
        r0[j] = k0[j] * av + to_acc(vb[k].v[j]);
      }
    }
    store_vec<T, V>(o0 + off[k], r0);
    if (BWD) store_vec<T, V>(o1 + off[k], r1);
  }
}

template <bool BWD, typename T, int V>
__device__ void apply_nchw(const Geometry& g, int S, int GW, const T* a, const T* b, T* o0, T* o1,
                           const acc_t<T>* gate, const acc_t<T>* c1, const acc_t<T>* c2, long long it0, long long it1,
                           long long wid, long long nw) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31, sub = lane & (GW - 1), grp = lane / GW, gpw = 32 / GW;
  const int nv = g.P / V;
  const int seg = (nv + S - 1) / S;
  for (long long it = it0 + wid * gpw + grp; it < it1; it += nw * gpw) {
    const long long row = it / S;
    const int s = (int)(it - row * S);
    const int v1 = min(nv, (s + 1) * seg);
    A k0[V], k1[V], k2[V];
    apply_coef<BWD, T>(g, row, gate, c1, c2, k0[0], k1[0], k2[0]);
#pragma unroll
    for (int j = 1; j < V; ++j) {
      k0[j] = k0[0];
      k1[j] = k1[0];
      k2[j] = k2[0];
    }
    const long long base = row * g.P;
    int i = s * seg + sub;
    for (; i + GW * (kUnroll - 1) < v1; i += GW * kUnroll) {
      long long off[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) off[k] = base + (long long)(i + GW * k) * V;
      apply_vecs<BWD, T, V, kUnroll>(a, b, o0, o1, off, k0, k1, k2);
    }
    for (; i < v1; i += GW) {
      const long long off[1] = {base + (long long)i * V};
      apply_vecs<BWD, T, V, 1>(a, b, o0, o1, off, k0, k1, k2);
    }
  }
}

template <bool BWD, typename T, int V>
__device__ void apply_cl(const Geometry& g, int S, int CV, const T* a, const T* b, T* o0, T* o1,
                         const acc_t<T>* gate, const acc_t<T>* c1, const acc_t<T>* c2, long long it0, long long it1,
                         long long bid, long long nb) {
  using A = acc_t<T>;
  const int cv = threadIdx.x % CV, py = threadIdx.x / CV, PY = blockDim.x / CV;
  const int nvc = g.C / V;
  const int nch = (nvc + CV - 1) / CV;
  const int seg = (g.P + S - 1) / S;
  for (long long it = it0 + bid; it < it1; it += nb) {
    const int n = (int)(it / (nch * S));
    const int rem = (int)(it - (long long)n * nch * S);
    const int ch = rem / S, s = rem - (rem / S) * S;
    const int vc = ch * CV + cv;
    if (vc >= nvc) continue;  // no block-level sync below
    const int p1 = min(g.P, (s + 1) * seg);
    A k0[V], k1[V], k2[V];
#pragma unroll
    for (int j = 0; j < V; ++j)
      apply_coef<BWD, T>(g, (long long)n * g.C + vc * V + j, gate, c1, c2, k0[j], k1[j], k2[j]);
    const long long base = (long long)n * g.P * g.C + (long long)vc * V;
    int p = s * seg + py;
    for (; p + PY * (kUnroll - 1) < p1; p += PY * kUnroll) {
      long long off[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) off[k] = base + (long long)(p + PY * k) * g.C;
      apply_vecs<BWD, T, V, kUnroll>(a, b, o0, o1, off, k0, k1, k2);
    }
    for (; p < p1; p += PY) {
      const long long off[1] = {base + (long long)p * g.C};
      apply_vecs<BWD, T, V, 1>(a, b, o0, o1, off, k0, k1, k2);
    }
  }
}

}  // namespace cmpe_se
