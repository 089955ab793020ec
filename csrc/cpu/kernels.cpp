#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "fast.h"
#include "serial_row.h"
#include "../fgsgd/group_scale.h"

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

inline bool is_row_shape(int A, int B) { return A * B > kMaxElems; }  // the checks allow only B == 1 there

enum Isa : int { kScalar = 0, kBase = 1, kAvx2 = 2 };

bool cpu_has_avx2() {
#if FGSGD_CPU_HAVE_AVX2_TU
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

int parse_isa(const char* name) {
  if (!name) return -1;
  if (!std::strcmp(name, "scalar")) return kScalar;
  if (!std::strcmp(name, "base")) return FGSGD_CPU_HAVE_FAST ? int(kBase) : -1;
  if (!std::strcmp(name, "avx2")) return cpu_has_avx2() ? kAvx2 : -1;
  return -1;
}

std::atomic<int>& isa_state() {
  static std::atomic<int> state([] {
    const int env = parse_isa(std::getenv("FGSGD_CPU_ISA"));
    return env >= 0 ? env : cpu_has_avx2() ? int(kAvx2) : FGSGD_CPU_HAVE_FAST ? int(kBase) : int(kScalar);
  }());
  return state;
}

// Runs range(slot, begin, end) over every component of every slot, parallel over the concatenated index
// space: each task hands whole runs of one tensor to `range`.
template <class T, class R>
void each_range(const std::vector<TensorSlot<T>>& slots, int64_t grain, R&& range) {
  std::vector<int64_t> start(slots.size() + 1, 0);
  for (size_t t = 0; t < slots.size(); ++t) start[t + 1] = start[t] + slots[t].n;
  at::parallel_for(0, start.back(), grain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (int64_t k = begin; k < end;) {
      while (k >= start[t + 1]) ++t;
      const int64_t stop = std::min(end, start[t + 1]);
      range(slots[t], k - start[t], stop - start[t]);
      k = stop;
    }
  });
}

// Runs f(slot, i) for every component of every slot.
template <class T, class F>
void each_slot(const std::vector<TensorSlot<T>>& slots, F&& f) {
  each_range(slots, kGrain, [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(t, i);
  });
}

inline int64_t row_grain(int n) { return std::max<int64_t>(1, 16 * kGrain / n); }  // ~32k elements per task

// Row components (serial_row.h) on the chosen instruction set: the step, or ‖ξ‖² when `wd` is given.
template <class T>
void multi_rows(const std::vector<TensorSlot<T>>& slots, int n, const StepHParams<T>* h, T wd) {
  const int v = isa_state().load();
  each_range(slots, row_grain(n), [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
#if FGSGD_CPU_HAVE_AVX2_TU
    if (v == kAvx2) return h ? step_rows_avx2(t, *h, n, begin, end) : sqnorm_rows_avx2(t, wd, n, begin, end);
#endif
#if FGSGD_CPU_HAVE_FAST
    if (v == kBase) return h ? step_rows_base(t, *h, n, begin, end) : sqnorm_rows_base(t, wd, n, begin, end);
#endif
    return h ? cpu_rows::step_rows(t, *h, n, begin, end) : cpu_rows::sqnorm_rows(t, wd, n, begin, end);
  });
}

// The fused step of slots on the fast path: each task hands whole runs of one tensor to the vectorised
// range function.
template <class T>
void fast_multi_step(const std::vector<TensorSlot<T>>& slots, int A, int B, const StepHParams<T>& h, int isa) {
  each_range(slots, kGrain, [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
#if FGSGD_CPU_HAVE_AVX2_TU
    if (isa == kAvx2) return step_range_avx2(t, h, A, B, begin, end);
#endif
#if FGSGD_CPU_HAVE_FAST
    step_range_base(t, h, A, B, begin, end);
#endif
  });
}

}  // namespace

const char* isa() {
  switch (isa_state().load()) {
    case kScalar: return "scalar";
    case kAvx2: return "avx2";
    default: return "base";
  }
}

bool set_isa(const char* name) {
  const int v = parse_isa(name);
  if (v < 0) return false;
  isa_state().store(v);
  return true;
}

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
  if (is_row_shape(A, B)) return multi_rows(slots, A, &h, T(0));
  const int v = isa_state().load();
  if (v != kScalar && fast_shape(A, B)) return fast_multi_step(slots, A, B, h, v);
  with_shape(A, B, [&](auto s) { each_slot(slots, [&](const TensorSlot<T>& t, int64_t i) { step_at(s, t, h, i); }); });
}
template <class T>
void multi_sqnorm(const std::vector<TensorSlot<T>>& slots, int A, int B, T wd) {
  if (is_row_shape(A, B)) return multi_rows(slots, A, static_cast<const StepHParams<T>*>(nullptr), wd);
  const int v = isa_state().load();
  if (v != kScalar && fast_shape(A, B)) {
    return each_range(slots, kGrain, [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
#if FGSGD_CPU_HAVE_AVX2_TU
      if (v == kAvx2) return sqnorm_range_avx2(t, wd, A, B, begin, end);
#endif
#if FGSGD_CPU_HAVE_FAST
      sqnorm_range_base(t, wd, A, B, begin, end);
#endif
    });
  }
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

template <class T>
void group_scale(const GroupScaleArgs<T>& a) {
  at::parallel_for(0, a.groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) a.out[g] = group_scale_at(a, g);
  });
}

#define FGSGD_INSTANTIATE(T)                                                                          \
  template void proj<T>(const UnaryArgs<T>&, int, int);                                              \
  template void retr<T>(const UnaryArgs<T>&, int, int);                                              \
  template void projx<T>(const UnaryArgs<T>&, int, int);                                             \
  template void norms<T>(const UnaryArgs<T>&, int, int);                                             \
  template void multi_step<T>(const std::vector<TensorSlot<T>>&, int, int, const StepHParams<T>&);  \
  template void multi_sqnorm<T>(const std::vector<TensorSlot<T>>&, int, int, T);                     \
  template void multi_projx<T>(const std::vector<TensorSlot<T>>&, int, int);                         \
  template void multi_rescale<T>(const std::vector<TensorSlot<T>>&, int, int);                      \
  template void group_scale<T>(const GroupScaleArgs<T>&);
FGSGD_INSTANTIATE(float)
FGSGD_INSTANTIATE(double)
#undef FGSGD_INSTANTIATE

}  // namespace cpu
}  // namespace fgsgd
