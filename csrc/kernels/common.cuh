// Device helpers shared by the CMPE-SE kernels: dtype traits, 16-byte vectors, fixed-order
// reductions and the grid barrier of the persistent kernels. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cmpe_se.h"

// Shared-memory declarations through macros so that a host-side emulator (threads as OS
// threads) can compile the same device code.
#ifndef CMPE_SE_DYNAMIC_SMEM
#define CMPE_SE_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define CMPE_SE_SHARED_VAR(type, name) __shared__ type name
#endif

// Thread-block clusters (sm_90+): barrier over the blocks of this block's cluster (release /
// acquire at cluster scope) and the address of the same shared-memory object in block `rank` of
// the cluster (distributed shared memory). Below sm_90 the resident kernel is never launched
// with clusters (the launcher uses cluster size 1, where neither macro is reached).
#ifndef CMPE_SE_CLUSTER_SYNC
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define CMPE_SE_CLUSTER_SYNC() cooperative_groups::this_cluster().sync()
#define CMPE_SE_CLUSTER_MAP(ptr, rank) cooperative_groups::this_cluster().map_shared_rank((ptr), (rank))
#else
#define CMPE_SE_CLUSTER_SYNC() __trap()
#define CMPE_SE_CLUSTER_MAP(ptr, rank) (__trap(), (ptr))
#endif
#endif

// Access tracing of the host emulator (tests/emulator: bytes moved, coalescing): every global
// access of a full-size tensor goes through load_raw / load_vec / store_vec below. On the GPU the
// hook is empty and the helpers are __forceinline__ as always (no change to the generated code).
#ifndef CMPE_SE_TRACE_GLOBAL
#define CMPE_SE_TRACE_GLOBAL(ptr, bytes, is_store) ((void)0)
#endif
#ifndef CMPE_SE_VEC_INLINE
#define CMPE_SE_VEC_INLINE __forceinline__
#endif

namespace cmpe_se {

// ---- dtypes --------------------------------------------------------------------------------

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// running statistics may be stored in any float dtype
__device__ __forceinline__ double load_stat(const void* p, StatDtype t, int i) {
  switch (t) {
    case StatDtype::F16: return (double)__half2float(static_cast<const __half*>(p)[i]);
    case StatDtype::BF16: return (double)__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case StatDtype::F64: return static_cast<const double*>(p)[i];
    default: return (double)static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_stat(void* p, StatDtype t, int i, double v) {
  switch (t) {
    case StatDtype::F16: static_cast<__half*>(p)[i] = __float2half_rn((float)v); break;
    case StatDtype::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn((float)v); break;
    case StatDtype::F64: static_cast<double*>(p)[i] = v; break;
    default: static_cast<float*>(p)[i] = (float)v; break;
  }
}

// ---- vectors -------------------------------------------------------------------------------

// V elements of T in one aligned access (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ CMPE_SE_VEC_INLINE void load_vec(const T* p, acc_t<T> (&out)[V]) {
  CMPE_SE_TRACE_GLOBAL(p, sizeof(T) * V, false);
  Vec<T, V> r = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_acc(r.v[j]);
}

// Raw load (kept in the input dtype until used: half the registers for 16-bit inputs).
template <typename T, int V>
__device__ CMPE_SE_VEC_INLINE Vec<T, V> load_raw(const T* p) {
  CMPE_SE_TRACE_GLOBAL(p, sizeof(T) * V, false);
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ CMPE_SE_VEC_INLINE void store_vec(T* p, const acc_t<T> (&in)[V]) {
  CMPE_SE_TRACE_GLOBAL(p, sizeof(T) * V, true);
  Vec<T, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = from_acc<T>(in[j]);
  *reinterpret_cast<Vec<T, V>*>(p) = r;
}

// ---- reductions (fixed order: deterministic) -----------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums W values over the block; thread 0 adds the result to dst[0..W) (a shared accumulator,
// so repeated calls sum in call order). red: shared scratch of 32*W doubles. All threads call.
template <int W>
__device__ __forceinline__ void block_sum_add(double (&v)[W], double* red, double* dst) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < W; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < W; ++k) red[warp * W + k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 0; k < W; ++k) {
      double s = 0.0;
      for (int w = 0; w < nwarps; ++w) s += red[w * W + k];
      dst[k] += s;
    }
  }
  __syncthreads();
}

// ---- grid barrier of the persistent kernels ------------------------------------------------
//
// counter[0] counts arrivals, counter[1] counts completed barriers. Both are zeroed on the
// stream before the launch (one memset of the workspace header). The last block to arrive
// runs `last(...)` (a whole-block function, e.g. a reduction of per-block partials in fixed
// slot order) before releasing the others, so a reduction-then-broadcast costs one barrier.
// Every block must be co-resident: the grid is sized from the occupancy calculator and launched
// cooperatively (docs/CUDA.md).
struct GridBarrier {
  unsigned* counter;
  unsigned epoch;

  template <typename F>
  __device__ __forceinline__ void sync(F&& last) {
    CMPE_SE_SHARED_VAR(int, is_last);
    __syncthreads();
    ++epoch;
    if (threadIdx.x == 0) {
      __threadfence();
      const unsigned old = atomicAdd(&counter[0], 1u);
      is_last = (old == epoch * gridDim.x - 1u);
      if (is_last) __threadfence();
    }
    __syncthreads();
    if (is_last) {
      last();
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(&counter[1], 1u);
      }
    }
    if (threadIdx.x == 0) {
      volatile unsigned* rel = &counter[1];
      // A missing block would hang the device forever; trap instead (about a minute of
      // spinning) so that a broken launch configuration surfaces as a CUDA error.
      unsigned spins = 0;
      while (*rel < epoch) {
        __nanosleep(32);
        if (++spins > (1u << 30)) __trap();
      }
      __threadfence();
    }
    __syncthreads();
  }
  __device__ __forceinline__ void sync() {
    sync([] {});
  }
};

}  // namespace cmpe_se
