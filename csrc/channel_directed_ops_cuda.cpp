// CUDA implementation of channel_directed_ (schema in channel_directed_ops.cpp): channel_directed_impl.h over
// csrc/cuda/channel_directed.cu, on the current stream (no host synchronisation).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "channel_directed_impl.h"
#include "cuda/channel_directed.cuh"

namespace fgsgd {
namespace ops {

struct CudaFibers {
  template <class T>
  static void channel_directed(const std::vector<FiberSlot<T>>& s, FiberMetric m, double lam, const Tensor& g0) {
    c10::cuda::CUDAGuard guard(g0.device());
    const cudaError_t err = cuda::channel_directed(s.data(), int(s.size()), m == FiberMetric::kSobolev, lam,
                                                   c10::cuda::getCurrentCUDAStream(g0.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "fgsgd: CUDA kernel launch failed: ", cudaGetErrorString(err));
  }
};

}  // namespace ops
}  // namespace fgsgd

TORCH_LIBRARY_IMPL(fgsgd, CUDA, m) {
  m.impl("channel_directed_", &fgsgd::ops::channel_directed_<fgsgd::ops::CudaFibers>);
}
TORCH_LIBRARY_IMPL(fgsgd, SparseCUDA, m) {
  m.impl("channel_directed_", &fgsgd::ops::channel_directed_<fgsgd::ops::CudaFibers>);
}
