// The CPU fast path compiled for AVX-512 (16 float lanes, 32 registers), with no -mavx512f for the rest of the
// build: as fast_avx2.cpp, `#pragma GCC target` covers only what follows, every inline function here is in
// namespace fgsgd::avx512 (config.h), and kernels.cpp calls in only when the CPU has AVX-512 F/VL/DQ/BW.
// float only: double components run the AVX2 lanes (fp64 is not the fast path; an 8×8 double transpose is left
// out), forwarded below.
#include "fast.h"
#if FGSGD_CPU_HAVE_AVX512_TU
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#define FGSGD_ISA avx512
#define FGSGD_SIMD_AVX2 1
#define FGSGD_SIMD_AVX512 1
#define FGSGD_FAST_ENTRY(NAME) NAME##_avx512
#define FGSGD_FAST_FLOAT_ONLY 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
// GCC 12's avx512fintrin.h initialises its `undefined` vectors from themselves (_mm512_undefined_ps), which
// -Wuninitialized reports at every use in this unit.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "fast_impl.h"
#pragma GCC pop_options

namespace fgsgd {
namespace cpu {
void step_range_avx512(const TensorSlot<double>& t, const StepHParams<double>& h, int A, int B, int64_t begin,
                       int64_t end) {
  step_range_avx2(t, h, A, B, begin, end);
}
void sqnorm_range_avx512(const TensorSlot<double>& t, double wd, int A, int B, int64_t begin, int64_t end) {
  sqnorm_range_avx2(t, wd, A, B, begin, end);
}
void interleaved_in_avx512(const double* src, int64_t stride, int S, int64_t n, double* tile) {
  interleaved_in_avx2(src, stride, S, n, tile);
}
void interleaved_out_avx512(const double* tile, int64_t stride, int S, int64_t n, double* dst) {
  interleaved_out_avx2(tile, stride, S, n, dst);
}
}  // namespace cpu
}  // namespace fgsgd
#endif
