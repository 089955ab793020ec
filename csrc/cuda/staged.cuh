// Shared-memory staging of a block's components: the memory side of the CUDA step for fixed shapes.
//
// One thread per component reads its A·B values at a stride of A·B words, so a warp's load
// instruction touches A·B cache lines (9 for 3×3) and the L1 replays it that many times. Staging
// instead copies the block's kThreads·A·B contiguous values of p, g and m into shared memory with
// coalesced loads (16-byte vectors where the chunk is 16-byte aligned), every thread then runs the
// shared math of csrc/fgsgd on its component from shared memory, and the results go back the same
// way. Per 3×3 component a thread reads shared memory at a stride of 9 words: 9 is odd, so the 32
// threads of a warp hit 32 different banks (for doubles, 18 words per half-warp: also distinct).
#pragma once
#include <cuda_runtime.h>

#include <stdint.h>

namespace fgsgd {
namespace cuda {

template <class T>
struct Vec16;  // the 16-byte vector of T
template <>
struct Vec16<float> {
  using type = float4;
};
template <>
struct Vec16<double> {
  using type = double2;
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// dst[e] = src[e] for e < n, by the block's `threads` threads; 16-byte vectors when `vec` (both
// pointers 16-byte aligned and n·sizeof(T) a multiple of 16). Every thread issues all of its loads
// before its first store (the loop is unrolled over a compile-time bound), so a block keeps its whole
// chunk in flight.
template <int kMaxElems, int threads, class T>
__device__ __forceinline__ void copy_chunk(T* __restrict__ dst, const T* __restrict__ src, int n, bool vec) {
  if (vec) {
    using V = typename Vec16<T>::type;
    constexpr int kPer = 16 / sizeof(T);
    constexpr int kMaxVec = (kMaxElems + kPer - 1) / kPer;
    const int nv = n / kPer;
    V* d = reinterpret_cast<V*>(dst);
    const V* s = reinterpret_cast<const V*>(src);
#pragma unroll
    for (int k = 0; k < (kMaxVec + threads - 1) / threads; ++k) {
      const int e = k * threads + int(threadIdx.x);
      if (e < nv) d[e] = s[e];
    }
  } else {
#pragma unroll
    for (int k = 0; k < (kMaxElems + threads - 1) / threads; ++k) {
      const int e = k * threads + int(threadIdx.x);
      if (e < n) dst[e] = src[e];
    }
  }
}

}  // namespace cuda
}  // namespace fgsgd
