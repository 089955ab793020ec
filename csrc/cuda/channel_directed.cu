#include "channel_directed.cuh"

#include "../fgsgd/channel_directed.h"

namespace fgsgd {
namespace cuda {
namespace {

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

template <class T>
__global__ void __launch_bounds__(kFiberThreads) fibers_kernel(const FiberTable<T> table, bool sobolev, T inv_lam) {
  const int64_t b = blockIdx.x;
  int t = 0;
  while (t + 1 < table.count && b >= table.block_start[t + 1]) ++t;  // uniform across the block
  const FiberSlot<T>& s = table.slot[t];
  const int64_t i = (b - table.block_start[t]) * kFiberThreads + threadIdx.x;  // fiber i of the slot
  if (i >= s.outer * s.C) return;
  const int64_t o = i / s.C, c = i - o * s.C;
  T* x = s.x + o * s.L * s.C + c;
  if (sobolev)
    sobolev_fibers<T, 1>(x, s.L, s.C, 1, table.coeffs[t]);
  else
    reweighted_fibers<T, 1>(x, s.L, s.C, 1, inv_lam);
}

}  // namespace

template <class T>
cudaError_t channel_directed(const FiberSlot<T>* slots, int count, bool sobolev, double lam, cudaStream_t stream) {
  const T inv_lam = sobolev ? T(1) : T(1.0 / lam);
  for (int first = 0; first < count;) {
    FiberTable<T> table;
    table.count = 0;
    table.block_start[0] = 0;
    for (; first < count && table.count < kFiberSlotsPerLaunch; ++first) {
      const int k = table.count++;
      const FiberSlot<T>& s = slots[first];
      table.slot[k] = s;
      table.coeffs[k] = cast_coeffs<T>(sobolev_coeffs(sobolev ? lam : 0.0, s.L, kSobolevTail<T>));
      table.block_start[k + 1] = table.block_start[k] + (s.outer * s.C + kFiberThreads - 1) / kFiberThreads;
    }
    const int64_t blocks = table.block_start[table.count];
    if (blocks > 0) fibers_kernel<T><<<dim3(unsigned(blocks)), kFiberThreads, 0, stream>>>(table, sobolev, inv_lam);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template cudaError_t channel_directed<float>(const FiberSlot<float>*, int, bool, double, cudaStream_t);
template cudaError_t channel_directed<double>(const FiberSlot<double>*, int, bool, double, cudaStream_t);

}  // namespace cuda
}  // namespace fgsgd
