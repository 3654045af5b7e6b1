// Argument validation of cmpe_se::forward / cmpe_se::backward (docs/ARCHITECTURE.md), done before
// any computation. Every message names the op, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "cpu/pair_view.h"

namespace cmpe_se {
namespace cpu {

struct Config {
  Mode mode = Mode::kSE;
  int64_t N = 0, C = 0, H = 0, W = 0, P = 0;
  int64_t r = 0;   // fc1 rows
  int64_t R = 0;   // hidden length: r, or 2r for double_fc
  int64_t Dz = 0;  // relation vector length (fc1 columns)
  int64_t e = 0;   // pair-view filters
  int64_t kh = 0, kw = 0, fold = 0, pad = 0;
  bool channels_last = false;
  at::ScalarType acc = at::kFloat;
};

inline Mode parse_mode(const char* op, std::string_view mode) {
  if (mode == "se") return Mode::kSE;
  if (mode == "double_fc") return Mode::kDoubleFC;
  if (mode == "pair_2x1") return Mode::kPair2x1;
  if (mode == "pair_1x1") return Mode::kPair1x1;
  if (mode == "folded_3x3") return Mode::kFolded3x3;
  TORCH_CHECK(false, op, ": mode must be one of 'se', 'double_fc', 'pair_2x1', 'pair_1x1', 'folded_3x3', got '",
              mode, "'");
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

// A small tensor in the acc dtype with an exact shape.
inline void check_small(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                        at::ScalarType acc) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc,
              " (the acc dtype of the inputs: float64 for float64 inputs, float32 otherwise), got ",
              t.scalar_type());
}

inline void check_absent(const char* op, const char* name, const std::optional<at::Tensor>& t, std::string_view mode) {
  TORCH_CHECK(!present(t) || t->numel() == 0, op, ": ", name, " must be None in mode '", mode,
              "', got a tensor of shape ", t->sizes());
}

// The full-size inputs (u and x, or grad_y and u): shape, dtype, device, layout decision.
inline Config check_activations(const char* op, const char* an, const at::Tensor& a, const char* bn,
                                const at::Tensor& b) {
  Config g;
  check_cpu(op, an, a);
  check_cpu(op, bn, b);
  TORCH_CHECK(a.dim() == 4, op, ": ", an, " must be 4-D (N, C, H, W), got shape ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), op, ": ", bn, " must have the shape of ", an, " ", a.sizes(), ", got ",
              b.sizes());
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", an,
              " must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(b.scalar_type() == st, op, ": ", bn, " must have the dtype of ", an, " (", st, "), got ",
              b.scalar_type());
  g.N = a.size(0); g.C = a.size(1); g.H = a.size(2); g.W = a.size(3);
  g.P = g.H * g.W;
  TORCH_CHECK(g.C >= 1 && g.P >= 1, op, ": ", an, " must have at least one channel and one pixel, got shape ",
              a.sizes());
  g.acc = st == at::kDouble ? at::kDouble : at::kFloat;
  g.channels_last = a.is_contiguous(at::MemoryFormat::ChannelsLast) && !a.is_contiguous();
  return g;
}

// Weights shared by both ops; fills r, R, Dz, e, kh, kw, fold, pad.
inline void check_weights(const char* op, Config& g, std::string_view mode_str, const at::Tensor& fc1,
                          const std::optional<at::Tensor>& fc1_id, const at::Tensor& fc2,
                          const std::optional<at::Tensor>& pair_w, const std::optional<at::Tensor>& bn_w,
                          const std::optional<at::Tensor>& bn_b, int64_t fold_width, int64_t padding) {
  const bool pair = is_pair(g.mode);
  if (g.mode == Mode::kFolded3x3) {
    TORCH_CHECK(fold_width >= 1 && g.C % fold_width == 0, op, ": fold_width must be a positive divisor of C=", g.C,
                " in mode 'folded_3x3', got ", fold_width);
    TORCH_CHECK(padding == 0 || padding == 1, op, ": padding must be 0 or 1, got ", padding);
    const int64_t rows = 2 * (g.C / fold_width);
    TORCH_CHECK(rows - 2 + 2 * padding >= 1 && fold_width - 2 + 2 * padding >= 1, op,
                ": the fold (", rows, " rows x ", fold_width, " columns) is too small for a 3x3 conv with padding ",
                padding, " (padding 0 needs 2*C/fold_width >= 3 and fold_width >= 3)");
    g.fold = fold_width; g.pad = padding;
    g.kh = 3; g.kw = 3;
    g.Dz = (rows - 2 + 2 * padding) * (fold_width - 2 + 2 * padding);
  } else if (g.mode == Mode::kPair2x1) {
    g.kh = 1; g.kw = 2; g.Dz = g.C;
  } else if (g.mode == Mode::kPair1x1) {
    g.kh = 1; g.kw = 1; g.Dz = 2 * g.C;
  } else {
    g.Dz = g.C;
  }
  check_cpu(op, "fc1_weight", fc1);
  TORCH_CHECK(fc1.dim() == 2 && fc1.size(1) == g.Dz, op, ": fc1_weight must have shape [r, ", g.Dz,
              "] in mode '", mode_str, "', got ", fc1.sizes());
  g.r = fc1.size(0);
  g.R = g.mode == Mode::kDoubleFC ? 2 * g.r : g.r;
  check_small(op, "fc1_weight", fc1, {g.r, g.Dz}, g.acc);
  check_small(op, "fc2_weight", fc2, {g.C, g.R}, g.acc);
  if (g.mode == Mode::kDoubleFC) {
    TORCH_CHECK(present(fc1_id), op, ": fc1_identity_weight is required in mode 'double_fc'");
    check_small(op, "fc1_identity_weight", *fc1_id, {g.r, g.C}, g.acc);
  } else {
    check_absent(op, "fc1_identity_weight", fc1_id, mode_str);
  }
  if (pair) {
    TORCH_CHECK(present(pair_w), op, ": pair_weight is required in mode '", mode_str, "'");
    TORCH_CHECK(pair_w->dim() == 4 && pair_w->size(0) >= 1, op, ": pair_weight must have shape [e, 1, ", g.kh, ", ",
                g.kw, "] with e >= 1, got ", pair_w->sizes());
    g.e = pair_w->size(0);
    check_small(op, "pair_weight", *pair_w, {g.e, 1, g.kh, g.kw}, g.acc);
    TORCH_CHECK(present(bn_w), op, ": bn_weight is required in mode '", mode_str, "'");
    TORCH_CHECK(present(bn_b), op, ": bn_bias is required in mode '", mode_str, "'");
    check_small(op, "bn_weight", *bn_w, {g.e}, g.acc);
    check_small(op, "bn_bias", *bn_b, {g.e}, g.acc);
  } else {
    check_absent(op, "pair_weight", pair_w, mode_str);
    check_absent(op, "bn_weight", bn_w, mode_str);
    check_absent(op, "bn_bias", bn_b, mode_str);
  }
}

inline void check_running(const char* op, const char* name, const at::Tensor& t, const Config& g) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == g.e, op, ": ", name, " must have shape [", g.e,
              "] (one entry per pair-view filter), got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

}  // namespace cpu
}  // namespace cmpe_se
