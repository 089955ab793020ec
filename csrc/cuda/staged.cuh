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

#include "../fgsgd/batched.h"
#include "slot_table.cuh"

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

// Global → shared for the three arrays at once: sp[e] = gp[e], sg[e] = gg[e] and, `with_m`, sm[e] = gm[e],
// for e < n, by the block's `threads` threads; 16-byte vectors when `vec` (all pointers 16-byte aligned
// and n·sizeof(T) a multiple of 16). Every load of a thread goes to registers before its first shared
// store: copying one array after the other would make the loads of g wait until p's data arrived (a
// shared store waits for its load, and instructions issue in order), leaving a third of the chunk in
// flight at a time.
// Loop trips per thread when `threads` threads move at most kMaxElems values of T as vectors V.
template <int kMaxElems, int threads, class T, class V>
constexpr int kItersPerThread = ((kMaxElems + int(sizeof(V) / sizeof(T)) - 1) / int(sizeof(V) / sizeof(T)) +
                                 threads - 1) / threads;

template <int kMaxElems, int threads, class T, class V>
__device__ __forceinline__ void stage_in_as(T* sp, T* sg, T* sm, const T* gp, const T* gg, const T* gm, int n,
                                            bool with_m) {
  constexpr int kIters = kItersPerThread<kMaxElems, threads, T, V>;
  const int nv = n / int(sizeof(V) / sizeof(T));
  V rp[kIters], rg[kIters], rm[kIters];
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    const int e = k * threads + int(threadIdx.x);
    if (e < nv) {
      rp[k] = reinterpret_cast<const V*>(gp)[e];
      rg[k] = reinterpret_cast<const V*>(gg)[e];
      if (with_m) rm[k] = reinterpret_cast<const V*>(gm)[e];
    }
  }
#pragma unroll
  for (int k = 0; k < kIters; ++k) {
    const int e = k * threads + int(threadIdx.x);
    if (e < nv) {
      reinterpret_cast<V*>(sp)[e] = rp[k];
      reinterpret_cast<V*>(sg)[e] = rg[k];
      if (with_m) reinterpret_cast<V*>(sm)[e] = rm[k];
    }
  }
}

template <int kMaxElems, int threads, class T>
__device__ __forceinline__ void stage_in(T* sp, T* sg, T* sm, const T* gp, const T* gg, const T* gm, int n, bool vec,
                                         bool with_m) {
  if (vec)
    stage_in_as<kMaxElems, threads, T, typename Vec16<T>::type>(sp, sg, sm, gp, gg, gm, n, with_m);
  else
    stage_in_as<kMaxElems, threads, T, T>(sp, sg, sm, gp, gg, gm, n, with_m);
}

// Shared → global: dst[e] = src[e] for e < n (16-byte vectors when `vec`), by the block's threads.
template <int kMaxElems, int threads, class T, class V>
__device__ __forceinline__ void copy_as(T* __restrict__ dst, const T* __restrict__ src, int n) {
  const int nv = n / int(sizeof(V) / sizeof(T));
#pragma unroll
  for (int k = 0; k < kItersPerThread<kMaxElems, threads, T, V>; ++k) {
    const int e = k * threads + int(threadIdx.x);
    if (e < nv) reinterpret_cast<V*>(dst)[e] = reinterpret_cast<const V*>(src)[e];
  }
}

template <int kMaxElems, int threads, class T>
__device__ __forceinline__ void copy_chunk(T* __restrict__ dst, const T* __restrict__ src, int n, bool vec) {
  if (vec)
    copy_as<kMaxElems, threads, T, typename Vec16<T>::type>(dst, src, n);
  else
    copy_as<kMaxElems, threads, T, T>(dst, src, n);
}

// Channels-last weights (TensorSlot::interleave = L > 0; batched.h entries_of): thread i < nc moves the E entries of
// the block's component c0 + i between global memory (entry e at first + e·L) and its shared slot (s[i·E + e]).
// The components of a block are consecutive input channels (but where the block crosses an output channel), so
// each of the E load (or store) instructions of a warp touches consecutive addresses: coalesced as it is, without
// the contiguous copies the weight and gradient would otherwise go through. Every load goes to registers before
// the first shared store, as in stage_in_as.
template <int E, class T>
__device__ __forceinline__ void gather_in(T* sp, T* sg, const T* p, const T* g, Entries at, bool own) {
  if (!own) return;
  T rp[E], rg[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    rp[e] = p[at.first + e * at.stride];
    rg[e] = g[at.first + e * at.stride];
  }
  const int i = int(threadIdx.x);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    sp[i * E + e] = rp[e];
    sg[i * E + e] = rg[e];
  }
}

template <int E, class T>
__device__ __forceinline__ void scatter_out(T* p, const T* sp, Entries at, bool own) {
  if (!own) return;
  const int i = int(threadIdx.x);
#pragma unroll
  for (int e = 0; e < E; ++e) p[at.first + e * at.stride] = sp[i * E + e];
}

// Scratch shared memory of the code-sorted variant: kSortBuckets counters and the block's permutation.
constexpr int kSortBuckets = 8;  // codes 0..6 (codes.h), and one bucket for idle threads and unknown codes
template <int kThreadsT>
constexpr int kSortScratchInts = kSortBuckets + kThreadsT;

// Which component of the block thread i runs. Plain staging: component i. Code-sorted (kSort): the
// block's components ordered by code (a counting sort with shared-memory atomics), so that the warps
// of a block with mixed manifolds mostly run one code path each instead of every path in turn; the
// order within a code is arbitrary, which changes nothing computed (each component is independent).
// `code`: the code of the thread's own component (any value for idle threads, i >= nc).
template <int kThreadsT, bool kSort>
__device__ __forceinline__ int component_of_thread(int code, int nc, int* scratch) {
  const int i = threadIdx.x;
  if constexpr (!kSort) {
    return i;
  } else {
    int* count = scratch;
    int* perm = scratch + kSortBuckets;
    if (i < kSortBuckets) count[i] = 0;
    __syncthreads();
    if (i >= nc) code = kSortBuckets - 1;
    const int bucket = code >= 0 && code < kSortBuckets - 1 ? code : kSortBuckets - 1;
    atomicAdd(&count[bucket], 1);
    __syncthreads();
    if (i == 0) {  // exclusive prefix sum: the first position of every bucket
      int start = 0;
      for (int k = 0; k < kSortBuckets; ++k) {
        const int c = count[k];
        count[k] = start;
        start += c;
      }
    }
    __syncthreads();
    perm[atomicAdd(&count[bucket], 1)] = i;
    __syncthreads();
    return perm[i];
  }
}

// What component c needs besides p, g and m: its code, R and its group's index (for s_g), each one
// independent load (the dependent s_g = group_scale[group] is read later, see group_step).
template <class T>
struct ComponentInputs {
  int code;
  T r;
  int32_t group;
};
template <class T>
__device__ __forceinline__ ComponentInputs<T> inputs_of(const TensorSlot<T>& slot, int64_t c) {
  return ComponentInputs<T>{code_at(slot, c), rescale_at(slot, c), slot.group_index ? slot.group_index[c] : 0};
}
template <class T>
__device__ __forceinline__ T group_step(const TensorSlot<T>& slot, const ComponentInputs<T>& in) {
  return slot.group_scale ? slot.group_scale[in.group] : T(1);
}

// Block b of a staged step launch (one block per kThreadsT components of one tensor), with the hyper-parameters
// that h_launch and ctl give its tensor (step_control.h; nothing at all when ctl skips the step): stage p, g (and m)
// into sp, sg, sm (kThreadsT·A·B values each, 16-byte aligned, shared by the block's threads), run
// component_step (csrc/fgsgd/step.h) of one component per thread, write p (and m) back. With kSort the
// components are handed to the threads in order of their codes (component_of_thread; `scratch` holds
// kSortScratchInts<kThreadsT> shared ints), else scratch is unused. kInterleaved: every tensor of the table is a
// channels-last weight (by_layout), whose p and g are staged by gather_in and written back by scatter_out; the
// shared layout, and so the math and its results, are those of a contiguous weight. A compile-time choice, so that
// the contiguous kernel is the one it was (the run-time branch cost it 7 registers a thread: 64 → 71 in fp32, sm_90,
// one block fewer per SM).
template <int kThreadsT, bool kSort = false, bool kInterleaved = false, class S, class T>
__device__ __forceinline__ void staged_step_block(S s, const SlotTable<T>& table, const StepHParams<T>& h_launch,
                                                  const StepControl& ctl, int64_t b, T* sp, T* sg, T* sm,
                                                  int* scratch = nullptr) {
  constexpr int E = S::kCap;
  constexpr int kChunk = kThreadsT * E;
  if (step_skipped(ctl)) return;  // uniform over the launch: every thread leaves before the first barrier
  const int t = slot_of_block(table, b);
  const TensorSlot<T>& slot = table.slot[t];
  const StepHParams<T> h = resolve_step(h_launch, ctl, slot.step);
  const int64_t c0 = (b - table.block_start[t]) * kThreadsT;
  const int nc = int(slot.n - c0 < kThreadsT ? slot.n - c0 : kThreadsT);
  const int ne = nc * E;
  const bool use_m = h.momentum != T(0);
  const bool read_m = use_m && !h.first_step;
  constexpr bool interleaved = kInterleaved;
  T* gp = slot.p + c0 * E;
  const T* gg = slot.g + c0 * E;
  T* gm = use_m ? slot.m + c0 * E : nullptr;
  // 16-byte vectors when this chunk is whole and its three addresses are aligned (a whole chunk is
  // kThreadsT·E·sizeof(T) bytes, a multiple of 16, so every chunk of an aligned tensor is aligned)
  const bool vec = nc == kThreadsT && (interleaved || (aligned16(gp) && aligned16(gg))) && (!use_m || aligned16(gm));
  // the thread's own component's code, R and group are requested before the chunk, so that their latency
  // overlaps the chunk's instead of following the barrier
  const bool own = int(threadIdx.x) < nc;
  ComponentInputs<T> in{0, T(1), 0};
  if (own) in = inputs_of(slot, c0 + threadIdx.x);
  const Entries at = interleaved && own ? entries_of(slot, E, c0 + threadIdx.x) : Entries{0, 1};
  if constexpr (interleaved) {
    gather_in<E>(sp, sg, slot.p, slot.g, at, own);
    if (read_m) copy_chunk<kChunk, kThreadsT>(sm, gm, ne, vec);
  } else {
    stage_in<kChunk, kThreadsT>(sp, sg, sm, gp, gg, gm, ne, vec, read_m);
  }
  __syncthreads();
  const int j = component_of_thread<kThreadsT, kSort>(in.code, nc, scratch);
  if (kSort && j < nc) in = inputs_of(slot, c0 + j);  // another thread's component: read again (L1)
  if (j < nc) {
    T p[E], g[E], m[E];
    load(s, sp + j * E, p);
    load(s, sg + j * E, g);
    if (read_m) load(s, sm + j * E, m);
    component_step(s, in.code, p, g, m, in.r, group_step(slot, in), h);
    store(s, p, sp + j * E);
    if (use_m) store(s, m, sm + j * E);
  }
  __syncthreads();
  if constexpr (interleaved)
    scatter_out<E>(slot.p, sp, at, own);
  else
    copy_chunk<kChunk, kThreadsT>(gp, sp, ne, vec);
  if (use_m) copy_chunk<kChunk, kThreadsT>(gm, sm, ne, vec);
}

// Block b of a staged tangent_sqnorm launch (group_clip's ‖ξ_i‖², DESIGN.md §1 step 2): p and g staged as in
// staged_step_block (coalesced; the per-thread reads of the plain kernel touch 9 cache lines per warp load; a
// channels-last weight's by gather_in: kInterleaved, as in staged_step_block), then ‖Π_ω(R·g)‖² of one component
// per thread into slot.out.
template <int kThreadsT, bool kInterleaved = false, class S, class T>
__device__ __forceinline__ void staged_sqnorm_block(S s, const SlotTable<T>& table, T wd, int64_t b, T* sp, T* sg) {
  constexpr int E = S::kCap;
  constexpr int kChunk = kThreadsT * E;
  const int t = slot_of_block(table, b);
  const TensorSlot<T>& slot = table.slot[t];
  const int64_t c0 = (b - table.block_start[t]) * kThreadsT;
  const int nc = int(slot.n - c0 < kThreadsT ? slot.n - c0 : kThreadsT);
  const T* gp = slot.p + c0 * E;
  const T* gg = slot.g + c0 * E;
  const bool vec = nc == kThreadsT && aligned16(gp) && aligned16(gg);
  const int i = int(threadIdx.x);
  int code = 0;
  T r = T(1);
  if (i < nc) {  // requested before the chunk, as in staged_step_block
    code = code_at(slot, c0 + i);
    r = rescale_at(slot, c0 + i);
  }
  if constexpr (kInterleaved)
    gather_in<E>(sp, sg, slot.p, slot.g, i < nc ? entries_of(slot, E, c0 + i) : Entries{0, 1}, i < nc);
  else
    stage_in<kChunk, kThreadsT>(sp, sg, static_cast<T*>(nullptr), gp, gg, static_cast<const T*>(nullptr), nc * E,
                                vec, false);
  __syncthreads();
  if (i < nc) {
    T p[E], g[E];
    load(s, sp + i * E, p);
    load(s, sg + i * E, g);
    slot.out[c0 + i] = tangent_sqnorm(s, code, p, g, r, manifold_of(code) == kManEuclidean ? wd : T(0));
  }
}

}  // namespace cuda
}  // namespace fgsgd
