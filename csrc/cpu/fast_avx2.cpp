// The CPU fast path compiled for AVX2 + FMA (8 float / 4 double lanes), with no -mavx2 for the rest
// of the build: `#pragma GCC target` covers only what follows it, every inline function here is in
// namespace fgsgd::avx2 (config.h), and kernels.cpp calls in only when the CPU has AVX2 and FMA.
#include "fast.h"
#if FGSGD_CPU_HAVE_AVX2_TU
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#define FGSGD_ISA avx2
#define FGSGD_SIMD_AVX2 1
#define FGSGD_FAST_ENTRY(NAME) NAME##_avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "fast_impl.h"
#pragma GCC pop_options
#endif
