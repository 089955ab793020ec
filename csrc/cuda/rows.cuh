// The step of row components (n×1, n > kMaxElems: csrc/fgsgd/row_step.h) on the GPU: one block per row, its
// kRowThreads threads striding over the row, the sums between passes through shared memory. Block code only
// (kernels.cu launches it; tests/cuda_emu runs it on the CPU).
#pragma once
#include <cuda_runtime.h>

#include "../fgsgd/batched.h"
#include "../fgsgd/row_step.h"
#include "slot_table.cuh"

namespace fgsgd {
namespace cuda {

constexpr int kRowThreads = 128;  // threads per row (one block each)

// Row_step's Ctx for the kT threads of a block; `red` is 2·kT values of shared memory.
template <class T, int kT>
struct BlockRow {
  using Acc = T;
  T* red;
  template <class F>
  __device__ void each(int64_t n, F&& f) {
    for (int64_t i = threadIdx.x; i < n; i += kT) f(i);
  }
  template <int K, class F>
  __device__ void reduce(int64_t n, F&& f, Acc (&s)[K]) {  // per-thread sums, then a tree over the block
    static_assert(K <= 2, "red holds two sums");
    for (int k = 0; k < K; ++k) s[k] = Acc(0);
    for (int64_t i = threadIdx.x; i < n; i += kT) {
      Acc v[2] = {Acc(0), Acc(0)};
      f(i, v[0], v[1]);
      for (int k = 0; k < K; ++k) s[k] += v[k];
    }
    for (int k = 0; k < K; ++k) red[k * kT + threadIdx.x] = s[k];
    __syncthreads();
    for (int h = kT / 2; h > 0; h >>= 1) {
      if (int(threadIdx.x) < h)
        for (int k = 0; k < K; ++k) red[k * kT + threadIdx.x] += red[k * kT + threadIdx.x + h];
      __syncthreads();
    }
    for (int k = 0; k < K; ++k) s[k] = red[k * kT];  // every thread gets the sums
    __syncthreads();                                  // before the next reduction overwrites red
  }
};

// Block b of a row launch (the table counts one block per row: next_table(..., 1)): the step of one row.
template <int kT, class T>
__device__ __forceinline__ void row_step_block(const SlotTable<T>& table, const StepHParams<T>& h_launch,
                                               const StepControl& ctl, int64_t n, int64_t b, T* red) {
  if (step_skipped(ctl)) return;  // uniform over the launch
  const int t = slot_of_block(table, b);
  const TensorSlot<T>& s = table.slot[t];
  const StepHParams<T> h = resolve_step(h_launch, ctl, s.step);
  const int64_t i = b - table.block_start[t];
  BlockRow<T, kT> ctx{red};
  row_step(ctx, code_at(s, i), s.p + i * n, s.g + i * n, s.m ? s.m + i * n : nullptr, n, rescale_at(s, i),
           step_scale_at(s, i), h);
}

// ‖ξ‖² of one row into s.out.
template <int kT, class T>
__device__ __forceinline__ void row_sqnorm_block(const SlotTable<T>& table, T wd, int64_t n, int64_t b, T* red) {
  const int t = slot_of_block(table, b);
  const TensorSlot<T>& s = table.slot[t];
  const int64_t i = b - table.block_start[t];
  BlockRow<T, kT> ctx{red};
  const double v = row_tangent_sqnorm(ctx, code_at(s, i), s.p + i * n, s.g + i * n, n, rescale_at(s, i), wd);
  if (threadIdx.x == 0) s.out[i] = v;
}

}  // namespace cuda
}  // namespace fgsgd
