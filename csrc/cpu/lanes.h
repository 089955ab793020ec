// SIMD lane types for the CPU fast path: Lanes<E, P> holds one element of W components, one per
// lane, so that the shared math of csrc/fgsgd (templated on its element type, see config.h) runs W
// components at once. Built on GCC/Clang vector extensions: the same source compiles for any
// instruction set; the translation unit that includes it picks the set (csrc/cpu/fast_*.cpp) and
// the register width (kRegBytes: 64 bytes with AVX-512, 32 with AVX, else 16). Only sqrt and the AoS <-> SoA
// transposes use intrinsics, where the instruction set has them. GCC does not define __AVX__ after
// `#pragma GCC target` in C++, so the AVX2 and AVX-512 units say so themselves: FGSGD_SIMD_AVX2 (both),
// FGSGD_SIMD_AVX512.
//
// Everything here is an always-inline free function or member, never a friend defined in the class:
// GCC compiles friends of class templates without the translation unit's `#pragma GCC target`.
#pragma once
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "../fgsgd/config.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#define FGSGD_LANE inline __attribute__((always_inline))

FGSGD_NAMESPACE_BEGIN
namespace simd {

#if defined(__AVX__) || defined(FGSGD_SIMD_AVX2)
#define FGSGD_SIMD_HAS_AVX 1
#else
#define FGSGD_SIMD_HAS_AVX 0
#endif

#if defined(FGSGD_SIMD_AVX512)
constexpr int kRegBytes = 64;  // one SIMD register
#elif FGSGD_SIMD_HAS_AVX
constexpr int kRegBytes = 32;
#else
constexpr int kRegBytes = 16;
#endif
#define FGSGD_UNROLL _Pragma("GCC unroll 16")

template <class E, int Bytes>
struct VecOf;
#define FGSGD_VEC_OF(E, I, BYTES)                                       \
  template <>                                                          \
  struct VecOf<E, BYTES> {                                             \
    typedef E type __attribute__((vector_size(BYTES)));                \
    typedef I mask __attribute__((vector_size(BYTES)));                \
  };
FGSGD_VEC_OF(float, int32_t, 16)
FGSGD_VEC_OF(float, int32_t, 32)
FGSGD_VEC_OF(double, int64_t, 16)
FGSGD_VEC_OF(double, int64_t, 32)
FGSGD_VEC_OF(float, int32_t, 64)
FGSGD_VEC_OF(double, int64_t, 64)
#undef FGSGD_VEC_OF

// Lanes<E, P>: P registers of H = kRegBytes / sizeof(E) lanes each, W = H·P components. P > 1
// interleaves P independent register streams in every operation, which hides the latency of the
// long dependency chains of the math (dot products, sqrt, division) on an out-of-order core.
template <class E, int P>
struct LaneMask {
  typedef typename VecOf<E, kRegBytes>::mask V;
  V r[P];  // all ones (true) or zero per lane
};

template <class E, int P>
struct Lanes {
  using Scalar = E;
  static constexpr int kRegs = P;
  static constexpr int kRegLanes = kRegBytes / int(sizeof(E));  // H
  static constexpr int kWidth = kRegLanes * P;                    // W
  typedef typename VecOf<E, kRegBytes>::type V;
  V r[P];

  Lanes() = default;
  FGSGD_LANE Lanes(E x) {  // broadcast (implicit: T(1), scalar * lanes)
    FGSGD_UNROLL for (int k = 0; k < P; ++k) r[k] = V{} + x;
  }
  FGSGD_LANE E lane(int c) const { return r[c / kRegLanes][c % kRegLanes]; }
  FGSGD_LANE void set_lane(int c, E x) { r[c / kRegLanes][c % kRegLanes] = x; }

#define FGSGD_LANE_COMPOUND(OP)                                                 \
  FGSGD_LANE Lanes& operator OP(const Lanes& b) {                               \
    FGSGD_UNROLL for (int k = 0; k < P; ++k) r[k] OP b.r[k];                    \
    return *this;                                                               \
  }
  FGSGD_LANE_COMPOUND(+=)
  FGSGD_LANE_COMPOUND(-=)
  FGSGD_LANE_COMPOUND(*=)
  FGSGD_LANE_COMPOUND(/=)
#undef FGSGD_LANE_COMPOUND
  FGSGD_LANE Lanes operator-() const {
    Lanes o;
    FGSGD_UNROLL for (int k = 0; k < P; ++k) o.r[k] = -r[k];
    return o;
  }

  // Lane c = base[idx[c]] (a per-component scalar such as R).
  static FGSGD_LANE Lanes gather(const E* base, const int32_t* idx) {
    Lanes o;
    FGSGD_UNROLL for (int c = 0; c < kWidth; ++c) o.set_lane(c, base[idx[c]]);
    return o;
  }
};

template <class T> struct Ident { using type = T; };  // a non-deduced context: scalars convert

#define FGSGD_LANE_BINARY(OP)                                                                              \
  template <class E, int P>                                                                                \
  FGSGD_LANE Lanes<E, P> operator OP(const Lanes<E, P>& a, const Lanes<E, P>& b) {                         \
    Lanes<E, P> o;                                                                                         \
    FGSGD_UNROLL for (int k = 0; k < P; ++k) o.r[k] = a.r[k] OP b.r[k];                                    \
    return o;                                                                                              \
  }                                                                                                        \
  template <class E, int P>                                                                                \
  FGSGD_LANE Lanes<E, P> operator OP(typename Ident<E>::type a, const Lanes<E, P>& b) {                    \
    Lanes<E, P> o;                                                                                         \
    FGSGD_UNROLL for (int k = 0; k < P; ++k) o.r[k] = a OP b.r[k];                                         \
    return o;                                                                                              \
  }                                                                                                        \
  template <class E, int P>                                                                                \
  FGSGD_LANE Lanes<E, P> operator OP(const Lanes<E, P>& a, typename Ident<E>::type b) {                    \
    Lanes<E, P> o;                                                                                         \
    FGSGD_UNROLL for (int k = 0; k < P; ++k) o.r[k] = a.r[k] OP b;                                         \
    return o;                                                                                              \
  }
FGSGD_LANE_BINARY(+)
FGSGD_LANE_BINARY(-)
FGSGD_LANE_BINARY(*)
FGSGD_LANE_BINARY(/)
#undef FGSGD_LANE_BINARY

#define FGSGD_LANE_COMPARE(OP)                                                              \
  template <class E, int P>                                                                 \
  FGSGD_LANE LaneMask<E, P> operator OP(const Lanes<E, P>& a, const Lanes<E, P>& b) {       \
    LaneMask<E, P> m;                                                                       \
    FGSGD_UNROLL for (int k = 0; k < P; ++k) m.r[k] = a.r[k] OP b.r[k];                     \
    return m;                                                                               \
  }
FGSGD_LANE_COMPARE(>)
FGSGD_LANE_COMPARE(<)
FGSGD_LANE_COMPARE(>=)
FGSGD_LANE_COMPARE(<=)
#undef FGSGD_LANE_COMPARE

template <class E, int P>
FGSGD_LANE Lanes<E, P> select_(const LaneMask<E, P>& m, const Lanes<E, P>& a, const Lanes<E, P>& b) {
  Lanes<E, P> o;
  FGSGD_UNROLL for (int k = 0; k < P; ++k) o.r[k] = m.r[k] ? a.r[k] : b.r[k];
  return o;
}

template <class E, int P>
FGSGD_LANE bool any_(const LaneMask<E, P>& m) {
  typename LaneMask<E, P>::V acc = m.r[0];
  for (int k = 1; k < P; ++k) acc |= m.r[k];
  bool any = false;
  for (int c = 0; c < Lanes<E, P>::kRegLanes; ++c) any |= acc[c] != 0;
  return any;
}

// √x of one register.
template <class V>
FGSGD_LANE V sqrt_reg(V a) {
  [[maybe_unused]] constexpr int bytes = int(sizeof(V));
  using E = decltype(a[0] + 0);
#if defined(FGSGD_SIMD_AVX512)
  if constexpr (bytes == 64 && sizeof(E) == 4) return (V)_mm512_sqrt_ps((__m512)a);
  if constexpr (bytes == 64 && sizeof(E) == 8) return (V)_mm512_sqrt_pd((__m512d)a);
#endif
#if FGSGD_SIMD_HAS_AVX
  if constexpr (bytes == 32 && sizeof(E) == 4) return (V)_mm256_sqrt_ps((__m256)a);
  if constexpr (bytes == 32 && sizeof(E) == 8) return (V)_mm256_sqrt_pd((__m256d)a);
#endif
#if defined(__SSE2__)
  if constexpr (bytes == 16 && sizeof(E) == 4) return (V)_mm_sqrt_ps((__m128)a);
  if constexpr (bytes == 16 && sizeof(E) == 8) return (V)_mm_sqrt_pd((__m128d)a);
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
  if constexpr (bytes == 16 && sizeof(E) == 4) return (V)vsqrtq_f32((float32x4_t)a);
  if constexpr (bytes == 16 && sizeof(E) == 8) return (V)vsqrtq_f64((float64x2_t)a);
#endif
  V o;
  for (int c = 0; c < bytes / int(sizeof(E)); ++c) o[c] = ::fgsgd::sqrt_(E(a[c]));
  return o;
}

template <class E, int P>
FGSGD_LANE Lanes<E, P> sqrt_(const Lanes<E, P>& a) {
  Lanes<E, P> o;
  FGSGD_UNROLL for (int k = 0; k < P; ++k) o.r[k] = sqrt_reg(a.r[k]);
  return o;
}

// 1/√x of one register. float: the hardware estimate (relative error < 1.5·2⁻¹²) refined by one
// Newton step y ← y(3 − x y²)/2, relative error below 1e-6, a third of the latency of a square
// root and a division. double, or no estimate instruction: √ and division.
template <class V>
FGSGD_LANE V rsqrt_reg(V a) {
  [[maybe_unused]] constexpr int bytes = int(sizeof(V));
  using E = decltype(a[0] + 0);
#if !defined(FGSGD_EXACT_RSQRT)
#if defined(FGSGD_SIMD_AVX512)
  if constexpr (bytes == 64 && sizeof(E) == 4) {  // the estimate is better here (< 2⁻¹⁴): the same Newton step
    const V y = (V)_mm512_rsqrt14_ps((__m512)a);
    return (0.5f * y) * (3.0f - (a * y) * y);
  }
#endif
#if FGSGD_SIMD_HAS_AVX
  if constexpr (bytes == 32 && sizeof(E) == 4) {
    const V y = (V)_mm256_rsqrt_ps((__m256)a);
    return (0.5f * y) * (3.0f - (a * y) * y);
  }
#endif
#if defined(__SSE2__)
  if constexpr (bytes == 16 && sizeof(E) == 4) {
    const V y = (V)_mm_rsqrt_ps((__m128)a);
    return (0.5f * y) * (3.0f - (a * y) * y);
  }
#endif
#endif
  return E(1) / sqrt_reg(a);
}

template <class E, int P>
FGSGD_LANE Lanes<E, P> rsqrt_(const Lanes<E, P>& a) {
  Lanes<E, P> o;
  FGSGD_UNROLL for (int k = 0; k < P; ++k) o.r[k] = rsqrt_reg(a.r[k]);
  return o;
}

template <class E, int P>
FGSGD_LANE Lanes<E, P> abs_(const Lanes<E, P>& a) {
  return select_(a < Lanes<E, P>(E(0)), -a, a);
}

// sin and cos per lane. float: the Cephes sinf/cosf polynomials (S. Moshier; as vectorised in
// J. Pommier's sse_mathfun), error about 1 ulp for |x| < 8192, beyond which (never in a sane
// step: x is a step length) the lanes go through libm. double: libm per lane (fp64 is not the
// fast path).
template <class V>
FGSGD_LANE void sincos_reg(V x, V* s, V* c) {
  typedef typename VecOf<float, int(sizeof(V))>::mask M;
  const M sign_bit = M{} + int32_t(0x80000000u);
  const V ax = (V)((M)x & ~sign_bit);
  M j = __builtin_convertvector(ax * 1.27323954473516f, M);  // ⌊|x|·4/π⌋
  j = (j + 1) & (M{} - 2);                                   // round up to even
  const V y = __builtin_convertvector(j, V);
  const V xr = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const V z = xr * xr;
  const V pc = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
               0.5f * z + 1.0f;
  const V ps = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * xr + xr;
  const M swap = (j & 2) != 0;
  const V sin_abs = swap ? pc : ps;
  const V cos_abs = swap ? ps : pc;
  // sin is odd: the sign of x, flipped when j & 4; cos flips when (j − 2) & 4 is clear.
  const M sbits = ((M)x & sign_bit) ^ (((j & 4) != 0) & sign_bit);
  const M cbits = (((j - 2) & 4) == 0) & sign_bit;
  *s = (V)((M)sin_abs ^ sbits);
  *c = (V)((M)cos_abs ^ cbits);
}

template <int P>
FGSGD_LANE void sincos_lanes(const Lanes<float, P>& x, Lanes<float, P>* s, Lanes<float, P>* c) {
  if (any_(abs_(x) > Lanes<float, P>(8192.0f))) {
    for (int k = 0; k < Lanes<float, P>::kWidth; ++k) {
      s->set_lane(k, sinf(x.lane(k)));
      c->set_lane(k, cosf(x.lane(k)));
    }
    return;
  }
  FGSGD_UNROLL for (int k = 0; k < P; ++k) sincos_reg(x.r[k], &s->r[k], &c->r[k]);
}

template <int P>
FGSGD_LANE Lanes<float, P> sin_(const Lanes<float, P>& x) {
  Lanes<float, P> s, c;
  sincos_lanes(x, &s, &c);
  return s;
}
template <int P>
FGSGD_LANE Lanes<float, P> cos_(const Lanes<float, P>& x) {
  Lanes<float, P> s, c;
  sincos_lanes(x, &s, &c);
  return c;
}
// cos t and sin(t)/t from one range reduction (overloads the generic cos_sinc_ of small_linalg.h).
template <int P>
FGSGD_LANE void cos_sinc_(const Lanes<float, P>& t, Lanes<float, P>* c, Lanes<float, P>* sc) {
  using L = Lanes<float, P>;
  L s;
  sincos_lanes(t, &s, c);
  *sc = select_(t > L(1e-4f), s / t, 1.0f - t * t / 6.0f);
}

template <int P>
FGSGD_LANE Lanes<double, P> sin_(const Lanes<double, P>& x) {
  Lanes<double, P> o;
  for (int k = 0; k < Lanes<double, P>::kWidth; ++k) o.set_lane(k, sin(x.lane(k)));
  return o;
}
template <int P>
FGSGD_LANE Lanes<double, P> cos_(const Lanes<double, P>& x) {
  Lanes<double, P> o;
  for (int k = 0; k < Lanes<double, P>::kWidth; ++k) o.set_lane(k, cos(x.lane(k)));
  return o;
}

// H×H transpose of H registers: r[i][j] <-> r[j][i].
template <class V>
FGSGD_LANE void transpose_regs(V* r) {
  [[maybe_unused]] constexpr int bytes = int(sizeof(V));
  using E = decltype(r[0][0] + 0);
  constexpr int H = bytes / int(sizeof(E));
#if FGSGD_SIMD_HAS_AVX
  if constexpr (bytes == 32 && sizeof(E) == 4) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps((__m256)r[2 * i], (__m256)r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps((__m256)r[2 * i], (__m256)r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = (V)_mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      r[i + 4] = (V)_mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
    return;
  }
  if constexpr (bytes == 32 && sizeof(E) == 8) {
    const __m256d t0 = _mm256_unpacklo_pd((__m256d)r[0], (__m256d)r[1]);
    const __m256d t1 = _mm256_unpackhi_pd((__m256d)r[0], (__m256d)r[1]);
    const __m256d t2 = _mm256_unpacklo_pd((__m256d)r[2], (__m256d)r[3]);
    const __m256d t3 = _mm256_unpackhi_pd((__m256d)r[2], (__m256d)r[3]);
    r[0] = (V)_mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = (V)_mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = (V)_mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = (V)_mm256_permute2f128_pd(t1, t3, 0x31);
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (bytes == 16 && sizeof(E) == 4) {
    __m128 a = (__m128)r[0], b = (__m128)r[1], c = (__m128)r[2], d = (__m128)r[3];
    _MM_TRANSPOSE4_PS(a, b, c, d);
    r[0] = (V)a;
    r[1] = (V)b;
    r[2] = (V)c;
    r[3] = (V)d;
    return;
  }
  if constexpr (bytes == 16 && sizeof(E) == 8) {
    const __m128d a = (__m128d)r[0], b = (__m128d)r[1];
    r[0] = (V)_mm_unpacklo_pd(a, b);
    r[1] = (V)_mm_unpackhi_pd(a, b);
    return;
  }
#endif
  for (int i = 0; i < H; ++i)
    for (int j = i + 1; j < H; ++j) {
      const E a = r[i][j];
      r[i][j] = r[j][i];
      r[j][i] = a;
    }
}

#if defined(FGSGD_SIMD_AVX512)
// 16 float lanes: a register holds components c (low 256 bits) and c + 8 (high 256 bits), so that the
// 8×8 transpose of the AVX2 path runs on both halves at once (the same unpack and shuffle steps, per
// 128-bit lane; the last step, which swaps 128-bit lanes within each half, by one two-source permute).
FGSGD_LANE void transpose_halves(__m512* r) {
  __m512 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // per half h: [a's 128-bit lane 2h, b's lane 2h] and [a's lane 2h + 1, b's lane 2h + 1] (permute2f128 0x20, 0x31)
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  const __m512i hi = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_permutex2var_ps(u[i], lo, u[i + 4]);
    r[i + 4] = _mm512_permutex2var_ps(u[i], hi, u[i + 4]);
  }
}

FGSGD_LANE __m512 load_pair(const float* a, const float* b) {  // 8 floats at a, then 8 at b
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(a))),
                                             _mm256_castps_pd(_mm256_loadu_ps(b)), 1));
}

// load_soa / store_soa of 16-lane float registers. Loads: elements in groups of 8 through transpose_halves, the
// remaining N mod 8 by one gather each. Stores, 3×3 components only (the one fast-path shape, fast.h): the 8
// elements of a transposed row and element 8 joined by one permute, then one masked store per component (with
// one scalar store per component for element 8, or a scatter, 1.2 M random-code components took 7.0 / 7.3 ms
// instead of 6.6, 1 thread).
template <int N, int P>
FGSGD_LANE void load_soa_x16(const float* base, const int32_t* off, Lanes<float, P>* lanes) {
  FGSGD_UNROLL for (int k = 0; k < P; ++k) {
    const int32_t* o = off + 16 * k;
    FGSGD_UNROLL for (int e0 = 0; e0 + 8 <= N; e0 += 8) {
      __m512 rows[8];
      FGSGD_UNROLL for (int c = 0; c < 8; ++c) rows[c] = load_pair(base + o[c] + e0, base + o[c + 8] + e0);
      transpose_halves(rows);
      FGSGD_UNROLL for (int i = 0; i < 8; ++i) lanes[e0 + i].r[k] = (typename Lanes<float, P>::V)rows[i];
    }
    const __m512i vo = _mm512_loadu_si512(o);
    FGSGD_UNROLL for (int e = N / 8 * 8; e < N; ++e)
      lanes[e].r[k] = (typename Lanes<float, P>::V)_mm512_i32gather_ps(vo, base + e, 4);
  }
}
template <int N, int P>
FGSGD_LANE void store_soa_x16(const Lanes<float, P>* lanes, float* base, const int32_t* off) {
  static_assert(N == 9, "the 16-lane stores are written for 3x3 components");
  FGSGD_UNROLL for (int k = 0; k < P; ++k) {
    const int32_t* o = off + 16 * k;
    __m512 rows[8];
    FGSGD_UNROLL for (int i = 0; i < 8; ++i) rows[i] = (__m512)lanes[i].r[k];
    transpose_halves(rows);
    const __m512 e8 = (__m512)lanes[8].r[k];
    FGSGD_UNROLL for (int c = 0; c < 8; ++c) {
      const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16 + c, 0, 0, 0, 0, 0, 0, 0);
      const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24 + c, 0, 0, 0, 0, 0, 0, 0);
      _mm512_mask_storeu_ps(base + o[c], __mmask16(0x1ff), _mm512_permutex2var_ps(rows[c], lo, e8));
      _mm512_mask_storeu_ps(base + o[c + 8], __mmask16(0x1ff), _mm512_permutex2var_ps(rows[c], hi, e8));
    }
  }
}
#endif

// AoS <-> SoA: component c of a block is the N contiguous elements at base + off[c] (element
// offsets, W of them); lanes[e] holds element e of the W components. Full groups of H elements go
// through H×H register transposes; the remaining N mod H elements are gathered (AVX2) or moved one
// by one.
template <int N, class E, int P>
FGSGD_LANE void load_soa_regs(const E* base, const int32_t* off, Lanes<E, P>* lanes) {
  using L = Lanes<E, P>;
  constexpr int H = L::kRegLanes;
  constexpr int full = N / H * H;
  FGSGD_UNROLL for (int k = 0; k < P; ++k) {
    FGSGD_UNROLL for (int e0 = 0; e0 < full; e0 += H) {
      typename L::V rows[H];
      FGSGD_UNROLL for (int c = 0; c < H; ++c) memcpy(&rows[c], base + off[k * H + c] + e0, sizeof(rows[c]));
      transpose_regs(rows);
      FGSGD_UNROLL for (int i = 0; i < H; ++i) lanes[e0 + i].r[k] = rows[i];
    }
#if defined(FGSGD_SIMD_AVX2)
    if constexpr (sizeof(E) == 4 && H == 8 && full < N) {
      const __m256i vo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + k * H));
      FGSGD_UNROLL for (int e = full; e < N; ++e)
        lanes[e].r[k] = (typename L::V)_mm256_i32gather_ps(reinterpret_cast<const float*>(base) + e, vo, 4);
      continue;
    }
#endif
    FGSGD_UNROLL for (int e = full; e < N; ++e)
      FGSGD_UNROLL for (int c = 0; c < H; ++c) lanes[e].r[k][c] = base[off[k * H + c] + e];
  }
}

template <int N, class E, int P>
FGSGD_LANE void load_soa(const E* base, const int32_t* off, Lanes<E, P>* lanes) {
#if defined(FGSGD_SIMD_AVX512)
  if constexpr (sizeof(E) == 4 && Lanes<E, P>::kRegLanes == 16)
    load_soa_x16<N>(base, off, lanes);
  else
#endif
    load_soa_regs<N>(base, off, lanes);
}

template <int N, class E, int P>
FGSGD_LANE void store_soa_regs(const Lanes<E, P>* lanes, E* base, const int32_t* off) {
  using L = Lanes<E, P>;
  constexpr int H = L::kRegLanes;
  constexpr int full = N / H * H;
  FGSGD_UNROLL for (int k = 0; k < P; ++k) {
    FGSGD_UNROLL for (int e0 = 0; e0 < full; e0 += H) {
      typename L::V rows[H];
      FGSGD_UNROLL for (int i = 0; i < H; ++i) rows[i] = lanes[e0 + i].r[k];
      transpose_regs(rows);
      FGSGD_UNROLL for (int c = 0; c < H; ++c) memcpy(base + off[k * H + c] + e0, &rows[c], sizeof(rows[c]));
    }
    FGSGD_UNROLL for (int e = full; e < N; ++e)
      FGSGD_UNROLL for (int c = 0; c < H; ++c) base[off[k * H + c] + e] = lanes[e].r[k][c];
  }
}

template <int N, class E, int P>
FGSGD_LANE void store_soa(const Lanes<E, P>* lanes, E* base, const int32_t* off) {
#if defined(FGSGD_SIMD_AVX512)
  if constexpr (sizeof(E) == 4 && Lanes<E, P>::kRegLanes == 16)
    store_soa_x16<N>(lanes, base, off);
  else
#endif
    store_soa_regs<N>(lanes, base, off);
}

}  // namespace simd

template <class E, int P>
struct LaneScalar<simd::Lanes<E, P>> {
  using type = E;
};

FGSGD_NAMESPACE_END
