// Channel-directed gradients (DESIGN.md §1, "Channel-directed gradients"): every fiber f of a gradient along
// one axis (the output channels by default; length L, periodic) is replaced by its gradient under another metric:
//   re-weighted L2 (H⁰): f ← mean(f) + (f − mean(f))/λ
//   Sobolev (H¹):        f ← (I − λΔ)⁻¹ f, Δ the periodic second difference along the fiber.
// The fibers are the columns of (L, C) blocks (C = the product of the later axes, each fiber's entries C apart),
// so W adjacent columns share every memory row: the CPU runs W lanes per call (1 KiB of a row), a CUDA thread one
// column.
//
// Sobolev in O(L) per fiber: with (S f)_j = f_{j+1}, I − λΔ = (1 + 2λ) − λ(S + S⁻¹) = a (1 − rS)(1 − rS⁻¹) with
// r = 2λ / (1 + 2λ + √(1 + 4λ)) in [0, 1) and 1/a = r/λ = 2 / (1 + 2λ + √(1 + 4λ)). So f = (I − λΔ)⁻¹ x is
//   w = (1 − rS)⁻¹ x/a:  w_j = x_j/a + r w_{j+1},  w_{L−1} = (1/a) Σ_{k<L} r^k x_{(L−1+k) mod L} / (1 − r^L)
//   f = (1 − rS⁻¹)⁻¹ w:  f_j = w_j + r f_{j−1},     f_0 = (w_0 + Σ_{1≤j<L} r^{L−j} w_j) / (1 − r^L)
// (the periodic sums of the two geometric series). Both sums stop at the K-th term (the terms beyond are below
// r^K ≤ kSobolevTail of the largest, far under rounding): one short pass over K rows, then two streaming passes.
#pragma once
#include "config.h"

FGSGD_NAMESPACE_BEGIN

// The geometric terms r^k dropped from the two periodic sums: r^k < ε² of the element type (ε the unit roundoff: the
// dropped tail, at most r^K/(1 − r) ≤ ε²(√λ + 1) of the largest entry, stays far below rounding). At λ = 1
// (r = 0.38) float32 keeps 35 terms, float64 77.
template <class T>
constexpr double kSobolevTail = sizeof(T) == 4 ? 3.55e-15 : 1.23e-32;

// The constants of one Sobolev solve on fibers of length L: r, 1/a, 1/(1 − r^L), and K, the number of terms kept.
template <class T>
struct SobolevCoeffs {
  T r, inv_a, inv_one_minus_rl;
  int64_t terms;
};

// Host side, in double (λ ≥ 0, L ≥ 1); λ = 0 gives r = 0, 1/a = 1: the identity. tail: kSobolevTail<T>.
inline SobolevCoeffs<double> sobolev_coeffs(double lam, int64_t L, double tail) {
  const double d = 1.0 + 2.0 * lam + sqrt(1.0 + 4.0 * lam);
  SobolevCoeffs<double> c{2.0 * lam / d, 2.0 / d, 1.0, 1};
  c.inv_one_minus_rl = 1.0 / (1.0 - pow(c.r, double(L)));
  // K: the first k with r^k < tail (at least 1, at most L)
  double rk = c.r;
  while (c.terms < L && rk >= tail) {
    ++c.terms;
    rk *= c.r;
  }
  return c;
}

template <class T>
FGSGD_HD SobolevCoeffs<T> cast_coeffs(const SobolevCoeffs<double>& c) {
  return SobolevCoeffs<T>{T(c.r), T(c.inv_a), T(c.inv_one_minus_rl), c.terms};
}

// Sobolev on n ≤ W adjacent fibers (lanes) of length L that start at x[0..n) and step by `stride`, in place.
template <class T, int W>
FGSGD_HD void sobolev_fibers(T* x, int64_t L, int64_t stride, int n, const SobolevCoeffs<T>& c) {
  const T r = c.r;
  T w[W], acc[W];
  // w_{L−1}: x_{L−1} + Σ_{1≤k<K} r^k x_{k−1}
  for (int l = 0; l < n; ++l) w[l] = x[(L - 1) * stride + l];
  T rk = r;
  for (int64_t k = 1; k < c.terms; ++k, rk *= r)
    for (int l = 0; l < n; ++l) w[l] += rk * x[(k - 1) * stride + l];
  const T scale = c.inv_a * c.inv_one_minus_rl;
  // backward pass: w_j = x_j/a + r w_{j+1} in place, and the sum of f_0 (r^{L−j} w_j for j ≥ 1, w_0 for j = 0)
  T rj = r;  // r^{L−j}
  for (int l = 0; l < n; ++l) {
    w[l] *= scale;
    x[(L - 1) * stride + l] = w[l];
    acc[l] = L == 1 ? w[l] : rj * w[l];
  }
  for (int64_t j = L - 2; j >= 0; --j) {
    T* row = x + j * stride;
    rj *= r;
    const bool tail = j == 0 || L - j < c.terms;  // r^{L−j} is kept (K terms, as in w_{L−1})
    const T coef = j == 0 ? T(1) : rj;
    for (int l = 0; l < n; ++l) {
      w[l] = row[l] * c.inv_a + r * w[l];
      row[l] = w[l];
      if (tail) acc[l] += coef * w[l];
    }
  }
  // forward pass: f_0 = acc/(1 − r^L), f_j = w_j + r f_{j−1}
  for (int l = 0; l < n; ++l) {
    acc[l] *= c.inv_one_minus_rl;
    x[l] = acc[l];
  }
  for (int64_t j = 1; j < L; ++j) {
    T* row = x + j * stride;
    for (int l = 0; l < n; ++l) {
      acc[l] = row[l] + r * acc[l];
      row[l] = acc[l];
    }
  }
}

// Re-weighted L2 on n ≤ W fibers: f ← mean(f) + (f − mean(f))/λ = f/λ + mean(f)(1 − 1/λ), in place.
template <class T, int W>
FGSGD_HD void reweighted_fibers(T* x, int64_t L, int64_t stride, int n, T inv_lam) {
  T sum[W];
  for (int l = 0; l < n; ++l) sum[l] = T(0);
  for (int64_t j = 0; j < L; ++j)
    for (int l = 0; l < n; ++l) sum[l] += x[j * stride + l];
  const T keep = (T(1) - inv_lam) / T(L);
  for (int l = 0; l < n; ++l) sum[l] *= keep;
  for (int64_t j = 0; j < L; ++j)
    for (int l = 0; l < n; ++l) x[j * stride + l] = x[j * stride + l] * inv_lam + sum[l];
}

FGSGD_NAMESPACE_END
