#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "fast.h"
#include "interleaved.h"
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

// Components streamed by the row kernels (serial_row.h): every n×1 longer than kMaxCayleyRows, not only those
// over kMaxElems (the checks allow only n×1 there). No Cayley code reaches them (it needs A <= 8), and from
// 16×1 up the row kernel is 2-4× faster than the per-component path (benchmarks/README, "Short rows").
inline bool takes_row_kernel(int A, int B) { return A * B > kMaxElems || (B == 1 && A > kMaxCayleyRows); }

enum Isa : int { kScalar = 0, kBase = 1, kAvx2 = 2, kAvx512 = 3 };

bool cpu_has_avx2() {
#if FGSGD_CPU_HAVE_AVX2_TU
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if FGSGD_CPU_HAVE_AVX512_TU
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

int parse_isa(const char* name) {
  if (!name) return -1;
  if (!std::strcmp(name, "scalar")) return kScalar;
  if (!std::strcmp(name, "base")) return FGSGD_CPU_HAVE_FAST ? int(kBase) : -1;
  if (!std::strcmp(name, "avx2")) return cpu_has_avx2() ? kAvx2 : -1;
  if (!std::strcmp(name, "avx512")) return cpu_has_avx512() ? kAvx512 : -1;
  return -1;
}

std::atomic<int>& isa_state() {
  static std::atomic<int> state([] {
    const int env = parse_isa(std::getenv("FGSGD_CPU_ISA"));
    return env >= 0                ? env
           : cpu_has_avx512()      ? int(kAvx512)
           : cpu_has_avx2()        ? int(kAvx2)
           : FGSGD_CPU_HAVE_FAST   ? int(kBase)
                                   : int(kScalar);
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

// In a void function: returns NAME_avx512(args), NAME_avx2(args) or NAME_base(args), the fast-path entry
// (fast.h) of instruction set `isa`; does nothing for kScalar (the caller's scalar code follows) or in a build
// without the fast path.
#if FGSGD_CPU_HAVE_AVX2_TU
#define FGSGD_CALL_X86(isa, NAME, ...)                     \
  if ((isa) == kAvx512) return NAME##_avx512(__VA_ARGS__); \
  if ((isa) == kAvx2) return NAME##_avx2(__VA_ARGS__);
#else
#define FGSGD_CALL_X86(isa, NAME, ...)
#endif
#if FGSGD_CPU_HAVE_FAST
#define FGSGD_CALL_FAST(isa, NAME, ...)        \
  {                                            \
    FGSGD_CALL_X86(isa, NAME, __VA_ARGS__)     \
    if ((isa) == kBase) return NAME##_base(__VA_ARGS__); \
  }
#else
#define FGSGD_CALL_FAST(isa, NAME, ...)
#endif

}  // namespace

const char* isa() {
  switch (isa_state().load()) {
    case kScalar: return "scalar";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
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

// The transposes of channels-last tiles (interleaved.h): the fast path's for 3×3 components, else the scalar ones.
template <class T>
Transposer<T> transposer(int isa, int A, int B) {
#if FGSGD_CPU_HAVE_AVX2_TU
  if (fast_shape(A, B) && isa == kAvx512) return {&interleaved_in_avx512, &interleaved_out_avx512};
  if (fast_shape(A, B) && isa == kAvx2) return {&interleaved_in_avx2, &interleaved_out_avx2};
#endif
#if FGSGD_CPU_HAVE_FAST
  if (fast_shape(A, B) && isa == kBase) return {&interleaved_in_base, &interleaved_out_base};
#endif
  return {&interleaved_in_scalar<T>, &interleaved_out_scalar<T>};
}

// Where a multi-tensor op runs: row components (serial_row.h) and 3×3 components (fast.h) on the fast path of
// the chosen instruction set, one run of one tensor per call of rows(t, begin, end) or fast(t, begin, end); the
// other shapes (and the scalar choice) per component, each(s, t, i) with the shape policy s. A slot with
// TensorSlot::interleave = L > 0 is a channels-last weight, run through tiles (interleaved.h); `writes_p`: the op
// changes the weights.
// Short rows (kMaxCayleyRows < A <= kMaxElems, B = 1) of a channels-last (O, I, kh, 1) weight are interleaved too
// (op_impl.h is_interleaved): the row kernel reads a row as contiguous, so such slots go through tiles instead,
// stepped per component as before the row kernel took short rows over.
template <class T, class Rows, class Fast, class Each>
void route(const std::vector<TensorSlot<T>>& slots, int A, int B, int isa,
           bool writes_p, Rows&& rows, Fast&& fast, Each&& each) {
  const std::vector<TensorSlot<T>>* tiled = &slots;
  std::vector<TensorSlot<T>> interleaved;
  if (takes_row_kernel(A, B)) {
    for (const auto& t : slots)
      if (t.interleave != 0) interleaved.push_back(t);
    if (interleaved.empty()) return each_range(slots, row_grain(A), rows);
    std::vector<TensorSlot<T>> plain;
    for (const auto& t : slots)
      if (t.interleave == 0) plain.push_back(t);
    each_range(plain, row_grain(A), rows);
    tiled = &interleaved;
  }
  const bool use_fast = isa != kScalar && fast_shape(A, B);
  with_shape(A, B, [&](auto s) {
    auto dense = [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
      if (use_fast) return fast(t, begin, end);
      for (int64_t i = begin; i < end; ++i) each(s, t, i);
    };
    const Transposer<T> tr = transposer<T>(isa, A, B);
    each_range(*tiled, kGrain, [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
      if (t.interleave == 0) return dense(t, begin, end);
      interleaved_range(t, t.interleave, A * B, begin, end, writes_p, tr, dense);
    });
  });
}

template <class T>
void multi_step(const std::vector<TensorSlot<T>>& slots, int A, int B, const StepHParams<T>& h) {
  const int v = isa_state().load();
  route(slots, A, B, v, /*writes_p=*/true,
        [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
          FGSGD_CALL_FAST(v, step_rows, t, h, A, begin, end);
          cpu_rows::step_rows(t, h, A, begin, end);
        },
        [&](const TensorSlot<T>& t, int64_t begin, int64_t end) { FGSGD_CALL_FAST(v, step_range, t, h, A, B, begin, end); },
        [&](auto s, const TensorSlot<T>& t, int64_t i) { step_at(s, t, h, i); });
}
template <class T>
void multi_sqnorm(const std::vector<TensorSlot<T>>& slots, int A, int B, T wd) {
  const int v = isa_state().load();
  route(slots, A, B, v, /*writes_p=*/false,
        [&](const TensorSlot<T>& t, int64_t begin, int64_t end) {
          FGSGD_CALL_FAST(v, sqnorm_rows, t, wd, A, begin, end);
          cpu_rows::sqnorm_rows(t, wd, A, begin, end);
        },
        [&](const TensorSlot<T>& t, int64_t begin, int64_t end) { FGSGD_CALL_FAST(v, sqnorm_range, t, wd, A, B, begin, end); },
        [&](auto s, const TensorSlot<T>& t, int64_t i) { sqnorm_at(s, t, wd, i); });
}
#undef FGSGD_CALL_FAST
#undef FGSGD_CALL_X86

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
  template void multi_step<T>(const std::vector<TensorSlot<T>>&, int, int, const StepHParams<T>&);     \
  template void multi_sqnorm<T>(const std::vector<TensorSlot<T>>&, int, int, T);                    \
  template void multi_projx<T>(const std::vector<TensorSlot<T>>&, int, int);                         \
  template void multi_rescale<T>(const std::vector<TensorSlot<T>>&, int, int);                      \
  template void group_scale<T>(const GroupScaleArgs<T>&);
FGSGD_INSTANTIATE(float)
FGSGD_INSTANTIATE(double)
#undef FGSGD_INSTANTIATE

}  // namespace cpu
}  // namespace fgsgd
