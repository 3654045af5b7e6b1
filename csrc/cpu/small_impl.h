// Small per-sample math: the excitation network and the pair view (included by kernels_impl.h
// inside the per-ISA namespace; see there). Vector lengths are C, r, D (at most a few thousand),
// all operands stay in L1/L2.

template <class A> struct VecOf;
template <> struct VecOf<float> { using V = f32x8; static constexpr int L = 8; };
template <> struct VecOf<double> { using V = f64x4; static constexpr int L = 4; };

template <class A>
struct Small {
  using V = typename VecOf<A>::V;
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

  static void gemv_relu(const A* W, const A* x, int64_t rows, int64_t cols, A* y) {
    for (int64_t i = 0; i < rows; ++i) {
      const A v = dot(W + i * cols, x, cols);
      y[i] = v > A(0) ? v : A(0);
    }
  }

  static void excite_gate(const A* W2T, const A* h, int64_t R, int64_t C, A* gate) {
    for (int64_t c = 0; c < C; ++c) gate[c] = A(0);
    for (int64_t j = 0; j < R; ++j)
      if (h[j] != A(0)) axpy(h[j], W2T + j * C, gate, C);
    for (int64_t c = 0; c < C; ++c) gate[c] = A(1) / (A(1) + std::exp(-gate[c]));
  }

  static void excite_backward(const A* G, const A* gate, const A* h, const A* W2T, int64_t R, int64_t C, A* dg,
                              A* dh_pre) {
    for (int64_t c = 0; c < C; ++c) dg[c] = G[c] * gate[c] * (A(1) - gate[c]);
    for (int64_t j = 0; j < R; ++j) dh_pre[j] = h[j] > A(0) ? dot(W2T + j * C, dg, C) : A(0);
  }

  static void gemv_t(const A* W, const A* x, int64_t rows, int64_t cols, A* y) {
    for (int64_t k = 0; k < cols; ++k) y[k] = A(0);
    for (int64_t j = 0; j < rows; ++j)
      if (x[j] != A(0)) axpy(x[j], W + j * cols, y, cols);
  }

  static void gather_patches(const A* pool_u, const A* pool_x, const int32_t* idx, const A* ref, int64_t K,
                             int64_t D, A* Qc) {
    for (int64_t k = 0; k < K; ++k) {
      const int32_t* ik = idx + k * D;
      A* qk = Qc + k * D;
      const A rk = ref[k];
      for (int64_t d = 0; d < D; ++d) {
        const int32_t i = ik[d];
        // idx = 2*c + flow (0: pool_u, 1: pool_x), -1 where the padding of the conv reaches outside
        const A v = i < 0 ? A(0) : (i & 1 ? pool_x[i >> 1] : pool_u[i >> 1]);
        qk[d] = v - rk;
      }
    }
  }

  static void patch_moments(const A* Qc, int64_t K, int64_t D, A* c2) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = k; l < K; ++l) c2[k * K + l] = c2[l * K + k] = dot(Qc + k * D, Qc + l * D, D);
  }

  static void patch_combine(const A* Qc, const A* w, A b, int64_t K, int64_t D, A* v) {
    for (int64_t d = 0; d < D; ++d) v[d] = b;
    for (int64_t k = 0; k < K; ++k) axpy(w[k], Qc + k * D, v, D);
  }

  static void patch_scatter(const A* dv, const A* Qc, const A* w, const A* cvec, const A* B, const int32_t* idx,
                            int64_t K, int64_t D, int64_t C, A* dpool_u, A* dpool_x, A* dq) {
    (void)C;
    for (int64_t k = 0; k < K; ++k) {
      const A ck = cvec[k];
      for (int64_t d = 0; d < D; ++d) dq[d] = ck;
      axpy(w[k], dv, dq, D);
      if (B != nullptr)
        for (int64_t l = 0; l < K; ++l) axpy(-B[k * K + l], Qc + l * D, dq, D);
      const int32_t* ik = idx + k * D;
      for (int64_t d = 0; d < D; ++d) {
        const int32_t i = ik[d];
        if (i < 0) continue;
        if (i & 1) dpool_x[i >> 1] += dq[d];
        else dpool_u[i >> 1] += dq[d];
      }
    }
  }
};
