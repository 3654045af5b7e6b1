// The pair view as a gather table (torch-free): for each filter tap k and map position d, which
// value of the pair map the tap reads. One table serves the three pair modes, forward and backward.
#pragma once

#include <cstdint>
#include <vector>

namespace cmpe_se {
namespace cpu {

enum class Mode : int { kSE = 0, kDoubleFC = 1, kPair2x1 = 2, kPair1x1 = 3, kFolded3x3 = 4 };

inline bool is_pair(Mode m) { return static_cast<int>(m) >= static_cast<int>(Mode::kPair2x1); }

struct PairView {
  int64_t K = 0;               // taps per filter: 2 (2x1), 1 (1x1), 9 (3x3)
  int64_t D = 0;               // map positions per sample (= length of z)
  std::vector<int32_t> idx;    // [K][D]: 2*c + flow (flow 0: u, 1: x), or -1 (zero padding)
};

// folded_3x3: F[2q + f, j] = flow f of channel q*m + j; the 3x3 tap (a, b) at output (oi, oj) reads
// F[oi + a - pad, oj + b - pad] (cross-correlation, as conv2d).
inline PairView make_pair_view(Mode mode, int64_t C, int64_t m, int64_t pad) {
  PairView pv;
  if (mode == Mode::kPair2x1) {
    pv.K = 2; pv.D = C;
    pv.idx.resize(2 * C);
    for (int64_t c = 0; c < C; ++c) {
      pv.idx[c] = static_cast<int32_t>(2 * c);
      pv.idx[C + c] = static_cast<int32_t>(2 * c + 1);
    }
  } else if (mode == Mode::kPair1x1) {  // map C x 2 flattened row-major: position d = 2c + flow
    pv.K = 1; pv.D = 2 * C;
    pv.idx.resize(2 * C);
    for (int64_t d = 0; d < 2 * C; ++d) pv.idx[d] = static_cast<int32_t>(d);
  } else if (mode == Mode::kFolded3x3) {
    const int64_t rows = 2 * (C / m), Ho = rows - 2 + 2 * pad, Wo = m - 2 + 2 * pad;
    pv.K = 9; pv.D = Ho * Wo;
    pv.idx.assign(9 * pv.D, -1);
    for (int64_t a = 0; a < 3; ++a)
      for (int64_t b = 0; b < 3; ++b)
        for (int64_t oi = 0; oi < Ho; ++oi)
          for (int64_t oj = 0; oj < Wo; ++oj) {
            const int64_t fr = oi + a - pad, fc = oj + b - pad;
            if (fr < 0 || fr >= rows || fc < 0 || fc >= m) continue;
            const int64_t c = (fr / 2) * m + fc;
            pv.idx[(a * 3 + b) * pv.D + oi * Wo + oj] = static_cast<int32_t>(2 * c + (fr % 2));
          }
  }
  return pv;
}

}  // namespace cpu
}  // namespace cmpe_se
