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

// nn[j] = ‖x_j‖² for every column j; true when any of them is above big_sq_ in any lane (the rescaling path), or
// (``tiny_too``) below small_sq_.
template <class S, class T>
FGSGD_HD bool col_sq_norms_overflow(const S& s, const T* x, T* nn, bool tiny_too = false) {
  const int B = s.cols();
  bool large = false;
  FGSGD_UNROLL
  for (int j = 0; j < B; ++j) {
    nn[j] = col_dot(s, x, x, j);
    large = large || any_(nn[j] > big_sq_<T>()) || (tiny_too && any_(nn[j] < small_sq_<T>()));
  }
  return large;
}

// Scale every column of y to unit norm.
template <class S, class T>
FGSGD_HD void normalize_columns(const S& s, T* y) {
  const int B = s.cols(), n = s.size();
  T nn[S::kCap], inv[S::kCap];
  // a column norm over- or underflows: rescale the columns first (normalising is scale-invariant)
  if (col_sq_norms_overflow(s, y, nn, /*tiny_too=*/true)) {
    FGSGD_UNROLL
    for (int j = 0; j < B; ++j) inv[j] = inv_or_one_(col_max_abs(s, y, j));
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) y[i] *= inv[i % B];
    FGSGD_UNROLL
    for (int j = 0; j < B; ++j) nn[j] = col_dot(s, y, y, j);
  }
  FGSGD_UNROLL
  for (int j = 0; j < B; ++j) inv[j] = rsqrt_(nn[j]);
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) y[i] *= inv[i % B];
}

// x ← x/‖x‖_F.
template <class S, class T>
FGSGD_HD void normalize(const S& s, T* x) {
  const int n = s.size();
  T nn = dot(s, x, x);
  if (any_(nn > big_sq_<T>()) || any_(nn < small_sq_<T>())) {  // ‖x‖² over- or underflows: rescale first
    const T inv_m = inv_or_one_(max_abs(s, x));
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) x[i] *= inv_m;
    nn = dot(s, x, x);
  }
  const T inv = rsqrt_(nn);
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

// The exp retractions take their step along V⊥ = Π_ω V = V − ⟨ω,V⟩ω: Exp_ω(V⊥) = cos t·ω + sin t·V⊥/t, t = ‖V⊥‖
// (over the component for the sphere, per column for the oblique). For V tangent at ω on the manifold, V⊥ = V in exact
// arithmetic; in floating point ⟨ω,V⟩ is the rounding of the tangent projection, about ε‖g‖, which a mostly radial
// gradient makes large relative to ‖V‖: cos t·ω + sin t·V/t then lands off the sphere by sin 2t·⟨ω,V⟩/t (1e-2 in fp32
// for ‖g‖ = 1e5‖ξ‖). Along V⊥ the step lands on the manifold to rounding (tests/test_radial_gradients.py).

// out = Exp_ω(V⊥) over the n_el entries at stride `stride` from 0 (the sphere's, one column of the oblique's) with
// V⊥ formed, for the steps where ‖V‖² overflows or V lies mostly along ω (there ‖V‖² − a² cancels: an fp32 oblique
// step off its manifold by 0.57): U = V/m with m = max|V_i|, U⊥ = U − ⟨ω,U⟩ω, t = m‖U⊥‖,
// V⊥/t = U⊥/‖U⊥‖. Where ω is on its sphere to rounding, U⊥ is orthogonal to ω by definition, and the ω part that
// rounding leaves in it (about ε·|⟨ω,U⟩|, which sin t/t turns into a step off the manifold) is removed again: a
// second Gram–Schmidt pass. A point off its sphere (which the kernels take as it is) keeps U − ⟨ω,U⟩ω, the
// formula's meaning there. U⊥ is kept in `out` (which may be v, not w).
template <class T>
FGSGD_HD void exp_of_large(const T* w, const T* v, T* out, int n_el, int stride) {
  const T m = max_abs_strided(v, n_el, stride);
  const T inv_m = inv_or_one_(m);
  T wu = T(0), ww = T(0);
  FGSGD_UNROLL
  for (int i = 0; i < n_el; ++i) {
    wu += w[i * stride] * (v[i * stride] * inv_m);
    ww += w[i * stride] * w[i * stride];
  }
  T wu2 = T(0);
  FGSGD_UNROLL
  for (int i = 0; i < n_el; ++i) {
    out[i * stride] = v[i * stride] * inv_m - wu * w[i * stride];
    wu2 += w[i * stride] * out[i * stride];
  }
  wu2 = select_(abs_(ww - T(1)) <= T(on_sphere_tol_of(scalar_of<T>())), wu2, T(0));
  T uu = T(0);
  FGSGD_UNROLL
  for (int i = 0; i < n_el; ++i) {
    out[i * stride] -= wu2 * w[i * stride];
    uu += out[i * stride] * out[i * stride];
  }
  const auto moves = uu > T(exp_rounding_sq_of(scalar_of<T>()));  // else U⊥ is rounding: ω stays
  const T t = select_(moves, m * sqrt_(uu), T(0));
  const T k = select_(moves, sin_(t) * rsqrt_(uu), T(0));
  const T c = cos_(t);
  FGSGD_UNROLL
  for (int i = 0; i < n_el; ++i) out[i * stride] = c * w[i * stride] + k * out[i * stride];
}

// Whether t² = ‖V‖² − a²(2 − ‖ω‖²) lost most of ‖V‖² = vv to cancellation (V mostly along ω): exp_of_large then.
template <class T>
FGSGD_HD bool mostly_radial_(T tt, T vv) {
  return any_(tt < T(0.25) * vv);
}

// The large-step path of the Cayley retraction for A > 3, on M = I − K: K is scaled down to ‖K‖_F ≤ √2·τ,
// τ = 2^12 in float, 2^26 in double (about 1/√ε). Cayley(K) moves by O(1/‖K‖) beyond that norm, and the
// pivoted solve's error grows as ‖K‖ε: τ balances the two, so a step however large (‖K‖ may be any finite
// value, its square need not be) lands on the manifold with an error of about √ε (tests/test_large_steps.py).
FGSGD_HD constexpr float cayley_clamp_of(float) { return 0x1p12f; }
FGSGD_HD constexpr double cayley_clamp_of(double) { return 0x1p26; }
template <class T>
FGSGD_HD void clamp_cayley(T* M, int A) {
  T m = T(0);
  FGSGD_UNROLL
  for (int i = 0; i < A; ++i)
    FGSGD_UNROLL
    for (int j = i + 1; j < A; ++j) m = select_(abs_(M[i * A + j]) > m, abs_(M[i * A + j]), m);
  const T inv_m = inv_or_one_(m);
  T kk = T(0);  // ‖K‖_F² / (2m²)
  FGSGD_UNROLL
  for (int i = 0; i < A; ++i)
    FGSGD_UNROLL
    for (int j = i + 1; j < A; ++j) kk += (M[i * A + j] * inv_m) * (M[i * A + j] * inv_m);
  const T norm = m * sqrt_(kk);  // ‖K‖_F / √2
  const T tau = T(cayley_clamp_of(scalar_of<T>()));
  const T f = select_(norm > tau, tau / norm, T(1));
  FGSGD_UNROLL
  for (int i = 0; i < A; ++i)
    FGSGD_UNROLL
    for (int j = 0; j < A; ++j)
      if (i != j) M[i * A + j] *= f;
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
    // Where ‖k‖² overflows, k = m·k̂ (m = max|k_ij|) and c(Kx + K²x) = 2(K̂x/m + K̂²x)/(1/m² + ‖k̂‖²).
    T k01 = M[1 * A + 0], k02 = M[2 * A + 0], k12 = M[2 * A + 1];  // K_ij = −M_ij = M_ji, i < j
    T kk = k01 * k01 + k02 * k02 + k12 * k12, inv_m = T(1);
    if (any_(kk > big_sq_<T>())) {
      const T a01 = abs_(k01), a02 = abs_(k02), a12 = abs_(k12);
      const T m01 = select_(a01 > a02, a01, a02);
      inv_m = inv_or_one_(select_(m01 > a12, m01, a12));
      k01 *= inv_m;
      k02 *= inv_m;
      k12 *= inv_m;
      kk = k01 * k01 + k02 * k02 + k12 * k12;
    }
    const T c = T(2) / (inv_m * inv_m + kk);
    FGSGD_UNROLL
    for (int q = 0; q < B; ++q) {
      const T x0 = w[0 * B + q], x1 = w[1 * B + q], x2 = w[2 * B + q];
      const T u0 = k01 * x1 + k02 * x2, u1 = k12 * x2 - k01 * x0, u2 = -(k02 * x0 + k12 * x1);  // K x
      const T v0 = k01 * u1 + k02 * u2, v1 = k12 * u2 - k01 * u0, v2 = -(k02 * u0 + k12 * u1);  // K K x
      out[0 * B + q] = x0 + c * (u0 * inv_m + v0);
      out[1 * B + q] = x1 + c * (u1 * inv_m + v1);
      out[2 * B + q] = x2 + c * (u2 * inv_m + v2);
    }
    return;
  }
  // A > 3: the elimination without pivoting loses accuracy as ‖W‖²ε, so it is kept for ‖K‖_F² ≤ 2 (K = W/2),
  // where the growth bound of small_linalg.h is below 3n; larger steps are clamped (clamp_cayley), solved with
  // pivoting and end with a QR.
  T kk = T(0);
  FGSGD_UNROLL
  for (int i = 0; i < A; ++i)
    FGSGD_UNROLL
    for (int j = i + 1; j < A; ++j) kk += M[i * A + j] * M[i * A + j];
  const bool large = any_(kk > T(1));
  if (large) clamp_cayley(M, A);
  FGSGD_UNROLL
  for (int i = 0; i < A; ++i)  // rhs = (I + W/2) ω = 2ω − M ω
    FGSGD_UNROLL
    for (int q = 0; q < B; ++q) {
      T acc = T(0);
      FGSGD_UNROLL
      for (int j = 0; j < A; ++j) acc += M[i * A + j] * w[j * B + q];
      out[i * B + q] = T(2) * w[i * B + q] - acc;
    }
  if (!large) {
    solve_inplace(M, out, A, B);  // M = I − W/2 has symmetric part I: see small_linalg.h
    return;
  }
  solve_inplace<true>(M, out, A, B);
  qr_q_inplace(s, out);  // back onto the manifold: the solve's error, about ‖K‖ε, is no longer at rounding level
}

// x ← the exact projection onto the manifold (stiefel: the Q factor of QR, diag(R) > 0).
template <class S, class T>
FGSGD_HD void projx_inplace(const S& s, int code, T* x) {
  switch (manifold_of(code)) {
    case kManSphere:
      normalize(s, x);
      break;
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
    case kSphereExp: {  // cos t ω + sin t V⊥/t, V⊥ = V − aω, a = ⟨ω,V⟩, t = ‖V⊥‖ (see exp_of_large)
      const T tt = dot(s, v, v);
      if (any_(tt > big_sq_<T>())) {
        exp_of_large(w, v, out, n, 1);
        break;
      }
      const T a = dot(s, w, v);
      const T t2 = tangent_sq_(tt, a, dot(s, w, w));
      if (mostly_radial_(t2, tt)) {
        exp_of_large(w, v, out, n, 1);
        break;
      }
      T c, sc;
      cos_sinc_sq_(t2, &c, &sc);
      c -= sc * a;  // c ω + sc V = cos t ω + sc V⊥
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = c * w[i] + sc * v[i];
      break;
    }
    case kObliqueExp: {  // the same per column
      T c[S::kCap], sc[S::kCap];
      if (col_sq_norms_overflow(s, v, c)) {  // c[j] = ‖V_j‖² until cos_sinc_sq_ below
        FGSGD_UNROLL
        for (int j = 0; j < B; ++j) exp_of_large(w + j, v + j, out + j, s.rows(), B);
        break;
      }
      bool radial = false;
      FGSGD_UNROLL
      for (int j = 0; j < B; ++j) {
        sc[j] = col_dot(s, w, v, j);  // a_j until cos_sinc_sq_ below
        const T t2 = tangent_sq_(c[j], sc[j], col_dot(s, w, w, j));
        radial = radial || mostly_radial_(t2, c[j]);
        c[j] = t2;
      }
      if (radial) {
        FGSGD_UNROLL
        for (int j = 0; j < B; ++j) exp_of_large(w + j, v + j, out + j, s.rows(), B);
        break;
      }
      FGSGD_UNROLL
      for (int j = 0; j < B; ++j) {
        const T a = sc[j];
        cos_sinc_sq_(c[j], &c[j], &sc[j]);
        c[j] -= sc[j] * a;
      }
      FGSGD_UNROLL
      for (int i = 0; i < n; ++i) out[i] = c[i % B] * w[i] + sc[i % B] * v[i];
      break;
    }
    case kStiefelCayley:
      if (s.rows() <= kMaxCayleyRows) {  // its work matrix holds kMaxCayleyRows² entries: a code that does not fit
        cayley(s, w, v, out);             // the shape (refused by the Python ops on the CPU) leaves ω as it is
        break;
      }
      [[fallthrough]];
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
