// Streaming passes over the full-size tensors of one sample (included by kernels_impl.h inside the
// per-ISA namespace; see there). NCHW rows are reduced with four vector accumulators; channels_last
// pixel rows are reduced down the rows with chunks of channel vectors held in registers.

template <class S>
struct Stream {
  using IOS = IO<S>;
  using A = typename IOS::A;
  using V = typename IOS::V;
  static constexpr int L = IOS::L;

  // sum_p a[p] (and sum_p a[p]*b[p] when B is true) over one contiguous row
  template <bool B>
  static CMPE_INL A row_sum(const S* a, const S* b, int64_t n) {
    V s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t i = 0;
    for (; i + 4 * L <= n; i += 4 * L) {
      if (B) {
        s0 += IOS::load(a + i) * IOS::load(b + i);
        s1 += IOS::load(a + i + L) * IOS::load(b + i + L);
        s2 += IOS::load(a + i + 2 * L) * IOS::load(b + i + 2 * L);
        s3 += IOS::load(a + i + 3 * L) * IOS::load(b + i + 3 * L);
      } else {
        s0 += IOS::load(a + i);
        s1 += IOS::load(a + i + L);
        s2 += IOS::load(a + i + 2 * L);
        s3 += IOS::load(a + i + 3 * L);
      }
    }
    for (; i + L <= n; i += L) s0 += B ? IOS::load(a + i) * IOS::load(b + i) : IOS::load(a + i);
    A s = hsum((s0 + s1) + (s2 + s3));
    for (; i < n; ++i) s += B ? IOS::load1(a + i) * IOS::load1(b + i) : IOS::load1(a + i);
    return s;
  }

  // out[c] = sum_p a[c,p] (* b[c,p]) for a [P][C] block. Pixel rows are taken in blocks of
  // kRowBlock; within a block, chunks of up to kChunk channel vectors are accumulated in registers
  // down the rows (one add per input vector, no accumulator traffic through memory), then added
  // to out. Measured ~1.8x faster than accumulating each row into an array of C sums (C=128,
  // 32x32, one thread, AMD EPYC dev machine). tmp: unused (kept for the table's signature).
  static constexpr int kChunk = 8;
  template <bool B, int K>
  static CMPE_INL void chunk_sum(const S* a, const S* b, int64_t C, int64_t p0, int64_t p1, int64_t c0, A* out) {
    V s[K];
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) s[k] = V{};
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t o = p * C + c0;
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        if (B)
          s[k] += IOS::load(a + o + k * L) * IOS::load(b + o + k * L);
        else
          s[k] += IOS::load(a + o + k * L);
      }
    }
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) vstore(out + c0 + k * L, vload<V>(out + c0 + k * L) + s[k]);
  }
  template <bool B>
  static void cl_reduce(const S* a, const S* b, int64_t C, int64_t P, A* out, A* /*tmp*/) {
    for (int64_t c = 0; c < C; ++c) out[c] = A(0);
    const int64_t nv = C / L;
    for (int64_t p0 = 0; p0 < P; p0 += kRowBlock) {
      const int64_t p1 = p0 + kRowBlock < P ? p0 + kRowBlock : P;
      int64_t v = 0;
      for (; v + kChunk <= nv; v += kChunk) chunk_sum<B, kChunk>(a, b, C, p0, p1, v * L, out);
      for (; v < nv; ++v) chunk_sum<B, 1>(a, b, C, p0, p1, v * L, out);
      for (int64_t c = nv * L; c < C; ++c) {
        A t = A(0);
        for (int64_t p = p0; p < p1; ++p)
          t += B ? IOS::load1(a + p * C + c) * IOS::load1(b + p * C + c) : IOS::load1(a + p * C + c);
        out[c] += t;
      }
    }
  }

  static void squeeze(const S* u, const S* x, int64_t C, int64_t P, bool cl, A* pool_u, A* pool_x, A* scratch) {
    const A inv = A(1) / A(P);
    if (cl || P == 1) {
      cl_reduce<false>(u, nullptr, C, P, pool_u, scratch);
      if (x != nullptr) cl_reduce<false>(x, nullptr, C, P, pool_x, scratch);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        pool_u[c] = row_sum<false>(u + c * P, nullptr, P);
        if (x != nullptr) pool_x[c] = row_sum<false>(x + c * P, nullptr, P);
      }
    }
    for (int64_t c = 0; c < C; ++c) pool_u[c] *= inv;
    if (x != nullptr)
      for (int64_t c = 0; c < C; ++c) pool_x[c] *= inv;
  }

  // rescale, and pool_x[c] = mean_p X[c,p] summed on the way (se: the gate needs pool_u only, so X
  // is read once). Walks the sample forwards like rescale. tmp: C values.
  static void rescale_pool(const S* u, const S* x, const A* gate, S* y, int64_t C, int64_t P, bool cl, A* pool_x,
                           A* tmp) {
    const A inv = A(1) / A(P);
    if (cl || P == 1) {
      for (int64_t c = 0; c < C; ++c) pool_x[c] = A(0);
      for (int64_t p0 = 0; p0 < P; p0 += kRowBlock) {
        const int64_t p1 = p0 + kRowBlock < P ? p0 + kRowBlock : P;
        for (int64_t c = 0; c < C; ++c) tmp[c] = A(0);
        for (int64_t p = p0; p < p1; ++p) {
          const S* up = u + p * C; const S* xp = x + p * C; S* yp = y + p * C;
          int64_t c = 0;
          for (; c + L <= C; c += L) {
            const V xv = IOS::load(xp + c);
            IOS::store(yp + c, vload<V>(gate + c) * IOS::load(up + c) + xv);
            vstore(tmp + c, vload<V>(tmp + c) + xv);
          }
          for (; c < C; ++c) {
            const A xv = IOS::load1(xp + c);
            IOS::store1(yp + c, gate[c] * IOS::load1(up + c) + xv);
            tmp[c] += xv;
          }
        }
        for (int64_t c = 0; c < C; ++c) pool_x[c] += tmp[c];
      }
      for (int64_t c = 0; c < C; ++c) pool_x[c] *= inv;
      return;
    }
    for (int64_t c = 0; c < C; ++c) {
      const S* up = u + c * P; const S* xp = x + c * P; S* yp = y + c * P;
      const A g = gate[c];
      const V gv = V{} + g;
      V s0 = {}, s1 = {};
      int64_t p = 0;
      for (; p + 2 * L <= P; p += 2 * L) {
        const V x0 = IOS::load(xp + p), x1 = IOS::load(xp + p + L);
        IOS::store(yp + p, gv * IOS::load(up + p) + x0);
        IOS::store(yp + p + L, gv * IOS::load(up + p + L) + x1);
        s0 += x0;
        s1 += x1;
      }
      for (; p + L <= P; p += L) {
        const V x0 = IOS::load(xp + p);
        IOS::store(yp + p, gv * IOS::load(up + p) + x0);
        s0 += x0;
      }
      A s = hsum(s0 + s1);
      for (; p < P; ++p) {
        const A xv = IOS::load1(xp + p);
        IOS::store1(yp + p, g * IOS::load1(up + p) + xv);
        s += xv;
      }
      pool_x[c] = s * inv;
    }
  }

  static void grad_reduce(const S* dy, const S* u, int64_t C, int64_t P, bool cl, A* G, A* scratch) {
    if (cl || P == 1) {
      cl_reduce<true>(dy, u, C, P, G, scratch);
    } else {
      for (int64_t c = 0; c < C; ++c) G[c] = row_sum<true>(dy + c * P, u + c * P, P);
    }
  }

  // rescale and grad_write walk the sample in memory order. Walking it backwards (so that the rows the
  // reduction read last are still in L2) restarts the hardware prefetchers at every row: measured
  // 1.3-1.7x slower per sample on the 2-core AMD EPYC dev machine (NCHW rows of 0.25-4 KB).
  static void rescale(const S* u, const S* x, const A* gate, S* y, int64_t C, int64_t P, bool cl) {
    if (cl || P == 1) {
      for (int64_t p = 0; p < P; ++p) {
        const S* up = u + p * C; const S* xp = x + p * C; S* yp = y + p * C;
        int64_t c = 0;
        for (; c + L <= C; c += L)
          IOS::store(yp + c, vload<V>(gate + c) * IOS::load(up + c) + IOS::load(xp + c));
        for (; c < C; ++c) IOS::store1(yp + c, gate[c] * IOS::load1(up + c) + IOS::load1(xp + c));
      }
      return;
    }
    for (int64_t c = 0; c < C; ++c) {
      const S* up = u + c * P; const S* xp = x + c * P; S* yp = y + c * P;
      const A g = gate[c];
      const V gv = V{} + g;
      int64_t p = 0;
      for (; p + L <= P; p += L) IOS::store(yp + p, gv * IOS::load(up + p) + IOS::load(xp + p));
      for (; p < P; ++p) IOS::store1(yp + p, g * IOS::load1(up + p) + IOS::load1(xp + p));
    }
  }

  // dU[c,p] = vu[c], dX[c,p] = vx[c] at every pixel: the gradients when dY is constant over H, W.
  static void grad_fill(const A* vu, const A* vx, S* du, S* dx, int64_t C, int64_t P, bool cl) {
    if (cl || P == 1) {
      for (int64_t p = 0; p < P; ++p) {
        S* dup = du + p * C; S* dxp = dx + p * C;
        int64_t c = 0;
        for (; c + L <= C; c += L) {
          IOS::store(dup + c, vload<V>(vu + c));
          IOS::store(dxp + c, vload<V>(vx + c));
        }
        for (; c < C; ++c) {
          IOS::store1(dup + c, vu[c]);
          IOS::store1(dxp + c, vx[c]);
        }
      }
      return;
    }
    for (int64_t c = 0; c < C; ++c) {
      S* dup = du + c * P; S* dxp = dx + c * P;
      const V a = V{} + vu[c], b = V{} + vx[c];
      int64_t p = 0;
      for (; p + L <= P; p += L) {
        IOS::store(dup + p, a);
        IOS::store(dxp + p, b);
      }
      for (; p < P; ++p) {
        IOS::store1(dup + p, vu[c]);
        IOS::store1(dxp + p, vx[c]);
      }
    }
  }

  static void grad_write(const S* dy, const A* gate, const A* bias_u, const A* bias_x, S* du, S* dx, int64_t C,
                         int64_t P, bool cl) {
    if (cl || P == 1) {
      for (int64_t p = 0; p < P; ++p) {
        const S* dyp = dy + p * C; S* dup = du + p * C; S* dxp = dx + p * C;
        int64_t c = 0;
        for (; c + L <= C; c += L) {
          const V d = IOS::load(dyp + c);
          IOS::store(dup + c, vload<V>(gate + c) * d + vload<V>(bias_u + c));
          IOS::store(dxp + c, d + vload<V>(bias_x + c));
        }
        for (; c < C; ++c) {
          const A d = IOS::load1(dyp + c);
          IOS::store1(dup + c, gate[c] * d + bias_u[c]);
          IOS::store1(dxp + c, d + bias_x[c]);
        }
      }
      return;
    }
    for (int64_t c = 0; c < C; ++c) {
      const S* dyp = dy + c * P; S* dup = du + c * P; S* dxp = dx + c * P;
      const A g = gate[c], bu = bias_u[c], bx = bias_x[c];
      const V gv = V{} + g, buv = V{} + bu, bxv = V{} + bx;
      int64_t p = 0;
      for (; p + L <= P; p += L) {
        const V d = IOS::load(dyp + p);
        IOS::store(dup + p, gv * d + buv);
        IOS::store(dxp + p, d + bxv);
      }
      for (; p < P; ++p) {
        const A d = IOS::load1(dyp + p);
        IOS::store1(dup + p, g * d + bu);
        IOS::store1(dxp + p, d + bx);
      }
    }
  }
};
