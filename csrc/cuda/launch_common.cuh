// What the forward and backward launchers share: raising the shared-memory limit and reading the
// occupancy of one kernel, and launching it (cooperative or not). Torch-free.
#pragma once
#include <cuda_runtime.h>

#include "cmpe_se.h"

namespace cmpe_se {

// Raise the kernel's dynamic shared-memory limit to the device maximum once (never lower it:
// another shape's cached launch configuration may need more than this one), then ask the
// occupancy calculator how many blocks of (threads, smem) fit on one SM.
inline int prepare_kernel(const void* k, int threads, size_t smem, int* blocks_per_sm) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  // The dynamic limit is the opt-in maximum minus the kernel's static shared memory: asking for
  // the whole opt-in size is cudaErrorInvalidValue (seen on an H200, 2026-11-26).
  cudaFuncAttributes attr{};
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, k);
  const int dyn_max = optin - static_cast<int>(attr.sharedSizeBytes);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn_max > (int)smem ? dyn_max : (int)smem);
  if (err != cudaSuccess) return (int)err;
  return (int)cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, k, threads, smem);
}

// Launch kernel(P params, Launch launch); cooperative launches guarantee co-residency for the
// grid barrier.
template <typename P>
int launch_kernel(const void* k, const P& p, const Launch& l, void* stream) {
  P pp = p;
  Launch ll = l;
  void* args[] = {&pp, &ll};
  cudaError_t err;
  if (l.cooperative) {
    err = cudaLaunchCooperativeKernel(k, dim3(l.blocks), dim3(l.threads), args, l.smem,
                                      static_cast<cudaStream_t>(stream));
  } else {
    err = cudaLaunchKernel(k, dim3(l.blocks), dim3(l.threads), args, l.smem, static_cast<cudaStream_t>(stream));
  }
  return (int)err;
}

}  // namespace cmpe_se
