// The pair view's geometry (torch-free): mode -> the padded image and filter of kernels.h's PairGeom.
#pragma once

#include <cstdint>

#include "cpu/kernels.h"
#include "cpu/small_vec.h"

namespace cmpe_se {
namespace cpu {

enum class Mode : int { kSE = 0, kDoubleFC = 1, kPair2x1 = 2, kPair1x1 = 3, kFolded3x3 = 4 };

inline bool is_pair(Mode m) { return static_cast<int>(m) >= static_cast<int>(Mode::kPair2x1); }

// folded_3x3: F[2q + f, j] = flow f of channel q*m + j, padded by pad; pair_2x1 / pair_1x1: the
// pair map [C][2]. Either way the taps are a plain (unpadded) cross-correlation of the stored image.
inline PairGeom make_pair_geom(Mode mode, int64_t C, int64_t m, int64_t pad) {
  PairGeom g;
  g.C = C;
  if (mode == Mode::kFolded3x3) {
    g.folded = true;
    g.m = m;
    g.pad = pad;
    g.Hp = 2 * (C / m) + 2 * pad;
    g.Wp = m + 2 * pad;
    g.kh = g.kw = 3;
  } else {
    g.Hp = C;
    g.Wp = 2;
    g.kh = 1;
    g.kw = mode == Mode::kPair2x1 ? 2 : 1;
  }
  g.K = g.kh * g.kw;
  g.Ho = g.Hp - g.kh + 1;
  g.Wo = g.Wp - g.kw + 1;
  g.D = g.Ho * g.Wo;
  return g;
}

// mq[k]: the batch mean of tap k = the mean over map positions of the batch-mean image (double).
template <class A>
SmallVec<double> patch_mean(const PairGeom& g, const A* pu, const A* px, int64_t N) {
  SmallVec<double> mean_u(g.C, 0.0), mean_x(g.C, 0.0), mq(g.K, 0.0);
  SmallVec<double, 512> img(g.Hp * g.Wp, 0.0);
  if (N == 0 || g.D == 0) return mq;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < g.C; ++c) {
      mean_u[c] += pu[n * g.C + c];
      mean_x[c] += px[n * g.C + c];
    }
  if (g.folded) {
    for (int64_t row = 0; row < g.Hp - 2 * g.pad; ++row)
      for (int64_t j = 0; j < g.m; ++j)
        img[(row + g.pad) * g.Wp + g.pad + j] = (row & 1 ? mean_x : mean_u)[(row >> 1) * g.m + j];
  } else {
    for (int64_t c = 0; c < g.C; ++c) {
      img[2 * c] = mean_u[c];
      img[2 * c + 1] = mean_x[c];
    }
  }
  // the window sums in two passes: row[r * kw + b] = image row r over columns b .. b+Wo-1, then tap
  // (a, b) = rows a .. a+Ho-1 of those (many short independent chains instead of one long one)
  SmallVec<double> row(g.Hp * g.kw, 0.0);
  for (int64_t r = 0; r < g.Hp; ++r)
    for (int64_t b = 0; b < g.kw; ++b) {
      double s = 0.0;
      for (int64_t oj = 0; oj < g.Wo; ++oj) s += img[r * g.Wp + oj + b];
      row[r * g.kw + b] = s;
    }
  for (int64_t a = 0; a < g.kh; ++a)
    for (int64_t b = 0; b < g.kw; ++b) {
      double s = 0.0;
      for (int64_t oi = 0; oi < g.Ho; ++oi) s += row[(oi + a) * g.kw + b];
      mq[a * g.kw + b] = s / (static_cast<double>(N) * g.D);
    }
  return mq;
}

}  // namespace cpu
}  // namespace cmpe_se
