#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <cstdio>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#include "cuda_runtime.h"
#include "kernels/forward.cuh"
#include "kernels/resident.cuh"
#include "kernels/backward.cuh"
#include "kernels/resident_backward.cuh"
#include "cuda/launch_plan.cuh"

namespace emu {
emu_dim3 tl_tid, tl_bid;
emu_dim3 g_bdim, g_gdim;
Block* tl_block;
std::vector<Event>* tl_events = nullptr;
unsigned long g_progress = 0;
std::vector<Range> g_ranges;
std::vector<std::vector<Event>> g_events;
bool g_tracing = false;
unsigned* g_barrier_counter = nullptr;
// one launch's events, flattened after the launch: [launch, global thread, addr, bytes, store,
// epoch, range, site]; launches are numbered in the order they ran since emu_trace(true)
std::vector<int64_t> g_log;
int64_t g_launch = 0;
std::vector<int64_t> g_launch_threads;  // threads per block of each traced launch
}

using namespace cmpe_se;

// ---- the small-tensor counter (the "small" build only: -fsanitize=thread at compile time) ----
// GCC's ThreadSanitizer instrumentation calls __tsan_readN / __tsan_writeN before every memory
// access the compiled code makes that is not provably thread-local; this library is linked
// WITHOUT libtsan and supplies those hooks itself (below): they count the bytes of an access only
// while a GPU thread runs (run_grid sets g_small_on around each fiber's turn) and only when its
// address falls in one of the ranges registered by emu_small_set (the small tensors: pools, gate,
// hidden, BN moments, weights, running stats, weight gradients, workspace areas). Full-size
// tensors stay with the tracer above; shared memory (Block::smem), the fibers' stacks and the
// emulator's own data are never registered. The hooks are not instrumented themselves.
#ifdef CMPE_SE_EMU_SMALL_TRAFFIC
namespace emu_small {
constexpr int kMax = 48;
struct Range {
  uintptr_t begin, end;
  int64_t read, written, reads, writes;  // bytes, accesses
  unsigned char* seen;                   // per byte: 1 read, 2 written
};
Range g_r[kMax];
int g_n = 0;
uintptr_t g_lo = ~(uintptr_t)0, g_hi = 0;
bool g_on = false;  // a fiber (GPU thread) of a launch is running

__attribute__((no_sanitize_thread, always_inline)) inline void hit(const void* p, uintptr_t n, bool store) {
  if (!g_on) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a >= g_hi || a + n <= g_lo) return;
  for (int i = 0; i < g_n; ++i) {
    Range& r = g_r[i];
    if (a >= r.begin && a < r.end) {
      const uintptr_t m = a + n <= r.end ? n : r.end - a;
      if (store) { r.written += (int64_t)m; ++r.writes; }
      else { r.read += (int64_t)m; ++r.reads; }
      const unsigned char bit = store ? 2 : 1;
      for (uintptr_t k = 0; k < m; ++k) r.seen[a - r.begin + k] |= bit;
      return;
    }
  }
}
}  // namespace emu_small

#define EMU_TSAN_HOOK(name, n, store) \
  extern "C" __attribute__((no_sanitize_thread, used)) void name(void* p) { emu_small::hit(p, (n), (store)); }
EMU_TSAN_HOOK(__tsan_read1, 1, false)
EMU_TSAN_HOOK(__tsan_read2, 2, false)
EMU_TSAN_HOOK(__tsan_read4, 4, false)
EMU_TSAN_HOOK(__tsan_read8, 8, false)
EMU_TSAN_HOOK(__tsan_read16, 16, false)
EMU_TSAN_HOOK(__tsan_write1, 1, true)
EMU_TSAN_HOOK(__tsan_write2, 2, true)
EMU_TSAN_HOOK(__tsan_write4, 4, true)
EMU_TSAN_HOOK(__tsan_write8, 8, true)
EMU_TSAN_HOOK(__tsan_write16, 16, true)
EMU_TSAN_HOOK(__tsan_unaligned_read2, 2, false)
EMU_TSAN_HOOK(__tsan_unaligned_read4, 4, false)
EMU_TSAN_HOOK(__tsan_unaligned_read8, 8, false)
EMU_TSAN_HOOK(__tsan_unaligned_read16, 16, false)
EMU_TSAN_HOOK(__tsan_unaligned_write2, 2, true)
EMU_TSAN_HOOK(__tsan_unaligned_write4, 4, true)
EMU_TSAN_HOOK(__tsan_unaligned_write8, 8, true)
EMU_TSAN_HOOK(__tsan_unaligned_write16, 16, true)
#undef EMU_TSAN_HOOK
extern "C" __attribute__((no_sanitize_thread, used)) void __tsan_read_range(void* p, unsigned long n) {
  emu_small::hit(p, n, false);
}
extern "C" __attribute__((no_sanitize_thread, used)) void __tsan_write_range(void* p, unsigned long n) {
  emu_small::hit(p, n, true);
}
extern "C" __attribute__((no_sanitize_thread, used)) void __tsan_init() {}
extern "C" __attribute__((no_sanitize_thread, used)) void __tsan_func_entry(void*) {}
extern "C" __attribute__((no_sanitize_thread, used)) void __tsan_func_exit() {}
#define EMU_SMALL_ON(v) (emu_small::g_on = (v))
#else
#define EMU_SMALL_ON(v) ((void)0)
#endif

// ---- fibers: every GPU thread of a launch is a ucontext on the calling OS thread ----
namespace emu {
constexpr size_t kStack = 256 * 1024;  // per GPU thread (pages are touched lazily); one guard page below
struct Fiber {
  ucontext_t ctx;
  void* mem = nullptr;
  bool done = false;
  emu_dim3 tid, bid;
  Block* block = nullptr;
  std::vector<Event>* events = nullptr;
};
ucontext_t g_sched;
Fiber* g_cur = nullptr;
const std::function<void()>* g_kernel = nullptr;
void yield() { swapcontext(&g_cur->ctx, &g_sched); }
void fiber_main() {
  (*g_kernel)();
  g_cur->done = true;
  ++g_progress;
}  // returns to g_sched through uc_link
}  // namespace emu

template <typename F>
void run_grid(int blocks, int threads, size_t smem, F kernel, int cluster = 1) {
  emu::g_bdim = {(unsigned)threads, 1, 1};
  emu::g_gdim = {(unsigned)blocks, 1, 1};
  std::vector<std::unique_ptr<emu::Block>> bl;
  std::vector<emu::Block*> all;
  std::vector<std::unique_ptr<emu::Barrier>> cbars;
  for (int b = 0; b < blocks; ++b) {
    auto blk = std::make_unique<emu::Block>();
    blk->smem.assign(smem + 64, 0xCD);  // garbage-fill: reads of unwritten smem show up
    blk->bar.n = threads;
    blk->warp_bars = std::vector<emu::Barrier>(threads / 32);
    for (auto& w : blk->warp_bars) w.n = 32;
    blk->shfl.assign(threads, 0);
    blk->index = b;
    blk->cluster = cluster;
    if (b % cluster == 0) {
      cbars.push_back(std::make_unique<emu::Barrier>());
      cbars.back()->n = threads * cluster;
    }
    blk->cbar = cbars.back().get();
    blk->all = &all;
    all.push_back(blk.get());
    bl.push_back(std::move(blk));
  }
  if (emu::g_tracing) emu::g_events.assign((size_t)blocks * threads, {});
  const std::function<void()> body = kernel;
  emu::g_kernel = &body;
  const size_t page = 4096, total = emu::kStack + page;
  std::vector<emu::Fiber> fibers((size_t)blocks * threads);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) {
      emu::Fiber& f = fibers[(size_t)b * threads + t];
      f.tid = {(unsigned)t, 0, 0};
      f.bid = {(unsigned)b, 0, 0};
      f.block = bl[b].get();
      f.events = emu::g_tracing ? &emu::g_events[(size_t)b * threads + t] : nullptr;
      f.mem = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f.mem == MAP_FAILED) { std::fprintf(stderr, "emulator: mmap of a fiber stack failed\n"); std::abort(); }
      mprotect(f.mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = static_cast<char*>(f.mem) + page;
      f.ctx.uc_stack.ss_size = emu::kStack;
      f.ctx.uc_link = &emu::g_sched;
      makecontext(&f.ctx, emu::fiber_main, 0);
    }
  // round robin: each fiber runs until it waits (a barrier, a shuffle, a spin) or finishes
  size_t live = fibers.size();
  int idle_rounds = 0;
  while (live > 0) {
    const unsigned long before = emu::g_progress;
    for (auto& f : fibers) {
      if (f.done) continue;
      emu::g_cur = &f;
      emu::tl_tid = f.tid;
      emu::tl_bid = f.bid;
      emu::tl_block = f.block;
      emu::tl_events = f.events;
      EMU_SMALL_ON(true);
      swapcontext(&emu::g_sched, &f.ctx);
      EMU_SMALL_ON(false);
      if (f.done) {
        --live;
        munmap(f.mem, total);
        f.mem = nullptr;
      }
    }
    // a round in which no fiber arrived at a barrier, made an atomic or finished: every live fiber
    // waits for something no other can do (a divergent __syncthreads, a missing block at a grid
    // barrier); the GPU would hang, the emulator stops the process
    idle_rounds = emu::g_progress == before ? idle_rounds + 1 : 0;
    if (idle_rounds > 100000) {
      std::fprintf(stderr, "emulator: deadlock (%zu of %zu GPU threads wait forever)\n", live, fibers.size());
      std::abort();
    }
  }
  emu::g_cur = nullptr;
  emu::tl_block = nullptr;
  emu::tl_events = nullptr;
  emu::g_kernel = nullptr;
  if (emu::g_tracing) {
    for (size_t gt = 0; gt < emu::g_events.size(); ++gt)
      for (const auto& e : emu::g_events[gt]) {
        const int64_t row[8] = {emu::g_launch, (int64_t)gt, (int64_t)e.addr, e.bytes, e.store, e.epoch, e.range,
                                (int64_t)reinterpret_cast<uintptr_t>(e.site)};
        emu::g_log.insert(emu::g_log.end(), row, row + 8);
      }
    emu::g_events.clear();
    emu::g_launch_threads.push_back(threads);
    ++emu::g_launch;
  }
}

// ---- the C interface (tests/emulator/__init__.py loads this library with ctypes) ----
// No torch headers: the Python side allocates every tensor and passes data pointers and sizes.
// Every entry point returns 0, or -1 with the message in emu_last_error().
namespace {
std::string g_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::runtime_error(msg);
}

// The geometry vector of the Python side: [N, C, H, W, mode, e, K, r, Dz, fold_m, pad, channels_last]
// (mode: 0 se, 1 double_fc, 2 pair_2x1, 3 pair_1x1, 4 folded_3x3; the numbering of cmpe_se::Mode).
Geometry geom_of(const int64_t* v) {
  Geometry g{};
  g.N = v[0]; g.C = v[1]; g.P = v[2] * v[3];
  g.mode = static_cast<Mode>(v[4]);
  g.r = v[7]; g.Dz = v[8]; g.Rh = g.mode == Mode::DOUBLE_FC ? 2 * g.r : g.r;
  g.K = 1; g.fold_m = v[9]; g.pad = v[10]; g.channels_last = v[11] != 0; g.e = 0; g.L = 0;
  if (is_pair_mode(g.mode)) {
    g.e = v[5]; g.K = v[6];
    if (g.mode == Mode::PAIR_2X1) g.L = g.C;
    else if (g.mode == Mode::PAIR_1X1) g.L = 2 * g.C;
    else { g.Ho = 2 * (g.C / g.fold_m) - 2 + 2 * g.pad; g.Wo = g.fold_m - 2 + 2 * g.pad; g.L = g.Ho * g.Wo; }
  }
  return g;
}

// element type codes of the Python side: 0 float32, 1 float64, 2 float16, 3 bfloat16
template <typename F>
void dispatch(int code, F&& f) {
  switch (code) {
    case 0: f(float{}); break;
    case 1: f(double{}); break;
    case 2: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

StatDtype stat_of(int code) {
  return code == 1 ? StatDtype::F64 : code == 2 ? StatDtype::F16 : code == 3 ? StatDtype::BF16 : StatDtype::F32;
}

// ---- launch configurations ----
// A Launch as a vector (Python side: tests/emulator/__init__.py LAUNCH_FIELDS):
// [threads, blocks, splits, cv, gw, vec, smem, cooperative, per_sample, cluster]
void launch_vec(const Launch& l, int64_t* v) {
  const int64_t f[10] = {l.threads, l.blocks, l.splits, l.cv, l.gw, l.vec, (int64_t)l.smem, l.cooperative,
                         l.per_sample, l.cluster};
  std::copy(f, f + 10, v);
}
Launch launch_of(const int64_t* v) {
  Launch l{};
  l.threads = (int)v[0]; l.blocks = (int)v[1]; l.splits = (int)v[2]; l.cv = (int)v[3]; l.gw = (int)v[4];
  l.vec = (int)v[5]; l.smem = (size_t)v[6]; l.cooperative = v[7] != 0; l.per_sample = v[8] != 0; l.cluster = (int)v[9];
  return l;
}

// Hand-picked configuration (the older emulator tests: tiny grids, any thread count).
Launch explicit_launch(const Geometry& g, bool bwd, int elem, int acc, int64_t threads, int64_t blocks, int64_t splits,
                       int64_t vec, int64_t cluster, bool per_sample) {
  Launch l{};
  l.threads = threads; l.blocks = blocks; l.splits = splits; l.vec = vec;
  int nvc = g.C / l.vec, cv = 1;
  while (cv < 32 && cv < nvc) cv *= 2;
  l.cv = cv;
  int nvr = g.P / l.vec, gw = 1;
  while (gw < 32 && gw < nvr) gw *= 2;
  l.gw = gw;
  l.per_sample = per_sample;
  l.cooperative = true;
  l.smem = smem_plan(g, acc, bwd, l.threads, l.vec).total;
  if (cluster > 0) {
    l.cluster = cluster;
    l.smem = resident_plan(g, acc, elem, l.threads, l.vec, cluster, bwd).total;
    l.splits = 1;
    l.blocks = 1;
  }
  return l;
}

// DeviceLimits from a vector [cc_major, sms, smem_optin, smem_per_sm, regs_per_sm, max_threads_per_sm,
// max_blocks_per_sm] (the emulated device; H100 numbers in csrc/cuda/launch_plan.cuh).
DeviceLimits limits_of(const int64_t* v) {
  DeviceLimits d{};
  d.name = "emulated";
  d.cc_major = (int)v[0]; d.sms = (int)v[1]; d.smem_optin = (size_t)v[2]; d.smem_per_sm = (size_t)v[3];
  d.smem_reserved = 1024; d.regs_per_sm = (int)v[4]; d.max_threads_per_sm = (int)v[5]; d.max_blocks_per_sm = (int)v[6];
  return d;
}

// Registers per thread of the kernels for the occupancy model (ptxas, sm_90: docs/CUDA.md).
constexpr int kRegsPersistent = 128, kRegsResident = 96;

// What both passes set up before their kernels: the geometry and the launch of the Python side, the
// accumulation width, the workspace (the caller zeroes its 16-byte header: the grid-barrier counters)
// and the full-size tensors whose traffic is counted, N*C*P elements of the dtype each.
struct Pass {
  Geometry g;
  Launch l;
  int accb;
  unsigned char* base;
};
Pass begin_pass(const int64_t* gv, const int64_t* launch, int dtype, void* workspace,
                std::initializer_list<const void*> full_size) {
  const Pass s{geom_of(gv), launch_of(launch), dtype == 1 ? 8 : 4, static_cast<unsigned char*>(workspace)};
  const int64_t tb = s.g.N * s.g.C * s.g.P * (dtype == 1 ? 8 : dtype == 0 ? 4 : 2);
  emu::g_ranges.clear();
  for (const void* t : full_size) {
    const auto b = reinterpret_cast<uintptr_t>(t);
    emu::g_ranges.push_back({b, b + (uintptr_t)tb});
  }
  return s;
}

// Runs a pass's kernel as its launcher does: the resident kernel, one cluster of l.cluster blocks per
// sample, when the plan has clusters, else the persistent grid. kernel(v) runs the kernel of vector width
// decltype(v)::value: 16 / sizeof(T) (16-byte vectors) when the plan vectorises, else 1.
template <typename T, typename Resident, typename Persistent>
void run_planned(const Geometry& g, const Launch& l, Resident&& resident, Persistent&& persistent) {
  const std::integral_constant<int, 16 / sizeof(T)> vector{};
  const std::integral_constant<int, 1> scalar{};
  if (l.cluster > 0) {
    const int rb = g.N * l.cluster;
    if (l.vec > 1) run_grid(rb, l.threads, l.smem, [&] { resident(vector); }, l.cluster);
    else run_grid(rb, l.threads, l.smem, [&] { resident(scalar); }, l.cluster);
  } else {
    if (l.vec > 1) run_grid(l.blocks, l.threads, l.smem, [&] { persistent(vector); });
    else run_grid(l.blocks, l.threads, l.smem, [&] { persistent(scalar); });
  }
}
}  // namespace

extern "C" {

const char* emu_last_error() { return g_error.c_str(); }

void emu_trace(int on) {
  emu::g_tracing = on != 0;
  emu::g_log.clear();
  emu::g_launch = 0;
  emu::g_launch_threads.clear();
}

// The events since emu_trace(1): rows of 8 int64 (see g_log), and the number of traced launches.
int64_t emu_trace_rows() { return (int64_t)emu::g_log.size() / 8; }
int64_t emu_trace_launches() { return (int64_t)emu::g_launch_threads.size(); }
// Copies the events ([rows, 8]) and the threads per block of each launch, then clears them.
void emu_trace_take(int64_t* events, int64_t* threads) {
  std::copy(emu::g_log.begin(), emu::g_log.end(), events);
  std::copy(emu::g_launch_threads.begin(), emu::g_launch_threads.end(), threads);
  emu::g_log.clear();
  emu::g_launch_threads.clear();
  emu::g_launch = 0;
}

// Demangled name of the function containing a code address (the call site of a helper), into buf.
void emu_site_name(int64_t site, char* buf, int64_t n) {
  Dl_info info{};
  std::string name = "?";
  if (dladdr(reinterpret_cast<void*>(site), &info) && info.dli_sname) {
    int st = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    name = st == 0 && d ? d : info.dli_sname;
    std::free(d);
  }
  std::snprintf(buf, (size_t)n, "%s", name.c_str());
}

// The planner of csrc/cuda/launch_plan.cuh on the emulated device: the Launch the binding would
// use for this shape and these options (out[0:10]), then the workspace bytes (out[10]).
// opts: [threads, max_blocks, splits, vec, coop, path, cluster]; dev: see limits_of.
int emu_plan(const int64_t* gv, int backward, int training, int elem, int aligned, const int64_t* opts,
             const int64_t* dev, int64_t* out) {
  return guarded([&] {
    PlanOptions o;
    o.threads = clamp_threads((int)opts[0]); o.max_blocks = (int)opts[1]; o.splits = (int)opts[2];
    o.vec = opts[3] != 0; o.coop = opts[4] != 0; o.path = (CudaPath)opts[5]; o.cluster = (int)opts[6];
    const DeviceLimits d = limits_of(dev);
    Geometry g = geom_of(gv);  // plan_pass may adjust it (as the binding's call does)
    const int acc = elem == 8 ? 8 : 4;
    const Plan pl = plan_pass(
        g, backward != 0, training != 0, elem, acc, aligned != 0, o, d,
        [&](int t, size_t s, int) { return model_blocks_per_sm(d, kRegsPersistent, t, s); },
        [&](int t, size_t s, int, int c) { return model_max_clusters(d, kRegsResident, t, s, c); });
    check(pl.ok(), std::string("cmpe_se (emulated planner): ") + pl.error);
    launch_vec(pl.l, out);
    out[10] = backward ? (int64_t)backward_workspace(g, pl.l, acc).total : (int64_t)forward_workspace(g, pl.l, acc).total;
  });
}

// A launch vector (out[0:10]) for the hand-picked configurations of the older tests.
int emu_explicit(const int64_t* gv, int backward, int elem, int64_t threads, int64_t blocks, int64_t splits,
                 int64_t vec, int64_t cluster, int per_sample, int64_t* out) {
  return guarded([&] {
    const Geometry g = geom_of(gv);
    const int acc = elem == 8 ? 8 : 4;
    launch_vec(explicit_launch(g, backward != 0, elem, acc, threads, blocks, splits, vec, cluster, per_sample != 0), out);
  });
}

// Workspace bytes of a pass with this launch (acc: bytes of the accumulation type).
int64_t emu_workspace_bytes(const int64_t* gv, const int64_t* launch, int backward, int acc) {
  const Geometry g = geom_of(gv);
  const Launch l = launch_of(launch);
  return backward ? (int64_t)backward_workspace(g, l, acc).total : (int64_t)forward_workspace(g, l, acc).total;
}

// Offsets of the workspace areas of a pass with this launch, then its total (forward: part, stat,
// total; backward: gpart, dg, dhp, z, dv, dudx, dq, part1, fin, total); the header (counters) is
// [0, 256). Returns the number of values written.
int emu_workspace_areas(const int64_t* gv, const int64_t* launch, int backward, int acc, int64_t* out) {
  const Geometry g = geom_of(gv);
  const Launch l = launch_of(launch);
  if (backward) {
    const BackwardWorkspace w = backward_workspace(g, l, acc);
    const size_t v[10] = {w.gpart, w.dg, w.dhp, w.z, w.dv, w.dudx, w.dq, w.part1, w.fin, w.total};
    for (int i = 0; i < 10; ++i) out[i] = (int64_t)v[i];
    return 10;
  }
  const ForwardWorkspace w = forward_workspace(g, l, acc);
  out[0] = (int64_t)w.part; out[1] = (int64_t)w.stat; out[2] = (int64_t)w.total;
  return 3;
}

// Whether this library counts the small tensors' traffic (the "small" build).
int emu_small_available() {
#ifdef CMPE_SE_EMU_SMALL_TRAFFIC
  return 1;
#else
  return 0;
#endif
}

#ifdef CMPE_SE_EMU_SMALL_TRAFFIC
// Registers the ranges [begin, begin + bytes) to count (disjoint; at most 48) and zeroes their
// counters; n = 0 clears them.
int emu_small_set(int n, const int64_t* begins, const int64_t* bytes) {
  return guarded([&] {
    check(n >= 0 && n <= emu_small::kMax, "emu_small_set: too many ranges");
    for (int i = 0; i < emu_small::g_n; ++i) delete[] emu_small::g_r[i].seen;
    emu_small::g_n = 0;
    emu_small::g_lo = ~(uintptr_t)0;
    emu_small::g_hi = 0;
    for (int i = 0; i < n; ++i) {
      emu_small::Range& r = emu_small::g_r[i];
      r.begin = (uintptr_t)begins[i];
      r.end = r.begin + (uintptr_t)bytes[i];
      r.read = r.written = r.reads = r.writes = 0;
      r.seen = new unsigned char[(size_t)bytes[i] + 1]();
      emu_small::g_lo = std::min(emu_small::g_lo, r.begin);
      emu_small::g_hi = std::max(emu_small::g_hi, r.end);
    }
    emu_small::g_n = n;
  });
}

// Per registered range: [bytes read, bytes written, read accesses, write accesses, distinct bytes
// read, distinct bytes written] (6 int64 each, in registration order).
void emu_small_take(int64_t* out) {
  for (int i = 0; i < emu_small::g_n; ++i) {
    const emu_small::Range& r = emu_small::g_r[i];
    int64_t dr = 0, dw = 0;
    for (uintptr_t k = 0; k < r.end - r.begin; ++k) {
      dr += r.seen[k] & 1;
      dw += (r.seen[k] >> 1) & 1;
    }
    const int64_t v[6] = {r.read, r.written, r.reads, r.writes, dr, dw};
    std::copy(v, v + 6, out + 6 * i);
  }
}
#endif

// A planted launch for the counter's own test (tests/test_gpu_evidence.py): `blocks` blocks of
// `threads` threads; each thread reads w[t % n] (4-byte floats), stores it in shared memory, waits
// at __syncthreads (a call: the compiler must load w again), reads w[t % n] a second time and its
// neighbour's value from shared memory, stores the sum in shared memory; after a barrier thread 0
// of each block writes out[block] (two shared values). The host reads
// w[0] before the launch and writes out[blocks] after it (outside a launch: not counted). Counted:
// reads of w 2 x 4 bytes per thread, writes of out 4 bytes per block.
int emu_small_probe(float* w, float* out, int n, int blocks, int threads) {
  return guarded([&] {
    check(n > 0 && blocks > 0 && threads > 0 && threads % 32 == 0, "emu_small_probe: bad sizes");
    const float host = w[0];
    run_grid(blocks, threads, (size_t)threads * sizeof(float), [&] {
      CMPE_SE_DYNAMIC_SMEM(smem);
      float* s = reinterpret_cast<float*>(smem);
      const int t = threadIdx.x;
      const float a = w[t % n];
      s[t] = a;
      __syncthreads();
      const float b = w[t % n] + s[(t + 1) % blockDim.x];
      __syncthreads();
      s[t] = b;  // every thread uses its second read
      __syncthreads();
      if (t == 0) out[blockIdx.x] = s[0] + s[blockDim.x - 1];
    });
    out[blocks] = host;
  });
}

// One forward pass. t: [u, x, y, fc1, fc1_id, fc2, pair_w, bn_w, bn_b, running_mean, running_var,
// pool_u, pool_x, gate, hidden, bn_mean, bn_invstd, workspace] (absent ones null); the workspace is
// laid out as the binding lays it out (the caller zeroes its 16-byte header).
int emu_forward(void* const* t, const int64_t* gv, const int64_t* launch, int dtype, int stat_dtype, int training,
                double momentum, double eps) {
  return guarded([&] {
    const Pass s = begin_pass(gv, launch, dtype, t[17], {t[0], t[1], t[2]});
    const Geometry& g = s.g;
    const Launch& l = s.l;
    const ForwardWorkspace wsp = forward_workspace(g, l, s.accb);
    unsigned char* base = s.base;
    ForwardParams p{};
    p.g = g; p.u = t[0]; p.x = t[1]; p.y = t[2];
    p.fc1_w = t[3]; p.fc1_id_w = t[4]; p.fc2_w = t[5]; p.pair_w = t[6]; p.bn_w = t[7]; p.bn_b = t[8];
    p.running_mean = t[9]; p.running_var = t[10]; p.stat_dtype = stat_of(stat_dtype);
    p.training = training != 0; p.momentum = momentum; p.eps = eps;
    p.pool_u = t[11]; p.pool_x = t[12]; p.gate = t[13]; p.hidden = t[14]; p.bn_mean = t[15]; p.bn_invstd = t[16];
    p.counter = reinterpret_cast<unsigned*>(base); p.part = base + wsp.part; p.stat_part = base + wsp.stat;
    emu::g_barrier_counter = p.counter;
    dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      run_planned<T>(g, l, [&](auto v) { cmpe_se_forward_resident_kernel<T, decltype(v)::value>(p, l); },
                     [&](auto v) { cmpe_se_forward_kernel<T, decltype(v)::value>(p, l); });
    });
    emu::g_barrier_counter = nullptr;
  });
}

// One backward pass. t: [dy, u, grad_u, grad_x, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd,
// fc1, fc1_id, fc2, pair_w, bn_w, bn_b, d_fc1, d_fc1_id, d_fc2, d_pair, d_bn_w, d_bn_b, workspace].
int emu_backward(void* const* t, const int64_t* gv, const int64_t* launch, int dtype, int training) {
  return guarded([&] {
    const Pass s = begin_pass(gv, launch, dtype, t[22], {t[0], t[1], t[2], t[3]});
    const Geometry& g = s.g;
    const Launch& l = s.l;
    const BackwardWorkspace wsp = backward_workspace(g, l, s.accb);
    unsigned char* base = s.base;
    BackwardParams p{};
    p.g = g; p.dy = t[0]; p.u = t[1]; p.du_out = t[2]; p.dx_out = t[3];
    p.pool_u = t[4]; p.pool_x = t[5]; p.gate = t[6]; p.hidden = t[7]; p.bn_mean = t[8]; p.bn_invstd = t[9];
    p.fc1_w = t[10]; p.fc1_id_w = t[11]; p.fc2_w = t[12]; p.pair_w = t[13]; p.bn_w = t[14]; p.bn_b = t[15];
    p.training = training != 0;
    p.d_fc1 = t[16]; p.d_fc1_id = t[17]; p.d_fc2 = t[18]; p.d_pair = t[19]; p.d_bn_w = t[20]; p.d_bn_b = t[21];
    p.counter = reinterpret_cast<unsigned*>(base);
    p.gpart = base + wsp.gpart; p.dg = base + wsp.dg; p.dhp = base + wsp.dhp; p.zbuf = base + wsp.z;
    p.dv = base + wsp.dv; p.dudx = base + wsp.dudx; p.dq = base + wsp.dq; p.part1 = base + wsp.part1;
    p.fin = base + wsp.fin;
    emu::g_barrier_counter = p.counter;
    dispatch(dtype, [&](auto tag) {
      using T = decltype(tag);
      run_planned<T>(g, l, [&](auto v) { cmpe_se_backward_resident_kernel<T, decltype(v)::value>(p, l); },
                     [&](auto v) { cmpe_se_backward_kernel<T, decltype(v)::value>(p, l); });
      if (l.cluster > 0) {  // the resident backward (se, double_fc) leaves the fc weight gradients to this launch
        const long long elems = weight_grad_elements(g);
        const int wt = 64;  // the launcher uses 256 threads per block; the grid covers the elements either way
        run_grid((int)std::max<long long>(1, std::min<long long>(4, (elems + wt - 1) / wt)), wt, 0,
                 [&] { cmpe_se_weight_grads_kernel<T>(p); });
      }
    });
    emu::g_barrier_counter = nullptr;
  });
}

}  // extern "C"
