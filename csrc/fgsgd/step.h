// The fused FG-SGD step of one component: DESIGN.md §1, Algorithm 1, steps 1, 3, 4 and 5,
// with the group step size s_g (step 2) given.
#pragma once
#include "manifold.h"

namespace fgsgd {

template <class T>
struct StepHParams {
  T lr, momentum, dampening, weight_decay;
  bool nesterov, first_step, stabilize;
};

template <class S, class T>
FGSGD_HD void load(const S& s, const T* src, T* dst) {
#pragma unroll
  for (int i = 0; i < s.size(); ++i) dst[i] = src[i];
}

template <class S, class T>
FGSGD_HD void store(const S& s, const T* src, T* dst) {
#pragma unroll
  for (int i = 0; i < s.size(); ++i) dst[i] = src[i];
}

// Step 1: ω = p/R and ξ = Π_ω(R·(g + wd·p)). Callers pass wd = 0 except on euclidean components.
template <class S, class T>
FGSGD_HD void tangent(const S& s, int code, const T* p, const T* g, T r, T wd, T* w, T* xi) {
  const T inv_r = T(1) / r;
#pragma unroll
  for (int i = 0; i < s.size(); ++i) {
    w[i] = p[i] * inv_r;
    xi[i] = r * (wd != T(0) ? g[i] + wd * p[i] : g[i]);
  }
  proj(s, code, w, xi, xi);
}

// ‖ξ‖_F² of one component (input of the group step size).
template <class S, class T>
FGSGD_HD T tangent_sqnorm(const S& s, int code, const T* p, const T* g, T r, T wd) {
  T w[S::kCap], xi[S::kCap];
  tangent(s, code, p, g, r, wd, w, xi);
  return dot(s, xi, xi);
}

// p, m (when momentum != 0) are read and written in place; g is read. `sg` is s_g, `r` is R.
template <class S, class T>
FGSGD_HD void component_step(const S& s, int code, T* p, const T* g, T* m, T r, T sg,
                             const StepHParams<T>& h) {
  const int n = s.size();
  T w[S::kCap], xi[S::kCap], d[S::kCap], buf[S::kCap];
  tangent(s, code, p, g, r, manifold_of(code) == kManEuclidean ? h.weight_decay : T(0), w, xi);
#pragma unroll
  for (int i = 0; i < n; ++i) xi[i] *= sg;
  const bool use_m = h.momentum != T(0);
  if (use_m) {
#pragma unroll
    for (int i = 0; i < n; ++i) {  // step 3
      buf[i] = h.first_step ? xi[i] : h.momentum * m[i] + (T(1) - h.dampening) * xi[i];
      d[i] = -h.lr * (h.nesterov ? xi[i] + h.momentum * buf[i] : buf[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < n; ++i) d[i] = -h.lr * xi[i];
  }
  retr(s, code, w, d, xi);  // step 4: ω' (reuses xi's storage)
  if (h.stabilize) projx_inplace(s, code, xi);  // step 5
  if (use_m) {
    proj(s, code, xi, buf, buf);  // transport by projection onto T_ω'
    store(s, buf, m);
  }
#pragma unroll
  for (int i = 0; i < n; ++i) p[i] = r * xi[i];
}

}  // namespace fgsgd
