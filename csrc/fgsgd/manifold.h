// The manifold operators of DESIGN.md §1 on one component ω ∈ R^{A×B} (row-major, local memory).
// Every function takes the component code (codes.h), uniform over the lanes when T is a lane
// type; `out` may alias the tangent/vector input (never ω itself), so callers can project in place.
#pragma once
#include "codes.h"
#include "small_linalg.h"

FGSGD_NAMESPACE_BEGIN

// Π_ω(U): the tangent projection.
template <class S, class T>
FGSGD_HD void proj(const S& s, int code, const T* w, const T* u, T* out) {
  const int A = s.rows(), B = s.cols(), n = s.size();
  switch (manifold_of(code)) {
    case kManSphere: {  // U − ⟨ω,U⟩ω
      const T a = dot(s, w, u);
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = u[i] - a * w[i];
      break;
    }
    case kManOblique: {  // per column j: U_j − (ω_jᵀU_j) ω_j
      T a[S::kCap];
      FGSGD_UNROLL
      for (int j = 0; j < B; ++j) a[j] = col_dot(s, w, u, j);
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = u[i] - a[i % B] * w[i];
      break;
    }
    case kManStiefel: {  // U − ω sym(ωᵀU)
      T m[S::kCap];  // B×B <= A×B
      FGSGD_UNROLL
      for (int p = 0; p < B; ++p)
        FGSGD_UNROLL
        for (int q = 0; q < B; ++q) {
          T acc = T(0);
          FGSGD_UNROLL
          for (int r = 0; r < A; ++r) acc += w[r * B + p] * u[r * B + q];
          m[p * B + q] = acc;
        }
      FGSGD_UNROLL
      for (int p = 0; p < B; ++p)
        FGSGD_UNROLL
        for (int q = p + 1; q < B; ++q) {  // (the diagonal is its own symmetric part)
          const T v = T(0.5) * (m[p * B + q] + m[q * B + p]);
          m[p * B + q] = v;
          m[q * B + p] = v;
        }
      FGSGD_UNROLL
      for (int r = 0; r < A; ++r)
        FGSGD_UNROLL
        for (int q = 0; q < B; ++q) {
          T acc = u[r * B + q];  // U − Σ_p ω_rp sym_pq as B fused multiply-subtracts
          FGSGD_UNROLL
          for (int p = 0; p < B; ++p) acc -= w[r * B + p] * m[p * B + q];
          out[r * B + q] = acc;
        }
      break;
    }
    default:
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = u[i];
  }
}

// Scale every column of y to unit norm.
template <class S, class T>
FGSGD_HD void normalize_columns(const S& s, T* y) {
  const int B = s.cols(), n = s.size();
  T inv[S::kCap];
  FGSGD_UNROLL
  for (int j = 0; j < B; ++j) inv[j] = rsqrt_(col_dot(s, y, y, j));
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) y[i] *= inv[i % B];
}

// Y = (I − W/2)⁻¹ (I + W/2) ω, W = P V ωᵀ − ω (P V)ᵀ, P = I − ωωᵀ/2 (A <= kMaxCayleyRows).
template <class S, class T>
FGSGD_HD void cayley(const S& s, const T* w, const T* v, T* out) {
  const int A = s.rows(), B = s.cols();
  T wtv[S::kCap], pv[S::kCap], M[S::kCapAA];
  FGSGD_UNROLL
  for (int p = 0; p < B; ++p)
    FGSGD_UNROLL
    for (int q = 0; q < B; ++q) {
      T acc = T(0);
      FGSGD_UNROLL
      for (int r = 0; r < A; ++r) acc += w[r * B + p] * v[r * B + q];
      wtv[p * B + q] = acc;
    }
  FGSGD_UNROLL
  for (int r = 0; r < A; ++r)
    FGSGD_UNROLL
    for (int q = 0; q < B; ++q) {
      T acc = T(0);
      FGSGD_UNROLL
      for (int p = 0; p < B; ++p) acc += w[r * B + p] * wtv[p * B + q];
      pv[r * B + q] = v[r * B + q] - T(0.5) * acc;
    }
  FGSGD_UNROLL
  for (int i = 0; i < A; ++i) {  // M = I − W/2, W_ij = Σ_q pv_iq ω_jq − ω_iq pv_jq: built exactly skew
    M[i * A + i] = T(1);
    FGSGD_UNROLL
    for (int j = i + 1; j < A; ++j) {
      T acc = T(0);
      FGSGD_UNROLL
      for (int q = 0; q < B; ++q) acc += pv[i * B + q] * w[j * B + q] - w[i * B + q] * pv[j * B + q];
      M[i * A + j] = T(-0.5) * acc;
      M[j * A + i] = T(0.5) * acc;
    }
  }
  if (A == 3) {
    // K = W/2 is skew 3×3 (K x = k × x): K² = kkᵀ − ‖k‖²I, so (I − K)(I + K + kkᵀ) = (1 + ‖k‖²)I and
    // (I − K)⁻¹(I + K) = I + 2(K + K²)/(1 + ‖k‖²): Y = ω + c (Kω + K(Kω)), c = 2/(1 + ‖k‖²), no solve (a
    // shorter dependency chain than the elimination).
    const T k01 = M[1 * A + 0], k02 = M[2 * A + 0], k12 = M[2 * A + 1];  // K_ij = −M_ij = M_ji, i < j
    const T c = T(2) / (T(1) + (k01 * k01 + k02 * k02 + k12 * k12));
    FGSGD_UNROLL
    for (int q = 0; q < B; ++q) {
      const T x0 = w[0 * B + q], x1 = w[1 * B + q], x2 = w[2 * B + q];
      const T u0 = k01 * x1 + k02 * x2, u1 = k12 * x2 - k01 * x0, u2 = -(k02 * x0 + k12 * x1);  // K x
      const T v0 = k01 * u1 + k02 * u2, v1 = k12 * u2 - k01 * u0, v2 = -(k02 * u0 + k12 * u1);  // K K x
      out[0 * B + q] = x0 + c * (u0 + v0);
      out[1 * B + q] = x1 + c * (u1 + v1);
      out[2 * B + q] = x2 + c * (u2 + v2);
    }
    return;
  }
  FGSGD_UNROLL
  for (int i = 0; i < A; ++i)  // rhs = (I + W/2) ω = 2ω − M ω
    FGSGD_UNROLL
    for (int q = 0; q < B; ++q) {
      T acc = T(0);
      FGSGD_UNROLL
      for (int j = 0; j < A; ++j) acc += M[i * A + j] * w[j * B + q];
      out[i * B + q] = T(2) * w[i * B + q] - acc;
    }
  solve_nopivot_inplace(M, out, A, B);  // M = I − W/2 has symmetric part I: see small_linalg.h
}

// x ← the exact projection onto the manifold (stiefel: the Q factor of QR, diag(R) > 0).
template <class S, class T>
FGSGD_HD void projx_inplace(const S& s, int code, T* x) {
  const int n = s.size();
  switch (manifold_of(code)) {
    case kManSphere: {
      const T inv = rsqrt_(dot(s, x, x));
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) x[i] *= inv;
      break;
    }
    case kManOblique:
      normalize_columns(s, x);
      break;
    case kManStiefel:
      qr_q_inplace(s, x);
      break;
    default:
      break;
  }
}

// normalize, qr and euclidean: Retr_ω(V) = projx(ω + V).
FGSGD_HD bool is_first_order(int code) {
  return code == kSphereNormalize || code == kObliqueNormalize || code == kStiefelQR || code == kEuclidean;
}

// out = Retr_ω(V).
template <class S, class T>
FGSGD_HD void retr(const S& s, int code, const T* w, const T* v, T* out) {
  const int B = s.cols(), n = s.size();
  if (is_first_order(code)) {
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) out[i] = w[i] + v[i];
    projx_inplace(s, code, out);  // normalize, qr: the projection of ω + V
    return;
  }
  switch (code) {
    case kSphereExp: {  // cos‖V‖ ω + sin‖V‖ V/‖V‖
      T c, sc;
      cos_sinc_sq_(dot(s, v, v), &c, &sc);
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = c * w[i] + sc * v[i];
      break;
    }
    case kObliqueExp: {  // the same per column
      T c[S::kCap], sc[S::kCap];
      FGSGD_UNROLL
      for (int j = 0; j < B; ++j) cos_sinc_sq_(col_dot(s, v, v, j), &c[j], &sc[j]);
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = c[i % B] * w[i] + sc[i % B] * v[i];
      break;
    }
    case kStiefelCayley:
      cayley(s, w, v, out);
      break;
    default:  // unknown codes are rejected by the callers; never leave `out` unwritten
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = w[i];
  }
}

// out = Retr_ω(a·V) for V tangent at ω (the step's direction). The first-order retractions form ω + a·V as
// fused multiply-adds; the others scale V first.
template <class S, class T>
FGSGD_HD void retr(const S& s, int code, const T* w, T a, const T* v, T* out) {
  const int n = s.size();
  if (is_first_order(code)) {
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) out[i] = w[i] + a * v[i];
    if (code == kStiefelQR) {
      qr_q_of_step_inplace(s, out);  // V tangent at ω: see there
    } else {
      projx_inplace(s, code, out);  // normalize: the projection of ω + V
    }
  } else {
    T av[S::kCap];
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) av[i] = a * v[i];
    retr(s, code, w, av, out);
  }
}

// Frobenius, spectral and ℓ2→1 (sum of row norms) norms of x.
template <class S, class T>
FGSGD_HD void norms(const S& s, const T* x, T* fro, T* spectral, T* l21) {
  const int A = s.rows(), B = s.cols();
  *fro = sqrt_(dot(s, x, x));
  T acc = T(0);
  for (int r = 0; r < A; ++r) {
    T row = T(0);
    for (int q = 0; q < B; ++q) row += x[r * B + q] * x[r * B + q];
    acc += sqrt_(row);
  }
  *l21 = acc;
  T gram[S::kCap];  // xᵀx, B×B <= A×B when A >= B; for A < B use x xᵀ (A×A)
  const bool tall = A >= B;
  const int m = tall ? B : A;
  for (int p = 0; p < m; ++p)
    for (int q = 0; q < m; ++q) {
      T g = T(0);
      if (tall)
        for (int r = 0; r < A; ++r) g += x[r * B + p] * x[r * B + q];
      else
        for (int c = 0; c < B; ++c) g += x[p * B + c] * x[q * B + c];
      gram[p * m + q] = g;
    }
  const T top = sym_max_eig(gram, m);
  *spectral = sqrt_(top > T(0) ? top : T(0));
}

FGSGD_NAMESPACE_END
