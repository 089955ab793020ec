// Dense linear algebra on one small row-major matrix held in local memory (registers on a GPU).
// T is a scalar or a CPU lane type (config.h): no branch below depends on a value of T, except choices between
// two ways of computing the same values (qr_q_of_step_inplace, cos_sinc_sq_, the overflow guards), each uniform
// over the lanes.
#pragma once
#include "config.h"

FGSGD_NAMESPACE_BEGIN

template <class T>
FGSGD_HD T sinc_(T t) {  // sin(t)/t, t >= 0; both sides are finite or NaN only where not selected
  return select_(t > T(1e-4), sin_(t) / t, T(1) - t * t / T(6));
}

// cos(t) and sin(t)/t together (the exp retractions). Lane types overload it with one shared
// range reduction for both (csrc/cpu/lanes.h).
template <class T>
FGSGD_HD void cos_sinc_(T t, T* c, T* sc) {
  *c = cos_(t);
  *sc = sinc_(t);
}

// cos t and sin(t)/t from tt = t² (the exp retractions, tt = ‖V‖²). Where tt <= 1/4 in every lane (t <= 1/2:
// steps of ordinary size), their Taylor series in tt, cos to t¹⁴ and sinc to t¹⁴ (the first terms left out are
// below 1e-17): no square root, division or range reduction, which were the longest dependency chain of an exp
// step. Otherwise cos_sinc_ of √tt: like qr_q_of_step_inplace, a branch uniform over the lanes between two ways
// of computing the same values.
template <class T>
FGSGD_HD void cos_sinc_sq_(T tt, T* c, T* sc) {
  if (any_(tt > T(0.25))) {
    cos_sinc_(sqrt_(tt), c, sc);
    return;
  }
  *c = T(1) + tt * (T(-1.0 / 2) + tt * (T(1.0 / 24) + tt * (T(-1.0 / 720) + tt * (T(1.0 / 40320) +
       tt * (T(-1.0 / 3628800) + tt * (T(1.0 / 479001600) + tt * T(-1.0 / 87178291200)))))));
  *sc = T(1) + tt * (T(-1.0 / 6) + tt * (T(1.0 / 120) + tt * (T(-1.0 / 5040) + tt * (T(1.0 / 362880) +
        tt * (T(-1.0 / 39916800) + tt * (T(1.0 / 6227020800) + tt * T(-1.0 / 1307674368000)))))));
}

// The exp retractions' t² = ‖V⊥‖², V⊥ = V − aω (manifold.h, before exp_of_large): ‖V‖² − a²(2 − ‖ω‖²) from
// vv = ‖V‖², a = ⟨ω,V⟩ and ww = ‖ω‖², three independent dot products (a shorter dependency chain than forming V⊥:
// AVX2 sphere-exp step 3.5 → 3.9 ms, against 4.1 for V⊥ formed), clamped at 0. Where ‖V‖² does not overflow neither
// does a (|a| ≤ ‖ω‖‖V‖).
template <class T>
FGSGD_HD T tangent_sq_(T vv, T a, T ww) {
  const T tt = vv - a * a * (T(2) - ww);
  return select_(tt > T(0), tt, T(0));
}

// ⟨x, y⟩ over the n = A·B elements, in three interleaved partial sums: a dependency chain of n/3
// multiply-adds instead of n (latency, not rounding, is what these tiny reductions cost).
template <class S, class T>
FGSGD_HD T dot(const S& s, const T* x, const T* y) {
  const int n = s.size();
  if (n < 3) return n == 1 ? x[0] * y[0] : x[0] * y[0] + x[1] * y[1];
  T a0 = x[0] * y[0], a1 = x[1] * y[1], a2 = x[2] * y[2];
  int i = 3;
  FGSGD_UNROLL
  for (; i + 3 <= n; i += 3) {
    a0 += x[i] * y[i];
    a1 += x[i + 1] * y[i + 1];
    a2 += x[i + 2] * y[i + 2];
  }
  FGSGD_UNROLL
  for (; i < n; ++i) a0 += x[i] * y[i];
  return a0 + (a1 + a2);
}

// Column j of x and y: sum_r x[r, j] y[r, j].
template <class S, class T>
FGSGD_HD T col_dot(const S& s, const T* x, const T* y, int j) {
  const int A = s.rows(), B = s.cols();
  T acc = T(0);
  FGSGD_UNROLL
  for (int r = 0; r < A; ++r) acc += x[r * B + j] * y[r * B + j];
  return acc;
}

// Column jx of x and column jy of y: sum_r x[r, jx] y[r, jy].
template <class S, class T>
FGSGD_HD T col_dot(const S& s, const T* x, const T* y, int jx, int jy) {
  const int A = s.rows(), B = s.cols();
  T acc = T(0);
  FGSGD_UNROLL
  for (int r = 0; r < A; ++r) acc += x[r * B + jx] * y[r * B + jy];
  return acc;
}

// Overflow guards. Squared norms above big_sq_<T>() (2^100 in float, 2^900 in double: entries beyond about
// 2^50, resp. 2^450) send the retractions to a slow path that rescales first, so that a finite step, however
// large, still lands finite and on the manifold (tests/test_large_steps.py). Uniform branches over the lanes.
FGSGD_HD constexpr float big_sq_of(float) { return 0x1p100f; }
FGSGD_HD constexpr double big_sq_of(double) { return 0x1p900; }
template <class T>
FGSGD_HD T big_sq_() {
  return T(big_sq_of(scalar_of<T>()));
}
// And below its inverse (entries under about 2^-50, resp. 2^-450, as a tiny initial filter may have) a squared norm
// loses its digits to subnormals: normalize rescales then too.
template <class T>
FGSGD_HD T small_sq_() {
  return T(1 / big_sq_of(scalar_of<T>()));
}

// The row kernels' rescue pass (row_step.h): a power of two s such that (s·x)² of any finite x, summed over up to
// 2^31 entries, stays finite (2^-80 in float, 2^-600 in double); what underflows is negligible beside an entry whose
// square exceeds big_sq_ / n.
FGSGD_HD constexpr float row_rescale_of(float) { return 0x1p-80f; }
FGSGD_HD constexpr double row_rescale_of(double) { return 0x1p-600; }

// max |x_i| over the n_el entries of x at stride `stride` (a whole component: stride 1; a column: stride B).
template <class T>
FGSGD_HD T max_abs_strided(const T* x, int n_el, int stride) {
  T m = abs_(x[0]);
  FGSGD_UNROLL
  for (int i = 1; i < n_el; ++i) m = select_(abs_(x[i * stride]) > m, abs_(x[i * stride]), m);
  return m;
}

template <class S, class T>
FGSGD_HD T max_abs(const S& s, const T* x) {
  return max_abs_strided(x, s.size(), 1);
}

// max_r |x[r, j]| over column j.
template <class S, class T>
FGSGD_HD T col_max_abs(const S& s, const T* x, int j) {
  return max_abs_strided(x + j, s.rows(), s.cols());
}

// 1/m where m > 0, else 1 (a factor that rescales a nonzero vector to max-entry 1 and leaves 0 alone).
template <class T>
FGSGD_HD T inv_or_one_(T m) {
  return select_(m > T(0), T(1) / m, T(1));
}

// Column k of x ← H_j x_k, H_j = I − β v_j v_jᵀ, the reflector stored in rows j.. of column j of v.
template <class S, class T>
FGSGD_HD void reflect_column(const S& s, const T* v, T beta, int j, T* x, int k) {
  const int A = s.rows(), B = s.cols();
  T f = T(0);
  FGSGD_UNROLL
  for (int i = j; i < A; ++i) f += v[i * B + j] * x[i * B + k];
  f *= beta;
  FGSGD_UNROLL
  for (int i = j; i < A; ++i) x[i * B + k] -= f * v[i * B + j];
}

// |‖ω‖² − 1| up to which ω counts as on its sphere to rounding (64 ε): the exp retractions' second Gram–Schmidt pass.
FGSGD_HD constexpr float on_sphere_tol_of(float) { return 0x1p-17f; }
FGSGD_HD constexpr double on_sphere_tol_of(double) { return 0x1p-46; }

// ‖U⊥‖² (U = V/max|V|) up to which an exp step's tangent part is the rounding of V (4ε relative): no step then. A
// one-entry column (an oblique 1×k filter, a 1×1 sphere component) has no tangent space, and the rounding left in
// U⊥ after both Gram–Schmidt passes is along ω, so stepping by it left the manifold by O(1) (manifold.h exp_of_large).
FGSGD_HD constexpr float exp_rounding_sq_of(float) { return 0x1p-42f; }
FGSGD_HD constexpr double exp_rounding_sq_of(double) { return 0x1p-100; }

// The smallest normal number: a reflector's column below it (relative to the largest entry, 1) counts as empty.
FGSGD_HD constexpr float tiny_of(float) { return 0x1p-126f; }
FGSGD_HD constexpr double tiny_of(double) { return 0x1p-1022; }

// x ← Q of the thin QR of x with diag(R) > 0, by Householder reflections on x/max|x| (Q does not change
// when x is scaled, and the column norms cannot overflow). Q is orthogonal to rounding for every x, also
// one that is numerically rank-deficient (a huge step: ω + a·V with ‖a·V‖ beyond 1/ε, where Gram–Schmidt
// normalises rounding noise); a column with nothing left (R_jj = 0, or below the smallest normal number) becomes
// the reflectors' image of e_j. Each reflector is formed from its column scaled to max-entry 1 (H = I − 2vvᵀ/vᵀv
// does not change when v is scaled, as LAPACK's larfg): a column far smaller than the largest entry (1e-20 in
// float) squared to subnormals, and β = 2/vᵀv overflowed (NaN). The sign of each reflector is a select, so there
// is no branch on values.
template <class S, class T>
FGSGD_HD void qr_q_inplace(const S& s, T* x) {
  const int A = s.rows(), B = s.cols(), n = s.size();
  const T inv_m = inv_or_one_(max_abs(s, x));
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) x[i] *= inv_m;
  T v[S::kCap], beta[kMaxStiefelCols], flip[kMaxStiefelCols];  // v[i, j], i >= j: reflector j
  FGSGD_UNROLL
  for (int j = 0; j < B; ++j) {
    T cm = T(0);
    FGSGD_UNROLL
    for (int i = j; i < A; ++i) cm = select_(abs_(x[i * B + j]) > cm, abs_(x[i * B + j]), cm);
    const T inv_c = select_(cm >= T(tiny_of(scalar_of<T>())), T(1) / cm, T(0));
    const T x0 = x[j * B + j] * inv_c;
    T tail = T(0);
    FGSGD_UNROLL
    for (int i = j + 1; i < A; ++i) {
      v[i * B + j] = x[i * B + j] * inv_c;
      tail += v[i * B + j] * v[i * B + j];
    }
    const T nrm = sqrt_(tail + x0 * x0);
    const T alpha = select_(x0 < T(0), nrm, -nrm);  // H_j x_j ∝ α e_j; v = x_j − α e_j, no cancellation
    const T v0 = x0 - alpha;
    v[j * B + j] = v0;
    const T vv = tail + v0 * v0;
    beta[j] = select_(vv > T(0), T(2) / vv, T(0));
    flip[j] = select_(alpha > T(0), T(1), T(-1));  // Q's column j times sign(R_jj): diag(R) > 0
    FGSGD_UNROLL
    for (int k = j + 1; k < B; ++k) reflect_column(s, v, beta[j], j, x, k);  // x_k ← H_j x_k
  }
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) x[i] = T(i / B == i % B ? 1 : 0);  // [I_B; 0], then H_0 ⋯ H_{B−1} applied to it
  FGSGD_UNROLL
  for (int j = B - 1; j >= 0; --j)
    FGSGD_UNROLL
    for (int q = j; q < B; ++q) reflect_column(s, v, beta[j], j, x, q);  // columns q < j are still e_q
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) x[i] *= flip[i % B];
}

// x ← Q of the thin QR of x (diag(R) > 0) for x = ω + V, ω on the Stiefel manifold and V tangent at ω (the
// step's retraction). ωᵀV is skew, so xᵀx = I + VᵀV: its eigenvalues lie in [1, 1 + ‖V‖₂²], and
// tr(xᵀx) − B = ‖V‖_F² ≥ ‖V‖₂². Where tr(xᵀx) ≤ B + 1 in every lane (κ(x)² ≤ 2: steps of ordinary size), by
// Cholesky QR: R from the Cholesky factor of the Gram matrix xᵀx (pivots ≥ 1), then Q = x R⁻¹ column by column.
// Its loss of orthogonality, O(κ²ε), is then at rounding level like CGS2's, at about half the latency (the Gram
// entries are independent, where CGS2 chains through every column twice): 1.2 M 3×3 components, 2 threads,
// stiefel-qr step AVX2 5.2 → 3.9 ms, AVX-512 3.4 → 2.8 ms. Larger steps take Householder QR
// (qr_q_inplace), whose orthogonality does not depend on κ. The choice is uniform over the lanes of a block, and
// both sides compute the same Q.
template <class S, class T>
FGSGD_HD void qr_q_of_step_inplace(const S& s, T* x) {
  const int A = s.rows(), B = s.cols();
  T R[kMaxStiefelCols * kMaxStiefelCols], inv[kMaxStiefelCols];  // R: the upper triangle, B×B
  T trace = T(0);
  FGSGD_UNROLL
  for (int p = 0; p < B; ++p) {
    FGSGD_UNROLL
    for (int q = p; q < B; ++q) R[p * B + q] = col_dot(s, x, x, p, q);
    trace += R[p * B + p];
  }
  if (any_(trace > T(B + 1))) {
    qr_q_inplace(s, x);
    return;
  }
  FGSGD_UNROLL
  for (int j = 0; j < B; ++j) {  // Cholesky, in place: xᵀx = RᵀR, inv[j] = 1 / R_jj
    FGSGD_UNROLL
    for (int k = 0; k < j; ++k) {
      T acc = R[k * B + j];
      FGSGD_UNROLL
      for (int i = 0; i < k; ++i) acc -= R[i * B + k] * R[i * B + j];
      R[k * B + j] = acc * inv[k];
    }
    T d = R[j * B + j];
    FGSGD_UNROLL
    for (int k = 0; k < j; ++k) d -= R[k * B + j] * R[k * B + j];
    inv[j] = rsqrt_(d);
  }
  FGSGD_UNROLL
  for (int j = 0; j < B; ++j)  // q_j = (x_j − Σ_{k<j} R_kj q_k) / R_jj
    FGSGD_UNROLL
    for (int i = 0; i < A; ++i) {
      T acc = x[i * B + j];
      FGSGD_UNROLL
      for (int k = 0; k < j; ++k) acc -= R[k * B + j] * x[i * B + k];
      x[i * B + j] = acc * inv[j];
    }
}

// Solve M Y = R in place for an n×n matrix M (row-major, n <= kMaxCayleyRows) and n×b right-hand
// sides R, by Gaussian elimination, by default WITHOUT pivoting. M is destroyed, R becomes Y.
//
// Precondition: the symmetric part of M is ⪰ I. The Cayley retraction solves with M = I − W/2, W
// skew-symmetric (Wᵀ = −W), whose symmetric part is exactly I. For such M:
//  * xᵀMx = xᵀHx ≥ ‖x‖² for every x (H = sym(M), xᵀKx = 0 for the skew part K), so by
//    Cauchy–Schwarz ‖x‖‖Mx‖ ≥ xᵀMx ≥ ‖x‖²: ‖Mx‖ ≥ ‖x‖, every singular value of M is ≥ 1 and
//    ‖M⁻¹‖₂ ≤ 1 (for M = I − W/2 the eigenvalues are 1 − iθ/2, so I − W/2 is never singular).
//  * Every pivot is ≥ 1: the first is M₁₁ = e₁ᵀMe₁ ≥ 1. Given y, choose x = (α, y) with α such
//    that row 1 of Mx vanishes (α = −M₁₂y/M₁₁); then the rest of Mx is S y, S = M₂₂ − M₂₁M₁₂/M₁₁
//    the Schur complement, and yᵀSy = xᵀMx ≥ ‖x‖² ≥ ‖y‖². So S again has symmetric part ⪰ I and
//    by induction every later pivot is ≥ 1 too: elimination never divides by anything below 1.
//  * Growth is bounded (Golub & Van Loan, Matrix Computations, §4.2, matrices with a positive
//    definite symmetric part H and skew part K: ‖|L||U|‖ ≤ n(‖H‖ + ‖KH⁻¹Kᵀ‖) = n(1 + ‖W‖²/4) here),
//    so no pivoting is needed for stability.
// No pivoting keeps the solve free of data-dependent branches (SIMD lanes, GPU threads). Its error grows as
// ‖W‖²ε, though, so the Cayley retraction takes it only for ‖W‖ of ordinary steps; kPivot = true is partial
// pivoting for the others (error about κ(M)ε ≤ ‖W‖ε/2): before eliminating column c, every later row whose
// |M_rc| beats the current pivot's is swapped into row c by selects, which leaves the largest there without a
// branch on values.
template <bool kPivot = false, class T>
FGSGD_HD void solve_inplace(T* M, T* R, int n, int b) {
  FGSGD_UNROLL
  for (int c = 0; c < n; ++c) {
    if constexpr (kPivot) {
      FGSGD_UNROLL
      for (int r = c + 1; r < n; ++r) {
        const auto swap = abs_(M[r * n + c]) > abs_(M[c * n + c]);
        FGSGD_UNROLL
        for (int k = c; k < n; ++k) {
          const T top = M[c * n + k], low = M[r * n + k];
          M[c * n + k] = select_(swap, low, top);
          M[r * n + k] = select_(swap, top, low);
        }
        FGSGD_UNROLL
        for (int k = 0; k < b; ++k) {
          const T top = R[c * b + k], low = R[r * b + k];
          R[c * b + k] = select_(swap, low, top);
          R[r * b + k] = select_(swap, top, low);
        }
      }
    }
    const T inv = T(1) / M[c * n + c];
    FGSGD_UNROLL
    for (int r = c + 1; r < n; ++r) {
      const T f = M[r * n + c] * inv;
      FGSGD_UNROLL
      for (int k = c + 1; k < n; ++k) M[r * n + k] -= f * M[c * n + k];
      FGSGD_UNROLL
      for (int k = 0; k < b; ++k) R[r * b + k] -= f * R[c * b + k];
    }
    M[c * n + c] = inv;  // keep 1/pivot for the back substitution
  }
  FGSGD_UNROLL
  for (int c = n - 1; c >= 0; --c) {
    FGSGD_UNROLL
    for (int k = 0; k < b; ++k) {
      T acc = R[c * b + k];
      FGSGD_UNROLL
      for (int j = c + 1; j < n; ++j) acc -= M[c * n + j] * R[j * b + k];
      R[c * b + k] = acc * M[c * n + c];
    }
  }
}

// Largest eigenvalue of a symmetric n×n matrix G (row-major, destroyed) by cyclic Jacobi sweeps.
// Scalar T only (norms, not a hot path).
template <class T>
FGSGD_HD T sym_max_eig(T* G, int n) {
  for (int sweep = 0; sweep < 30; ++sweep) {
    T off = T(0), diag = T(0);
    for (int p = 0; p < n; ++p) {
      diag += G[p * n + p] * G[p * n + p];
      for (int q = p + 1; q < n; ++q) off += G[p * n + q] * G[p * n + q];
    }
    if (off <= T(1e-30) * diag || off == T(0)) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const T apq = G[p * n + q];
        if (apq == T(0)) continue;
        const T theta = (G[q * n + q] - G[p * n + p]) / (T(2) * apq);
        const T t = (theta >= T(0) ? T(1) : T(-1)) / (abs_(theta) + sqrt_(theta * theta + T(1)));
        const T c = T(1) / sqrt_(t * t + T(1));
        const T sn = t * c;
        for (int k = 0; k < n; ++k) {  // G ← G J
          const T gp = G[k * n + p], gq = G[k * n + q];
          G[k * n + p] = c * gp - sn * gq;
          G[k * n + q] = sn * gp + c * gq;
        }
        for (int k = 0; k < n; ++k) {  // G ← Jᵀ G
          const T gp = G[p * n + k], gq = G[q * n + k];
          G[p * n + k] = c * gp - sn * gq;
          G[q * n + k] = sn * gp + c * gq;
        }
      }
    }
  }
  T best = G[0];
  for (int p = 1; p < n; ++p) best = G[p * n + p] > best ? G[p * n + p] : best;
  return best;
}

FGSGD_NAMESPACE_END
