// The fused step of one *row* component: an n×1 column of any length n (the row view of a 1×1 conv or
// linear weight, one output channel's weights), too long for the small-matrix math of step.h
// (A·B <= kMaxElems); the CPU streams the shorter n×1 with n > kMaxCayleyRows here too (faster than step.h
// from 16×1 up: csrc/cpu/kernels.cpp, takes_row_kernel). DESIGN.md §1, Algorithm 1, steps 1, 3, 4 and 5
// with s_g given, as step.h, for the manifolds an n×1 component can sit on: euclidean, sphere and oblique
// (one column: the same manifold) and stiefel with qr (St(n, 1) is the sphere; Q of QR with diag(R) > 0 is
// x/‖x‖). Cayley and unknown codes leave the row as it is (callers refuse them: cayley needs A <= 8).
//
// The row is streamed instead of held in registers: the reductions are sums over the row, so the math
// runs as a few passes over p, g and m with a sum between passes. `Ctx` says how a pass is split and how
// its sums are made: on the CPU one thread does the row (an `omp simd` loop, sums in double); on the GPU
// the threads of a block share it (csrc/cuda/rows.cuh: a block reduction). Ctx provides
//   using Acc;                                           the accumulator type of the sums,
//   template <class F> void each(int64_t n, F f);        f(i) for this worker's share of [0, n),
//   template <int K, class F> void reduce(int64_t n, F f, Acc (&s)[K]);
//                                                        the same, f(i, v0, v1) setting element i's terms
//                                                        (K = 1: v0 only); s[k] ← their sums over the row.
// Every worker visits the same indices in every pass, so a pass may overwrite what it read; f must not
// depend on other elements than i (the CPU vectorises the loops on that promise).
#pragma once
#include <type_traits>
#include "codes.h"
#include "small_linalg.h"
#include "types.h"

FGSGD_NAMESPACE_BEGIN

// Whether a row of this code moves on the sphere (every curved row code) and retracts by the exponential map.
FGSGD_HD bool row_curved(int code) { return code >= kSphereNormalize && code <= kStiefelQR; }
FGSGD_HD bool row_exp(int code) { return code == kSphereExp || code == kObliqueExp; }
FGSGD_HD bool row_code_ok(int code) { return code >= kEuclidean && code <= kStiefelQR; }

// Whether a reduction into `sums` (an Acc[K]) computes a second sum.
template <class Sums>
constexpr bool second_sum_v = std::extent_v<std::remove_reference_t<Sums>> == 2;

// a = ⟨ω, R·g⟩ (the sphere's tangent projection ξ = R·g − a·ω); 0 for euclidean rows. With `ww`, also *ww = ‖ω‖²
// (the exp rows' step along d⊥ = d − ⟨ω,d⟩ω: ‖d⊥‖² = ‖d‖² − ⟨ω,d⟩²(2 − ‖ω‖²); manifold.h exp_of_large).
template <class Ctx, class T>
FGSGD_HD T row_tangent_dot(Ctx& ctx, int code, const T* p, const T* g, int64_t n, T r, T* ww = nullptr) {
  using Acc = typename Ctx::Acc;
  if (!row_curved(code)) return T(0);
  const T inv_r = T(1) / r;
  if (ww) {  // two lambdas: one generic lambda for both (as in pass 2 of the step) ran exp rows at 5.1 against 4.5 ms
    Acc s[2];
    ctx.reduce(n, [&](int64_t i, Acc& v, Acc& u) {
      const T w = p[i] * inv_r;
      v = Acc(w) * Acc(r * g[i]);
      u = Acc(w) * Acc(w);
    }, s);
    *ww = T(s[1]);
    return T(s[0]);
  }
  Acc s[1];
  ctx.reduce(n, [&](int64_t i, Acc& v, Acc&) { v = Acc(p[i] * inv_r) * Acc(r * g[i]); }, s);
  return T(s[0]);
}

// ‖ξ‖² of one row (step 2's input), in double; wd acts on euclidean rows only. Where a sum in float (the GPU's
// Acc) leaves big_sq_, the row is summed again scaled by row_rescale_of (uniform over the row), as the step does.
template <class Ctx, class T>
FGSGD_HD double row_tangent_sqnorm(Ctx& ctx, int code, const T* p, const T* g, int64_t n, T r, T wd) {
  using Acc = typename Ctx::Acc;
  const T a = row_tangent_dot(ctx, code, p, g, n, r);
  const T w_d = manifold_of(code) == kManEuclidean ? wd : T(0);
  const T inv_r = T(1) / r;
  auto xi_at = [&](int64_t i) { return r * (g[i] + w_d * p[i]) - a * (p[i] * inv_r); };
  Acc s[1];
  ctx.reduce(n, [&](int64_t i, Acc& v, Acc&) {
    const T xi = xi_at(i);
    v = Acc(xi) * Acc(xi);
  }, s);
  if (s[0] <= big_sq_<Acc>()) return double(s[0]);
  const T sc = T(row_rescale_of(T(0)));
  ctx.reduce(n, [&](int64_t i, Acc& v, Acc&) {
    const T xi = xi_at(i) * sc;
    v = Acc(xi) * Acc(xi);
  }, s);
  return double(s[0]) / double(sc) / double(sc);  // (sc² underflows in double)
}

// How a step uses the momentum buffer: none, read and written, written only (the first step).
enum RowMomentum : int { kRowNoMomentum = 0, kRowMomentum = 1, kRowFirstStep = 2 };

// row_step with the momentum mode and nesterov fixed at compile time: the per-element code of every pass
// then has no branch and no conditional memory access (the CPU loops vectorise).
template <int kMom, bool kNesterov, class Ctx, class T>
FGSGD_HD void row_step_impl(Ctx& ctx, int code, T* p, const T* g, T* m, int64_t n, T r, T sg,
                            const StepHParams<T>& h) {
  using Acc = typename Ctx::Acc;
  const bool curved = row_curved(code);
  const T inv_r = T(1) / r;
  const T wd = curved ? T(0) : h.weight_decay;
  const bool exp_map = row_exp(code);
  T ww = T(1);  // ‖ω‖², exp rows only
  const T a = row_tangent_dot(ctx, code, p, g, n, r, exp_map ? &ww : nullptr);
  const T mom = h.momentum, omd = T(1) - h.dampening, lr = h.lr;
  auto xi_at = [&](int64_t i, T w) {  // s_g·Π_ω(R·(g + wd·p)) at i
    return sg * (r * (g[i] + wd * p[i]) - a * w);
  };
  auto buf_at = [&](int64_t i, T xi) {  // step 3: the new momentum buffer
    if constexpr (kMom == kRowFirstStep) return xi;
    if constexpr (kMom == kRowMomentum) return mom * m[i] + omd * xi;
    return T(0);
  };
  auto d_of = [&](T xi, T buf) {  // the retraction's direction
    if constexpr (kMom == kRowNoMomentum) return -lr * xi;
    if constexpr (kNesterov) return -lr * (xi + mom * buf);
    return -lr * buf;
  };
  if (!curved) {
    ctx.each(n, [&](int64_t i) {
      const T w = p[i] * inv_r, xi = xi_at(i, w), buf = buf_at(i, xi);
      if constexpr (kMom != kRowNoMomentum) m[i] = buf;
      p[i] = r * (w + d_of(xi, buf));
    });
    return;
  }
  auto d_again = [&](int64_t i, T w, T& buf) {  // d after pass 2, which wrote the buffer into m
    buf = T(0);
    if constexpr (kMom == kRowNoMomentum) {
      return d_of(xi_at(i, w), buf);
    } else {
      buf = m[i];
      if constexpr (kNesterov) return d_of(xi_at(i, w), buf);
      return -lr * buf;  // neither g nor ξ needed
    }
  };
  const T on_w = exp_map ? T(0) : T(1);  // ‖d‖² (exp) or ‖ω + d‖² (normalize)
  // ‖ω + d‖² or ‖d‖², and for exp rows ⟨ω, d⟩ (the step is along d⊥ = d − ⟨ω,d⟩ω, manifold.h exp_of_large): the
  // second sum only where it is used, chosen at compile time (the CPU loop vectorises either way; summing it in every
  // row cost normalize rows 4.2 against 3.9 ms for 12 M entries, a runtime `if` in the loop 9.3 ms).
  Acc q[2] = {Acc(0), Acc(0)};
  auto pass2 = [&](auto& sums) {
    ctx.reduce(n, [&](int64_t i, Acc& out, Acc& rad_out) {
      const T w = p[i] * inv_r, xi = xi_at(i, w), buf = buf_at(i, xi);
      if constexpr (kMom != kRowNoMomentum) m[i] = buf;
      const T d = d_of(xi, buf), v = on_w * w + d;
      out = Acc(v) * Acc(v);
      if constexpr (second_sum_v<decltype(sums)>) rad_out = Acc(w) * Acc(d);
    }, sums);
  };
  if (exp_map) {
    pass2(q);
  } else {
    Acc q1[1];
    pass2(q1);
    q[0] = q1[0];
  }
  // A huge step (‖v‖² above big_sq_, or overflowed): the same sums of sc·v, sc = row_rescale_of (uniform over the row).
  T sc = T(1);
  if (T(q[0]) > big_sq_<T>()) {
    sc = T(row_rescale_of(T(0)));
    ctx.reduce(n, [&](int64_t i, Acc& out, Acc& rad_out) {
      const T w = p[i] * inv_r;
      T buf;
      const T d = d_again(i, w, buf) * sc, v = on_w * w * sc + d;
      out = Acc(v) * Acc(v);
      rad_out = Acc(w) * Acc(d);
    }, q);
  }
  T alpha, beta;  // ω' = α·ω + β·d
  // An exp row far along ω: ‖d‖² − ⟨ω,d⟩² cancelled (a row near a coordinate axis with a large radial gradient
  // landed 0.05 off its sphere, fp32). Then ω' = cos t·ω + sinc t·d⊥ with d⊥ = d − s·ω formed per element in
  // double, s = ⟨ω,d⟩ (over ‖ω‖² where ω is on its sphere to rounding), and its ω part left by a float sum (the
  // GPU's Acc) removed again (manifold.h exp_of_large): one more pass over the row, uniform per row.
  // (With the rescue's sc: the sums are of sc·d, and t = ‖d⊥‖ is capped as below.)
  double s_d = 0, cos_d = 0, k_d = 0;
  const double sc_d = double(sc);
  bool formed = false;
  if (exp_map && T(tangent_sq_(T(q[0]), T(q[1]), ww)) < T(0.25) * T(q[0])) {
    formed = true;
    const double wwd = double(ww);
    const bool on_sphere = abs_(wwd - 1.0) <= double(on_sphere_tol_of(T(0)));
    s_d = double(q[1]) / (on_sphere ? wwd : 1.0);
    Acc e[2];
    ctx.reduce(n, [&](int64_t i, Acc& ee, Acc& ew) {
      const T w = p[i] * inv_r;
      T buf;
      const double di = sc_d * double(d_again(i, w, buf)) - s_d * double(w);
      ee = Acc(di * di);
      ew = Acc(di * double(w));
    }, e);
    const double b = on_sphere ? double(e[1]) / wwd : 0.0;  // ‖d⊥ − bω‖² = Σd⊥² − b²‖ω‖²
    s_d += b;
    const double tt_d = double(e[0]) - b * b * wwd > 0.0 ? double(e[0]) - b * b * wwd : 0.0;
    if (sc == T(1)) {
      cos_sinc_sq_(tt_d, &cos_d, &k_d);
    } else {
      const double nu = sqrt_(tt_d), cap = double(big_sq_<T>()), t = nu / sc_d < cap ? nu / sc_d : cap;
      cos_d = cos_(t);
      k_d = nu > 0.0 ? sin_(t) / nu : 0.0;
    }
  }
  if (formed) {
    alpha = beta = T(0);
  } else if (exp_map) {
    const T rad = T(q[1]), tt = tangent_sq_(T(q[0]), rad, ww);  // sc·⟨ω,d⟩, sc²‖d⊥‖²
    if (sc == T(1)) {
      cos_sinc_sq_(tt, &alpha, &beta);  // cos t ω + sin t d⊥/t, t = ‖d⊥‖
      alpha -= beta * rad;
    } else {  // t = ‖d⊥‖ capped at big_sq_ (its angle is rounding long before); sin t·d⊥/t = sin t·(sc·d⊥)/√tt
      const T nu = sqrt_(tt), t = nu / sc < big_sq_<T>() ? nu / sc : big_sq_<T>();
      const T sn = tt > T(0) ? sin_(t) / nu : T(0);
      alpha = cos_(t) - sn * rad;
      beta = sn * sc;
    }
  } else {
    alpha = beta = rsqrt_(T(q[0])) * sc;  // (ω + V)/‖ω + V‖
  }
  Acc s[2];
  auto pass3 = [&](auto wn_of) {  // ω' into p, ⟨ω', buf⟩ and ‖ω'‖²
    ctx.reduce(n, [&](int64_t i, Acc& v0, Acc& v1) {
      const T w = p[i] * inv_r;
      T buf;
      const T d = d_again(i, w, buf);
      const T wn = wn_of(w, d);
      p[i] = wn;
      v0 = Acc(wn) * Acc(buf);
      v1 = Acc(wn) * Acc(wn);
    }, s);
  };
  if (formed) {
    pass3([&](T w, T d) { return T(cos_d * double(w) + k_d * (sc_d * double(d) - s_d * double(w))); });
  } else {
    pass3([&](T w, T d) { return alpha * w + beta * d; });
  }
  const T ns = h.stabilize ? rsqrt_(T(s[1])) : T(1);  // step 5: ω'' = ω'/‖ω'‖
  const T cb = T(s[0]) * ns;                            // ⟨ω'', buf⟩
  ctx.each(n, [&](int64_t i) {
    const T wn = p[i] * ns;
    if constexpr (kMom != kRowNoMomentum) m[i] = m[i] - cb * wn;  // transport by projection onto T_ω''
    p[i] = r * wn;
  });
}

// One step of one row in place: p (and m when momentum != 0; read unless first_step) written, g read.
// Passes: (1) a = ⟨ω, R·g⟩; (2) the momentum buffer into m, and ‖ω + d‖² (normalize) or ‖d‖² (exp);
// (3) ω' into p, ⟨ω', buf⟩ and ‖ω'‖²; (4) stabilize (ω'' = ω'/‖ω'‖), transport m ← buf − ⟨ω'', buf⟩ω'',
// p ← R·ω''. Euclidean rows take one pass.
template <class Ctx, class T>
FGSGD_HD void row_step(Ctx& ctx, int code, T* p, const T* g, T* m, int64_t n, T r, T sg_in, const StepHParams<T>& h) {
  if (!row_code_ok(code)) return;
  const T sg = sg_in * h.grad_unscale;  // s_g and GradScaler's unscale (ξ is linear in g: wd = 0 then)
  if (h.momentum == T(0))
    row_step_impl<kRowNoMomentum, false>(ctx, code, p, g, m, n, r, sg, h);
  else if (h.first_step)
    h.nesterov ? row_step_impl<kRowFirstStep, true>(ctx, code, p, g, m, n, r, sg, h)
               : row_step_impl<kRowFirstStep, false>(ctx, code, p, g, m, n, r, sg, h);
  else
    h.nesterov ? row_step_impl<kRowMomentum, true>(ctx, code, p, g, m, n, r, sg, h)
               : row_step_impl<kRowMomentum, false>(ctx, code, p, g, m, n, r, sg, h);
}

FGSGD_NAMESPACE_END
