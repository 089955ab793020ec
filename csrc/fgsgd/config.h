// Portability macros and scalar helpers shared by the CPU and CUDA builds.
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define FGSGD_HD __host__ __device__ __forceinline__
#else
#define FGSGD_HD inline
#endif

namespace fgsgd {

constexpr int kMaxElems = 64;       // A*B of one component, at most
constexpr int kMaxCayleyRows = 8;   // the Cayley retraction solves an A×A system: A <= 8

FGSGD_HD float sqrt_(float x) { return sqrtf(x); }
FGSGD_HD double sqrt_(double x) { return sqrt(x); }
FGSGD_HD float sin_(float x) { return sinf(x); }
FGSGD_HD double sin_(double x) { return sin(x); }
FGSGD_HD float cos_(float x) { return cosf(x); }
FGSGD_HD double cos_(double x) { return cos(x); }
FGSGD_HD float abs_(float x) { return fabsf(x); }
FGSGD_HD double abs_(double x) { return fabs(x); }

// Component shape as a policy: Fixed<A, B> lets the compiler unroll the hot 3×3 case,
// Dyn carries A and B at run time (any A >= 1, B >= 1 with A*B <= kMaxElems).
template <int A_, int B_>
struct Fixed {
  static constexpr int A = A_;
  static constexpr int B = B_;
  static constexpr int kCap = A_ * B_;
  FGSGD_HD constexpr int rows() const { return A_; }
  FGSGD_HD constexpr int cols() const { return B_; }
  FGSGD_HD constexpr int size() const { return A_ * B_; }
};

struct Dyn {
  static constexpr int kCap = kMaxElems;
  int A, B;
  FGSGD_HD int rows() const { return A; }
  FGSGD_HD int cols() const { return B; }
  FGSGD_HD int size() const { return A * B; }
};

}  // namespace fgsgd

namespace fgsgd {
// Host-side shape dispatch: 3×3 gets the unrolled Fixed policy, everything else Dyn.
template <class F>
inline void with_shape(int A, int B, F&& f) {
  if (A == 3 && B == 3) {
    f(Fixed<3, 3>{});
  } else {
    f(Dyn{A, B});
  }
}
}  // namespace fgsgd
