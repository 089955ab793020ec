// Row components on the CPU (n×1, n > kMaxCayleyRows: csrc/fgsgd/row_step.h): one thread streams a whole row
// in `omp simd` loops (row_step's passes are elementwise but for their sums, which are in double, in the
// order the vectorised loop makes). Compiled by kernels.cpp (the scalar ISA choice) and once per fast-path
// instruction set (fast_impl.h), each copy in its own namespace (config.h).
#pragma once
#include <stdint.h>

#include "../fgsgd/batched.h"
#include "../fgsgd/row_step.h"

FGSGD_NAMESPACE_BEGIN
namespace cpu_rows {

struct SerialRow {
  using Acc = double;
  template <class F>
  void each(int64_t n, F&& f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) f(i);
  }
  template <int K, class F>
  void reduce(int64_t n, F&& f, Acc (&s)[K]) {
    static_assert(K == 1 || K == 2, "one or two sums per pass");
    Acc s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t i = 0; i < n; ++i) {
      Acc v0 = 0, v1 = 0;
      f(i, v0, v1);
      s0 += v0;
      s1 += v1;
    }
    s[0] = s0;
    if constexpr (K == 2) s[K - 1] = s1;
  }
};

// The step of rows [begin, end) of one tensor whose rows have n entries.
template <class T>
void step_rows(const TensorSlot<T>& t, const StepHParams<T>& h, int64_t n, int64_t begin, int64_t end) {
  SerialRow ctx;
  for (int64_t i = begin; i < end; ++i)
    row_step(ctx, code_at(t, i), t.p + i * n, t.g + i * n, t.m ? t.m + i * n : nullptr, n, rescale_at(t, i),
             step_scale_at(t, i), h);
}

// ‖ξ‖² of rows [begin, end) into t.out.
template <class T>
void sqnorm_rows(const TensorSlot<T>& t, T wd, int64_t n, int64_t begin, int64_t end) {
  SerialRow ctx;
  for (int64_t i = begin; i < end; ++i)
    t.out[i] = row_tangent_sqnorm(ctx, code_at(t, i), t.p + i * n, t.g + i * n, n, rescale_at(t, i), wd);
}

}  // namespace cpu_rows
FGSGD_NAMESPACE_END
