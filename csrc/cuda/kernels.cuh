// CUDA kernels over the shared math of csrc/fgsgd. Plain CUDA C++: raw pointers and a stream,
// no torch headers, so this compiles with nvcc alone (`nvcc -c -std=c++17 -arch=sm_90`).
#pragma once
#include <cuda_runtime.h>

#include "../fgsgd/batched.h"
#include "slot_table.cuh"

namespace fgsgd {
namespace cuda {

template <class T> cudaError_t proj(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream);
template <class T> cudaError_t retr(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream);
template <class T> cudaError_t projx(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream);
template <class T> cudaError_t norms(const UnaryArgs<T>& a, int A, int B, cudaStream_t stream);

// Multi-tensor ops: `count` slots of one shape, ceil(count / kSlotsPerLaunch) launches.
// multi_step: `c` holds the run-time controls (csrc/fgsgd/step_control.h); tensors with step counts get them
// incremented by a launch after the step's, unless c.found_inf skips the step.
template <class T>
cudaError_t multi_step(const TensorSlot<T>* slots, int count, int A, int B, const StepHParams<T>& h,
                       const StepControl& c, cudaStream_t stream);
template <class T>
cudaError_t multi_sqnorm(const TensorSlot<T>* slots, int count, int A, int B, T weight_decay, cudaStream_t stream);
template <class T>
cudaError_t multi_projx(const TensorSlot<T>* slots, int count, int A, int B, cudaStream_t stream);
template <class T>
cudaError_t multi_rescale(const TensorSlot<T>* slots, int count, int A, int B, cudaStream_t stream);
// s_g of every group (csrc/fgsgd/group_scale.h), one thread per group.
template <class T>
cudaError_t group_scale(const GroupScaleArgs<T>& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fgsgd
