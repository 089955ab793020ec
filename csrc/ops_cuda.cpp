// CUDA implementation of the fgsgd ops: the torch-facing code of op_impl.h over csrc/cuda.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "op_impl.h"
#include "cuda/kernels.cuh"

namespace fgsgd {
namespace ops {

inline void cuda_ok(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "fgsgd: CUDA kernel launch failed: ", cudaGetErrorString(err)); }

struct CudaBackend {
  static cudaStream_t stream(const Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }
#define FGSGD_CUDA_UNARY(NAME)                                                           \
  template <class T>                                                                     \
  static void NAME(const UnaryArgs<T>& a, const Tensor& x) {                             \
    c10::cuda::CUDAGuard guard(x.device());                                              \
    cuda_ok(cuda::NAME(a, rows_of(x), cols_of(x), stream(x)));                           \
  }
  FGSGD_CUDA_UNARY(proj)
  FGSGD_CUDA_UNARY(retr)
  FGSGD_CUDA_UNARY(projx)
  FGSGD_CUDA_UNARY(norms)
#undef FGSGD_CUDA_UNARY
  // The controls stay on the device: the kernels read them (no host synchronisation, capturable).
  template <class T>
  static void step(const std::vector<TensorSlot<T>>& s, const Tensor& p0, const StepHParams<T>& h, const StepControl& c) {
    c10::cuda::CUDAGuard guard(p0.device());
    cuda_ok(cuda::multi_step(s.data(), int(s.size()), rows_of(p0), cols_of(p0), h, c, stream(p0)));
  }
  template <class T> static void sqnorm(const std::vector<TensorSlot<T>>& s, const Tensor& p0, T wd) {
    c10::cuda::CUDAGuard guard(p0.device());
    cuda_ok(cuda::multi_sqnorm(s.data(), int(s.size()), rows_of(p0), cols_of(p0), wd, stream(p0)));
  }
  template <class T> static void projx_slots(const std::vector<TensorSlot<T>>& s, const Tensor& p0) {
    c10::cuda::CUDAGuard guard(p0.device());
    cuda_ok(cuda::multi_projx(s.data(), int(s.size()), rows_of(p0), cols_of(p0), stream(p0)));
  }
  template <class T> static void rescale_slots(const std::vector<TensorSlot<T>>& s, const Tensor& p0) {
    c10::cuda::CUDAGuard guard(p0.device());
    cuda_ok(cuda::multi_rescale(s.data(), int(s.size()), rows_of(p0), cols_of(p0), stream(p0)));
  }
  template <class T> static void group_scale(const GroupScaleArgs<T>& a, const Tensor& sq) {
    c10::cuda::CUDAGuard guard(sq.device());
    cuda_ok(cuda::group_scale(a, stream(sq)));
  }
};

}  // namespace ops
}  // namespace fgsgd

TORCH_LIBRARY_IMPL(fgsgd, CUDA, m) { fgsgd::ops::register_impls<fgsgd::ops::CudaBackend>(m); }
// Sparse inputs dispatch to SparseCUDA: the same implementation, whose checks reject them by name.
TORCH_LIBRARY_IMPL(fgsgd, SparseCUDA, m) { fgsgd::ops::register_impls<fgsgd::ops::CudaBackend>(m); }
