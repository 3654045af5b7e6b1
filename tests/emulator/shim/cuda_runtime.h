// Host emulator of the CUDA features the cmpe_se kernels use: every GPU thread is a fiber (a
// user-space context with its own stack, harness.cpp run_grid), all of a launch's fibers run on the
// calling OS thread, round robin; a fiber gives up the CPU only where a GPU thread would wait
// (__syncthreads, a warp shuffle, a cluster barrier, __nanosleep in a grid-barrier spin), so a
// barrier costs two context switches per thread instead of an OS-level wake-up of every thread.
// Also a tracer of the global-memory accesses of the full-size tensors: the vector helpers of
// kernels/common.cuh (load_raw, load_vec, store_vec) call CMPE_SE_TRACE_GLOBAL, which records
// (address, bytes, load/store, call site, grid-barrier epoch) per GPU thread when tracing is on and
// the address lies in a registered range (tests/emulator/__init__.py turns the records into bytes
// moved and 32-byte-sector coalescing).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct emu_dim3 { unsigned x, y, z; };
namespace emu {
void yield();               // back to the scheduler (harness.cpp): the other fibers run, then this one resumes
extern unsigned long g_progress;  // barrier arrivals, atomics, finished fibers (the scheduler's deadlock check)
struct Barrier {
  int n = 0, count = 0, gen = 0;
  void wait() {
    const int g = gen;
    ++g_progress;
    if (++count == n) { count = 0; ++gen; return; }
    while (gen == g) yield();
  }
};
struct Event {
  uintptr_t addr;
  const void* site;     // return address of the helper: its call site in the kernel code
  unsigned bytes;
  unsigned short range; // index of the registered range
  unsigned char store;
  unsigned char epoch;  // grid barriers this block had passed (GridBarrier's arrivals)
};
struct Range {
  uintptr_t begin, end;
};
extern std::vector<Range> g_ranges;         // registered full-size tensors (set before a launch)
extern std::vector<std::vector<Event>> g_events;  // per GPU thread (block * threads + thread)
extern bool g_tracing;
extern unsigned* g_barrier_counter;         // &counter[0] of the launch (arrivals)
struct Block {
  std::vector<unsigned char> smem;
  int epoch = 0;
  Barrier bar;
  std::vector<Barrier> warp_bars;
  std::vector<uint64_t> shfl;
  alignas(16) unsigned char vars[64];
  int index = 0, cluster = 1;          // thread-block clusters along x: rank = index % cluster
  Barrier* cbar = nullptr;             // barrier of this block's cluster (threads * cluster)
  std::vector<Block*>* all = nullptr;  // every block of the grid
};
extern emu_dim3 tl_tid, tl_bid;         // the running fiber's (set by the scheduler at each switch)
extern emu_dim3 g_bdim, g_gdim;
extern Block* tl_block;
extern std::vector<Event>* tl_events;
inline void trace(const void* p, unsigned bytes, bool store, const void* site) {
  if (!g_tracing || tl_events == nullptr) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (size_t r = 0; r < g_ranges.size(); ++r)
    if (a >= g_ranges[r].begin && a < g_ranges[r].end) {
      tl_events->push_back({a, site, bytes, (unsigned short)r, (unsigned char)store,
                            (unsigned char)(tl_block->epoch < 255 ? tl_block->epoch : 255)});
      return;
    }
}
}  // namespace emu
// The vector helpers are real functions in the emulator, so that __builtin_return_address(0)
// inside them is the call site.
#define CMPE_SE_VEC_INLINE __attribute__((noinline))
#define CMPE_SE_TRACE_GLOBAL(ptr, bytes, is_store) \
  emu::trace((const void*)(ptr), (unsigned)(bytes), (is_store), __builtin_return_address(0))
#define threadIdx emu::tl_tid
#define blockIdx emu::tl_bid
#define blockDim emu::g_bdim
#define gridDim emu::g_gdim
#define CMPE_SE_DYNAMIC_SMEM(name) unsigned char* name = emu::tl_block->smem.data()
#define CMPE_SE_SHARED_VAR(type, name) type& name = *reinterpret_cast<type*>(emu::tl_block->vars)
namespace emu {
inline void cluster_sync() { tl_block->cbar->wait(); }
// distributed shared memory: the same offset in block `rank` of this block's cluster
template <typename T>
T* map_shared(T* p, int rank) {
  Block* b = tl_block;
  const auto off = reinterpret_cast<unsigned char*>(p) - b->smem.data();
  if (off < 0 || (size_t)off >= b->smem.size() || rank < 0 || rank >= b->cluster) std::abort();
  Block* t = (*b->all)[(b->index / b->cluster) * b->cluster + rank];
  return reinterpret_cast<T*>(t->smem.data() + off);
}
}  // namespace emu
#define CMPE_SE_CLUSTER_SYNC() emu::cluster_sync()
#define CMPE_SE_CLUSTER_MAP(ptr, rank) emu::map_shared((ptr), (rank))

inline void __syncthreads() { emu::tl_block->bar.wait(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  emu::Block* b = emu::tl_block;
  const int t = threadIdx.x, w = t >> 5, lane = t & 31;
  std::memcpy(&b->shfl[t], &v, sizeof(T));
  b->warp_bars[w].wait();
  T r;
  std::memcpy(&r, &b->shfl[(w << 5) | (lane ^ o)], sizeof(T));
  b->warp_bars[w].wait();
  return r;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  if (p == emu::g_barrier_counter) ++emu::tl_block->epoch;  // a block arrives at a grid barrier
  ++emu::g_progress;
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}  // one OS thread: every store is visible to the next fiber
inline void __nanosleep(unsigned) { emu::yield(); }
inline void __trap() { std::abort(); }
inline float __expf(float x) { return std::exp(x); }
inline int min(int a, int b) { return a < b ? a : b; }
