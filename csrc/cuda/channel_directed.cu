#include "channel_directed.cuh"

#include "fibers.cuh"

namespace fgsgd {
namespace cuda {
namespace {

template <class T>
__global__ void __launch_bounds__(kFiberThreads) fibers_kernel(const FiberTable<T> table, bool sobolev, T inv_lam) {
  fiber_thread(table, int64_t(blockIdx.x), int(threadIdx.x), sobolev, inv_lam);
}

}  // namespace

template <class T>
cudaError_t channel_directed(const FiberSlot<T>* slots, int count, bool sobolev, double lam, cudaStream_t stream) {
  const T inv_lam = sobolev ? T(1) : T(1.0 / lam);
  for (int first = 0; first < count; first += kFiberSlotsPerLaunch) {
    const FiberTable<T> table = next_fiber_table(slots, count, first, sobolev, lam);
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
