// cmpe_se::forward on CPU: squeeze, excite, rescale, fused per sample.
//
// Evaluation mode and the modes without BN (se, double_fc) need nothing from other samples, so each
// sample is squeezed, excited and rescaled in one go: its second read of U and X hits the cache.
// Training-mode pair views need the batch statistics of BN first (the only cross-sample
// dependency): squeeze every sample, then a small phase over the N x map data (patch moments ->
// mu_i, var_i of every filter), then excite + rescale every sample.
#include "cpu/common.h"
#include "cpu/cpu_ops.h"

namespace cmpe_se {
namespace cpu {
namespace {

struct FwdArgs {
  Config g;
  at::Tensor uc, xc, y;           // dense in the kernel layout
  at::Tensor fc1, fc1_id, fc2;    // contiguous, acc (fc2 is transposed per call into a work buffer)
  PairGeom pv;
  PairFilters filt;
  at::Tensor running_mean, running_var;
  bool training = false;
  double momentum = 0.1, eps = 1e-5;
  // the saved outputs (acc): the returned tensors of cmpe_se::forward, or a work buffer of cmpe_se::infer
  void *pool_u = nullptr, *pool_x = nullptr, *gate = nullptr, *hidden = nullptr, *bn_mean = nullptr,
       *bn_invstd = nullptr;
};

// Training-mode BN statistics from the centred patch moments (mu_i = w_i . mq, var_i = w_i' Cov w_i),
// saved in acc; the running statistics are updated exactly like nn.BatchNorm2d.
template <class A>
void batch_statistics(FwdArgs& a, const A* c2, const SmallVec<double>& mq) {
  const int64_t e = a.filt.e, K = a.filt.K, N = a.g.N;
  const double M = static_cast<double>(N) * a.pv.D;
  SmallVec<double> cov(K * K, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K * K; ++j) cov[j] += c2[n * K * K + j];
  for (auto& v : cov) v /= M;
  SmallVec<double> var(e);
  a.filt.mu.assign(e, 0.0);
  a.filt.invstd.assign(e, 0.0);
  A* mean_out = static_cast<A*>(a.bn_mean);
  A* invstd_out = static_cast<A*>(a.bn_invstd);
  for (int64_t i = 0; i < e; ++i) {
    const double* w = a.filt.w.data() + i * K;
    double mu = 0.0, v = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      mu += w[k] * mq[k];
      for (int64_t l = 0; l < K; ++l) v += w[k] * cov[k * K + l] * w[l];
    }
    var[i] = v < 0.0 ? 0.0 : v;  // rounding can go below 0; NaN (and inf) propagate, as in nn.BatchNorm2d
    mean_out[i] = static_cast<A>(mu);
    invstd_out[i] = static_cast<A>(1.0 / std::sqrt(var[i] + a.eps));
    a.filt.mu[i] = mean_out[i];  // normalise with exactly the saved statistics
    a.filt.invstd[i] = invstd_out[i];
  }
  const double mom = a.momentum, unbias = M / (M - 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.running_mean.scalar_type(), "cmpe_se_rm", [&] {
    auto rm = a.running_mean.accessor<scalar_t, 1>();
    for (int64_t i = 0; i < e; ++i)
      rm[i] = static_cast<scalar_t>((1.0 - mom) * static_cast<double>(rm[i]) + mom * a.filt.mu[i]);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.running_var.scalar_type(), "cmpe_se_rv", [&] {
    auto rv = a.running_var.accessor<scalar_t, 1>();
    for (int64_t i = 0; i < e; ++i)
      rv[i] = static_cast<scalar_t>((1.0 - mom) * static_cast<double>(rv[i]) + mom * var[i] * unbias);
  });
}

// Evaluation-mode BN: the running statistics, in acc as the reference uses them.
template <class A>
void running_statistics(FwdArgs& a) {
  const int64_t e = a.filt.e;
  const SmallVec<double> rm = to_doubles(a.running_mean), rv = to_doubles(a.running_var);
  A* mean_out = static_cast<A*>(a.bn_mean);
  A* invstd_out = static_cast<A*>(a.bn_invstd);
  a.filt.mu.assign(e, 0.0);
  a.filt.invstd.assign(e, 0.0);
  for (int64_t i = 0; i < e; ++i) {
    mean_out[i] = static_cast<A>(rm[i]);
    invstd_out[i] = A(1) / std::sqrt(static_cast<A>(rv[i]) + static_cast<A>(a.eps));
    a.filt.mu[i] = mean_out[i];
    a.filt.invstd[i] = invstd_out[i];
  }
}

template <class S>
void run(FwdArgs& a) {
  using A = typename AccOf<S>::type;
  const Config& g = a.g;
  const StreamKernels<S>& sk = stream_kernels<S>();
  const SmallKernels<A>& mk = small_kernels<A>();
  const int64_t N = g.N, C = g.C, P = g.P, CP = C * P, R = g.R, r = g.r;
  const bool cl = g.channels_last, pair = is_pair(g.mode);
  const S* u = static_cast<const S*>(a.uc.data_ptr());
  const S* x = static_cast<const S*>(a.xc.data_ptr());
  S* y = static_cast<S*>(a.y.data_ptr());
  A* pu = static_cast<A*>(a.pool_u);
  A* px = static_cast<A*>(a.pool_x);
  A* gt = static_cast<A*>(a.gate);
  A* hid = static_cast<A*>(a.hidden);
  const A* W1 = a.fc1.data_ptr<A>();
  const A* W1i = g.mode == Mode::kDoubleFC ? a.fc1_id.data_ptr<A>() : nullptr;
  Buffer<A> w2t(C * R);
  transpose_into(a.fc2.data_ptr<A>(), C, R, w2t.data());
  const A* W2T = w2t.data();
  const int64_t K = a.pv.K, D = a.pv.D;
  const int64_t img_size = a.pv.Hp * a.pv.Wp;
  SmallVec<A> w_eff;
  A b_eff = A(0);

  // the gate of sample n; in the pair modes z holds its map already (patch_combine or pair_conv)
  auto excite = [&](int64_t n, const A* z) {
    A* h = hid + n * R;
    if (g.mode == Mode::kDoubleFC) {
      mk.gemv_relu(W1, pu + n * C, r, C, h);
      mk.gemv_relu(W1i, px + n * C, r, C, h + r);
    } else if (!pair) {
      mk.gemv_relu(W1, pu + n * C, r, C, h);
    } else {
      mk.gemv_relu(W1, z, r, D, h);
    }
    mk.excite_gate(W2T, h, R, C, gt + n * C);
  };

  if (pair && a.training) {
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      Buffer<A> scratch(2 * C);
      for (int64_t n = n0; n < n1; ++n)
        sk.squeeze(u + n * CP, x + n * CP, C, P, cl, pu + n * C, px + n * C, scratch.data());
    });
    const SmallVec<double> mq = patch_mean(a.pv, pu, px, N);
    const SmallVec<A> mqA = cast_vec<A>(mq);
    Buffer<A, kPatchInline> Qc(N * K * D);
    Buffer<A> c2(N * K * K);
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      Buffer<A> img(img_size);
      for (int64_t n = n0; n < n1; ++n) {
        mk.gather_patches(pu + n * C, px + n * C, a.pv, mqA.data(), Qc.data() + n * K * D, img.data());
        mk.patch_moments(Qc.data() + n * K * D, K, D, c2.data() + n * K * K);
      }
    });
    batch_statistics<A>(a, c2.data(), mq);
    a.filt.collapse(mq);
    w_eff = cast_vec<A>(a.filt.w_eff);
    b_eff = static_cast<A>(a.filt.b_eff);
    // same chunks as the squeeze, walked backwards: the last samples squeezed are still in cache
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      Buffer<A> z(D);
      for (int64_t n = n1 - 1; n >= n0; --n) {
        mk.patch_combine(Qc.data() + n * K * D, w_eff.data(), b_eff, K, D, z.data());
        excite(n, z.data());
        sk.rescale(u + n * CP, x + n * CP, gt + n * C, y + n * CP, C, P, cl);
      }
    });
    return;
  }

  if (pair) {
    running_statistics<A>(a);
    a.filt.collapse(SmallVec<double>(K, 0.0));
    w_eff = cast_vec<A>(a.filt.w_eff);
    b_eff = static_cast<A>(a.filt.b_eff);
  }
  // se: the gate needs pool_u only, so X is summed by the rescale pass and read once
  const bool x_late = g.mode == Mode::kSE;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    Buffer<A> scratch(2 * C), z(D), conv(pair ? mk.conv_scratch(a.pv) : 0);
    for (int64_t n = n0; n < n1; ++n) {
      sk.squeeze(u + n * CP, x_late ? nullptr : x + n * CP, C, P, cl, pu + n * C, px + n * C, scratch.data());
      if (pair) mk.pair_conv(pu + n * C, px + n * C, a.pv, w_eff.data(), b_eff, z.data(), conv.data());
      excite(n, z.data());
      if (x_late)
        sk.rescale_pool(u + n * CP, x + n * CP, gt + n * C, y + n * CP, C, P, cl, px + n * C, scratch.data());
      else
        sk.rescale(u + n * CP, x + n * CP, gt + n * C, y + n * CP, C, P, cl);
    }
  });
}

// The checks and the set-up both ops share; the saved outputs are left to the caller.
FwdArgs prepare(const char* op, const Tensor& u, const Tensor& x, const Tensor& fc1_weight,
                const OptTensor& fc1_identity_weight, const Tensor& fc2_weight, const OptTensor& pair_weight,
                const OptTensor& bn_weight, const OptTensor& bn_bias, const Tensor* running_mean,
                const Tensor* running_var, std::string_view mode, bool training, double momentum, double eps,
                int64_t fold_width, int64_t padding) {
  FwdArgs a;
  a.g = check_activations(op, "u", u, "x", x);
  Config& g = a.g;
  g.mode = parse_mode(op, mode);
  check_weights(op, g, mode, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
                fold_width, padding);
  const bool pair = is_pair(g.mode);
  if (pair) {
    TORCH_CHECK(running_mean != nullptr, op, ": running_mean is required in mode '", mode, "'");
    TORCH_CHECK(running_var != nullptr, op, ": running_var is required in mode '", mode, "'");
    check_running(op, "running_mean", *running_mean, g);
    check_running(op, "running_var", *running_var, g);
    TORCH_CHECK(!training || g.N * g.Dz > 1, op, ": pair_bn: expected more than 1 value per filter in training mode,"
                " got ", g.N * g.Dz, " (batch ", g.N, " x ", g.Dz, " map positions)");
  }

  const at::MemoryFormat mf = layout_of(g);
  a.uc = u.contiguous(mf);
  a.xc = x.contiguous(mf);
  a.fc1 = fc1_weight.contiguous();
  if (g.mode == Mode::kDoubleFC) a.fc1_id = fc1_identity_weight->contiguous();
  a.fc2 = fc2_weight.contiguous();
  if (pair) {
    a.pv = make_pair_geom(g.mode, g.C, g.fold, g.pad);
    a.filt = load_filters(*pair_weight, *bn_weight, *bn_bias);
    a.running_mean = *running_mean;
    a.running_var = *running_var;
  }
  a.training = training;
  a.momentum = momentum;
  a.eps = eps;
  return a;
}

// Element counts of the saved outputs, in the order cmpe_se::infer lays them out in one work buffer.
struct SavedSizes {
  int64_t nc, nr, e;
  explicit SavedSizes(const Config& g) : nc(g.N * g.C), nr(g.N * g.R), e(is_pair(g.mode) ? g.e : 0) {}
  int64_t total() const { return 3 * nc + nr + 2 * e; }
};

void point_saved(FwdArgs& a, char* base, size_t elem) {
  const SavedSizes n(a.g);
  size_t off = 0;
  auto next = [&](int64_t count) {
    void* p = base + off * elem;
    off += static_cast<size_t>(count);
    return p;
  };
  a.pool_u = next(n.nc);
  a.pool_x = next(n.nc);
  a.gate = next(n.nc);
  a.hidden = next(n.nr);
  a.bn_mean = next(n.e);
  a.bn_invstd = next(n.e);
}

void dispatch_run(FwdArgs& a, at::ScalarType st) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "cmpe_se_forward_cpu",
                                  [&] { run<typename StorageOf<scalar_t>::type>(a); });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& u, const Tensor& x, const Tensor& fc1_weight, const OptTensor& fc1_identity_weight,
    const Tensor& fc2_weight, const OptTensor& pair_weight, const OptTensor& bn_weight, const OptTensor& bn_bias,
    Tensor& running_mean, Tensor& running_var, std::string_view mode, bool training, double momentum, double eps,
    int64_t fold_width, int64_t padding) {
  FwdArgs a = prepare("cmpe_se::forward", u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight,
                      bn_bias, &running_mean, &running_var, mode, training, momentum, eps, fold_width, padding);
  const Config& g = a.g;
  Output y(u, layout_of(g));
  a.y = y.buf;
  // the six saved outputs: separate allocations (outputs sharing a storage count as aliasing to opcheck)
  const int64_t e = is_pair(g.mode) ? g.e : 0;
  Tensor pool_u = new_cpu({g.N, g.C}, g.acc), pool_x = new_cpu({g.N, g.C}, g.acc), gate = new_cpu({g.N, g.C}, g.acc),
         hidden = new_cpu({g.N, g.R}, g.acc), bn_mean = new_cpu({e}, g.acc), bn_invstd = new_cpu({e}, g.acc);
  a.pool_u = pool_u.data_ptr();
  a.pool_x = pool_x.data_ptr();
  a.gate = gate.data_ptr();
  a.hidden = hidden.data_ptr();
  a.bn_mean = bn_mean.data_ptr();
  a.bn_invstd = bn_invstd.data_ptr();
  dispatch_run(a, u.scalar_type());
  y.finish();
  return {y.out, std::move(pool_u), std::move(pool_x), std::move(gate), std::move(hidden), std::move(bn_mean),
          std::move(bn_invstd)};
}

Tensor infer(const Tensor& u, const Tensor& x, const Tensor& fc1_weight, const OptTensor& fc1_identity_weight,
             const Tensor& fc2_weight, const OptTensor& pair_weight, const OptTensor& bn_weight,
             const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
             std::string_view mode, double eps, int64_t fold_width, int64_t padding) {
  FwdArgs a = prepare("cmpe_se::infer", u, x, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight,
                      bn_bias, present(running_mean) ? &*running_mean : nullptr,
                      present(running_var) ? &*running_var : nullptr, mode, false, 0.0, eps, fold_width, padding);
  Output y(u, layout_of(a.g));
  a.y = y.buf;
  // the saved outputs of cmpe_se::forward, computed the same way, into a work buffer
  const size_t elem = a.g.acc == at::kDouble ? sizeof(double) : sizeof(float);
  Buffer<double> work((SavedSizes(a.g).total() * elem + sizeof(double) - 1) / sizeof(double));
  point_saved(a, reinterpret_cast<char*>(work.data()), elem);
  dispatch_run(a, u.scalar_type());
  y.finish();
  return y.out;
}

}  // namespace cpu
}  // namespace cmpe_se
