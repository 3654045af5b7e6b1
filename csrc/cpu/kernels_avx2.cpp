// The kernels built with AVX2 + FMA + F16C enabled (chosen at run time when the CPU has them).
// Standard headers come first, outside the target pragma: see kernels_impl.h.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CMPE_SE_ISA isa_avx2
#include "cpu/kernels_impl.h"
#undef CMPE_SE_ISA
#pragma GCC pop_options
#define CMPE_SE_HAVE_AVX2_BUILD 1
#else
// Not x86-64 (or not GCC/Clang): the "avx2" table is the portable build under another name.
#define CMPE_SE_ISA isa_avx2
#include "cpu/kernels_impl.h"
#undef CMPE_SE_ISA
#endif
