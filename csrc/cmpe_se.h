// Plain parameter structs shared by the CUDA launchers and the bindings. No torch headers.
//
// Every full-size tensor (U, X, Y, dY, dU, dX) is dense in one of two layouts:
//   NCHW:          index = (n*C + c)*P + p
//   channels_last: index = (n*P + p)*C + c
// Small tensors (pools, gate, hidden, weights, workspace) are contiguous, in the acc dtype
// (double for double inputs, float otherwise). Pointers typed void* are cast by the kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define CMPE_SE_HD __host__ __device__
#else
#define CMPE_SE_HD
#endif

namespace cmpe_se {

enum class Mode : int { SE = 0, DOUBLE_FC = 1, PAIR_2X1 = 2, PAIR_1X1 = 3, FOLDED_3X3 = 4 };

CMPE_SE_HD inline bool is_pair_mode(Mode m) { return static_cast<int>(m) >= static_cast<int>(Mode::PAIR_2X1); }

// dtype of the running-statistics buffers (any float dtype the module holds)
enum class StatDtype : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// Shape of the layer and of its small network, shared by forward and backward.
struct Geometry {
  int N, C, P;             // batch, channels, H*W
  bool channels_last;      // layout of every full-size tensor
  Mode mode;
  int r;                   // fc1 rows (hidden width per branch)
  int Rh;                  // hidden length: r, or 2r for double_fc
  int Dz;                  // relation vector length (fc1 columns)
  int e;                   // pair-view filters (0 outside pair modes)
  int K;                   // patch size: 1 (1x1), 2 (2x1), 9 (3x3)
  int L;                   // map positions per sample (Dz in pair modes)
  int fold_m, pad, Ho, Wo; // folded_3x3 geometry (F has 2*C/fold_m rows, fold_m columns)
};

// Launch configuration chosen by the bindings (see docs/CUDA.md for the env overrides).
struct Launch {
  int threads;      // threads per block (multiple of 32, <= 512)
  int blocks;       // persistent grid size, <= co-resident blocks
  int splits;       // squeeze / apply splits of the spatial axis (S >= 1)
  int cv;           // channels_last: vectors per pixel row handled by one item (power of 2 <= 32)
  int gw;           // NCHW: lanes per (row, split) item (power of 2 <= 32; < 32 for short rows)
  int vec;          // elements per vector access (16 bytes / sizeof(scalar) or 1)
  size_t smem;      // dynamic shared memory bytes
  bool cooperative; // launch with cudaLaunchCooperativeKernel
  bool per_sample;  // forward, samples independent: a block owns whole samples, no grid barrier
  int cluster;      // forward, samples independent: > 0 selects the resident kernel, one cluster of
                    // `cluster` blocks per sample (grid N * cluster), U and X kept in shared memory
};

struct ForwardParams {
  Geometry g;
  const void* u;
  const void* x;
  void* y;
  const void* fc1_w;      // [r, Dz]
  const void* fc1_id_w;   // [r, C] (double_fc) or null
  const void* fc2_w;      // [C, Rh]
  const void* pair_w;     // [e, K] or null
  const void* bn_w;       // [e]
  const void* bn_b;       // [e]
  void* running_mean;     // [e] in stat_dtype (pair modes)
  void* running_var;
  StatDtype stat_dtype;
  bool training;
  double momentum, eps;
  // saved outputs (acc)
  void* pool_u;   // [N, C]
  void* pool_x;   // [N, C]
  void* gate;     // [N, C]
  void* hidden;   // [N, Rh]
  void* bn_mean;  // [e]
  void* bn_invstd;
  // workspace
  unsigned* counter;  // grid-barrier counter, zeroed on the stream before launch
  void* part;         // acc: [2][N][S][C] squeeze partials
  void* stat_part;    // double: [blocks][K + K*K] block partial moments of the patches
};

struct BackwardParams {
  Geometry g;
  const void* dy;
  const void* u;
  void* du_out;           // grad_u
  void* dx_out;           // grad_x
  const void* pool_u;     // [N, C] acc
  const void* pool_x;
  const void* gate;
  const void* hidden;     // [N, Rh]
  const void* bn_mean;    // [e]
  const void* bn_invstd;
  const void* fc1_w;
  const void* fc1_id_w;
  const void* fc2_w;
  const void* pair_w;
  const void* bn_w;
  const void* bn_b;
  bool training;
  // weight gradients (acc)
  void* d_fc1;      // [r, Dz]
  void* d_fc1_id;   // [r, C] or null
  void* d_fc2;      // [C, Rh]
  void* d_pair;     // [e, K] or null
  void* d_bn_w;     // [e]
  void* d_bn_b;     // [e]
  // workspace
  unsigned* counter;
  void* gpart;      // acc [N][S][C]: partial G = sum_p dY*U
  void* dg;         // acc [N][C]
  void* dhp;        // acc [N][Rh]
  void* zbuf;       // acc [N][Dz] (pair modes: recomputed v)
  void* dv;         // acc [N][L] (pair modes)
  void* dudx;       // acc [2][N][C]
  void* dq;         // acc [blocks][L*K] scratch (folded_3x3)
  void* part1;      // double [blocks][1 + 2K + K*K] block partial moments
  void* fin;        // double [e + 1]: per-filter mean(db*n_hat), then mean(db)
};

// Dynamic shared memory of the persistent kernels, byte offsets. The small-network phases and
// the channels_last squeeze reduction are separated by barriers, so they alias from offset 0.
struct SmemPlan {
  size_t red;   // double[32 * kRedWidth]: block reductions
  size_t mom;   // double[kMomMax]: moment accumulators
  size_t su, sx, sdg, sz, sh, filt;  // acc arrays: C, C, C (bwd), L (pair), Rh, e * kFiltStride
  size_t total;
};
constexpr int kRedWidth = 10;  // values per block reduction (1 + K for K <= 9)
constexpr int kMomMax = 100;   // 1 + K + K + K*K for K = 9
CMPE_SE_HD inline int filt_stride(const Geometry& g) { return g.K + 5; }  // w[K], mu, invstd, gamma, beta, m2

CMPE_SE_HD inline SmemPlan smem_plan(const Geometry& g, int acc_size, bool backward, int threads, int vec) {
  auto up = [](size_t b) { return (b + 15) / 16 * 16; };
  SmemPlan s;
  s.red = 0;
  s.mom = up(s.red + sizeof(double) * 32 * kRedWidth);
  s.su = up(s.mom + sizeof(double) * kMomMax);
  const bool pair = is_pair_mode(g.mode);
  const bool need_x = g.mode == Mode::DOUBLE_FC || pair;
  s.sx = up(s.su + (size_t)acc_size * g.C);
  s.sdg = up(s.sx + (size_t)acc_size * (need_x ? g.C : 0));
  s.sz = up(s.sdg + (size_t)acc_size * (backward ? g.C : 0));
  s.sh = up(s.sz + (size_t)acc_size * (pair ? g.L : 0));
  s.filt = up(s.sh + (size_t)acc_size * g.Rh);
  size_t small = up(s.filt + (size_t)acc_size * (pair ? g.e * filt_stride(g) : 0));
  size_t stream = g.channels_last ? (size_t)(backward ? 1 : 2) * threads * vec * acc_size : 0;
  s.total = small > stream ? small : stream;
  return s;
}

// Shared memory of the resident kernels (one cluster of CL blocks per sample): the SmemPlan
// region (small network; the channels_last reduction scratch aliases it), then per-block pools
// and gate, then the block's slice of U and of X in the input dtype. The slice is a contiguous
// part of the sample: NCHW channels [o0, o1) (whole rows), channels_last pixels [o0, o1).
// Backward (se, double_fc): the slices hold dY and U, pu the partial G = sum dY*U, px is unused.
struct ResidentPlan {
  size_t pu, px, gate;  // acc[C] each: partial sums of this block's slice, then the gate
  size_t u, x;          // T[slice]: the block's part of U and X
  size_t slice;         // elements per block (at most)
  size_t total;
};

CMPE_SE_HD inline int resident_outer(const Geometry& g) { return g.channels_last ? g.P : g.C; }
CMPE_SE_HD inline int resident_inner(const Geometry& g) { return g.channels_last ? g.C : g.P; }
CMPE_SE_HD inline int resident_per_block(const Geometry& g, int cluster) {
  return (resident_outer(g) + cluster - 1) / cluster;
}

CMPE_SE_HD inline ResidentPlan resident_plan(const Geometry& g, int acc_size, int elem_size, int threads, int vec,
                                             int cluster, bool backward = false) {
  auto up = [](size_t b) { return (b + 15) / 16 * 16; };
  ResidentPlan r;
  r.pu = up(smem_plan(g, acc_size, backward, threads, vec).total);
  r.px = up(r.pu + (size_t)acc_size * g.C);
  r.gate = up(r.px + (size_t)acc_size * g.C);
  r.slice = (size_t)resident_per_block(g, cluster) * resident_inner(g);
  r.u = up(r.gate + (size_t)acc_size * g.C);
  r.x = up(r.u + (size_t)elem_size * r.slice);
  r.total = up(r.x + (size_t)elem_size * r.slice);
  return r;
}

// Launchers (csrc/cuda/*.cu), explicit instantiations for float, half, __nv_bfloat16, double.
// They return cudaError_t as int so that this header needs no CUDA headers.
template <typename scalar_t>
int forward_launch(const ForwardParams& p, const Launch& l, void* stream);
template <typename scalar_t>
int backward_launch(const BackwardParams& p, const Launch& l, void* stream);

// Prepare the persistent kernel that the launcher will pick for (threads, smem, vec): raise its
// dynamic shared-memory limit, then ask the occupancy calculator for co-resident blocks per SM.
// Returns cudaError_t as int.
template <typename scalar_t>
int forward_prepare(int threads, size_t smem, int vec, int* blocks_per_sm);
template <typename scalar_t>
int backward_prepare(int threads, size_t smem, int vec, int* blocks_per_sm);
// The resident forward kernel: raise its shared-memory limit (and allow clusters of 16), then
// the number of clusters of (cluster, threads, smem) that can be co-resident (0: cannot launch).
template <typename scalar_t>
int resident_prepare(int threads, size_t smem, int vec, int cluster, int* max_clusters);
template <typename scalar_t>
int resident_backward_prepare(int threads, size_t smem, int vec, int cluster, int* max_clusters);

}  // namespace cmpe_se
