// CPU kernels: at::parallel_for over components, each calling the shared math of csrc/fgsgd.
#pragma once
#include <vector>

#include "../fgsgd/batched.h"

namespace fgsgd {
namespace cpu {

template <class T> void proj(const UnaryArgs<T>& a, int A, int B);
template <class T> void retr(const UnaryArgs<T>& a, int A, int B);
template <class T> void projx(const UnaryArgs<T>& a, int A, int B);
template <class T> void norms(const UnaryArgs<T>& a, int A, int B);

template <class T> void multi_step(const std::vector<TensorSlot<T>>& slots, int A, int B, const StepHParams<T>& h);
template <class T> void multi_sqnorm(const std::vector<TensorSlot<T>>& slots, int A, int B, T weight_decay);
template <class T> void multi_projx(const std::vector<TensorSlot<T>>& slots, int A, int B);
template <class T> void multi_rescale(const std::vector<TensorSlot<T>>& slots, int A, int B);

}  // namespace cpu
}  // namespace fgsgd
