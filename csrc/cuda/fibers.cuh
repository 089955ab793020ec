// The channel-directed kernel's launch table and per-thread code (csrc/fgsgd/channel_directed.h), one thread per
// fiber: adjacent threads take adjacent columns of a row, so every row is one coalesced access. Host and device
// code only, no launch (channel_directed.cu launches it; tests/cuda_emu/fibers_emu.cpp runs it on the CPU).
#pragma once
#include <cuda_runtime.h>

#include "../fgsgd/channel_directed.h"
#include "../fgsgd/types.h"
#include "slot_table.cuh"

namespace fgsgd {
namespace cuda {

constexpr int kFiberSlotsPerLaunch = 32;  // the table travels as a kernel argument: under 4 KiB
constexpr int kFiberThreads = 128;

template <class T>
struct FiberTable {
  FiberSlot<T> slot[kFiberSlotsPerLaunch];
  SobolevCoeffs<T> coeffs[kFiberSlotsPerLaunch];
  int64_t block_start[kFiberSlotsPerLaunch + 1];  // first block of each slot: one per kFiberThreads fibers
  int count;
};
static_assert(sizeof(FiberTable<double>) + 64 <= 4096, "the fiber table outgrew 4 KiB");

// The table of slots[first ...] (at most kFiberSlotsPerLaunch); its block count is block_start[count].
template <class T>
inline FiberTable<T> next_fiber_table(const FiberSlot<T>* slots, int count, int first, bool sobolev, double lam) {
  FiberTable<T> table;
  table.count = 0;
  table.block_start[0] = 0;
  for (int k = first; k < count && table.count < kFiberSlotsPerLaunch; ++k) {
    const int c = table.count++;
    table.slot[c] = slots[k];
    table.coeffs[c] = cast_coeffs<T>(sobolev_coeffs(sobolev ? lam : 0.0, slots[k].L, kSobolevTail<T>));
    table.block_start[c + 1] = table.block_start[c] + (slots[k].outer * slots[k].C + kFiberThreads - 1) / kFiberThreads;
  }
  return table;
}

// Thread t of block b: fiber (b − block_start[slot]) · kFiberThreads + t of its slot, in place.
template <class T>
__device__ __forceinline__ void fiber_thread(const FiberTable<T>& table, int64_t b, int t, bool sobolev, T inv_lam) {
  const int k = owner_of_block(table.block_start, table.count, b);
  const FiberSlot<T>& s = table.slot[k];
  const int64_t i = (b - table.block_start[k]) * kFiberThreads + t;
  if (i >= s.outer * s.C) return;
  const int64_t o = i / s.C, c = i - o * s.C;
  T* x = s.x + o * s.L * s.C + c;
  if (sobolev)
    sobolev_fibers<T, 1>(x, s.L, s.C, 1, table.coeffs[k]);
  else
    reweighted_fibers<T, 1>(x, s.L, s.C, 1, inv_lam);
}

}  // namespace cuda
}  // namespace fgsgd
