// The fused step of one *row* component: an n×1 column of any length n (the row view of a 1×1 conv or
// linear weight, one output channel's weights), too long for the small-matrix math of step.h
// (A·B <= kMaxElems). DESIGN.md §1, Algorithm 1, steps 1, 3, 4 and 5 with s_g given, as step.h, for the
// manifolds an n×1 component can sit on: euclidean, sphere and oblique (one column: the same manifold)
// and stiefel with qr (St(n, 1) is the sphere; Q of QR with diag(R) > 0 is x/‖x‖). Cayley and unknown
// codes leave the row as it is (callers refuse them: the cayley retraction needs A <= 8).
//
// The row is streamed instead of held in registers: the reductions are sums over the row, so the math
// runs as a few passes over p, g and m with a sum between passes. `Ctx` says how a pass is split and how
// its partial sums are combined: on the CPU one thread does the row (sums in double); on the GPU the
// threads of a block share it (csrc/cuda/rows.cuh: a block reduction). Ctx provides
//   using Acc;                                      the accumulator type of the sums,
//   template <class F> void each(int64_t n, F f);   f(i) for this worker's share of [0, n),
//   template <int K> void sum(Acc (&v)[K]);         v ← the sums of v over the workers of the row.
// Every worker visits the same indices in every pass, so a pass may overwrite what it read.
#pragma once
#include "codes.h"
#include "small_linalg.h"
#include "types.h"

FGSGD_NAMESPACE_BEGIN

// Whether a row of this code moves on the sphere (every curved row code) and retracts by the exponential map.
FGSGD_HD bool row_curved(int code) { return code >= kSphereNormalize && code <= kStiefelQR; }
FGSGD_HD bool row_exp(int code) { return code == kSphereExp || code == kObliqueExp; }
FGSGD_HD bool row_code_ok(int code) { return code >= kEuclidean && code <= kStiefelQR; }

// a = ⟨ω, R·g⟩ (the sphere's tangent projection ξ = R·g − a·ω); 0 for euclidean rows.
template <class Ctx, class T>
FGSGD_HD T row_tangent_dot(Ctx& ctx, int code, const T* p, const T* g, int64_t n, T r) {
  using Acc = typename Ctx::Acc;
  if (!row_curved(code)) return T(0);
  const T inv_r = T(1) / r;
  Acc s[1] = {Acc(0)};
  ctx.each(n, [&](int64_t i) { s[0] += Acc(p[i] * inv_r) * Acc(r * g[i]); });
  ctx.sum(s);
  return T(s[0]);
}

// ‖ξ‖² of one row (step 2's input); wd acts on euclidean rows only.
template <class Ctx, class T>
FGSGD_HD T row_tangent_sqnorm(Ctx& ctx, int code, const T* p, const T* g, int64_t n, T r, T wd) {
  using Acc = typename Ctx::Acc;
  const T a = row_tangent_dot(ctx, code, p, g, n, r);
  const T w_d = manifold_of(code) == kManEuclidean ? wd : T(0);
  const T inv_r = T(1) / r;
  Acc s[1] = {Acc(0)};
  ctx.each(n, [&](int64_t i) {
    const T xi = r * (w_d != T(0) ? g[i] + w_d * p[i] : g[i]) - a * (p[i] * inv_r);
    s[0] += Acc(xi) * Acc(xi);
  });
  ctx.sum(s);
  return T(s[0]);
}

// One step of one row in place: p (and m when momentum != 0; read unless first_step) written, g read.
// Passes: (1) a = ⟨ω, R·g⟩; (2) the momentum buffer into m, and ‖ω + d‖² (normalize) or ‖d‖² (exp);
// (3) ω' into p, ⟨ω', buf⟩ and ‖ω'‖²; (4) stabilize (ω'' = ω'/‖ω'‖), transport m ← buf − ⟨ω'', buf⟩ω'',
// p ← R·ω''. Euclidean rows take one pass.
template <class Ctx, class T>
FGSGD_HD void row_step(Ctx& ctx, int code, T* p, const T* g, T* m, int64_t n, T r, T sg, const StepHParams<T>& h) {
  using Acc = typename Ctx::Acc;
  if (!row_code_ok(code)) return;
  const bool curved = row_curved(code), use_m = h.momentum != T(0);
  const T inv_r = T(1) / r;
  const T wd = curved ? T(0) : h.weight_decay;
  const T a = row_tangent_dot(ctx, code, p, g, n, r);
  auto xi_at = [&](int64_t i, T w) {  // s_g·Π_ω(R·(g + wd·p)) at i
    return sg * (r * (wd != T(0) ? g[i] + wd * p[i] : g[i]) - a * w);
  };
  auto buf_at = [&](int64_t i, T xi) {  // step 3: the new momentum buffer
    return h.first_step ? xi : h.momentum * m[i] + (T(1) - h.dampening) * xi;
  };
  auto d_of = [&](T xi, T buf) {  // the retraction's direction
    return use_m ? -h.lr * (h.nesterov ? xi + h.momentum * buf : buf) : -h.lr * xi;
  };
  if (!curved) {
    ctx.each(n, [&](int64_t i) {
      const T w = p[i] * inv_r, xi = xi_at(i, w);
      const T buf = use_m ? buf_at(i, xi) : T(0);
      if (use_m) m[i] = buf;
      p[i] = r * (w + d_of(xi, buf));
    });
    return;
  }
  const bool exp_map = row_exp(code);
  Acc q[1] = {Acc(0)};
  ctx.each(n, [&](int64_t i) {
    const T w = p[i] * inv_r, xi = xi_at(i, w);
    const T buf = use_m ? buf_at(i, xi) : T(0);
    if (use_m) m[i] = buf;
    const T v = exp_map ? d_of(xi, buf) : w + d_of(xi, buf);
    q[0] += Acc(v) * Acc(v);
  });
  ctx.sum(q);
  T c = T(0), sc = T(0), inv = T(0);
  if (exp_map)
    cos_sinc_(sqrt_(T(q[0])), &c, &sc);  // cos‖V‖ ω + sin‖V‖ V/‖V‖
  else
    inv = rsqrt_(T(q[0]));  // (ω + V)/‖ω + V‖
  Acc s[2] = {Acc(0), Acc(0)};
  const bool d_from_buf = use_m && !h.nesterov;  // d = −lr·buf: pass 3 needs neither g nor ξ
  ctx.each(n, [&](int64_t i) {
    const T w = p[i] * inv_r;
    const T buf = use_m ? m[i] : T(0);
    const T d = d_from_buf ? -h.lr * buf : d_of(xi_at(i, w), buf);
    const T wn = exp_map ? c * w + sc * d : (w + d) * inv;
    p[i] = wn;
    s[0] += Acc(wn) * Acc(buf);
    s[1] += Acc(wn) * Acc(wn);
  });
  ctx.sum(s);
  const T ns = h.stabilize ? rsqrt_(T(s[1])) : T(1);  // step 5: ω'' = ω'/‖ω'‖
  const T cb = T(s[0]) * ns;                            // ⟨ω'', buf⟩
  ctx.each(n, [&](int64_t i) {
    const T wn = p[i] * ns;
    if (use_m) m[i] = m[i] - cb * wn;  // transport by projection onto T_ω''
    p[i] = r * wn;
  });
}

FGSGD_NAMESPACE_END
