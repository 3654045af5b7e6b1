// CUDA bindings of cmpe_se::forward / cmpe_se::backward: the only CUDA-side file that sees
// at::Tensor. Argument checks (naming the argument), device guard, current stream, layout
// choice, workspace, launch configuration, dtype dispatch. Schemas live in csrc/ops.cpp.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <utility>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>

#include "cmpe_se.h"
#include "cuda/launch_plan.cuh"

namespace cmpe_se {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- launch options from the environment (read once; docs/CUDA.md) ---------------------------
int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoi(v) : dflt;
}

const PlanOptions& env_config() {
  static const PlanOptions cfg = [] {
    PlanOptions c;
    c.threads = clamp_threads(env_int("CMPE_SE_CUDA_THREADS", 256));
    c.max_blocks = std::max(0, env_int("CMPE_SE_CUDA_BLOCKS", 0));
    c.splits = std::max(0, env_int("CMPE_SE_CUDA_SPLITS", 0));
    c.vec = env_int("CMPE_SE_CUDA_VEC", 1) != 0;
    c.coop = env_int("CMPE_SE_CUDA_COOP", 1) != 0;
    const char* path = std::getenv("CMPE_SE_CUDA_PATH");
    const std::string ps = path ? path : "";
    TORCH_CHECK(ps.empty() || ps == "persistent" || ps == "per_sample" || ps == "resident",
                "cmpe_se (CUDA): CMPE_SE_CUDA_PATH must be persistent, per_sample or resident, got '", ps, "'");
    c.path = ps == "per_sample" ? CudaPath::PER_SAMPLE : ps == "resident" ? CudaPath::RESIDENT : CudaPath::PERSISTENT;
    c.cluster = std::max(0, env_int("CMPE_SE_CUDA_CLUSTER", 0));
    TORCH_CHECK(c.cluster == 0 || c.cluster == 1 || c.cluster == 2 || c.cluster == 4 || c.cluster == 8 ||
                    c.cluster == 16,
                "cmpe_se (CUDA): CMPE_SE_CUDA_CLUSTER must be 1, 2, 4, 8 or 16, got ", c.cluster);
    return c;
  }();
  return cfg;
}

// A device attribute, cached per (attribute, device): no driver call after the first (CUDA-graph
// capture after warm-up).
int device_attribute(cudaDeviceAttr attr, int device) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair((int)attr, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  cache[key] = v;
  return v;
}

int sm_count(int device) { return device_attribute(cudaDevAttrMultiProcessorCount, device); }

size_t smem_optin(int device) {
  return (size_t)device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

// Blocks per SM of one kernel variant, cached: the attribute and occupancy calls are made once
// per (kernel, threads, smem, device), never again inside a CUDA-graph capture after warm-up.
template <typename F>
int cached_blocks_per_sm(const void* key, int threads, size_t smem, int vec, int device, F&& prepare) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int, int>, int> cache;
  const auto k = std::make_tuple(key, threads, smem, vec, device);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  int bps = 0;
  C10_CUDA_CHECK(static_cast<cudaError_t>(prepare(threads, smem, vec, &bps)));
  std::lock_guard<std::mutex> lock(mu);
  cache[k] = bps;
  return bps;
}

int cc_major(int device) { return device_attribute(cudaDevAttrComputeCapabilityMajor, device); }

// Co-resident clusters of the resident kernel for (threads, smem, vec, cluster), cached like
// cached_blocks_per_sm.
template <typename F>
int cached_max_clusters(const void* key, int threads, size_t smem, int vec, int cluster, int device, F&& prepare) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int, int, int>, int> cache;
  const auto k = std::make_tuple(key, threads, smem, vec, cluster, device);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  int mc = 0;
  C10_CUDA_CHECK(static_cast<cudaError_t>(prepare(threads, smem, vec, cluster, &mc)));
  std::lock_guard<std::mutex> lock(mu);
  cache[k] = mc;
  return mc;
}

// The planner's view of this device (csrc/cuda/launch_plan.cuh): the attributes it reads.
DeviceLimits device_limits(int device) {
  DeviceLimits d{};
  d.name = "cuda";
  d.cc_major = cc_major(device);
  d.sms = sm_count(device);
  d.smem_optin = smem_optin(device);
  return d;
}

// ---- argument checks ---------------------------------------------------------------------
Mode parse_mode(std::string_view s) {
  if (s == "se") return Mode::SE;
  if (s == "double_fc") return Mode::DOUBLE_FC;
  if (s == "pair_2x1") return Mode::PAIR_2X1;
  if (s == "pair_1x1") return Mode::PAIR_1X1;
  if (s == "folded_3x3") return Mode::FOLDED_3X3;
  TORCH_CHECK(false, "cmpe_se (CUDA): mode must be one of se, double_fc, pair_2x1, pair_1x1, folded_3x3, got '",
              std::string(s), "'");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_small(const char* name, const Tensor& t, const Tensor& u, at::ScalarType acc) {
  TORCH_CHECK(t.device() == u.device(), "cmpe_se (CUDA): ", name, " must be on ", u.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, "cmpe_se (CUDA): ", name, " must be in the accumulation dtype ", acc,
              " (the Python layer casts weights), got ", t.scalar_type());
}

const Tensor& need(const OptTensor& t, const char* name, Mode m) {
  TORCH_CHECK(t.has_value() && t->defined(), "cmpe_se (CUDA): ", name, " is required in mode ", (int)m);
  return *t;
}

Tensor small_contig(const Tensor& t) { return t.contiguous(); }

// Geometry from the input shape and the weights, with the shape checks the kernels rely on.
Geometry make_geometry(const Tensor& u, Mode mode, const Tensor& fc1, const Tensor& fc2, const OptTensor& pair_w,
                       int64_t fold_width, int64_t padding) {
  TORCH_CHECK(u.dim() == 4, "cmpe_se (CUDA): u must be 4-D (N, C, H, W), got ", u.sizes());
  TORCH_CHECK(u.numel() > 0, "cmpe_se (CUDA): u must be non-empty, got ", u.sizes());
  Geometry g{};
  g.N = (int)u.size(0);
  g.C = (int)u.size(1);
  g.P = (int)(u.size(2) * u.size(3));
  g.mode = mode;
  TORCH_CHECK(fc1.dim() == 2, "cmpe_se (CUDA): fc1_weight must be 2-D, got ", fc1.sizes());
  g.r = (int)fc1.size(0);
  g.Dz = (int)fc1.size(1);
  g.Rh = mode == Mode::DOUBLE_FC ? 2 * g.r : g.r;
  TORCH_CHECK(fc2.dim() == 2 && fc2.size(0) == g.C && fc2.size(1) == g.Rh, "cmpe_se (CUDA): fc2_weight must be [",
              g.C, ", ", g.Rh, "], got ", fc2.sizes());
  g.e = 0;
  g.K = 1;
  g.L = 0;
  g.fold_m = (int)fold_width;
  g.pad = (int)padding;
  if (is_pair_mode(mode)) {
    const Tensor& w = need(pair_w, "pair_weight", mode);
    const int kh = mode == Mode::FOLDED_3X3 ? 3 : 1, kw = mode == Mode::FOLDED_3X3 ? 3 : (mode == Mode::PAIR_2X1 ? 2 : 1);
    TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(2) == kh && w.size(3) == kw && w.size(0) >= 1,
                "cmpe_se (CUDA): pair_weight must be [e, 1, ", kh, ", ", kw, "], got ", w.sizes());
    g.e = (int)w.size(0);
    g.K = kh * kw;
    if (mode == Mode::PAIR_2X1) {
      g.L = g.C;
    } else if (mode == Mode::PAIR_1X1) {
      g.L = 2 * g.C;
    } else {
      TORCH_CHECK(fold_width >= 1 && g.C % fold_width == 0, "cmpe_se (CUDA): fold_width must divide C=", g.C,
                  ", got ", fold_width);
      TORCH_CHECK(padding == 0 || padding == 1, "cmpe_se (CUDA): padding must be 0 or 1, got ", padding);
      g.Ho = 2 * (g.C / g.fold_m) - 2 + 2 * g.pad;
      g.Wo = g.fold_m - 2 + 2 * g.pad;
      TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "cmpe_se (CUDA): fold too small for a 3x3 conv with padding ", padding);
      g.L = g.Ho * g.Wo;
    }
  }
  const int dz = is_pair_mode(mode) ? g.L : g.C;
  TORCH_CHECK(g.Dz == dz, "cmpe_se (CUDA): fc1_weight must have ", dz, " columns in this mode, got ", fc1.sizes());
  return g;
}

// The geometry of a pass on u in layout fmt (H*W == 1 runs as channels_last: the two layouts coincide), with
// the shape checks of make_geometry, then fc1_weight's and fc2_weight's device and dtype.
Geometry pass_geometry(const Tensor& u, at::MemoryFormat fmt, Mode mode, at::ScalarType acc, const Tensor& fc1,
                       const Tensor& fc2, const OptTensor& pair_w, int64_t fold_width, int64_t padding) {
  Geometry g = make_geometry(u, mode, fc1, fc2, pair_w, fold_width, padding);
  g.channels_last = (fmt == at::MemoryFormat::ChannelsLast && g.C > 1) || (g.P == 1);
  check_small("fc1_weight", fc1, u, acc);
  check_small("fc2_weight", fc2, u, acc);
  return g;
}

// Layout of the full-size tensors: follows u as torch.empty_like(u) would (channels_last iff u
// is channels_last and not contiguous); other strides go through a contiguous copy.
at::MemoryFormat layout_of(const Tensor& u) {
  if (u.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (u.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return u.suggest_memory_format();
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  bool ok = true;
  for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
  return ok;
}

template <typename T>
void launch_forward(const ForwardParams& p, const Launch& l, cudaStream_t s) {
  C10_CUDA_CHECK(static_cast<cudaError_t>(forward_launch<T>(p, l, s)));
}
template <typename T>
void launch_backward(const BackwardParams& p, const Launch& l, cudaStream_t s) {
  C10_CUDA_CHECK(static_cast<cudaError_t>(backward_launch<T>(p, l, s)));
}

#define CMPE_SE_DISPATCH(dtype, NAME, ...)                                                             \
  switch (dtype) {                                                                                     \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }                                   \
    case at::kHalf: { using scalar_t = __half; __VA_ARGS__; break; }                                   \
    case at::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }                        \
    case at::kDouble: { using scalar_t = double; __VA_ARGS__; break; }                                 \
    default: TORCH_CHECK(false, "cmpe_se (CUDA): ", NAME, " must be float32, float16, bfloat16 or float64, got ", dtype); \
  }

// The launch of one pass from the planner, with the occupancy calculator of this device's kernels
// (the pass's persistent and resident kernels for u's dtype).
Launch plan_or_raise(Geometry& g, bool backward, bool training, const Tensor& u, bool aligned) {
  const int device = u.get_device();
  const int elem = (int)u.element_size(), acc = (int)c10::elementSize(acc_type(u.scalar_type()));
  int (*prepare)(int, size_t, int, int*) = nullptr;
  int (*rprepare)(int, size_t, int, int, int*) = nullptr;
  CMPE_SE_DISPATCH(u.scalar_type(), "u", {
    prepare = backward ? &backward_prepare<scalar_t> : &forward_prepare<scalar_t>;
    rprepare = backward ? &resident_backward_prepare<scalar_t> : &resident_prepare<scalar_t>;
  });
  const void* key = reinterpret_cast<const void*>(prepare);
  const void* rkey = reinterpret_cast<const void*>(rprepare);
  const DeviceLimits d = device_limits(device);
  const Plan pl = plan_pass(
      g, backward, training, elem, acc, aligned, env_config(), d,
      [&](int t, size_t s, int v) { return cached_blocks_per_sm(key, t, s, v, device, prepare); },
      [&](int t, size_t s, int v, int c) { return cached_max_clusters(rkey, t, s, v, c, device, rprepare); });
  TORCH_CHECK(pl.ok(), "cmpe_se (CUDA): ", pl.error);
  return pl.l;
}

// One pass's workspace: a byte tensor from the caching allocator on the current stream (no cudaMalloc in
// the hot path; capturable), its 16-byte head (the grid-barrier counters) zeroed on that stream.
struct Workspace {
  Tensor bytes;
  unsigned char* base;
  cudaStream_t stream;
};

Workspace make_workspace(const Tensor& u, size_t total) {
  Workspace w;
  w.bytes = at::empty({(int64_t)total}, u.options().dtype(at::kByte));
  w.base = static_cast<unsigned char*>(w.bytes.data_ptr());
  w.stream = c10::cuda::getCurrentCUDAStream(u.get_device()).stream();
  C10_CUDA_CHECK(cudaMemsetAsync(w.base, 0, 16, w.stream));
  return w;
}

// One pass's launch (plan_or_raise), the workspace layout that launch needs (`layout`: forward_workspace or
// backward_workspace, csrc/cuda/launch_plan.cuh, shared with the emulator) and the workspace itself.
template <typename Layout>
struct PassPlan {
  Launch l;
  Layout wsp;
  Workspace ws;
};

template <typename Layout>
PassPlan<Layout> plan_with_workspace(Geometry& g, bool backward, bool training, const Tensor& u, bool aligned,
                                     Layout (*layout)(const Geometry&, const Launch&, int)) {
  PassPlan<Layout> pp;
  pp.l = plan_or_raise(g, backward, training, u, aligned);
  pp.wsp = layout(g, pp.l, (int)c10::elementSize(acc_type(u.scalar_type())));
  pp.ws = make_workspace(u, pp.wsp.total);
  return pp;
}

// The optional small weights of both passes, contiguous and checked: fc1_identity_weight (double_fc),
// pair_weight, bn_weight, bn_bias (pair modes); undefined where the mode has none.
struct OptionalWeights {
  Tensor w1i, pw, bw, bb;
};

OptionalWeights optional_weights(Mode mode, const Geometry& g, const Tensor& u, at::ScalarType acc,
                                 const OptTensor& fc1_identity_weight, const OptTensor& pair_weight,
                                 const OptTensor& bn_weight, const OptTensor& bn_bias) {
  OptionalWeights o;
  if (mode == Mode::DOUBLE_FC) {
    o.w1i = small_contig(need(fc1_identity_weight, "fc1_identity_weight", mode));
    check_small("fc1_identity_weight", o.w1i, u, acc);
    TORCH_CHECK(o.w1i.dim() == 2 && o.w1i.size(0) == g.r && o.w1i.size(1) == g.C,
                "cmpe_se (CUDA): fc1_identity_weight must be [", g.r, ", ", g.C, "], got ", o.w1i.sizes());
  }
  if (is_pair_mode(mode)) {
    o.pw = small_contig(*pair_weight);
    o.bw = small_contig(need(bn_weight, "bn_weight", mode));
    o.bb = small_contig(need(bn_bias, "bn_bias", mode));
    check_small("pair_weight", o.pw, u, acc);
    check_small("bn_weight", o.bw, u, acc);
    check_small("bn_bias", o.bb, u, acc);
  }
  return o;
}

// The fields both passes' params have (cmpe_se.h): geometry, weights (null where the mode has none), the
// train/eval flag and the barrier counters at the head of the workspace.
template <typename Params>
void set_common(Params& p, const Geometry& g, const Tensor& w1, const Tensor& w2, const OptionalWeights& o,
                bool training, unsigned char* base) {
  p.g = g;
  p.fc1_w = w1.data_ptr();
  p.fc1_id_w = o.w1i.defined() ? o.w1i.data_ptr() : nullptr;
  p.fc2_w = w2.data_ptr();
  p.pair_w = o.pw.defined() ? o.pw.data_ptr() : nullptr;
  p.bn_w = o.bw.defined() ? o.bw.data_ptr() : nullptr;
  p.bn_b = o.bb.defined() ? o.bb.data_ptr() : nullptr;
  p.training = training;
  p.counter = reinterpret_cast<unsigned*>(base);
}

StatDtype stat_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return StatDtype::F32;
    case at::kHalf: return StatDtype::F16;
    case at::kBFloat16: return StatDtype::BF16;
    case at::kDouble: return StatDtype::F64;
    default: TORCH_CHECK(false, "cmpe_se (CUDA): running statistics must be floating point, got ", t.scalar_type());
  }
}

// ---- forward -----------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_cuda(
    const Tensor& u, const Tensor& x, const Tensor& fc1_weight, const OptTensor& fc1_identity_weight,
    const Tensor& fc2_weight, const OptTensor& pair_weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
    Tensor& running_mean, Tensor& running_var, std::string_view mode_s, bool training, double momentum,
    double eps, int64_t fold_width, int64_t padding) {
  const Mode mode = parse_mode(mode_s);
  TORCH_CHECK(u.is_cuda(), "cmpe_se (CUDA): u must be a CUDA tensor, got ", u.device());
  TORCH_CHECK(x.device() == u.device(), "cmpe_se (CUDA): x must be on ", u.device(), ", got ", x.device());
  TORCH_CHECK(x.sizes() == u.sizes(), "cmpe_se (CUDA): x must have the shape of u ", u.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == u.scalar_type(), "cmpe_se (CUDA): x must have the dtype of u (", u.scalar_type(),
              "), got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(u.device());
  const at::ScalarType acc = acc_type(u.scalar_type());
  const auto fmt = layout_of(u);
  const Tensor uc = u.contiguous(fmt), xc = x.contiguous(fmt);
  Geometry g = pass_geometry(u, fmt, mode, acc, fc1_weight, fc2_weight, pair_weight, fold_width, padding);
  const Tensor w1 = small_contig(fc1_weight), w2 = small_contig(fc2_weight);
  const OptionalWeights ow = optional_weights(mode, g, u, acc, fc1_identity_weight, pair_weight, bn_weight, bn_bias);
  const bool pair = is_pair_mode(mode);
  if (pair) {
    TORCH_CHECK(ow.bw.numel() == g.e && ow.bb.numel() == g.e, "cmpe_se (CUDA): bn_weight, bn_bias must have ", g.e,
                " elements");
    for (const Tensor* t : {&running_mean, &running_var}) {
      TORCH_CHECK(t->device() == u.device() && t->numel() == g.e && t->is_contiguous(),
                  "cmpe_se (CUDA): running_mean/running_var must be contiguous [", g.e, "] tensors on ", u.device());
    }
    TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
                "cmpe_se (CUDA): running_mean and running_var must share a dtype");
    TORCH_CHECK(!training || (long long)g.N * g.L > 1, "cmpe_se (CUDA): pair_bn expects more than 1 value per "
                "filter in training mode, got ", (long long)g.N * g.L);
  }
  auto fopt = u.options().dtype(acc);
  Tensor y = at::empty(u.sizes(), u.options().memory_format(fmt));
  Tensor pool_u = at::empty({g.N, g.C}, fopt), pool_x = at::empty({g.N, g.C}, fopt);
  Tensor gate = at::empty({g.N, g.C}, fopt), hidden = at::empty({g.N, g.Rh}, fopt);
  Tensor bn_mean = at::empty({g.e}, fopt), bn_invstd = at::empty({g.e}, fopt);

  const auto [l, wsp, ws] = plan_with_workspace(
      g, false, training, u, aligned16({uc.data_ptr(), xc.data_ptr(), y.data_ptr()}), &forward_workspace);
  unsigned char* const base = ws.base;

  ForwardParams p{};
  set_common(p, g, w1, w2, ow, training, base);
  p.u = uc.data_ptr();
  p.x = xc.data_ptr();
  p.y = y.data_ptr();
  p.running_mean = pair ? running_mean.data_ptr() : nullptr;
  p.running_var = pair ? running_var.data_ptr() : nullptr;
  p.stat_dtype = pair ? stat_dtype(running_mean) : StatDtype::F32;
  p.momentum = momentum;
  p.eps = eps;
  p.pool_u = pool_u.data_ptr();
  p.pool_x = pool_x.data_ptr();
  p.gate = gate.data_ptr();
  p.hidden = hidden.data_ptr();
  p.bn_mean = bn_mean.data_ptr();
  p.bn_invstd = bn_invstd.data_ptr();
  p.part = base + wsp.part;
  p.stat_part = base + wsp.stat;
  CMPE_SE_DISPATCH(u.scalar_type(), "u", { launch_forward<scalar_t>(p, l, ws.stream); });
  return {y, pool_u, pool_x, gate, hidden, bn_mean, bn_invstd};
}

// cmpe_se::infer: the forward in evaluation mode, y only (the same kernels, so the same bits as forward's y)
Tensor infer_cuda(const Tensor& u, const Tensor& x, const Tensor& fc1_weight, const OptTensor& fc1_identity_weight,
                  const Tensor& fc2_weight, const OptTensor& pair_weight, const OptTensor& bn_weight,
                  const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                  std::string_view mode_s, double eps, int64_t fold_width, int64_t padding) {
  const bool pair = is_pair_mode(parse_mode(mode_s));
  TORCH_CHECK(!pair || (running_mean.has_value() && running_var.has_value()), "cmpe_se::infer (CUDA): running_mean "
              "and running_var are required in mode '", mode_s, "'");
  Tensor rm = running_mean.has_value() ? *running_mean : at::empty({0}, fc1_weight.options());
  Tensor rv = running_var.has_value() ? *running_var : at::empty({0}, fc1_weight.options());
  return std::get<0>(forward_cuda(u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
                                  rm, rv, mode_s, false, 0.0, eps, fold_width, padding));
}

// ---- backward ----------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_cuda(
    const Tensor& grad_y, const Tensor& u, const Tensor& pool_u, const Tensor& pool_x, const Tensor& gate,
    const Tensor& hidden, const Tensor& bn_mean, const Tensor& bn_invstd, const Tensor& fc1_weight,
    const OptTensor& fc1_identity_weight, const Tensor& fc2_weight, const OptTensor& pair_weight,
    const OptTensor& bn_weight, const OptTensor& bn_bias, std::string_view mode_s, bool training, int64_t fold_width,
    int64_t padding) {
  const Mode mode = parse_mode(mode_s);
  TORCH_CHECK(u.is_cuda(), "cmpe_se (CUDA): u must be a CUDA tensor, got ", u.device());
  TORCH_CHECK(grad_y.device() == u.device(), "cmpe_se (CUDA): grad_y must be on ", u.device());
  TORCH_CHECK(grad_y.sizes() == u.sizes(), "cmpe_se (CUDA): grad_y must have the shape of u ", u.sizes(), ", got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == u.scalar_type(), "cmpe_se (CUDA): grad_y must have the dtype of u (",
              u.scalar_type(), "), got ", grad_y.scalar_type());
  const c10::cuda::CUDAGuard guard(u.device());
  const at::ScalarType acc = acc_type(u.scalar_type());
  const auto fmt = layout_of(u);
  const Tensor uc = u.contiguous(fmt), dyc = grad_y.contiguous(fmt);
  Geometry g = pass_geometry(u, fmt, mode, acc, fc1_weight, fc2_weight, pair_weight, fold_width, padding);
  const bool pair = is_pair_mode(mode);
  for (auto nt : {std::make_pair("pool_u", &pool_u), std::make_pair("pool_x", &pool_x), std::make_pair("gate", &gate)}) {
    check_small(nt.first, *nt.second, u, acc);
    TORCH_CHECK(nt.second->dim() == 2 && nt.second->size(0) == g.N && nt.second->size(1) == g.C, "cmpe_se (CUDA): ",
                nt.first, " must be [", g.N, ", ", g.C, "], got ", nt.second->sizes());
  }
  check_small("hidden", hidden, u, acc);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == g.N && hidden.size(1) == g.Rh, "cmpe_se (CUDA): hidden must be [",
              g.N, ", ", g.Rh, "], got ", hidden.sizes());
  const Tensor pu = pool_u.contiguous(), px = pool_x.contiguous(), gt = gate.contiguous(), hd = hidden.contiguous();
  const Tensor w1 = small_contig(fc1_weight), w2 = small_contig(fc2_weight);
  const OptionalWeights ow = optional_weights(mode, g, u, acc, fc1_identity_weight, pair_weight, bn_weight, bn_bias);
  Tensor bm, bi;
  if (pair) {
    bm = small_contig(bn_mean);
    bi = small_contig(bn_invstd);
    check_small("bn_mean", bm, u, acc);
    check_small("bn_invstd", bi, u, acc);
    TORCH_CHECK(ow.bw.numel() == g.e && ow.bb.numel() == g.e && bm.numel() == g.e && bi.numel() == g.e,
                "cmpe_se (CUDA): bn_weight, bn_bias, bn_mean, bn_invstd must have ", g.e, " elements");
  }
  auto fopt = u.options().dtype(acc);
  Tensor grad_u = at::empty(u.sizes(), u.options().memory_format(fmt));
  Tensor grad_x = at::empty(u.sizes(), u.options().memory_format(fmt));
  Tensor d_fc1 = at::empty(fc1_weight.sizes(), fopt), d_fc2 = at::empty(fc2_weight.sizes(), fopt);
  Tensor d_fc1_id = mode == Mode::DOUBLE_FC ? at::empty(ow.w1i.sizes(), fopt) : at::empty({0}, fopt);
  Tensor d_pair = pair ? at::empty(ow.pw.sizes(), fopt) : at::empty({0}, fopt);
  Tensor d_bn_w = at::empty({g.e}, fopt), d_bn_b = at::empty({g.e}, fopt);

  const auto [l, wsp, ws] = plan_with_workspace(
      g, true, training, u, aligned16({uc.data_ptr(), dyc.data_ptr(), grad_u.data_ptr(), grad_x.data_ptr()}),
      &backward_workspace);
  unsigned char* const base = ws.base;

  BackwardParams p{};
  set_common(p, g, w1, w2, ow, training, base);
  p.dy = dyc.data_ptr();
  p.u = uc.data_ptr();
  p.du_out = grad_u.data_ptr();
  p.dx_out = grad_x.data_ptr();
  p.pool_u = pu.data_ptr();
  p.pool_x = px.data_ptr();
  p.gate = gt.data_ptr();
  p.hidden = hd.data_ptr();
  p.bn_mean = bm.defined() ? bm.data_ptr() : nullptr;
  p.bn_invstd = bi.defined() ? bi.data_ptr() : nullptr;
  p.d_fc1 = d_fc1.data_ptr();
  p.d_fc1_id = mode == Mode::DOUBLE_FC ? d_fc1_id.data_ptr() : nullptr;
  p.d_fc2 = d_fc2.data_ptr();
  p.d_pair = pair ? d_pair.data_ptr() : nullptr;
  p.d_bn_w = d_bn_w.data_ptr();
  p.d_bn_b = d_bn_b.data_ptr();
  p.gpart = base + wsp.gpart;
  p.dg = base + wsp.dg;
  p.dhp = base + wsp.dhp;
  p.zbuf = base + wsp.z;
  p.dv = base + wsp.dv;
  p.dudx = base + wsp.dudx;
  p.dq = base + wsp.dq;
  p.part1 = base + wsp.part1;
  p.fin = base + wsp.fin;
  CMPE_SE_DISPATCH(u.scalar_type(), "u", { launch_backward<scalar_t>(p, l, ws.stream); });
  return {grad_u, grad_x, d_fc1, d_fc1_id, d_fc2, d_pair, d_bn_w, d_bn_b};
}

}  // namespace
}  // namespace cmpe_se

TORCH_LIBRARY_IMPL(cmpe_se, CUDA, m) {
  m.impl("forward", &cmpe_se::forward_cuda);
  m.impl("backward", &cmpe_se::backward_cuda);
  m.impl("infer", &cmpe_se::infer_cuda);
}

// No Python module stub: cmpe_se_fused/_loader.py (or a deployment, docs/DEPLOY.md) loads this library with
// torch.ops.load_library after _C, whose schemas the registrations above implement.
