// The CPU fast path of the fused step: W components at a time on SIMD lanes (lanes.h), compiled
// once per instruction set (fast_base.cpp: the build's baseline, SSE2 on x86-64; fast_avx2.cpp:
// AVX2+FMA; fast_avx512.cpp: AVX-512, 16 float lanes; the last two chosen at run time where the CPU
// has them). kernels.cpp picks the set and runs the ranges below from at::parallel_for. Plain
// declarations only: no math is compiled here.
#pragma once
#include <stdint.h>

#include "../fgsgd/types.h"

// The lanes need GCC/Clang vector extensions; other compilers (MSVC) keep the scalar path only.
#if defined(__GNUC__)
#define FGSGD_CPU_HAVE_FAST 1
#else
#define FGSGD_CPU_HAVE_FAST 0
#endif
#if FGSGD_CPU_HAVE_FAST && defined(__x86_64__) && !defined(__clang__)
#define FGSGD_CPU_HAVE_AVX2_TU 1  // fast_avx2.cpp is built (GCC's `#pragma GCC target`)
#define FGSGD_CPU_HAVE_AVX512_TU 1  // and fast_avx512.cpp
#else
#define FGSGD_CPU_HAVE_AVX2_TU 0
#define FGSGD_CPU_HAVE_AVX512_TU 0
#endif

namespace fgsgd {
namespace cpu {

// Shapes with a fast path; the others run the scalar per-component path.
inline bool fast_shape(int A, int B) { return A == 3 && B == 3; }

// The fused step of components [begin, end) of one tensor (A×B components, fast_shape(A, B)); ‖ξ‖² of them
// into t.out (sqnorm_range).
// Rows [begin, end) of one tensor of n×1 row components (serial_row.h): the step, and ‖ξ‖² into t.out.
// interleaved_in / _out: the transposes of a channels-last tile of 3×3 components (S = 9: interleaved.h).
#define FGSGD_DECLARE_FAST(ISA)                                                                        \
  void step_range_##ISA(const TensorSlot<float>& t, const StepHParams<float>& h, int A, int B,       \
                        int64_t begin, int64_t end);                                                   \
  void step_range_##ISA(const TensorSlot<double>& t, const StepHParams<double>& h, int A, int B,     \
                        int64_t begin, int64_t end);                                                   \
  void sqnorm_range_##ISA(const TensorSlot<float>& t, float wd, int A, int B, int64_t begin, int64_t end); \
  void sqnorm_range_##ISA(const TensorSlot<double>& t, double wd, int A, int B, int64_t begin, int64_t end); \
  void step_rows_##ISA(const TensorSlot<float>& t, const StepHParams<float>& h, int64_t n,           \
                       int64_t begin, int64_t end);                                                    \
  void step_rows_##ISA(const TensorSlot<double>& t, const StepHParams<double>& h, int64_t n,         \
                       int64_t begin, int64_t end);                                                    \
  void sqnorm_rows_##ISA(const TensorSlot<float>& t, float wd, int64_t n, int64_t begin, int64_t end);  \
  void sqnorm_rows_##ISA(const TensorSlot<double>& t, double wd, int64_t n, int64_t begin, int64_t end);  \
  void interleaved_in_##ISA(const float* src, int64_t stride, int S, int64_t n, float* tile);          \
  void interleaved_in_##ISA(const double* src, int64_t stride, int S, int64_t n, double* tile);       \
  void interleaved_out_##ISA(const float* tile, int64_t stride, int S, int64_t n, float* dst);        \
  void interleaved_out_##ISA(const double* tile, int64_t stride, int S, int64_t n, double* dst);
#if FGSGD_CPU_HAVE_FAST
FGSGD_DECLARE_FAST(base)
#endif
#if FGSGD_CPU_HAVE_AVX2_TU
FGSGD_DECLARE_FAST(avx2)
#endif
#if FGSGD_CPU_HAVE_AVX512_TU
FGSGD_DECLARE_FAST(avx512)
#endif
#undef FGSGD_DECLARE_FAST

}  // namespace cpu
}  // namespace fgsgd
