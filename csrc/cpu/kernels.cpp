#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace fgsgd {
namespace cpu {
namespace {

constexpr int64_t kGrain = 2048;  // components per task

template <class F>
void each(int64_t n, F&& f) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// Runs f(slot, i) for every component of every slot, parallel over the concatenated index space.
template <class T, class F>
void each_slot(const std::vector<TensorSlot<T>>& slots, F&& f) {
  std::vector<int64_t> start(slots.size() + 1, 0);
  for (size_t t = 0; t < slots.size(); ++t) start[t + 1] = start[t] + slots[t].n;
  at::parallel_for(0, start.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t k = begin; k < end; ++k) {
      while (k >= start[t + 1]) ++t;
      f(slots[t], k - start[t]);
    }
  });
}

}  // namespace

template <class T>
void proj(const UnaryArgs<T>& a, int A, int B) {
  with_shape(A, B, [&](auto s) { each(a.n, [&](int64_t i) { proj_at(s, a, i); }); });
}
template <class T>
void retr(const UnaryArgs<T>& a, int A, int B) {
  with_shape(A, B, [&](auto s) { each(a.n, [&](int64_t i) { retr_at(s, a, i); }); });
}
template <class T>
void projx(const UnaryArgs<T>& a, int A, int B) {
  with_shape(A, B, [&](auto s) { each(a.n, [&](int64_t i) { projx_at(s, a, i); }); });
}
template <class T>
void norms(const UnaryArgs<T>& a, int A, int B) {
  with_shape(A, B, [&](auto s) { each(a.n, [&](int64_t i) { norms_at(s, a, i); }); });
}

template <class T>
void multi_step(const std::vector<TensorSlot<T>>& slots, int A, int B, const StepHParams<T>& h) {
  with_shape(A, B, [&](auto s) { each_slot(slots, [&](const TensorSlot<T>& t, int64_t i) { step_at(s, t, h, i); }); });
}
template <class T>
void multi_sqnorm(const std::vector<TensorSlot<T>>& slots, int A, int B, T wd) {
  with_shape(A, B, [&](auto s) { each_slot(slots, [&](const TensorSlot<T>& t, int64_t i) { sqnorm_at(s, t, wd, i); }); });
}
template <class T>
void multi_projx(const std::vector<TensorSlot<T>>& slots, int A, int B) {
  with_shape(A, B, [&](auto s) { each_slot(slots, [&](const TensorSlot<T>& t, int64_t i) { projx_slot_at(s, t, i); }); });
}
template <class T>
void multi_rescale(const std::vector<TensorSlot<T>>& slots, int A, int B) {
  with_shape(A, B, [&](auto s) { each_slot(slots, [&](const TensorSlot<T>& t, int64_t i) { rescale_slot_at(s, t, i); }); });
}

#define FGSGD_INSTANTIATE(T)                                                                          \
  template void proj<T>(const UnaryArgs<T>&, int, int);                                              \
  template void retr<T>(const UnaryArgs<T>&, int, int);                                              \
  template void projx<T>(const UnaryArgs<T>&, int, int);                                             \
  template void norms<T>(const UnaryArgs<T>&, int, int);                                             \
  template void multi_step<T>(const std::vector<TensorSlot<T>>&, int, int, const StepHParams<T>&);  \
  template void multi_sqnorm<T>(const std::vector<TensorSlot<T>>&, int, int, T);                     \
  template void multi_projx<T>(const std::vector<TensorSlot<T>>&, int, int);                         \
  template void multi_rescale<T>(const std::vector<TensorSlot<T>>&, int, int);
FGSGD_INSTANTIATE(float)
FGSGD_INSTANTIATE(double)
#undef FGSGD_INSTANTIATE

}  // namespace cpu
}  // namespace fgsgd
