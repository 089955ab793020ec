#include "kernels.cuh"

#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "../fgsgd/group_scale.h"
#include "rows.cuh"
#include "staged.cuh"

namespace fgsgd {
namespace cuda {
namespace {

// A launch's arguments travel in the kernel parameter space (4 KiB before CUDA 12.1): the slot table and Extra.
static_assert(sizeof(SlotTable<double>) + sizeof(Extra<double>) + 64 <= 4096, "the slot table outgrew 4 KiB");

enum class Op { kProj, kRetr, kProjx, kNorms, kStep, kSqnorm, kSlotProjx, kRescale };

template <Op OP, class S, class T>
__global__ void __launch_bounds__(kThreads) unary_kernel(S s, UnaryArgs<T> a) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.n; i += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (OP == Op::kProj) proj_at(s, a, i);
    if constexpr (OP == Op::kRetr) retr_at(s, a, i);
    if constexpr (OP == Op::kProjx) projx_at(s, a, i);
    if constexpr (OP == Op::kNorms) norms_at(s, a, i);
  }
}

// One thread per component, kBlock per block (the table's per_block); the block's tensor is found by a scan
// that is uniform across the block.
template <Op OP, int kBlock, class S, class T>
__global__ void __launch_bounds__(kBlock) slot_kernel(S s, const SlotTable<T> table, const Extra<T> x) {
  const int64_t b = blockIdx.x;
  const int t = slot_of_block(table, b);
  const TensorSlot<T>& slot = table.slot[t];
  const int64_t i = (b - table.block_start[t]) * kBlock + threadIdx.x;
  if (i >= slot.n) return;
  if constexpr (OP == Op::kStep) {
    if (!step_skipped(x.ctl)) step_at(s, slot, resolve_step(x.h, x.ctl, slot.step), i);
  }
  if constexpr (OP == Op::kSqnorm) sqnorm_at(s, slot, x.weight_decay, i);
  if constexpr (OP == Op::kSlotProjx) projx_slot_at(s, slot, i);
  if constexpr (OP == Op::kRescale) rescale_slot_at(s, slot, i);
}

// The step of fixed-shape components with shared-memory staging (staged.cuh); kSort: components handed
// to the threads in order of their codes; kInterleaved: a table of channels-last weights (by_layout).
template <bool kSort, bool kInterleaved, class S, class T>
__global__ void __launch_bounds__(kThreads) staged_step_kernel(S s, const SlotTable<T> table, const Extra<T> x) {
  __shared__ __align__(16) T sp[kThreads * S::kCap];
  __shared__ __align__(16) T sg[kThreads * S::kCap];
  __shared__ __align__(16) T sm[kThreads * S::kCap];
  __shared__ int scratch[kSort ? kSortScratchInts<kThreads> : 1];
  staged_step_block<kThreads, kSort, kInterleaved>(s, table, x.h, x.ctl, blockIdx.x, sp, sg, sm, scratch);
}

// ‖ξ_i‖² of fixed-shape components with shared-memory staging (staged.cuh).
template <bool kInterleaved, class S, class T>
__global__ void __launch_bounds__(kThreads) staged_sqnorm_kernel(S s, const SlotTable<T> table, const Extra<T> x) {
  __shared__ __align__(16) T sp[kThreads * S::kCap];
  __shared__ __align__(16) T sg[kThreads * S::kCap];
  staged_sqnorm_block<kThreads, kInterleaved>(s, table, x.weight_decay, blockIdx.x, sp, sg);
}

// After the step launch of a table whose tensors carry step counts: one thread per tensor (count_step_of_slot).
template <class T>
__global__ void __launch_bounds__(kSlotsPerLaunch) count_steps_kernel(const SlotTable<T> table, const StepControl ctl) {
  count_step_of_slot(table, ctl, int(threadIdx.x));
}

template <class T>
void launch_count_steps(const SlotTable<T>& table, const StepControl& ctl, cudaStream_t stream) {
  if (has_step_counts(table)) count_steps_kernel<<<1, kSlotsPerLaunch, 0, stream>>>(table, ctl);
}

// Row components: one block per row (rows.cuh); n = the row length.
template <class T>
__global__ void __launch_bounds__(kRowThreads) row_step_kernel(const SlotTable<T> table, const Extra<T> x, int64_t n) {
  __shared__ T red[2 * kRowThreads];
  row_step_block<kRowThreads>(table, x.h, x.ctl, n, blockIdx.x, red);
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) row_sqnorm_kernel(const SlotTable<T> table, const Extra<T> x, int64_t n) {
  __shared__ T red[2 * kRowThreads];
  row_sqnorm_block<kRowThreads>(table, x.weight_decay, n, blockIdx.x, red);
}

template <class T>
__global__ void __launch_bounds__(kThreads) group_scale_kernel(const GroupScaleArgs<T> a) {
  const int64_t g = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (g < a.groups) a.out[g] = group_scale_at(a, g);
}

// Which step kernel runs for 3×3 components, by FGSGD_CUDA_STEP: "staged" (the default), "sorted" (staged,
// components sorted by code within a block) or "thread" (one thread per component, no staging). The
// alternatives stay for measurement (benchmarks/bench_kernels.py); read at every launch (a CUDA graph
// keeps the kernel it captured).
enum class StepKernel { kStaged, kSorted, kThread };
inline StepKernel step_kernel_choice() {
  const char* v = getenv("FGSGD_CUDA_STEP");
  if (v != nullptr && strcmp(v, "thread") == 0) return StepKernel::kThread;
  if (v != nullptr && strcmp(v, "sorted") == 0) return StepKernel::kSorted;
  return StepKernel::kStaged;
}

// kInterleaved: the table's tensors are channels-last weights (by_layout); the staged kernels are compiled for
// the one layout, the one-thread-per-component kernel reads either (batched.h entries_of).
template <bool kInterleaved, class T>
void launch_step(Fixed<3, 3> s, const SlotTable<T>& table, const Extra<T>& x, int64_t blocks, cudaStream_t stream) {
  switch (step_kernel_choice()) {
    case StepKernel::kStaged:
      staged_step_kernel<false, kInterleaved><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
      break;
    case StepKernel::kSorted:
      staged_step_kernel<true, kInterleaved><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
      break;
    case StepKernel::kThread:
      slot_kernel<Op::kStep, kThreads><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
      break;
  }
}

// Every other shape (Fixed<7, 7>, Dyn): one thread per component, either layout.
template <bool kInterleaved, class S, class T>
void launch_step(S s, const SlotTable<T>& table, const Extra<T>& x, int64_t blocks, cudaStream_t stream) {
  slot_kernel<Op::kStep, kThreads><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
}

// tangent_sqnorm: staged for 3×3 components (one thread per component with FGSGD_CUDA_STEP=thread).
template <bool kInterleaved, class T>
void launch_sqnorm(Fixed<3, 3> s, const SlotTable<T>& table, const Extra<T>& x, int64_t blocks, cudaStream_t stream) {
  if (step_kernel_choice() == StepKernel::kThread)
    slot_kernel<Op::kSqnorm, kThreads><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
  else
    staged_sqnorm_kernel<kInterleaved><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
}

template <bool kInterleaved, class S, class T>
void launch_sqnorm(S s, const SlotTable<T>& table, const Extra<T>& x, int64_t blocks, cudaStream_t stream) {
  slot_kernel<Op::kSqnorm, kThreads><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
}

template <Op OP, class T>
cudaError_t launch_unary(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  int64_t blocks = (a.n + kThreads - 1) / kThreads;
  if (blocks > 65535LL * 32) blocks = 65535LL * 32;  // grid-stride loop covers the rest
  with_shape(A, B, [&](auto s) { unary_kernel<OP><<<unsigned(blocks), kThreads, 0, stream>>>(s, a); });
  return cudaGetLastError();
}

template <Op OP, class T>
cudaError_t launch_rows(const TensorSlot<T>* slots, int count, int64_t n, const Extra<T>& x, cudaStream_t stream) {
  for (int first = 0; first < count; first += kSlotsPerLaunch) {
    const SlotTable<T> table = next_table(slots, count, first, 1);
    const int64_t blocks = table.block_start[table.count];
    if (blocks == 0) {  // only empty rows: their step counts still advance, as on the CPU
      if constexpr (OP == Op::kStep) launch_count_steps(table, x.ctl, stream);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      continue;
    }
    if constexpr (OP == Op::kStep) {
      row_step_kernel<<<unsigned(blocks), kRowThreads, 0, stream>>>(table, x, n);
      launch_count_steps(table, x.ctl, stream);
    } else
      row_sqnorm_kernel<<<unsigned(blocks), kRowThreads, 0, stream>>>(table, x, n);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The SMs of the current device (cached per device).
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  if (cached[dev] == 0) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = v > 0 ? v : 1;
  }
  return cached[dev];
}

// A small launch of Dyn components (ResNet's 7×7 stem before its Fixed<7, 7> kernels: 192 components, 2 blocks
// of 128 threads on 2 SMs; 103 µs on an H100, benchmarks/step_parts.py) is latency-bound: one thread per
// component, its arrays in local memory (3 KB per thread, fp32 step), 128 threads' worth of them more than an
// SM's L1 holds. With FGSGD_CUDA_SMALL_BLOCKS=1 a launch of fewer blocks than the GPU has SMs runs blocks of
// kSmallBlock threads instead: 4× the SMs, a quarter of the local memory per SM. Opt-in until measured on a GPU.
constexpr int kSmallBlock = 32;
inline bool small_blocks(int64_t blocks) {
  const char* v = getenv("FGSGD_CUDA_SMALL_BLOCKS");
  return v != nullptr && strcmp(v, "1") == 0 && blocks < sm_count();
}

// The shape policy of a multi-tensor launch: with_shape's (3×3 and 7×7 unrolled, in registers), or with
// FGSGD_CUDA_DYN=1 the run-time shape Dyn for all but 3×3: the kernels before the 7×7 specialisation, kept for
// measurement (benchmarks/step_parts.py times ResNet's stem both ways). Read at every launch.
template <class F>
void with_launch_shape(int A, int B, F&& f) {
  const char* v = getenv("FGSGD_CUDA_DYN");
  if (v != nullptr && strcmp(v, "1") == 0 && !(A == 3 && B == 3))
    f(Dyn{A, B});
  else
    with_shape(A, B, f);
}

// The launches of `count` slots of one layout (kInterleaved: channels-last weights, step and sqnorm only).
template <Op OP, bool kInterleaved, class T>
cudaError_t launch_tables(const TensorSlot<T>* slots, int count, int A, int B, const Extra<T>& x, cudaStream_t stream) {
  for (int first = 0; first < count; first += kSlotsPerLaunch) {
    const SlotTable<T> table = next_table(slots, count, first);
    const int64_t blocks = table.block_start[table.count];
    if (blocks == 0) {  // only empty tensors: their step counts still advance, as on the CPU
      if constexpr (OP == Op::kStep) launch_count_steps(table, x.ctl, stream);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      continue;
    }
    with_launch_shape(A, B, [&](auto s) {
      if constexpr (std::is_same_v<decltype(s), Dyn> && (OP == Op::kStep || OP == Op::kSqnorm)) {
        if (small_blocks(blocks)) {  // the same slots, kSmallBlock components per block
          const SlotTable<T> small = next_table(slots, count, first, kSmallBlock);
          slot_kernel<OP, kSmallBlock><<<unsigned(small.block_start[small.count]), kSmallBlock, 0, stream>>>(s, small, x);
          if constexpr (OP == Op::kStep) launch_count_steps(small, x.ctl, stream);
          return;
        }
      }
      if constexpr (OP == Op::kStep) {
        launch_step<kInterleaved>(s, table, x, blocks, stream);
        launch_count_steps(table, x.ctl, stream);
      } else if constexpr (OP == Op::kSqnorm) {
        launch_sqnorm<kInterleaved>(s, table, x, blocks, stream);
      } else
        slot_kernel<OP, kThreads><<<unsigned(blocks), kThreads, 0, stream>>>(s, table, x);
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <Op OP, class T>
cudaError_t launch_slots(const TensorSlot<T>* slots, int count, int A, int B, const Extra<T>& x, cudaStream_t stream) {
  if constexpr (OP == Op::kStep || OP == Op::kSqnorm) {
    if (A * B > kMaxElems) return launch_rows<OP>(slots, count, int64_t(A), x, stream);  // n×1 rows (op_impl.h checks)
    // channels-last weights (op_impl.h make_slots) in launches of their own
    return by_layout(slots, count, [&](const TensorSlot<T>* part, int n, auto layout) {
      return launch_tables<OP, decltype(layout)::value>(part, n, A, B, x, stream);
    });
  }
  return launch_tables<OP, false>(slots, count, A, B, x, stream);  // projx_, rescale_: contiguous only
}

}  // namespace

template <class T>
cudaError_t proj(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream) { return launch_unary<Op::kProj>(a, A, B, stream); }
template <class T>
cudaError_t retr(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream) { return launch_unary<Op::kRetr>(a, A, B, stream); }
template <class T>
cudaError_t projx(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream) { return launch_unary<Op::kProjx>(a, A, B, stream); }
template <class T>
cudaError_t norms(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream) { return launch_unary<Op::kNorms>(a, A, B, stream); }

template <class T>
cudaError_t multi_step(const TensorSlot<T>* slots, int count, int A, int B, const StepHParams<T>& h,
                       const StepControl& c, cudaStream_t stream) {
  return launch_slots<Op::kStep>(slots, count, A, B, Extra<T>{h, T(0), c}, stream);
}
template <class T>
cudaError_t multi_sqnorm(const TensorSlot<T>* slots, int count, int A, int B, T wd, cudaStream_t stream) {
  return launch_slots<Op::kSqnorm>(slots, count, A, B, Extra<T>{StepHParams<T>{}, wd}, stream);
}
template <class T>
cudaError_t multi_projx(const TensorSlot<T>* slots, int count, int A, int B, cudaStream_t stream) {
  return launch_slots<Op::kSlotProjx>(slots, count, A, B, Extra<T>{StepHParams<T>{}, T(0)}, stream);
}
template <class T>
cudaError_t multi_rescale(const TensorSlot<T>* slots, int count, int A, int B, cudaStream_t stream) {
  return launch_slots<Op::kRescale>(slots, count, A, B, Extra<T>{StepHParams<T>{}, T(0)}, stream);
}

template <class T>
cudaError_t group_scale(const GroupScaleArgs<T>& a, cudaStream_t stream) {
  if (a.groups == 0) return cudaSuccess;
  group_scale_kernel<<<unsigned((a.groups + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

#define FGSGD_INSTANTIATE(T)                                                                                    \
  template cudaError_t proj<T>(const UnaryArgs<T>&, int, int, cudaStream_t);                                   \
  template cudaError_t retr<T>(const UnaryArgs<T>&, int, int, cudaStream_t);                                   \
  template cudaError_t projx<T>(const UnaryArgs<T>&, int, int, cudaStream_t);                                  \
  template cudaError_t norms<T>(const UnaryArgs<T>&, int, int, cudaStream_t);                                  \
  template cudaError_t multi_step<T>(const TensorSlot<T>*, int, int, int, const StepHParams<T>&,                \
                                     const StepControl&, cudaStream_t);                                          \
  template cudaError_t multi_sqnorm<T>(const TensorSlot<T>*, int, int, int, T, cudaStream_t);                   \
  template cudaError_t multi_projx<T>(const TensorSlot<T>*, int, int, int, cudaStream_t);                       \
  template cudaError_t multi_rescale<T>(const TensorSlot<T>*, int, int, int, cudaStream_t);                     \
  template cudaError_t group_scale<T>(const GroupScaleArgs<T>&, cudaStream_t);
FGSGD_INSTANTIATE(float)
FGSGD_INSTANTIATE(double)
#undef FGSGD_INSTANTIATE

}  // namespace cuda
}  // namespace fgsgd
