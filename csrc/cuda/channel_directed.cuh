// CUDA kernel of channel_directed_ (csrc/fgsgd/channel_directed.h). Plain CUDA C++, no torch headers.
#pragma once
#include <cuda_runtime.h>

#include "../fgsgd/types.h"

namespace fgsgd {
namespace cuda {

// Every fiber of `count` slots in place, one thread per fiber (adjacent threads read adjacent columns of a row:
// coalesced), ceil(count / kFiberSlotsPerLaunch) launches. sobolev: (I − λΔ)⁻¹ f; else re-weighted L2.
template <class T>
cudaError_t channel_directed(const FiberSlot<T>* slots, int count, bool sobolev, double lam, cudaStream_t stream);

}  // namespace cuda
}  // namespace fgsgd
