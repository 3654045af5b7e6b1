// Small per-sample math: the excitation network and the pair view (included by kernels_impl.h
// inside the per-ISA namespace; see there). Vector lengths are C, r, D (at most a few thousand),
// all operands stay in L1/L2.

typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

// I: lane masks of V (lanes of the same width, Lane)
template <class A> struct VecOf;
template <> struct VecOf<float> { using V = f32x8; using I = i32x8; using Lane = int32_t; static constexpr int L = 8; };
template <> struct VecOf<double> { using V = f64x4; using I = i64x4; using Lane = int64_t; static constexpr int L = 4; };

// exp(x), 8 lanes: Cephes expf (range reduction by ln 2 in two parts, degree-5 polynomial), within
// about 1 ulp like the libm / Sleef exp that torch.sigmoid uses. NaN propagates.
CMPE_INL f32x8 exp_f32x8(f32x8 x) {
  x = x > 88.3762626647949f ? f32x8{} + 88.3762626647949f : x;
  x = x < -87.3365447504f ? f32x8{} - 87.3365447504f : x;
  const f32x8 t = x * 1.44269504088896341f;
  const i32x8 n = __builtin_convertvector(t + (t >= 0.0f ? f32x8{} + 0.5f : f32x8{} - 0.5f), i32x8);
  const f32x8 nf = __builtin_convertvector(n, f32x8);
  const f32x8 r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  f32x8 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * (f32x8)((n + 127) << 23);
}

template <class A> CMPE_INL void sigmoid_inplace(A* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = A(1) / (A(1) + std::exp(-g[i]));
}
template <> CMPE_INL void sigmoid_inplace<float>(float* g, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(g + i, 1.0f / (1.0f + exp_f32x8(-vload<f32x8>(g + i))));
  for (; i < n; ++i) g[i] = 1.0f / (1.0f + std::exp(-g[i]));
}

template <class A>
struct Small {
  using V = typename VecOf<A>::V;
  using I = typename VecOf<A>::I;
  using Lane = typename VecOf<A>::Lane;
  static constexpr int L = VecOf<A>::L;

  static A dot(const A* a, const A* b, int64_t n) {
    V s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t i = 0;
    for (; i + 4 * L <= n; i += 4 * L) {
      s0 += vload<V>(a + i) * vload<V>(b + i);
      s1 += vload<V>(a + i + L) * vload<V>(b + i + L);
      s2 += vload<V>(a + i + 2 * L) * vload<V>(b + i + 2 * L);
      s3 += vload<V>(a + i + 3 * L) * vload<V>(b + i + 3 * L);
    }
    for (; i + L <= n; i += L) s0 += vload<V>(a + i) * vload<V>(b + i);
    A s = hsum((s0 + s1) + (s2 + s3));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
  }

  static void axpy(A alpha, const A* x, A* y, int64_t n) {
    const V av = V{} + alpha;
    int64_t i = 0;
    for (; i + L <= n; i += L) vstore(y + i, vload<V>(y + i) + av * vload<V>(x + i));
    for (; i < n; ++i) y[i] += alpha * x[i];
  }

  // out[k] = sum_i coef[i*cs] * row(i)[k], summed over i in order; register-blocked so that out is
  // written once. row(i): the i-th row's pointer (rows of a matrix, or shifted runs of one image).
  template <class RowAt>
  static CMPE_INL void weighted_rows(const A* coef, int64_t cs, RowAt row, int64_t n, int64_t len, A* out) {
    int64_t k = 0;
    for (; k + 4 * L <= len; k += 4 * L) {
      V a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t i = 0; i < n; ++i) {
        const V c = V{} + coef[i * cs];
        const A* r = row(i) + k;
        a0 += c * vload<V>(r);
        a1 += c * vload<V>(r + L);
        a2 += c * vload<V>(r + 2 * L);
        a3 += c * vload<V>(r + 3 * L);
      }
      vstore(out + k, a0);
      vstore(out + k + L, a1);
      vstore(out + k + 2 * L, a2);
      vstore(out + k + 3 * L, a3);
    }
    for (; k + L <= len; k += L) {
      V a0 = {};
      for (int64_t i = 0; i < n; ++i) a0 += (V{} + coef[i * cs]) * vload<V>(row(i) + k);
      vstore(out + k, a0);
    }
    for (; k < len; ++k) {
      A s = A(0);
      for (int64_t i = 0; i < n; ++i) s += coef[i * cs] * row(i)[k];
      out[k] = s;
    }
  }

  // out[k] = sum_i coef[i*cs] * rows[i*len + k] (the weight-gradient GEMMs, W1' dh, W2 h and the filter
  // combination)
  static void weighted_sum(const A* coef, int64_t cs, const A* rows, int64_t n, int64_t len, A* out) {
    weighted_rows(coef, cs, [rows, len](int64_t i) { return rows + i * len; }, n, len, out);
  }

  static void gemv_relu(const A* W, const A* x, int64_t rows, int64_t cols, A* y) {
    for (int64_t i = 0; i < rows; ++i) {
      const A v = dot(W + i * cols, x, cols);
      y[i] = v < A(0) ? A(0) : v;  // NaN propagates, as torch.relu
    }
  }

  static void excite_gate(const A* W2T, const A* h, int64_t R, int64_t C, A* gate) {
    weighted_sum(h, 1, W2T, R, C, gate);
    sigmoid_inplace<A>(gate, C);
  }

  static void excite_backward(const A* G, const A* gate, const A* h, const A* W2T, int64_t R, int64_t C, A* dg,
                              A* dh_pre) {
    for (int64_t c = 0; c < C; ++c) dg[c] = G[c] * gate[c] * (A(1) - gate[c]);
    for (int64_t j = 0; j < R; ++j) dh_pre[j] = h[j] > A(0) ? dot(W2T + j * C, dg, C) : A(0);
  }

  static void gemv_t(const A* W, const A* x, int64_t rows, int64_t cols, A* y) {
    weighted_sum(x, 1, W, rows, cols, y);
  }

  // the padded pair-view image of one sample
  static void build_image(const A* pool_u, const A* pool_x, const PairGeom& g, A* img) {
    if (!g.folded) {
      for (int64_t c = 0; c < g.C; ++c) {
        img[2 * c] = pool_u[c];
        img[2 * c + 1] = pool_x[c];
      }
      return;
    }
    for (int64_t i = 0; i < g.Hp * g.Wp; ++i) img[i] = A(0);
    for (int64_t row = 0; row < g.Hp - 2 * g.pad; ++row) {
      const A* src = (row & 1 ? pool_x : pool_u) + (row >> 1) * g.m;
      A* dst = img + (row + g.pad) * g.Wp + g.pad;
      for (int64_t j = 0; j < g.m; ++j) dst[j] = src[j];
    }
  }

  static void gather_patches(const A* pool_u, const A* pool_x, const PairGeom& g, const A* ref, A* Qc, A* img) {
    build_image(pool_u, pool_x, g, img);
    // the geometry in locals: the stores below could alias g as far as the compiler knows
    const int64_t kh = g.kh, kw = g.kw, Ho = g.Ho, Wo = g.Wo, Wp = g.Wp, D = g.D;
    const A* img_end = img + g.Hp * Wp;
    const A* qc_end = Qc + g.K * D;
    for (int64_t a = 0; a < kh; ++a)
      for (int64_t b = 0; b < kw; ++b) {
        const int64_t k = a * kw + b;
        const A rk = ref[k];
        const V rv = V{} + rk;
        for (int64_t oi = 0; oi < Ho; ++oi) {
          const A* src = img + (oi + a) * Wp + b;
          A* dst = Qc + k * D + oi * Wo;
          // whole vectors even across the row's end (narrow maps: Wo < L): the lanes past it land
          // on the next row or tap, which is written after this one; scalar only at the buffers' ends
          int64_t j = 0;
          for (; j < Wo && src + j + L <= img_end && dst + j + L <= qc_end; j += L)
            vstore(dst + j, vload<V>(src + j) - rv);
          for (; j < Wo; ++j) dst[j] = src[j] - rk;
        }
      }
  }

  // Scratch of pair_conv: the image plus slack for the wide map's reads, then the wide map.
  static int64_t conv_scratch(const PairGeom& g) {
    const int64_t wide = (g.Ho * g.Wp + L - 1) / L * L;
    return g.Hp * g.Wp + g.kw + L + wide;
  }

  // v = b + sum_k w[k] * tap k, straight from the image (no patch matrix; evaluation-mode forward).
  // The map is computed over whole image rows (Ho x Wp, the columns past Wo discarded), so every
  // tap is one run of vector FMAs however narrow the map; each v[d] is summed in patch_combine's
  // order (k ascending from 0, then + b).
  static void pair_conv(const A* pool_u, const A* pool_x, const PairGeom& g, const A* w, A b, A* v, A* scratch) {
    const int64_t img_size = g.Hp * g.Wp, n = g.Ho * g.Wp;
    A* img = scratch;
    A* wide = scratch + img_size + g.kw + L;
    build_image(pool_u, pool_x, g, img);
    for (int64_t i = img_size; i < img_size + g.kw + L; ++i) img[i] = A(0);
    int64_t off[9];
    for (int64_t a = 0; a < g.kh; ++a)
      for (int64_t c = 0; c < g.kw; ++c) off[a * g.kw + c] = a * g.Wp + c;
    const int64_t nr = (n + L - 1) / L * L;  // whole vectors: the last reads into the slack
    weighted_rows(w, 1, [img, &off](int64_t k) { return img + off[k]; }, g.K, nr, wide);
    for (int64_t oi = 0; oi < g.Ho; ++oi)
      for (int64_t j = 0; j < g.Wo; ++j) v[oi * g.Wo + j] = wide[oi * g.Wp + j] + b;
  }

  static void patch_moments(const A* Qc, int64_t K, int64_t D, A* c2) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = k; l < K; ++l) c2[k * K + l] = c2[l * K + k] = dot(Qc + k * D, Qc + l * D, D);
  }

  static void patch_combine(const A* Qc, const A* w, A b, int64_t K, int64_t D, A* v) {
    weighted_sum(w, 1, Qc, K, D, v);
    for (int64_t d = 0; d < D; ++d) v[d] += b;
  }

  // dq[k,d] = cvec[k] + w[k]*dv[d] - sum_l B[k,l]*Qc[l,d] for all k, one block of L positions at a
  // time with the K patch vectors held in registers (KK: compile-time K, 0 = any K <= 9).
  template <int KK>
  static void patch_dq(const A* dv, const A* Qc, const A* w, const A* cvec, const A* B, int64_t Kr, int64_t D,
                       A* dq) {
    const int64_t K = KK > 0 ? KK : Kr;
    int64_t d = 0;
    for (; d + L <= D; d += L) {
      V q[9];
      for (int64_t l = 0; l < K; ++l) q[l] = vload<V>(Qc + l * D + d);
      const V g = vload<V>(dv + d);
      for (int64_t k = 0; k < K; ++k) {
        V acc = (V{} + cvec[k]) + (V{} + w[k]) * g;
        for (int64_t l = 0; l < K; ++l) acc -= (V{} + B[k * K + l]) * q[l];
        vstore(dq + k * D + d, acc);
      }
    }
    for (; d < D; ++d)
      for (int64_t k = 0; k < K; ++k) {
        A acc = cvec[k] + w[k] * dv[d];
        for (int64_t l = 0; l < K; ++l) acc -= B[k * K + l] * Qc[l * D + d];
        dq[k * D + d] = acc;
      }
  }

  static void patch_scatter(const A* dv, const A* Qc, const A* w, const A* cvec, const A* B, const PairGeom& g,
                            A* dpool_u, A* dpool_x, A* scratch) {
    const int64_t K = g.K, D = g.D;
    A* dq = scratch;
    A* dimg = scratch + K * D;
    if (B == nullptr) {
      for (int64_t k = 0; k < K; ++k) {
        A* dqk = dq + k * D;
        for (int64_t d = 0; d < D; ++d) dqk[d] = cvec[k];
        axpy(w[k], dv, dqk, D);
      }
    } else if (K == 9) {
      patch_dq<9>(dv, Qc, w, cvec, B, K, D, dq);
    } else {
      patch_dq<0>(dv, Qc, w, cvec, B, K, D, dq);
    }
    for (int64_t i = 0; i < g.Hp * g.Wp; ++i) dimg[i] = A(0);
    const int64_t kh = g.kh, kw = g.kw, Ho = g.Ho, Wo = g.Wo, Wp = g.Wp;  // locals: see gather_patches
    const A* dimg_end = dimg + g.Hp * Wp;
    const A* dq_end = dq + K * D;
    I lane;
    for (int t = 0; t < L; ++t) lane[t] = static_cast<Lane>(t);
    for (int64_t a = 0; a < kh; ++a)
      for (int64_t b = 0; b < kw; ++b) {
        const A* dqk = dq + (a * kw + b) * D;
        for (int64_t oi = 0; oi < Ho; ++oi) {
          A* dst = dimg + (oi + a) * Wp + b;
          const A* src = dqk + oi * Wo;
          // whole vectors, the lanes past the row's end (narrow maps: Wo < L) stored back unchanged;
          // each sum is the scalar loop's
          int64_t j = 0;
          for (; j < Wo && dst + j + L <= dimg_end && src + j + L <= dq_end; j += L) {
            const V d = vload<V>(dst + j);
            const I rem = I{} + static_cast<Lane>(Wo - j);
            vstore(dst + j, lane < rem ? d + vload<V>(src + j) : d);
          }
          for (; j < Wo; ++j) dst[j] += src[j];
        }
      }
    if (!g.folded) {
      for (int64_t c = 0; c < g.C; ++c) {
        dpool_u[c] += dimg[2 * c];
        dpool_x[c] += dimg[2 * c + 1];
      }
      return;
    }
    for (int64_t row = 0; row < g.Hp - 2 * g.pad; ++row) {
      A* dst = (row & 1 ? dpool_x : dpool_u) + (row >> 1) * g.m;
      const A* src = dimg + (row + g.pad) * g.Wp + g.pad;
      for (int64_t j = 0; j < g.m; ++j) dst[j] += src[j];
    }
  }
};
