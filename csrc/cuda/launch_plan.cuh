// Host-side launch planning of the CUDA kernels: path choice (persistent, per-sample, resident),
// grid, block, cluster size, spatial splits, shared memory and the workspace layout. Plain C++
// (no torch, no CUDA headers): csrc/cuda/bindings.cpp calls it with the device's attributes and
// the CUDA occupancy calculator; the host emulator (tests/emulator) calls it with the limits below
// and an occupancy model, so that the emulator runs the launches the GPU would run.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "cmpe_se.h"

namespace cmpe_se {

// What the planner needs to know about a device. Public numbers (CUDA C++ Programming Guide,
// "Compute capabilities" table; H100/H200 SXM 132 SMs, A100 108 SMs).
struct DeviceLimits {
  const char* name;
  int cc_major, cc_minor;
  int sms;
  size_t smem_optin;         // opt-in dynamic + static shared memory per block
  size_t smem_per_sm;        // shared memory per SM
  size_t smem_reserved;      // shared memory the system reserves per block (1 KB from sm_80)
  int regs_per_sm;
  int max_threads_per_sm;
  int max_blocks_per_sm;
  double copy_gbps;          // device-to-device copy bandwidth (read + write), GB/s; 0: unknown
  double mem_latency_ns;     // DRAM load latency under load, ns (for Little's law)
};

// H200 copy bandwidth: measured (benchmarks/results/2026-11-26-h200-66dc6c6); H100 / A100: about
// 90% of the nominal 3.35 / 2.04 TB/s (nominal numbers, not measured here). Latency: about 600 ns
// (Hopper) and 550 ns (Ampere) loaded DRAM latency, as published microbenchmarks report.
inline constexpr DeviceLimits kDeviceH100{"H100", 9, 0, 132, 232448, 233472, 1024, 65536, 2048, 32, 3000.0, 600.0};
inline constexpr DeviceLimits kDeviceH200{"H200", 9, 0, 132, 232448, 233472, 1024, 65536, 2048, 32, 4247.0, 600.0};
inline constexpr DeviceLimits kDeviceA100{"A100", 8, 0, 108, 166912, 167936, 1024, 65536, 2048, 32, 1800.0, 550.0};

enum class CudaPath : int { PERSISTENT = 0, PER_SAMPLE = 1, RESIDENT = 2 };

// The environment's launch options (docs/CUDA.md, "Launch parameters"), already validated.
struct PlanOptions {
  int threads = 256;      // CMPE_SE_CUDA_THREADS (clamped to 128..512, multiple of 32)
  int max_blocks = 0;     // CMPE_SE_CUDA_BLOCKS
  int splits = 0;         // CMPE_SE_CUDA_SPLITS
  bool vec = true;        // CMPE_SE_CUDA_VEC
  bool coop = true;       // CMPE_SE_CUDA_COOP
  CudaPath path = CudaPath::PERSISTENT;  // CMPE_SE_CUDA_PATH
  int cluster = 0;        // CMPE_SE_CUDA_CLUSTER (0: heuristic)
};

// Occupancy of a kernel variant: co-resident blocks per SM for (threads, dynamic smem, vec), and
// co-resident clusters on the device for (threads, smem, vec, cluster) (0: cannot launch).
using BlocksPerSmFn = std::function<int(int threads, size_t smem, int vec)>;
using MaxClustersFn = std::function<int(int threads, size_t smem, int vec, int cluster)>;

struct Plan {
  Launch l{};
  std::string error;  // non-empty: this shape cannot run (the binding raises it)
  bool ok() const { return error.empty(); }
};

inline int clamp_threads(int t) {
  t = t / 32 * 32;
  return t < 128 ? 128 : (t > 512 ? 512 : t);
}

// Persistent / per-sample launch: vector width, persistent grid, splits, shared memory.
// `aligned`: every full-size pointer is 16-byte aligned. `independent`: samples are independent
// (no batch statistics in this pass), so the per-sample path may be used (forward only).
inline Plan plan_stream(Geometry& g, bool backward, int elem, int acc, bool aligned, bool independent,
                        const PlanOptions& o, const DeviceLimits& d, const BlocksPerSmFn& blocks_per_sm) {
  Plan pl;
  Launch& l = pl.l;
  l.threads = o.threads;
  const int full_vec = 16 / elem;
  const bool ok = o.vec && aligned && (g.channels_last ? g.C % full_vec == 0 : g.P % full_vec == 0);
  l.vec = ok ? full_vec : 1;
  const int nvc = g.C / l.vec;
  int cv = 1;
  while (cv < 32 && cv < nvc) cv *= 2;
  l.cv = cv;
  l.gw = 32;
  l.smem = smem_plan(g, acc, backward, l.threads, l.vec).total;
  if (l.smem > d.smem_optin) {
    pl.error = "needs " + std::to_string(l.smem) + " bytes of shared memory per block for C=" + std::to_string(g.C) +
               " (map " + std::to_string(g.L) + ", hidden " + std::to_string(g.Rh) +
               "), more than the device allows (" + std::to_string(d.smem_optin) + "); use another backend";
    return pl;
  }
  const int bps = blocks_per_sm(l.threads, l.smem, l.vec);
  if (bps < 1) {
    pl.error = "kernel cannot be resident with " + std::to_string(l.threads) + " threads and " +
               std::to_string(l.smem) + " bytes of shared memory";
    return pl;
  }
  int grid = bps * d.sms;
  if (o.max_blocks > 0) grid = grid < o.max_blocks ? grid : o.max_blocks;
  // splits of the spatial axis so that the streaming phases fill the grid
  long long base_items, per_block;
  int max_s;
  if (g.channels_last) {
    base_items = (long long)g.N * ((nvc + cv - 1) / cv);
    per_block = 1;
    max_s = l.threads / cv;
    max_s = g.P / (2 * max_s);
    max_s = max_s < 1 ? 1 : max_s;
  } else {
    const int nv = g.P / l.vec;
    int gw = 1;
    while (gw < 32 && gw < nv) gw *= 2;
    l.gw = gw;  // rows shorter than a warp share one (several rows per warp)
    base_items = (long long)g.N * g.C;
    per_block = l.threads / gw;
    max_s = nv / 64;  // splits only for rows of >= 128 vectors: each keeps gw = 32
    max_s = max_s < 1 ? 1 : max_s;
  }
  long long want = ((long long)grid * per_block + base_items - 1) / base_items;
  want = want < 1 ? 1 : want;
  int S = o.splits > 0 ? o.splits : (int)(want < max_s ? want : max_s);
  const int pmax = g.P > 1 ? g.P : 1;
  S = S > pmax ? pmax : S;
  S = S < 1 ? 1 : S;
  l.splits = S;
  const long long stream_blocks = (base_items * S + per_block - 1) / per_block;
  long long blocks = stream_blocks > g.N ? stream_blocks : g.N;
  blocks = blocks < grid ? blocks : grid;
  l.blocks = (int)(blocks < 1 ? 1 : blocks);
  l.cooperative = o.coop;
  l.per_sample = false;
  l.cluster = 0;
  if (o.path == CudaPath::PER_SAMPLE && independent && !backward) {  // one block owns whole samples
    l.per_sample = true;
    l.splits = 1;
    l.blocks = grid < g.N ? grid : g.N;
    l.blocks = l.blocks < 1 ? 1 : l.blocks;
  }
  return pl;
}

// Cluster size of the resident kernels (0: the shape does not fit; the caller keeps the
// persistent launch): the smallest power of two (1..16; above 1 needs sm_90 and at most one
// slice row per block) whose block leaves room for two blocks per SM, else the smallest that fits
// at all. o.cluster > 0 forces one size (an error when it cannot run).
inline int plan_cluster(const Geometry& g, const Launch& l, int elem, int acc, bool backward, const PlanOptions& o,
                        const DeviceLimits& d, const MaxClustersFn& max_clusters, std::string* error) {
  const int outer = resident_outer(g);
  auto usable = [&](int cl, size_t limit) {
    if (cl > 1 && (d.cc_major < 9 || cl > outer)) return false;
    const size_t need = resident_plan(g, acc, elem, l.threads, l.vec, cl, backward).total;
    if (need + 1024 > limit) return false;  // 1 KB for the kernel's static shared memory
    return max_clusters(l.threads, need, l.vec, cl) >= 1;
  };
  if (o.cluster > 0) {
    if (!usable(o.cluster, d.smem_optin)) {
      *error = "CMPE_SE_CUDA_CLUSTER=" + std::to_string(o.cluster) + " cannot run this shape (N=" +
               std::to_string(g.N) + ", C=" + std::to_string(g.C) + ", P=" + std::to_string(g.P) +
               "): the slices need " +
               std::to_string(resident_plan(g, acc, elem, l.threads, l.vec, o.cluster, backward).total) +
               " bytes of shared memory per block (device limit " + std::to_string(d.smem_optin) + ", sm_" +
               std::to_string(d.cc_major) + "x)";
      return 0;
    }
    return o.cluster;
  }
  for (const size_t limit : {d.smem_optin / 2, d.smem_optin})
    for (int cl = 1; cl <= 16; cl *= 2)
      if (usable(cl, limit)) return cl;
  return 0;
}

// Which kernels run for a pass: the persistent / per-sample plan, replaced by the resident one
// where the path asks for it and the mode allows it (forward: se, double_fc, eval pair modes;
// backward: se, double_fc) and a cluster fits.
inline Plan plan_pass(Geometry& g, bool backward, bool training, int elem, int acc, bool aligned,
                      const PlanOptions& o, const DeviceLimits& d, const BlocksPerSmFn& stream_bps,
                      const MaxClustersFn& resident_clusters) {
  const bool pair = is_pair_mode(g.mode);
  const bool independent = !(pair && training);
  Plan pl = plan_stream(g, backward, elem, acc, aligned, independent, o, d, stream_bps);
  if (!pl.ok()) return pl;
  const bool resident_mode = backward ? (g.mode == Mode::SE || g.mode == Mode::DOUBLE_FC) : independent;
  if (o.path == CudaPath::RESIDENT && resident_mode) {
    const int cl = plan_cluster(g, pl.l, elem, acc, backward, o, d, resident_clusters, &pl.error);
    if (!pl.ok()) return pl;
    if (cl > 0) {  // else the persistent launch (docs/CUDA.md)
      pl.l.cluster = cl;
      pl.l.smem = resident_plan(g, acc, elem, pl.l.threads, pl.l.vec, cl, backward).total;
      pl.l.splits = 1;
      pl.l.blocks = 1;  // workspace sizing only: the resident kernels use no squeeze slots or moments
      pl.l.cooperative = false;
      pl.l.per_sample = false;
    }
  }
  return pl;
}

// ---- workspace layout: a 256-byte header (barrier counters), then 256-byte aligned regions ----

inline size_t ws_carve(size_t& off, size_t bytes) {
  const size_t o = off;
  off += (bytes + 255) / 256 * 256;
  return o;
}

inline int moment_count_host(int K) { return 1 + 2 * K + K * K; }

struct ForwardWorkspace {
  size_t part, stat, total;
};

inline ForwardWorkspace forward_workspace(const Geometry& g, const Launch& l, int acc) {
  ForwardWorkspace w;
  size_t off = 256;
  w.part = ws_carve(off, (size_t)2 * g.N * l.splits * g.C * acc);
  w.stat = ws_carve(off, (size_t)l.blocks * moment_count_host(g.K) * sizeof(double));
  w.total = off;
  return w;
}

struct BackwardWorkspace {
  size_t gpart, dg, dhp, z, dv, dudx, dq, part1, fin, total;
};

inline BackwardWorkspace backward_workspace(const Geometry& g, const Launch& l, int acc) {
  BackwardWorkspace w;
  size_t off = 256;
  const size_t NC = (size_t)g.N * g.C;
  w.gpart = ws_carve(off, NC * l.splits * acc);
  w.dg = ws_carve(off, NC * acc);
  w.dhp = ws_carve(off, (size_t)g.N * g.Rh * acc);
  w.z = ws_carve(off, (size_t)g.N * g.L * acc);
  w.dv = ws_carve(off, (size_t)g.N * g.L * acc);
  w.dudx = ws_carve(off, 2 * NC * acc);
  w.dq = ws_carve(off, g.mode == Mode::FOLDED_3X3 ? (size_t)l.blocks * g.L * g.K * acc : 0);
  w.part1 = ws_carve(off, (size_t)l.blocks * moment_count_host(g.K) * sizeof(double));
  w.fin = ws_carve(off, (size_t)(g.e + 1) * sizeof(double));
  w.total = off;
  return w;
}

// ---- an occupancy model (for devices not at hand: the emulator, docs/CUDA.md's table) -------
//
// Blocks per SM from the limits and a kernel's registers per thread (ptxas), the way the CUDA
// occupancy calculator counts them: registers allocated per warp in units of 256, shared memory
// per block plus the system's reserve, threads and the block cap.
inline int model_blocks_per_sm(const DeviceLimits& d, int regs_per_thread, int threads, size_t smem) {
  const int warps = (threads + 31) / 32;
  const int regs_warp = (regs_per_thread * 32 + 255) / 256 * 256;
  int b = d.max_blocks_per_sm;
  const int by_threads = d.max_threads_per_sm / (warps * 32);
  b = by_threads < b ? by_threads : b;
  const int by_regs = regs_warp > 0 ? (d.regs_per_sm / regs_warp) / warps : b;
  b = by_regs < b ? by_regs : b;
  const size_t per_block = smem + d.smem_reserved;
  if (smem + 0 > d.smem_optin) return 0;
  const int by_smem = (int)(d.smem_per_sm / per_block);
  b = by_smem < b ? by_smem : b;
  return b < 0 ? 0 : b;
}

// Co-resident clusters of `cluster` blocks: whole clusters of the device's co-resident blocks
// (ignores the GPC boundaries a real cluster launch also respects).
inline int model_max_clusters(const DeviceLimits& d, int regs_per_thread, int threads, size_t smem, int cluster) {
  if (cluster > 1 && d.cc_major < 9) return 0;
  if (cluster > 16) return 0;
  const int bps = model_blocks_per_sm(d, regs_per_thread, threads, smem);
  return bps * d.sms / cluster;
}

}  // namespace cmpe_se
