// The kernels built for the x86-64 baseline (SSE2), and the run-time choice between the builds.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

#define CMPE_SE_ISA isa_default
#include "cpu/kernels_impl.h"
#undef CMPE_SE_ISA

namespace cmpe_se {
namespace cpu {
namespace {

bool use_avx2() {
  static const bool yes = [] {
    const char* env = std::getenv("CMPE_SE_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "default") == 0) return false;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return yes;
}

}  // namespace

const char* isa_name() { return use_avx2() ? "avx2" : "default"; }

template <class S> const StreamKernels<S>& stream_kernels() {
  static const StreamKernels<S>& t = use_avx2() ? isa_avx2::stream_table<S>() : isa_default::stream_table<S>();
  return t;
}
template <class A> const SmallKernels<A>& small_kernels() {
  static const SmallKernels<A>& t = use_avx2() ? isa_avx2::small_table<A>() : isa_default::small_table<A>();
  return t;
}

template const StreamKernels<float>& stream_kernels<float>();
template const StreamKernels<double>& stream_kernels<double>();
template const StreamKernels<Bf16>& stream_kernels<Bf16>();
template const StreamKernels<Fp16>& stream_kernels<Fp16>();
template const SmallKernels<float>& small_kernels<float>();
template const SmallKernels<double>& small_kernels<double>();

}  // namespace cpu
}  // namespace cmpe_se
