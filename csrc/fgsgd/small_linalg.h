// Dense linear algebra on one small row-major matrix held in local memory (registers on a GPU).
#pragma once
#include "config.h"

namespace fgsgd {

template <class T>
FGSGD_HD T sinc_(T t) {  // sin(t)/t, t >= 0
  return t > T(1e-4) ? sin_(t) / t : T(1) - t * t / T(6);
}

template <class S, class T>
FGSGD_HD T dot(const S& s, const T* x, const T* y) {
  T acc = T(0);
#pragma unroll
  for (int i = 0; i < s.size(); ++i) acc += x[i] * y[i];
  return acc;
}

// Column j of x and y: sum_r x[r, j] y[r, j].
template <class S, class T>
FGSGD_HD T col_dot(const S& s, const T* x, const T* y, int j) {
  T acc = T(0);
#pragma unroll
  for (int r = 0; r < s.rows(); ++r) acc += x[r * s.cols() + j] * y[r * s.cols() + j];
  return acc;
}

// x ← Q of the thin QR of x with diag(R) > 0, by modified Gram–Schmidt applied twice
// ("twice is enough"), which keeps ‖QᵀQ − I‖ at rounding level for these tiny sizes.
template <class S, class T>
FGSGD_HD void qr_q_inplace(const S& s, T* x) {
  const int A = s.rows(), B = s.cols();
#pragma unroll
  for (int j = 0; j < B; ++j) {
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      for (int k = 0; k < j; ++k) {
        T r = T(0);
        for (int i = 0; i < A; ++i) r += x[i * B + k] * x[i * B + j];
        for (int i = 0; i < A; ++i) x[i * B + j] -= r * x[i * B + k];
      }
    }
    const T inv = T(1) / sqrt_(col_dot(s, x, x, j));
    for (int i = 0; i < A; ++i) x[i * B + j] *= inv;
  }
}

// Solve M Y = R in place for an n×n matrix M (row-major, n <= kMaxCayleyRows) and n×b right-hand
// sides R, by Gaussian elimination with partial pivoting. M is destroyed, R becomes Y.
template <class T>
FGSGD_HD void solve_inplace(T* M, T* R, int n, int b) {
  for (int c = 0; c < n; ++c) {
    int piv = c;
    T best = abs_(M[c * n + c]);
    for (int r = c + 1; r < n; ++r) {
      const T v = abs_(M[r * n + c]);
      if (v > best) { best = v; piv = r; }
    }
    if (piv != c) {
      for (int k = 0; k < n; ++k) { T t = M[c * n + k]; M[c * n + k] = M[piv * n + k]; M[piv * n + k] = t; }
      for (int k = 0; k < b; ++k) { T t = R[c * b + k]; R[c * b + k] = R[piv * b + k]; R[piv * b + k] = t; }
    }
    const T inv = T(1) / M[c * n + c];
    for (int r = c + 1; r < n; ++r) {
      const T f = M[r * n + c] * inv;
      if (f == T(0)) continue;
      for (int k = c; k < n; ++k) M[r * n + k] -= f * M[c * n + k];
      for (int k = 0; k < b; ++k) R[r * b + k] -= f * R[c * b + k];
    }
  }
  for (int c = n - 1; c >= 0; --c) {
    const T inv = T(1) / M[c * n + c];
    for (int k = 0; k < b; ++k) {
      T acc = R[c * b + k];
      for (int j = c + 1; j < n; ++j) acc -= M[c * n + j] * R[j * b + k];
      R[c * b + k] = acc * inv;
    }
  }
}

// Largest eigenvalue of a symmetric n×n matrix G (row-major, destroyed) by cyclic Jacobi sweeps.
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

}  // namespace fgsgd
