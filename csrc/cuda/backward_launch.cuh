// Backward launcher, templated on the input dtype; backward_<dtype>.cu instantiate it (one file per
// dtype so that the build and the ptxas test compile them in parallel). Torch-free.
#pragma once
#include "cuda/launch_common.cuh"
#include "kernels/backward.cuh"
#include "kernels/resident_backward.cuh"

namespace cmpe_se {

template <typename T>
void* backward_kernel_ptr(int vec) {
  constexpr int kV = 16 / sizeof(T);
  return vec > 1 ? reinterpret_cast<void*>(&cmpe_se_backward_kernel<T, kV>)
                 : reinterpret_cast<void*>(&cmpe_se_backward_kernel<T, 1>);
}

template <typename T>
void* resident_backward_kernel_ptr(int vec) {
  constexpr int kV = 16 / sizeof(T);
  return vec > 1 ? reinterpret_cast<void*>(&cmpe_se_backward_resident_kernel<T, kV>)
                 : reinterpret_cast<void*>(&cmpe_se_backward_resident_kernel<T, 1>);
}

template <typename T>
int backward_prepare(int threads, size_t smem, int vec, int* blocks_per_sm) {
  return prepare_kernel(backward_kernel_ptr<T>(vec), threads, smem, blocks_per_sm);
}

template <typename T>
int resident_backward_prepare(int threads, size_t smem, int vec, int cluster, int* max_clusters) {
  return prepare_cluster_kernel(resident_backward_kernel_ptr<T>(vec), threads, smem, cluster, max_clusters);
}

template <typename T>
int backward_launch(const BackwardParams& p, const Launch& l, void* stream) {
  if (l.cluster > 0) {  // resident: the per-sample kernel, then the weight gradients
    int err = launch_cluster_kernel(resident_backward_kernel_ptr<T>(l.vec), p, l, stream);
    if (err != 0) return err;
    const long long elems = weight_grad_elements(p.g);
    const int threads = 256;
    const int blocks = (int)((elems + threads - 1) / threads);
    BackwardParams pp = p;
    void* args[] = {&pp};
    return (int)cudaLaunchKernel(reinterpret_cast<const void*>(&cmpe_se_weight_grads_kernel<T>), dim3(blocks),
                                 dim3(threads), args, 0, static_cast<cudaStream_t>(stream));
  }
  return launch_kernel(backward_kernel_ptr<T>(l.vec), p, l, stream);
}

#define CMPE_SE_INSTANTIATE_BACKWARD(T)                                          \
  template int backward_prepare<T>(int, size_t, int, int*);                       \
  template int resident_backward_prepare<T>(int, size_t, int, int, int*);         \
  template int backward_launch<T>(const BackwardParams&, const Launch&, void*);

}  // namespace cmpe_se
