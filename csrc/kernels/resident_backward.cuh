// CMPE-SE backward, resident path (se and double_fc): dY stays on chip between the reduction
// G = sum_p dY*U and the writes of dU and dX. Two launches:
//
//   cmpe_se_backward_resident_kernel: one cluster of CL blocks per sample (grid N * CL), block
//   `rank` owning the same contiguous slice as the resident forward (resident.cuh):
//     1  load      the slice of dY and of U, global -> shared memory         (reads 2T once)
//     2  partial   per-channel sums of dY*U of the slice
//     -- cluster barrier --
//     3  G         gathered through distributed shared memory (NCHW from the owner of each
//                  channel, channels_last summed in rank order); every block then runs the small
//                  backward itself: dg = G s (1 - s), dh_pre = (W2^T dg) [h > 0], du = W1^T dh_pre
//                  (dx = W1id^T dh_pre in double_fc); rank 0 writes dg and dh_pre to the workspace
//     4  apply     dU = s dY + du/P, dX = dY + dx/P from shared memory             (writes 2T)
//     -- cluster barrier --
//   cmpe_se_weight_grads_kernel: dW2 = sum_n dg_n h_n^T, dW1 = sum_n dh_pre_n z_n^T (and the
//   identity branch), one thread per weight element, the batch summed in n order
//   (bwd_weight_grads of backward.cuh).
//
// Traffic: 4T, the floor of SPEC section 3 when dY stays on chip. Deterministic.
#pragma once

#include "kernels/backward.cuh"
#include "kernels/resident.cuh"

namespace cmpe_se {

template <int MODE, typename T, int V>
__device__ void resident_backward_body(const BackwardParams& p, const Launch& l, const Smem<acc_t<T>>& sm,
                                       const ResidentSmem<acc_t<T>, T>& rs, unsigned char* smem) {
  using A = acc_t<T>;
  static_assert(MODE == (int)Mode::SE || MODE == (int)Mode::DOUBLE_FC, "resident backward: se, double_fc");
  const Geometry& g = p.g;
  const ResidentSlice sl = ResidentSlice::make<V>(g, l.cluster);
  const T* dy = static_cast<const T*>(p.dy) + sl.base;
  const T* u = static_cast<const T*>(p.u) + sl.base;
  T* du_out = static_cast<T*>(p.du_out) + sl.base;
  T* dx_out = static_cast<T*>(p.dx_out) + sl.base;
  T* sdy = rs.u;  // slices: dY, then U
  T* su = rs.x;
  const int n = sl.n, rank = sl.rank, o0 = sl.o0;

  resident_load<T, V>(dy, u, sdy, su, sl.nvec);
  __syncthreads();
  if (g.channels_last)
    resident_partial_cl<true, T, V>(sdy, su, sl.o1 - o0, g.C, rs.pu, rs.px, reinterpret_cast<A*>(smem));
  else
    resident_partial_nchw<true, T, V>(sdy, su, sl.o1 - o0, g.P, o0, rs.pu, rs.px);
  sl.sync();

  const A* gate = static_cast<const A*>(p.gate) + (long long)n * g.C;
  A* dg = static_cast<A*>(p.dg) + (long long)n * g.C;
  for (int c = threadIdx.x; c < g.C; c += blockDim.x) {
    const A G = sl.gather(g, rs.pu, c);
    const A sg = gate[c];
    const A d = G * sg * (A(1) - sg);
    rs.gate[c] = sg;
    sm.sdg[c] = d;
    if (rank == 0) dg[c] = d;
  }
  __syncthreads();
  const A* hidden = static_cast<const A*>(p.hidden) + (long long)n * g.Rh;
  A* dhp = static_cast<A*>(p.dhp) + (long long)n * g.Rh;
  warp_dots(static_cast<const A*>(p.fc2_w), 1, g.Rh, sm.sdg, g.C, g.Rh, [&](int o, A s) {
    s = hidden[o] > A(0) ? s : A(0);
    sm.sh[o] = s;
    if (rank == 0) dhp[o] = s;
  });
  __syncthreads();
  // du (and dx) of every channel into sm.su / sm.sx (the forward's pool arrays, free here)
  const A* W1 = static_cast<const A*>(p.fc1_w);
  thread_dots(W1, 1, g.C, sm.sh, g.r, g.C, [&](int o, A s) { sm.su[o] = s / A(g.P); });
  if constexpr (MODE == (int)Mode::DOUBLE_FC)
    thread_dots(static_cast<const A*>(p.fc1_id_w), 1, g.C, sm.sh + g.r, g.r, g.C,
                [&](int o, A s) { sm.sx[o] = s / A(g.P); });
  __syncthreads();

  // apply: dU = s dY + du/P, dX = dY + dx/P (se: dx = 0)
  const int per_row = g.channels_last ? g.C / V : g.P / V;
  for_each_vector(sl.nvec, per_row, [&](int i, int row, int col) {
    const int off = i * V;
    A k0[V], k1[V], k2[V];
    if (g.channels_last) {
      const int c = col * V;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        k0[j] = rs.gate[c + j];
        k1[j] = sm.su[c + j];
        k2[j] = MODE == (int)Mode::DOUBLE_FC ? sm.sx[c + j] : A(0);
      }
    } else {
      const int c = o0 + row;
      const A a0 = rs.gate[c], a1 = sm.su[c], a2 = MODE == (int)Mode::DOUBLE_FC ? sm.sx[c] : A(0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        k0[j] = a0;
        k1[j] = a1;
        k2[j] = a2;
      }
    }
    A vd[V], r0[V], r1[V];
    load_vec<T, V>(sdy + off, vd);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      r0[j] = k0[j] * vd[j] + k1[j];
      r1[j] = vd[j] + k2[j];
    }
    store_vec<T, V>(du_out + off, r0);
    store_vec<T, V>(dx_out + off, r1);
  });
  if (sl.CL > 1) CMPE_SE_CLUSTER_SYNC();  // the other blocks have read this block's partials
}

template <typename T, int V>
__global__ void __launch_bounds__(512, 1) cmpe_se_backward_resident_kernel(BackwardParams p, Launch l) {
  CMPE_SE_DYNAMIC_SMEM(smem);
  const SmemPlan pl = smem_plan(p.g, (int)sizeof(acc_t<T>), true, l.threads, l.vec);
  const ResidentPlan rp =
      resident_plan(p.g, (int)sizeof(acc_t<T>), (int)sizeof(T), l.threads, l.vec, l.cluster, true);
  const Smem<acc_t<T>> sm(smem, pl, p.g);
  const ResidentSmem<acc_t<T>, T> rs(smem, rp);
  if (p.g.mode == Mode::DOUBLE_FC)
    resident_backward_body<(int)Mode::DOUBLE_FC, T, V>(p, l, sm, rs, smem);
  else
    resident_backward_body<(int)Mode::SE, T, V>(p, l, sm, rs, smem);
}

// The fc weight gradients of the resident backward (second launch, any grid).
template <typename T>
__global__ void __launch_bounds__(256) cmpe_se_weight_grads_kernel(BackwardParams p) {
  bwd_weight_grads<T>(p);
}

// Threads of the weight-gradient launch: one per weight element.
CMPE_SE_HD inline long long weight_grad_elements(const Geometry& g) {
  return (long long)g.C * g.Rh + (long long)g.r * g.Dz + (g.mode == Mode::DOUBLE_FC ? (long long)g.r * g.C : 0);
}

}  // namespace cmpe_se
