// Forward launcher, templated on the input dtype; forward_<dtype>.cu instantiate it (one file per
// dtype so that the build and the ptxas test compile them in parallel). Torch-free.
#pragma once
#include "cuda/launch_common.cuh"
#include "kernels/forward.cuh"
#include "kernels/resident.cuh"

namespace cmpe_se {

template <typename T>
void* forward_kernel_ptr(int vec) {
  constexpr int kV = 16 / sizeof(T);
  return vec > 1 ? reinterpret_cast<void*>(&cmpe_se_forward_kernel<T, kV>)
                 : reinterpret_cast<void*>(&cmpe_se_forward_kernel<T, 1>);
}

template <typename T>
void* resident_kernel_ptr(int vec) {
  constexpr int kV = 16 / sizeof(T);
  return vec > 1 ? reinterpret_cast<void*>(&cmpe_se_forward_resident_kernel<T, kV>)
                 : reinterpret_cast<void*>(&cmpe_se_forward_resident_kernel<T, 1>);
}

template <typename T>
int forward_prepare(int threads, size_t smem, int vec, int* blocks_per_sm) {
  return prepare_kernel(forward_kernel_ptr<T>(vec), threads, smem, blocks_per_sm);
}

template <typename T>
int resident_prepare(int threads, size_t smem, int vec, int cluster, int* max_clusters) {
  return prepare_cluster_kernel(resident_kernel_ptr<T>(vec), threads, smem, cluster, max_clusters);
}

template <typename T>
int forward_launch(const ForwardParams& p, const Launch& l, void* stream) {
  if (l.cluster > 0) return launch_cluster_kernel(resident_kernel_ptr<T>(l.vec), p, l, stream);
  return launch_kernel(forward_kernel_ptr<T>(l.vec), p, l, stream);
}

#define CMPE_SE_INSTANTIATE_FORWARD(T)                                        \
  template int forward_prepare<T>(int, size_t, int, int*);                    \
  template int resident_prepare<T>(int, size_t, int, int, int*);              \
  template int forward_launch<T>(const ForwardParams&, const Launch&, void*);

}  // namespace cmpe_se
