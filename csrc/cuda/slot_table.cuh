// Launch metadata of the multi-tensor kernels (in the style of apex's multi_tensor_apply): a table of
// up to kSlotsPerLaunch tensors, passed by value as a kernel argument, with the first block of each.
// Host code builds it (next_table), device code finds a block's tensor (slot_of_block).
#pragma once
#include <cuda_runtime.h>

#include <stdint.h>

#include <type_traits>
#include <vector>

#include "../fgsgd/step_control.h"
#include "../fgsgd/types.h"

namespace fgsgd {
namespace cuda {

// Tensors per launch: the slot table travels as a kernel argument and must stay under 4 KiB (kernels.cu): 36 slots
// of 96 bytes (40 before TensorSlot::interleave; ResNet-101 has 33 3×3 filter banks, still one launch).
constexpr int kSlotsPerLaunch = 36;
constexpr int kThreads = 128;  // threads per block = components per block

template <class T>
struct SlotTable {
  TensorSlot<T> slot[kSlotsPerLaunch];
  int64_t block_start[kSlotsPerLaunch + 1];
  int count;
};

template <class T>
struct Extra {
  StepHParams<T> h;
  T weight_decay;
  StepControl ctl;  // the step's run-time controls (step_control.h); all null for the other ops
};

// The table of slots[first ...] (at most kSlotsPerLaunch of them); its block count is
// block_start[count], one block per `per_block` components of each tensor (rows: 1).
template <class T>
inline SlotTable<T> next_table(const TensorSlot<T>* slots, int count, int first, int per_block = kThreads) {
  SlotTable<T> table;
  table.count = 0;
  table.block_start[0] = 0;
  for (int k = first; k < count && table.count < kSlotsPerLaunch; ++k) {
    const int c = table.count++;
    table.slot[c] = slots[k];
    table.block_start[c + 1] = table.block_start[c] + (slots[k].n + per_block - 1) / per_block;
  }
  return table;
}

// Calls f(slots, count, layout) for the contiguous slots (layout: std::false_type) and then the channels-last ones
// (std::true_type; TensorSlot::interleave), each in their order, so that a kernel is compiled for one layout (staged.cuh
// kInterleaved); f returns a cudaError_t, and the first error is returned. Only f(slots, count, false_type) when no
// slot is channels-last (no copy): a model is usually all one or all the other, one launch table either way.
template <class T, class F>
cudaError_t by_layout(const TensorSlot<T>* slots, int count, F&& f) {
  int interleaved = 0;
  for (int k = 0; k < count; ++k) interleaved += slots[k].interleave != 0;
  if (interleaved == 0) return f(slots, count, std::false_type{});
  std::vector<TensorSlot<T>> part[2];
  for (int k = 0; k < count; ++k) part[slots[k].interleave != 0].push_back(slots[k]);
  const cudaError_t err = f(part[0].data(), int(part[0].size()), std::false_type{});
  if (err != cudaSuccess) return err;
  return f(part[1].data(), int(part[1].size()), std::true_type{});
}

// The entry of a launch table whose blocks [block_start[t], block_start[t+1]) hold block b (a scan that is
// uniform across the block; empty tensors own no block). Every launch table's search (this one's, fibers.cuh's).
__device__ __forceinline__ int owner_of_block(const int64_t* block_start, int count, int64_t b) {
  int t = 0;
  while (t + 1 < count && b >= block_start[t + 1]) ++t;
  return t;
}

// The slot that block b works on.
template <class T>
__device__ __forceinline__ int slot_of_block(const SlotTable<T>& table, int64_t b) {
  return owner_of_block(table.block_start, table.count, b);
}

// After a step launch, thread t of one block: slot t's step count + 1, unless found_inf skipped the step (the
// step's blocks read the counts, so this runs as the next launch on the stream).
template <class T>
__device__ __forceinline__ void count_step_of_slot(const SlotTable<T>& table, const StepControl& c, int t) {
  if (t < table.count && table.slot[t].step != nullptr && !step_skipped(c)) *table.slot[t].step += 1.0f;
}

template <class T>
inline bool has_step_counts(const SlotTable<T>& table) {
  for (int t = 0; t < table.count; ++t)
    if (table.slot[t].step != nullptr) return true;
  return false;
}

}  // namespace cuda
}  // namespace fgsgd
