// Implementation of the kernels declared in kernels.h, compiled once per ISA.
//
// Included by kernels_default.cpp and kernels_avx2.cpp with CMPE_SE_ISA set to the namespace name.
// Every standard header must be included by the .cpp BEFORE its target pragma (so that no inline
// library function is emitted with AVX2 code into the baseline path); this file includes nothing.
//
// Vectors are GCC vector extensions of 32 bytes (8 floats / 4 doubles): AVX registers in the AVX2
// build, pairs of SSE registers in the baseline build. Reductions use a fixed number of
// accumulators in a fixed order, so results are deterministic (per ISA).
#ifndef CMPE_SE_ISA
#error "define CMPE_SE_ISA before including kernels_impl.h"
#endif

// 32-byte vectors are only passed between always-inline functions, so the baseline build's ABI
// note about them is moot.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace cmpe_se {
namespace cpu {
namespace CMPE_SE_ISA {

#define CMPE_INL inline __attribute__((always_inline))

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

template <class V, class T> CMPE_INL V vload(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <class V, class T> CMPE_INL void vstore(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// ---- 16-bit conversions (bit-exact with c10::BFloat16 / c10::Half, round to nearest even) ----

CMPE_INL f32x8 bf16_to_f32(u16x8 h) { return (f32x8)(__builtin_convertvector(h, u32x8) << 16); }

CMPE_INL u16x8 f32_to_bf16(f32x8 f) {
  u32x8 w = (u32x8)f;
  u32x8 r = (w + (((w >> 16) & 1u) + 0x7fffu)) >> 16;
  u32x8 nan = (u32x8)(f != f);
  r = (r & ~nan) | (0x7fc0u & nan);
  return __builtin_convertvector(r, u16x8);
}

CMPE_INL f32x8 fp16_to_f32(u16x8 h) {  // c10::detail::fp16_ieee_to_fp32_value, lane-wise
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  u32x8 sign = w & 0x80000000u;
  u32x8 two_w = w + w;
  f32x8 normalized = (f32x8)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  f32x8 denormalized = (f32x8)((two_w >> 17) | (126u << 23)) - 0.5f;
  u32x8 is_denorm = (u32x8)(two_w < (1u << 27));
  return (f32x8)(sign | (((u32x8)denormalized & is_denorm) | ((u32x8)normalized & ~is_denorm)));
}

CMPE_INL u16x8 f32_to_fp16(f32x8 f) {  // c10::detail::fp16_ieee_from_fp32_value, lane-wise
  u32x8 w = (u32x8)f;
  f32x8 base = ((f32x8)(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  u32x8 shl1_w = w + w;
  u32x8 sign = w & 0x80000000u;
  u32x8 bias = shl1_w & 0xFF000000u;
  u32x8 small = (u32x8)(bias < 0x71000000u);
  bias = (bias & ~small) | (0x71000000u & small);
  base = (f32x8)((bias >> 1) + 0x07800000u) + base;
  u32x8 bits = (u32x8)base;
  u32x8 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  u32x8 is_nan = (u32x8)(shl1_w > 0xFF000000u);
  u32x8 r = (sign >> 16) | ((0x7E00u & is_nan) | (nonsign & ~is_nan));
  return __builtin_convertvector(r, u16x8);
}

// ---- storage <-> accumulator vectors ----

template <class S> struct IO;
template <> struct IO<float> {
  using A = float; using V = f32x8; static constexpr int L = 8;
  static CMPE_INL V load(const float* p) { return vload<V>(p); }
  static CMPE_INL void store(float* p, V v) { vstore(p, v); }
  static CMPE_INL A load1(const float* p) { return *p; }
  static CMPE_INL void store1(float* p, A v) { *p = v; }
};
template <> struct IO<double> {
  using A = double; using V = f64x4; static constexpr int L = 4;
  static CMPE_INL V load(const double* p) { return vload<V>(p); }
  static CMPE_INL void store(double* p, V v) { vstore(p, v); }
  static CMPE_INL A load1(const double* p) { return *p; }
  static CMPE_INL void store1(double* p, A v) { *p = v; }
};
template <> struct IO<Bf16> {
  using A = float; using V = f32x8; static constexpr int L = 8;
  static CMPE_INL V load(const Bf16* p) { return bf16_to_f32(vload<u16x8>(p)); }
  static CMPE_INL void store(Bf16* p, V v) { vstore(p, f32_to_bf16(v)); }
  static CMPE_INL A load1(const Bf16* p) { u16x8 h = {p->bits}; return bf16_to_f32(h)[0]; }
  static CMPE_INL void store1(Bf16* p, A v) { f32x8 f = {v}; p->bits = f32_to_bf16(f)[0]; }
};
template <> struct IO<Fp16> {
  using A = float; using V = f32x8; static constexpr int L = 8;
  static CMPE_INL V load(const Fp16* p) { return fp16_to_f32(vload<u16x8>(p)); }
  static CMPE_INL void store(Fp16* p, V v) { vstore(p, f32_to_fp16(v)); }
  static CMPE_INL A load1(const Fp16* p) { u16x8 h = {p->bits}; return fp16_to_f32(h)[0]; }
  static CMPE_INL void store1(Fp16* p, A v) { f32x8 f = {v}; p->bits = f32_to_fp16(f)[0]; }
};

template <class V> CMPE_INL auto hsum(V v) {
  auto s = v[0];
  for (int i = 1; i < (int)(sizeof(V) / sizeof(v[0])); ++i) s += v[i];
  return s;
}

// Rows of the channels_last squeeze are summed in blocks of this many pixels before joining the
// running total: keeps the fp32 error of long spatial sums near that of a pairwise sum.
constexpr int64_t kRowBlock = 32;

#include "cpu/stream_impl.h"
#include "cpu/small_impl.h"

#undef CMPE_INL

}  // namespace CMPE_SE_ISA

namespace CMPE_SE_ISA {
template <class S> const StreamKernels<S>& stream_table() {
  using K = Stream<S>;
  static const StreamKernels<S> t{&K::squeeze, &K::rescale, &K::rescale_pool, &K::grad_reduce, &K::grad_write,
                                  &K::grad_fill};
  return t;
}
template <class A> const SmallKernels<A>& small_table() {
  using K = Small<A>;
  static const SmallKernels<A> t{&K::dot, &K::axpy, &K::weighted_sum, &K::gemv_relu, &K::excite_gate,
                                 &K::excite_backward, &K::gemv_t, &K::gather_patches, &K::patch_moments,
                                 &K::patch_combine, &K::pair_conv, &K::conv_scratch,
                                 &K::patch_scatter};
  return t;
}
template const StreamKernels<float>& stream_table<float>();
template const StreamKernels<double>& stream_table<double>();
template const StreamKernels<Bf16>& stream_table<Bf16>();
template const StreamKernels<Fp16>& stream_table<Fp16>();
template const SmallKernels<float>& small_table<float>();
template const SmallKernels<double>& small_table<double>();
}  // namespace CMPE_SE_ISA

}  // namespace cpu
}  // namespace cmpe_se

#pragma GCC diagnostic pop
