#include <torch/extension.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <cstdio>
#include <functional>
#include <memory>
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
using at::Tensor;

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
      swapcontext(&emu::g_sched, &f.ctx);
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

// ---- tracing API (tests/emulator/__init__.py) ----
void set_ranges(std::initializer_list<const Tensor*> ts) {
  emu::g_ranges.clear();
  for (const Tensor* t : ts) {
    const auto b = reinterpret_cast<uintptr_t>(t->data_ptr());
    emu::g_ranges.push_back({b, b + (uintptr_t)t->numel() * t->element_size()});
  }
}

void emu_trace(bool on) {
  emu::g_tracing = on;
  emu::g_log.clear();
  emu::g_launch = 0;
  emu::g_launch_threads.clear();
}

// The events since emu_trace(true), [E, 8] int64 (see g_log), and the threads per block of each launch.
std::vector<Tensor> emu_trace_take() {
  const int64_t rows = (int64_t)emu::g_log.size() / 8;
  Tensor ev = torch::from_blob(emu::g_log.data(), {rows, 8}, torch::kInt64).clone();
  Tensor th = torch::tensor(emu::g_launch_threads, torch::kInt64);
  emu::g_log.clear();
  emu::g_launch_threads.clear();
  emu::g_launch = 0;
  return {ev, th};
}

// Demangled name of the function containing each code address (the call sites of the helpers).
std::vector<std::string> emu_site_names(Tensor sites) {
  std::vector<std::string> out;
  auto acc = sites.contiguous();
  const int64_t* s = acc.data_ptr<int64_t>();
  for (int64_t i = 0; i < acc.numel(); ++i) {
    Dl_info info{};
    std::string name = "?";
    if (dladdr(reinterpret_cast<void*>(s[i]), &info) && info.dli_sname) {
      int st = 0;
      char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
      name = st == 0 && d ? d : info.dli_sname;
      std::free(d);
    }
    out.push_back(name);
  }
  return out;
}

Mode parse(const std::string& s) {
  if (s == "se") return Mode::SE;
  if (s == "double_fc") return Mode::DOUBLE_FC;
  if (s == "pair_2x1") return Mode::PAIR_2X1;
  if (s == "pair_1x1") return Mode::PAIR_1X1;
  return Mode::FOLDED_3X3;
}

Geometry geom(const Tensor& u, Mode mode, const Tensor& fc1, const c10::optional<Tensor>& pw, int64_t m, int64_t pad,
              bool cl) {
  Geometry g{};
  g.N = u.size(0); g.C = u.size(1); g.P = u.size(2) * u.size(3);
  g.channels_last = cl; g.mode = mode;
  g.r = fc1.size(0); g.Dz = fc1.size(1); g.Rh = mode == Mode::DOUBLE_FC ? 2 * g.r : g.r;
  g.K = 1; g.fold_m = m; g.pad = pad;
  if (is_pair_mode(mode)) {
    g.e = pw->size(0); g.K = pw->size(2) * pw->size(3);
    if (mode == Mode::PAIR_2X1) g.L = g.C;
    else if (mode == Mode::PAIR_1X1) g.L = 2 * g.C;
    else { g.Ho = 2 * (g.C / m) - 2 + 2 * pad; g.Wo = m - 2 + 2 * pad; g.L = g.Ho * g.Wo; }
  }
  return g;
}

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

void* ptr(const c10::optional<Tensor>& t) { return t && t->defined() && t->numel() ? t->data_ptr() : nullptr; }

// ---- launch configurations ----
// A Launch as a vector (Python side: tests/emulator/__init__.py LAUNCH_FIELDS):
// [threads, blocks, splits, cv, gw, vec, smem, cooperative, per_sample, cluster]
std::vector<int64_t> launch_vec(const Launch& l) {
  return {l.threads, l.blocks, l.splits, l.cv, l.gw, l.vec, (int64_t)l.smem, l.cooperative, l.per_sample, l.cluster};
}
Launch launch_of(const std::vector<int64_t>& v) {
  TORCH_CHECK(v.size() == 10, "launch vector of 10 fields expected");
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
DeviceLimits limits_of(const std::vector<int64_t>& v) {
  TORCH_CHECK(v.size() == 7, "device vector of 7 fields expected");
  DeviceLimits d{};
  d.name = "emulated";
  d.cc_major = (int)v[0]; d.sms = (int)v[1]; d.smem_optin = (size_t)v[2]; d.smem_per_sm = (size_t)v[3];
  d.smem_reserved = 1024; d.regs_per_sm = (int)v[4]; d.max_threads_per_sm = (int)v[5]; d.max_blocks_per_sm = (int)v[6];
  return d;
}

// Registers per thread of the kernels for the occupancy model (ptxas, sm_90: docs/CUDA.md).
constexpr int kRegsPersistent = 128, kRegsResident = 96;


// The planner of csrc/cuda/launch_plan.cuh on the emulated device: the Launch the binding would
// use for this shape and these options, plus [workspace bytes] at the end.
std::vector<int64_t> emu_plan(int64_t N, int64_t C, int64_t H, int64_t W, std::string mode_s, int64_t e, int64_t r,
                              int64_t m, int64_t pad, bool cl, bool backward, bool training, int64_t elem,
                              bool aligned, std::vector<int64_t> opts, std::vector<int64_t> dev) {
  // opts: [threads, max_blocks, splits, vec, coop, path, cluster]
  TORCH_CHECK(opts.size() == 7, "options vector of 7 fields expected");
  PlanOptions o;
  o.threads = clamp_threads((int)opts[0]); o.max_blocks = (int)opts[1]; o.splits = (int)opts[2]; o.vec = opts[3] != 0;
  o.coop = opts[4] != 0; o.path = (CudaPath)opts[5]; o.cluster = (int)opts[6];
  const DeviceLimits d = limits_of(dev);
  Geometry g{};
  g.N = N; g.C = C; g.P = H * W; g.channels_last = cl; g.mode = parse(mode_s);
  g.r = r; g.Rh = g.mode == Mode::DOUBLE_FC ? 2 * r : r; g.K = 1; g.fold_m = m; g.pad = pad; g.e = 0; g.L = 0;
  if (is_pair_mode(g.mode)) {
    g.e = e;
    g.K = g.mode == Mode::FOLDED_3X3 ? 9 : g.mode == Mode::PAIR_2X1 ? 2 : 1;
    if (g.mode == Mode::PAIR_2X1) g.L = g.C;
    else if (g.mode == Mode::PAIR_1X1) g.L = 2 * g.C;
    else { g.Ho = 2 * (g.C / m) - 2 + 2 * pad; g.Wo = m - 2 + 2 * pad; g.L = g.Ho * g.Wo; }
  }
  g.Dz = is_pair_mode(g.mode) ? g.L : g.C;
  const int acc = elem == 8 ? 8 : 4;
  const Plan pl = plan_pass(
      g, backward, training, (int)elem, acc, aligned, o, d,
      [&](int t, size_t s, int) { return model_blocks_per_sm(d, kRegsPersistent, t, s); },
      [&](int t, size_t s, int, int c) { return model_max_clusters(d, kRegsResident, t, s, c); });
  TORCH_CHECK(pl.ok(), "cmpe_se (emulated planner): ", pl.error);
  auto v = launch_vec(pl.l);
  v.push_back(backward ? (int64_t)backward_workspace(g, pl.l, acc).total : (int64_t)forward_workspace(g, pl.l, acc).total);
  return v;
}

// A launch vector for the hand-picked configurations of the older tests.
std::vector<int64_t> emu_explicit(int64_t N, int64_t C, int64_t H, int64_t W, std::string mode_s, int64_t e, int64_t r,
                                  int64_t m, int64_t pad, bool cl, bool backward, int64_t elem, int64_t threads,
                                  int64_t blocks, int64_t splits, int64_t vec, int64_t cluster, bool per_sample) {
  Geometry g{};
  g.N = N; g.C = C; g.P = H * W; g.channels_last = cl; g.mode = parse(mode_s);
  g.r = r; g.Rh = g.mode == Mode::DOUBLE_FC ? 2 * r : r; g.K = 1; g.e = 0; g.L = 0; g.fold_m = m; g.pad = pad;
  if (is_pair_mode(g.mode)) {
    g.e = e;
    g.K = g.mode == Mode::FOLDED_3X3 ? 9 : g.mode == Mode::PAIR_2X1 ? 2 : 1;
    if (g.mode == Mode::PAIR_2X1) g.L = g.C;
    else if (g.mode == Mode::PAIR_1X1) g.L = 2 * g.C;
    else { g.Ho = 2 * (g.C / m) - 2 + 2 * pad; g.Wo = m - 2 + 2 * pad; g.L = g.Ho * g.Wo; }
  }
  g.Dz = is_pair_mode(g.mode) ? g.L : g.C;
  const int acc = elem == 8 ? 8 : 4;
  return launch_vec(explicit_launch(g, backward, (int)elem, acc, threads, blocks, splits, vec, cluster, per_sample));
}

// A workspace laid out as the binding lays it out: header zeroed, the rest garbage (0x7f bytes).
Tensor workspace(size_t total, const Tensor& like) {
  Tensor ws = torch::full({(int64_t)total}, 0x7f, like.options().dtype(at::kByte));
  ws.narrow(0, 0, 16).zero_();
  return ws;
}

std::vector<Tensor> emu_forward(Tensor u, Tensor x, Tensor fc1, c10::optional<Tensor> fc1i, Tensor fc2,
                                c10::optional<Tensor> pw, c10::optional<Tensor> bw, c10::optional<Tensor> bb,
                                Tensor rm, Tensor rv, std::string mode_s, bool training, double momentum, double eps,
                                int64_t m, int64_t pad, bool cl, std::vector<int64_t> launch) {
  Mode mode = parse(mode_s);
  Geometry g = geom(u, mode, fc1, pw, m, pad, cl);
  auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto fo = u.options().dtype(acc);
  Tensor y = torch::empty_like(u);
  Tensor pu = torch::empty({g.N, g.C}, fo), px = torch::empty({g.N, g.C}, fo), gate = torch::empty({g.N, g.C}, fo);
  Tensor hid = torch::empty({g.N, g.Rh}, fo), bm = torch::empty({g.e}, fo), bi = torch::empty({g.e}, fo);
  int accb = acc == at::kDouble ? 8 : 4;
  const Launch l = launch_of(launch);
  const ForwardWorkspace wsp = forward_workspace(g, l, accb);
  Tensor ws = workspace(wsp.total, u);
  auto* base = static_cast<unsigned char*>(ws.data_ptr());
  ForwardParams p{};
  p.g = g; p.u = u.data_ptr(); p.x = x.data_ptr(); p.y = y.data_ptr();
  p.fc1_w = fc1.data_ptr(); p.fc1_id_w = ptr(fc1i); p.fc2_w = fc2.data_ptr(); p.pair_w = ptr(pw);
  p.bn_w = ptr(bw); p.bn_b = ptr(bb); p.running_mean = rm.numel() ? rm.data_ptr() : nullptr;
  p.running_var = rv.numel() ? rv.data_ptr() : nullptr;
  p.stat_dtype = rm.scalar_type() == at::kDouble ? StatDtype::F64 : rm.scalar_type() == at::kHalf ? StatDtype::F16 :
                 rm.scalar_type() == at::kBFloat16 ? StatDtype::BF16 : StatDtype::F32;
  p.training = training; p.momentum = momentum; p.eps = eps;
  p.pool_u = pu.data_ptr(); p.pool_x = px.data_ptr(); p.gate = gate.data_ptr(); p.hidden = hid.data_ptr();
  p.bn_mean = bm.data_ptr(); p.bn_invstd = bi.data_ptr();
  p.counter = reinterpret_cast<unsigned*>(base); p.part = base + wsp.part; p.stat_part = base + wsp.stat;
  set_ranges({&u, &x, &y});
  emu::g_barrier_counter = p.counter;
  const int vec = l.vec;
  dispatch(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kV = 16 / sizeof(T);
    if (l.cluster > 0) {  // the resident kernel: one cluster per sample
      const int rb = g.N * l.cluster;
      if (vec > 1) run_grid(rb, l.threads, l.smem, [&] { cmpe_se_forward_resident_kernel<T, kV>(p, l); }, l.cluster);
      else run_grid(rb, l.threads, l.smem, [&] { cmpe_se_forward_resident_kernel<T, 1>(p, l); }, l.cluster);
    } else {
      if (vec > 1) run_grid(l.blocks, l.threads, l.smem, [&] { cmpe_se_forward_kernel<T, kV>(p, l); });
      else run_grid(l.blocks, l.threads, l.smem, [&] { cmpe_se_forward_kernel<T, 1>(p, l); });
    }
  });
  emu::g_barrier_counter = nullptr;
  return {y, pu, px, gate, hid, bm, bi};
}

std::vector<Tensor> emu_backward(Tensor dy, Tensor u, Tensor pu, Tensor px, Tensor gate, Tensor hid, Tensor bm,
                                 Tensor bi, Tensor fc1, c10::optional<Tensor> fc1i, Tensor fc2,
                                 c10::optional<Tensor> pw, c10::optional<Tensor> bw, c10::optional<Tensor> bb,
                                 std::string mode_s, bool training, int64_t m, int64_t pad, bool cl,
                                 std::vector<int64_t> launch) {
  Mode mode = parse(mode_s);
  Geometry g = geom(u, mode, fc1, pw, m, pad, cl);
  auto acc = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto fo = u.options().dtype(acc);
  int accb = acc == at::kDouble ? 8 : 4;
  Tensor gu = torch::empty_like(u), gx = torch::empty_like(u);
  Tensor d1 = torch::empty(fc1.sizes(), fo), d2 = torch::empty(fc2.sizes(), fo);
  Tensor d1i = fc1i ? torch::empty(fc1i->sizes(), fo) : torch::empty({0}, fo);
  Tensor dp = pw ? torch::empty(pw->sizes(), fo) : torch::empty({0}, fo);
  Tensor dbw = torch::empty({g.e}, fo), dbb = torch::empty({g.e}, fo);
  const Launch l = launch_of(launch);
  const BackwardWorkspace wsp = backward_workspace(g, l, accb);
  Tensor ws = workspace(wsp.total, u);
  auto* base = static_cast<unsigned char*>(ws.data_ptr());
  BackwardParams p{};
  p.g = g; p.dy = dy.data_ptr(); p.u = u.data_ptr(); p.du_out = gu.data_ptr(); p.dx_out = gx.data_ptr();
  p.pool_u = pu.data_ptr(); p.pool_x = px.data_ptr(); p.gate = gate.data_ptr(); p.hidden = hid.data_ptr();
  p.bn_mean = bm.numel() ? bm.data_ptr() : nullptr; p.bn_invstd = bi.numel() ? bi.data_ptr() : nullptr;
  p.fc1_w = fc1.data_ptr(); p.fc1_id_w = ptr(fc1i); p.fc2_w = fc2.data_ptr(); p.pair_w = ptr(pw);
  p.bn_w = ptr(bw); p.bn_b = ptr(bb); p.training = training;
  p.d_fc1 = d1.data_ptr(); p.d_fc1_id = fc1i ? d1i.data_ptr() : nullptr; p.d_fc2 = d2.data_ptr();
  p.d_pair = pw ? dp.data_ptr() : nullptr; p.d_bn_w = dbw.data_ptr(); p.d_bn_b = dbb.data_ptr();
  p.counter = reinterpret_cast<unsigned*>(base);
  p.gpart = base + wsp.gpart; p.dg = base + wsp.dg; p.dhp = base + wsp.dhp; p.zbuf = base + wsp.z;
  p.dv = base + wsp.dv; p.dudx = base + wsp.dudx; p.dq = base + wsp.dq; p.part1 = base + wsp.part1;
  p.fin = base + wsp.fin;
  set_ranges({&dy, &u, &gu, &gx});
  emu::g_barrier_counter = p.counter;
  const int vec = l.vec;
  dispatch(u.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int kV = 16 / sizeof(T);
    if (l.cluster > 0) {  // the resident backward (se, double_fc), then the weight-gradient launch
      const int rb = g.N * l.cluster;
      if (vec > 1) run_grid(rb, l.threads, l.smem, [&] { cmpe_se_backward_resident_kernel<T, kV>(p, l); }, l.cluster);
      else run_grid(rb, l.threads, l.smem, [&] { cmpe_se_backward_resident_kernel<T, 1>(p, l); }, l.cluster);
      const long long elems = weight_grad_elements(g);
      const int wt = 64;  // the launcher uses 256 threads per block; the grid covers the elements either way
      run_grid((int)std::max<long long>(1, std::min<long long>(4, (elems + wt - 1) / wt)), wt, 0,
               [&] { cmpe_se_weight_grads_kernel<T>(p); });
    } else {
      if (vec > 1) run_grid(l.blocks, l.threads, l.smem, [&] { cmpe_se_backward_kernel<T, kV>(p, l); });
      else run_grid(l.blocks, l.threads, l.smem, [&] { cmpe_se_backward_kernel<T, 1>(p, l); });
    }
  });
  emu::g_barrier_counter = nullptr;
  return {gu, gx, d1, d1i, d2, dp, dbw, dbb};
}
