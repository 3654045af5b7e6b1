// cmpe_se::backward on CPU (SPEC section 2).
//
// Per sample, a head reads dY and U once (G = sum_p dY*U), runs the excitation backward and, in the
// pair modes, recomputes the centred patches q - mq of the pair view from the pools. A tail scatters
// the gradient of the pair view back onto the pools and writes dU, dX. In evaluation mode (and in
// se / double_fc) the tail follows the head of the same sample, while dY is still in cache; training
// BN needs batch sums first (sum dv, sum dv*(q - mq), the patch covariance), so there all heads run,
// then a small phase over the N x map data, then all tails. The BN backward over the e filters is
// collapsed to closed forms in those batch sums (see pair_gradients).
//
// dY is read where it lies whenever the kernels can (grad_view): each sample a dense block in the kernel
// layout at any sample stride (0 included: y.sum(0); a channel slice of torch.cat's gradient), or dY constant
// over H and W (y.sum(), y.sum((2, 3)): stride-0 pixels), where G = dY * sum_p U = dY * P * pool_u needs no pass
// over U at all and dU, dX are per-channel fills. Any other strides: one dense copy.
#include "cpu/common.h"
#include "cpu/cpu_ops.h"

namespace cmpe_se {
namespace cpu {
namespace {

struct BwdArgs {
  Config g;
  bool training = false;
  at::Tensor dyc, uc, du, dx;                       // dense in the kernel layout (dyc: per sample, dy_sn apart)
  int64_t dy_sn = 0;                                // elements between samples of dyc
  bool dy_bcast = false;                            // dY constant over H, W: read from dyb instead of dyc
  at::Tensor dyb;                                   // [N, C] in acc: dY at pixel 0 (dy_bcast)
  at::Tensor pool_u, pool_x, gate, hidden;          // contiguous, acc
  at::Tensor fc1, fc1_id, fc2;                      // contiguous, acc (fc2 transposed per call)
  PairGeom pv;
  PairFilters filt;
  at::Tensor d_fc1, d_fc1_id, d_fc2, d_pair, d_bn_w, d_bn_b;
};

// Pair-view sums of one batch, per sample (fixed-order reduction afterwards).
template <class A>
struct PairSums {
  SmallVec<double> S0;  // [N]: sum_d dv
  SmallVec<A> S1;       // [N][K]: sum_d dv * (q_k - mq_k)
  SmallVec<A> c2;       // [N][K][K]: sum_d (q - mq)(q - mq)' (training only)
};

// BN + pair-conv backward in closed form. With Qc = q - mq, t_i = w_i.mq - mu_i, db = dv/e:
//   a_i - mu_i = w_i.Qc + t_i, c_i = mean(db n_i) = s_i (w_i.S1 + t_i S0) / (e M)
//   dgamma_i = s_i (w_i.S1 + t_i S0) / e,  dbeta_i = S0 / e
//   training: dq = dv w_eff + cvec - B Qc,  cvec = -sum_i g_i s_i (S0/(eM) + c_i s_i t_i) w_i,
//             B = sum_i g_i s_i^2 c_i w_i w_i',  dw_i = g_i s_i (S1/e - c_i s_i M (Cov w_i + t_i mq))
//   eval:     dq = dv w_eff,  dw_i = g_i s_i (S1 + S0 mq) / e
// (s_i = invstd_i, g_i = gamma_i; S0, S1, Cov summed over the batch.) Returns cvec and B (training).
template <class A>
void pair_gradients(BwdArgs& a, const PairSums<A>& ps, const SmallVec<double>& mq, SmallVec<A>& cvec,
                    SmallVec<A>& B) {
  const PairFilters& f = a.filt;
  const int64_t e = f.e, K = f.K, N = a.g.N;
  const double M = static_cast<double>(N) * a.pv.D;
  double S0 = 0.0;
  SmallVec<double> S1(K, 0.0), cov(K * K, 0.0), cv(K, 0.0), Bd(K * K, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    S0 += ps.S0[n];
    for (int64_t k = 0; k < K; ++k) S1[k] += ps.S1[n * K + k];
    if (a.training)
      for (int64_t j = 0; j < K * K; ++j) cov[j] += ps.c2[n * K * K + j];
  }
  for (auto& v : cov) v /= M;
  A* dw = a.d_pair.data_ptr<A>();
  A* dgamma = a.d_bn_w.data_ptr<A>();
  A* dbeta = a.d_bn_b.data_ptr<A>();
  for (int64_t i = 0; i < e; ++i) {
    const double* w = f.w.data() + i * K;
    const double s = f.invstd[i], gs = f.gamma[i] * s;
    double wS = 0.0;
    for (int64_t k = 0; k < K; ++k) wS += w[k] * S1[k];
    const double num = wS + f.t[i] * S0;
    dgamma[i] = static_cast<A>(s * num / e);
    dbeta[i] = static_cast<A>(S0 / e);
    if (!a.training) {
      for (int64_t k = 0; k < K; ++k) dw[i * K + k] = static_cast<A>(gs * (S1[k] + S0 * mq[k]) / e);
      continue;
    }
    const double ci = s * num / (e * M);
    for (int64_t k = 0; k < K; ++k) {
      double covw = 0.0;
      for (int64_t l = 0; l < K; ++l) covw += cov[k * K + l] * w[l];
      dw[i * K + k] = static_cast<A>(gs * (S1[k] / e - ci * s * M * (covw + f.t[i] * mq[k])));
      cv[k] -= gs * (S0 / (e * M) + ci * s * f.t[i]) * w[k];
      for (int64_t l = 0; l < K; ++l) Bd[k * K + l] += gs * s * ci * w[k] * w[l];
    }
  }
  cvec = cast_vec<A>(cv);
  B = cast_vec<A>(Bd);
}

template <class S>
void run(BwdArgs& a) {
  using A = typename AccOf<S>::type;
  const Config& g = a.g;
  const StreamKernels<S>& sk = stream_kernels<S>();
  const SmallKernels<A>& mk = small_kernels<A>();
  const int64_t N = g.N, C = g.C, P = g.P, CP = C * P, R = g.R, r = g.r;
  const bool cl = g.channels_last, pair = is_pair(g.mode);
  const bool bcast = a.dy_bcast;
  const S* dy = bcast ? nullptr : static_cast<const S*>(a.dyc.data_ptr());
  const int64_t sn = a.dy_sn;
  const A* dyb = bcast ? a.dyb.data_ptr<A>() : nullptr;
  const S* u = bcast ? nullptr : static_cast<const S*>(a.uc.data_ptr());
  S* du = static_cast<S*>(a.du.data_ptr());
  S* dx = static_cast<S*>(a.dx.data_ptr());
  const A* pu = a.pool_u.data_ptr<A>();
  const A* px = a.pool_x.data_ptr<A>();
  const A* gt = a.gate.data_ptr<A>();
  const A* hid = a.hidden.data_ptr<A>();
  const A* W1 = a.fc1.data_ptr<A>();
  const A* W1i = g.mode == Mode::kDoubleFC ? a.fc1_id.data_ptr<A>() : nullptr;
  Buffer<A> w2t(C * R);
  transpose_into(a.fc2.data_ptr<A>(), C, R, w2t.data());
  const A* W2T = w2t.data();
  const int64_t K = a.pv.K, D = a.pv.D;
  const int64_t img_size = a.pv.Hp * a.pv.Wp;

  Buffer<A> dg(N * C), dh(N * R), z(pair ? N * D : 0), dv(pair ? N * D : 0);
  Buffer<A, kPatchInline> Qc(pair ? N * K * D : 0);
  PairSums<A> ps;
  SmallVec<double> mq;
  SmallVec<A> mqA, w_eff, cvec(K, A(0)), B;
  A b_eff = A(0);
  if (pair) {
    mq = patch_mean(a.pv, pu, px, N);
    mqA = cast_vec<A>(mq);
    a.filt.collapse(mq);
    w_eff = cast_vec<A>(a.filt.w_eff);
    b_eff = static_cast<A>(a.filt.b_eff);
    ps.S0.assign(N, 0.0);
    ps.S1.assign(N * K, A(0));
    if (a.training) ps.c2.assign(N * K * K, A(0));
  }

  // dY . U -> excitation backward -> d(pools) (se, double_fc) or dv, Qc, z and the sums (pair modes)
  auto head = [&](int64_t n, A* G, A* dpu, A* dpx, A* scratch) {
    if (bcast) {  // G = dY * sum_p U
      const A* d = dyb + n * C;
      const A* pun = pu + n * C;
      const A fP = static_cast<A>(P);
      for (int64_t c = 0; c < C; ++c) G[c] = d[c] * (pun[c] * fP);
    } else {
      sk.grad_reduce(dy + n * sn, u + n * CP, C, P, cl, G, scratch);
    }
    A* dhn = dh.data() + n * R;
    mk.excite_backward(G, gt + n * C, hid + n * R, W2T, R, C, dg.data() + n * C, dhn);
    if (g.mode == Mode::kSE) {
      mk.gemv_t(W1, dhn, r, C, dpu);
      for (int64_t c = 0; c < C; ++c) dpx[c] = A(0);
    } else if (g.mode == Mode::kDoubleFC) {
      mk.gemv_t(W1, dhn, r, C, dpu);
      mk.gemv_t(W1i, dhn + r, r, C, dpx);
    } else {
      A* dvn = dv.data() + n * D;
      A* qn = Qc.data() + n * K * D;
      mk.gemv_t(W1, dhn, r, D, dvn);
      mk.gather_patches(pu + n * C, px + n * C, a.pv, mqA.data(), qn, scratch);
      mk.patch_combine(qn, w_eff.data(), b_eff, K, D, z.data() + n * D);
      double s0 = 0.0;
      for (int64_t d = 0; d < D; ++d) s0 += dvn[d];
      ps.S0[n] = s0;
      for (int64_t k = 0; k < K; ++k) ps.S1[n * K + k] = mk.dot(dvn, qn + k * D, D);
      if (a.training) mk.patch_moments(qn, K, D, ps.c2.data() + n * K * K);
    }
  };
  // d(pools) -> dU = gate*dY + du/P, dX = dY + dx/P
  auto tail = [&](int64_t n, A* dpu, A* dpx, A* scratch) {
    if (pair) {
      for (int64_t c = 0; c < C; ++c) dpu[c] = dpx[c] = A(0);
      mk.patch_scatter(dv.data() + n * D, Qc.data() + n * K * D, w_eff.data(), cvec.data(),
                       B.empty() ? nullptr : B.data(), a.pv, dpu, dpx, scratch);
    }
    const A invP = A(1) / A(P);
    for (int64_t c = 0; c < C; ++c) {
      dpu[c] *= invP;
      dpx[c] *= invP;
    }
    if (bcast) {  // dU = gate*dY + du/P and dX = dY + dx/P are constant over the pixels of a channel
      const A* d = dyb + n * C;
      const A* gn = gt + n * C;
      for (int64_t c = 0; c < C; ++c) {
        dpu[c] = gn[c] * d[c] + dpu[c];
        dpx[c] = d[c] + dpx[c];
      }
      sk.grad_fill(dpu, dpx, du + n * CP, dx + n * CP, C, P, cl);
    } else {
      sk.grad_write(dy + n * sn, gt + n * C, dpu, dpx, du + n * CP, dx + n * CP, C, P, cl);
    }
  };
  auto samples = [&](bool do_head, bool do_tail) {
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      Buffer<A> G(C), dpu(C), dpx(C);
      Buffer<A, kPatchInline> scratch(std::max(C, K * D + img_size));
      // a tails-only pass walks its chunk backwards: the last heads' dY is still in cache
      for (int64_t i = n0; i < n1; ++i) {
        const int64_t n = do_head ? i : n1 - 1 - (i - n0);
        if (do_head) head(n, G.data(), dpu.data(), dpx.data(), scratch.data());
        if (do_tail) tail(n, dpu.data(), dpx.data(), scratch.data());
      }
    });
  };

  if (pair && a.training) {
    samples(true, false);
    pair_gradients<A>(a, ps, mq, cvec, B);
    samples(false, true);
  } else {
    samples(true, true);
    if (pair) pair_gradients<A>(a, ps, mq, cvec, B);
  }

  // weight gradients, each entry summed over n in order: dW2 = dg' h, dW1 = dh_pre' z
  Buffer<A> dW2T(R * C);
  at::parallel_for(0, R, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) mk.weighted_sum(hid + j, R, dg.data(), N, C, dW2T.data() + j * C);
  });
  A* dW2 = a.d_fc2.data_ptr<A>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < R; ++j) dW2[c * R + j] = dW2T[j * C + c];
  const int64_t Dz = g.Dz;
  const A* zsrc = pair ? z.data() : pu;
  A* dW1 = a.d_fc1.data_ptr<A>();
  A* dW1i = g.mode == Mode::kDoubleFC ? a.d_fc1_id.data_ptr<A>() : nullptr;
  at::parallel_for(0, r, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      mk.weighted_sum(dh.data() + j, R, zsrc, N, Dz, dW1 + j * Dz);
      if (dW1i != nullptr) mk.weighted_sum(dh.data() + r + j, R, px, N, C, dW1i + j * C);
    }
  });
}

// How the kernels read grad_y (see the top of this file): in place when each sample is a dense block in the
// kernel layout (any sample stride) or when it is constant over H and W; else a dense copy.
void grad_view(BwdArgs& a, const at::Tensor& grad_y, at::MemoryFormat mf) {
  const Config& g = a.g;
  auto stride_is = [&](int d, int64_t expect) { return grad_y.size(d) == 1 || grad_y.stride(d) == expect; };
  const bool dense = g.channels_last ? stride_is(1, 1) && stride_is(3, g.C) && stride_is(2, g.W * g.C)
                                     : stride_is(3, 1) && stride_is(2, g.W) && stride_is(1, g.P);
  if (dense) {
    a.dyc = grad_y;
    a.dy_sn = g.N > 1 ? grad_y.stride(0) : 0;
    return;
  }
  if (stride_is(2, 0) && stride_is(3, 0)) {
    a.dy_bcast = true;
    a.dyb = grad_y.select(3, 0).select(2, 0).to(g.acc).contiguous();  // [N, C]: small
    return;
  }
  a.dyc = grad_y.contiguous(mf);
  a.dy_sn = g.C * g.P;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad_y, const Tensor& u, const Tensor& pool_u, const Tensor& pool_x, const Tensor& gate,
    const Tensor& hidden, const Tensor& bn_mean, const Tensor& bn_invstd, const Tensor& fc1_weight,
    const OptTensor& fc1_identity_weight, const Tensor& fc2_weight, const OptTensor& pair_weight,
    const OptTensor& bn_weight, const OptTensor& bn_bias, std::string_view mode, bool training, int64_t fold_width,
    int64_t padding) {
  const char* op = "cmpe_se::backward";
  BwdArgs a;
  a.g = check_activations(op, "u", u, "grad_y", grad_y);
  Config& g = a.g;
  g.mode = parse_mode(op, mode);
  check_weights(op, g, mode, fc1_weight, fc1_identity_weight, fc2_weight, pair_weight, bn_weight, bn_bias,
                fold_width, padding);
  check_small(op, "pool_u", pool_u, {g.N, g.C}, g.acc);
  check_small(op, "pool_x", pool_x, {g.N, g.C}, g.acc);
  check_small(op, "gate", gate, {g.N, g.C}, g.acc);
  check_small(op, "hidden", hidden, {g.N, g.R}, g.acc);
  const bool pair = is_pair(g.mode);
  if (pair) {
    check_small(op, "bn_mean", bn_mean, {g.e}, g.acc);
    check_small(op, "bn_invstd", bn_invstd, {g.e}, g.acc);
  }

  const at::MemoryFormat mf = layout_of(g);
  grad_view(a, grad_y, mf);
  if (!a.dy_bcast) a.uc = u.contiguous(mf);
  Output du(u, mf), dx(u, mf);
  a.du = du.buf;
  a.dx = dx.buf;
  a.pool_u = pool_u.contiguous();
  a.pool_x = pool_x.contiguous();
  a.gate = gate.contiguous();
  a.hidden = hidden.contiguous();
  a.fc1 = fc1_weight.contiguous();
  if (g.mode == Mode::kDoubleFC) a.fc1_id = fc1_identity_weight->contiguous();
  a.fc2 = fc2_weight.contiguous();
  a.training = training;
  a.d_fc1 = new_cpu({g.r, g.Dz}, g.acc);
  a.d_fc1_id = g.mode == Mode::kDoubleFC ? new_cpu({g.r, g.C}, g.acc) : new_cpu({0}, g.acc);
  a.d_fc2 = new_cpu({g.C, g.R}, g.acc);
  if (pair) {
    a.pv = make_pair_geom(g.mode, g.C, g.fold, g.pad);
    a.filt = load_filters(*pair_weight, *bn_weight, *bn_bias);
    a.filt.mu = to_doubles(bn_mean);
    a.filt.invstd = to_doubles(bn_invstd);
    a.d_pair = new_cpu({g.e, 1, g.kh, g.kw}, g.acc);
    a.d_bn_w = new_cpu({g.e}, g.acc);
    a.d_bn_b = new_cpu({g.e}, g.acc);
  } else {
    a.d_pair = new_cpu({0}, g.acc);
    a.d_bn_w = new_cpu({0}, g.acc);
    a.d_bn_b = new_cpu({0}, g.acc);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "cmpe_se_backward_cpu",
                                  [&] { run<typename StorageOf<scalar_t>::type>(a); });
  du.finish();
  dx.finish();
  return {du.out, dx.out, a.d_fc1, a.d_fc1_id, a.d_fc2, a.d_pair, a.d_bn_w, a.d_bn_b};
}

}  // namespace cpu
}  // namespace cmpe_se
