// The fused FG-SGD step of one component: DESIGN.md §1, Algorithm 1, steps 1, 3, 4 and 5,
// with the group step size s_g (step 2) given.
#pragma once
#include "manifold.h"
#include "types.h"

FGSGD_NAMESPACE_BEGIN

template <class S, class T>
FGSGD_HD void load(const S& s, const T* src, T* dst) {
  const int n = s.size();
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) dst[i] = src[i];
}

template <class S, class T>
FGSGD_HD void store(const S& s, const T* src, T* dst) {
  const int n = s.size();
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) dst[i] = src[i];
}

// Step 1: ω = p/R and ξ = Π_ω(R·(g + wd·p)). Callers pass wd = 0 except on euclidean components.
template <class S, class T>
FGSGD_HD void tangent(const S& s, int code, const T* p, const T* g, T r, scalar_of<T> wd, T* w, T* xi) {
  const int n = s.size();
  const T inv_r = T(1) / r;
  if (wd != scalar_of<T>(0)) {
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) {
      w[i] = p[i] * inv_r;
      xi[i] = r * (g[i] + wd * p[i]);
    }
  } else {
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) {
      w[i] = p[i] * inv_r;
      xi[i] = r * g[i];
    }
  }
  proj(s, code, w, xi, xi);
}

// ‖ξ‖_F² of one component (input of the group step size), in double: summed in T, and where that sum leaves
// big_sq_ (in float from ‖ξ‖ = 2^50; it overflows from 1.8e19, where s_g = c/‖ξ_g‖ is still finite) summed
// again in double. Scalar T (csrc/cpu's lanes send such a component here: fast_impl.h sqnorm_block).
template <class S, class T>
FGSGD_HD double tangent_sqnorm(const S& s, int code, const T* p, const T* g, T r, T wd) {
  T w[S::kCap], xi[S::kCap];
  tangent(s, code, p, g, r, wd, w, xi);
  const T sq = dot(s, xi, xi);
  if (sq <= big_sq_<T>()) return double(sq);
  double acc = 0.0;
  for (int i = 0; i < s.size(); ++i) acc += double(xi[i]) * double(xi[i]);
  return acc;
}

// The step in two phases, so that a caller may fetch m between them (the CPU lanes do: fewer
// values live at once). Phase 1, steps 1 and 2: ω = p/R and the scaled tangent s_g·ξ (in xi).
template <class S, class T>
FGSGD_HD void step_tangent(const S& s, int code, const T* p, const T* g, T r, T sg,
                           const StepHParams<scalar_of<T>>& h, T* w, T* xi) {
  using E = scalar_of<T>;
  const int n = s.size();
  tangent(s, code, p, g, r, manifold_of(code) == kManEuclidean ? h.weight_decay : E(0), w, xi);
  const T f = sg * T(h.grad_unscale);  // s_g, and the unscale of a GradScaler's gradients (exact for powers of 2)
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) xi[i] *= f;
}

// Phase 2, steps 3 to 5, from phase 1's w and xi (xi is overwritten): p ← R·ω', m ← Π_ω'(buffer)
// (when momentum != 0; m is read unless first_step).
template <class S, class T>
FGSGD_HD void step_update(const S& s, int code, const T* w, T* xi, T* m, T r, const StepHParams<scalar_of<T>>& h,
                          T* p) {
  using E = scalar_of<T>;
  const int n = s.size();
  T d[S::kCap], buf[S::kCap];  // d: the direction, before the factor −lr (retr applies it)
  const bool use_m = h.momentum != E(0);
  if (use_m) {
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) {  // step 3
      buf[i] = h.first_step ? xi[i] : h.momentum * m[i] + (T(1) - h.dampening) * xi[i];
      d[i] = h.nesterov ? xi[i] + h.momentum * buf[i] : buf[i];
    }
  } else {
    FGSGD_UNROLL
    for (int i = 0; i < n; ++i) d[i] = xi[i];
  }
  retr(s, code, w, T(-h.lr), d, xi);  // step 4: ω' = Retr_ω(−lr·d) (reuses xi's storage)
  if (h.stabilize) projx_inplace(s, code, xi);  // step 5
  if (use_m) {
    proj(s, code, xi, buf, buf);  // transport by projection onto T_ω'
    store(s, buf, m);
  }
  FGSGD_UNROLL
  for (int i = 0; i < n; ++i) p[i] = r * xi[i];
}

// p, m (when momentum != 0) are read and written in place; g is read. `sg` is s_g, `r` is R.
// On lane types p, g, m are the W components' elements (SoA), all with the same code.
template <class S, class T>
FGSGD_HD void component_step(const S& s, int code, T* p, const T* g, T* m, T r, T sg,
                             const StepHParams<scalar_of<T>>& h) {
  T w[S::kCap], xi[S::kCap];
  step_tangent(s, code, p, g, r, sg, h, w, xi);
  step_update(s, code, w, xi, m, r, h, p);
}

FGSGD_NAMESPACE_END
