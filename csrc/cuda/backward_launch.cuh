// Backward launcher, templated on the input dtype; backward_<dtype>.cu instantiate it (one file per
// dtype so that the build and the ptxas test compile them in parallel). Torch-free.
#pragma once
#include "kernels/backward.cuh"

namespace cmpe_se {

template <typename T>
void* backward_kernel_ptr(int vec) {
  constexpr int kV = 16 / sizeof(T);
  return vec > 1 ? reinterpret_cast<void*>(&cmpe_se_backward_kernel<T, kV>)
                 : reinterpret_cast<void*>(&cmpe_se_backward_kernel<T, 1>);
}

template <typename T>
int backward_prepare(int threads, size_t smem, int vec, int* blocks_per_sm) {
  const void* k = backward_kernel_ptr<T>(vec);
  // Raise the limit to the device maximum once (never lower it: another shape's cached launch
  // configuration may need more than this one).
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

template <typename T>
int backward_launch(const BackwardParams& p, const Launch& l, void* stream) {
  BackwardParams pp = p;
  Launch ll = l;
  void* args[] = {&pp, &ll};
  const void* k = backward_kernel_ptr<T>(l.vec);
  cudaError_t err;
  if (l.cooperative) {
    err = cudaLaunchCooperativeKernel(k, dim3(l.blocks), dim3(l.threads), args, l.smem,
                                      static_cast<cudaStream_t>(stream));
  } else {
    err = cudaLaunchKernel(k, dim3(l.blocks), dim3(l.threads), args, l.smem, static_cast<cudaStream_t>(stream));
  }
  return (int)err;
}

#define CMPE_SE_INSTANTIATE_BACKWARD(T)                                     \
  template int backward_prepare<T>(int, size_t, int, int*);                    \
  template int backward_launch<T>(const BackwardParams&, const Launch&, void*);

}  // namespace cmpe_se
