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

// The resident forward kernel with clusters of `cluster` blocks: raise its dynamic shared-memory
// limit as above, allow clusters above the portable size of 8 (Hopper takes 16), and ask how many
// such clusters can be co-resident on the device (0: this configuration cannot launch).
inline int prepare_cluster_kernel(const void* k, int threads, size_t smem, int cluster, int* max_clusters) {
  int bps = 0;
  int err = prepare_kernel(k, threads, smem, &bps);
  if (err != 0) return err;
  if (bps < 1) {
    *max_clusters = 0;
    return 0;
  }
  if (cluster <= 1) {  // a plain launch: "clusters" of one block
    int dev = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    *max_clusters = bps * sms;
    return (int)e;
  }
  if (cluster > 8) {
    cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return (int)e;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(cluster);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return (int)cudaOccupancyMaxActiveClusters(max_clusters, k, &cfg);
}

// Launch the resident kernel: grid N * cluster, clusters of l.cluster blocks along x (block
// rank in the cluster = blockIdx.x % cluster); cluster size 1 is a plain launch.
template <typename P>
int launch_cluster_kernel(const void* k, const P& p, const Launch& l, void* stream) {
  P pp = p;
  Launch ll = l;
  void* args[] = {&pp, &ll};
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3((unsigned)p.g.N * (unsigned)l.cluster);
  cfg.blockDim = dim3(l.threads);
  cfg.dynamicSmemBytes = l.smem;
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = l.cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = l.cluster > 1 ? 1 : 0;
  return (int)cudaLaunchKernelExC(&cfg, k, args);
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
