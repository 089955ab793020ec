// Portability macros and scalar helpers shared by the CPU and CUDA builds.
//
// Lane types. Every math function of csrc/fgsgd is a template on the element type T of one
// component. T is float or double (one component per thread on the GPU, the scalar CPU path), or
// a CPU SIMD lane type (csrc/cpu/lanes.h) that holds the same element of W components, one per
// lane, so that one call does W components at once. A lane type provides the arithmetic operators,
// a broadcast constructor from its scalar, comparisons returning a mask, and the free functions
// sqrt_, rsqrt_, sin_, cos_, select_(mask, a, b) and any_(mask) found by argument-dependent lookup. Hence
// the math below does not branch on values of T: data-dependent choices are select_ (both sides are
// evaluated, so they must be finite or harmlessly NaN in the lanes that are not selected). The exceptions
// pick between two ways of computing the same result through any_ (a fast path for ordinary steps, a
// robust one for large steps: qr_q_of_step_inplace, cos_sinc_sq_, the overflow guards of the retractions).
// Hyper-parameters stay scalars: LaneScalar<T>::type.
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define FGSGD_HD __host__ __device__ __forceinline__
#else
#define FGSGD_HD inline
#endif

// Full unrolling of the loops over the elements of a component. With Fixed<A, B> the trip counts
// are constants, so the small arrays of the math become registers (on the CPU with lane types,
// arrays left in memory would cost a load and a store per use).
#if defined(__CUDACC__) || defined(__clang__)
#define FGSGD_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define FGSGD_UNROLL _Pragma("GCC unroll 16")
#else
#define FGSGD_UNROLL
#endif

// The CPU fast path compiles these headers once per instruction set (csrc/cpu/fast_*.cpp). Such a
// translation unit defines FGSGD_ISA (e.g. avx2) so that every inline function it emits lives in
// the inline namespace fgsgd::FGSGD_ISA: the linker can then never pick an AVX2-compiled copy of
// an inline function for the baseline code (an ODR clash that would crash CPUs without AVX2).
// Plain data types (types.h) stay in namespace fgsgd and are shared by all builds.
#if defined(FGSGD_ISA)
#define FGSGD_NAMESPACE_BEGIN namespace fgsgd { inline namespace FGSGD_ISA {
#define FGSGD_NAMESPACE_END } }
#else
#define FGSGD_NAMESPACE_BEGIN namespace fgsgd {
#define FGSGD_NAMESPACE_END }
#endif

// GCC's -Wmaybe-uninitialized, once the math is inlined into the CPU kernels, reports arrays that are written
// and read under the same condition (r[k] for k < j in qr_q_inplace, the momentum of a step that has one):
// false positives, about 150 of them per build. Off for the translation units that include the math.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

FGSGD_NAMESPACE_BEGIN

constexpr int kMaxElems = 64;       // A*B of one component, at most
constexpr int kMaxCayleyRows = 8;   // the Cayley retraction solves an A×A system: A <= 8
constexpr int kMaxStiefelCols = 8;  // stiefel needs A >= B, so A*B <= 64 gives B <= 8

FGSGD_HD float sqrt_(float x) { return sqrtf(x); }
FGSGD_HD double sqrt_(double x) { return sqrt(x); }
FGSGD_HD float rsqrt_(float x) { return 1.0f / sqrtf(x); }  // 1/√x, correctly rounded parts
FGSGD_HD double rsqrt_(double x) { return 1.0 / sqrt(x); }
FGSGD_HD float sin_(float x) { return sinf(x); }
FGSGD_HD double sin_(double x) { return sin(x); }
FGSGD_HD float cos_(float x) { return cosf(x); }
FGSGD_HD double cos_(double x) { return cos(x); }
FGSGD_HD float abs_(float x) { return fabsf(x); }
FGSGD_HD double abs_(double x) { return fabs(x); }
FGSGD_HD float select_(bool c, float a, float b) { return c ? a : b; }
FGSGD_HD double select_(bool c, double a, double b) { return c ? a : b; }
FGSGD_HD bool any_(bool c) { return c; }  // lane types: true when the mask is set in any lane

// The scalar type of a lane type (float and double are their own); lane types specialise it.
template <class T>
struct LaneScalar {
  using type = T;
};
template <class T>
using scalar_of = typename LaneScalar<T>::type;

// Component shape as a policy: Fixed<A, B> lets the compiler unroll the hot 3×3 case,
// Dyn carries A and B at run time (any A >= 1, B >= 1 with A*B <= kMaxElems).
template <int A_, int B_>
struct Fixed {
  static constexpr int A = A_;
  static constexpr int B = B_;
  static constexpr int kCap = A_ * B_;
  static constexpr int kCapAA = A_ * A_;  // an A×A work matrix (Cayley)
  FGSGD_HD constexpr int rows() const { return A_; }
  FGSGD_HD constexpr int cols() const { return B_; }
  FGSGD_HD constexpr int size() const { return A_ * B_; }
};

struct Dyn {
  static constexpr int kCap = kMaxElems;
  static constexpr int kCapAA = kMaxCayleyRows * kMaxCayleyRows;
  int A, B;
  FGSGD_HD int rows() const { return A; }
  FGSGD_HD int cols() const { return B; }
  FGSGD_HD int size() const { return A * B; }
};

// Host-side shape dispatch: the 3×3 filters and the 7×7 stem of CNNs get the unrolled Fixed policy, everything
// else Dyn. On the GPU a Fixed component lives in registers; a Dyn one in local memory (its arrays are indexed at
// run time), kCap = 64 entries per array: 3 KB per thread in the fp32 step kernel.
template <class F>
inline void with_shape(int A, int B, F&& f) {
  if (A == 3 && B == 3) {
    f(Fixed<3, 3>{});
  } else if (A == 7 && B == 7) {
    f(Fixed<7, 7>{});
  } else {
    f(Dyn{A, B});
  }
}

FGSGD_NAMESPACE_END
