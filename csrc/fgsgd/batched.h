// Batched forms of the component operators: argument records with raw pointers, and one
// function per op that does component `i`. The CPU backend calls them from at::parallel_for,
// the CUDA backend from one thread per component; neither repeats any math.
#pragma once
#include "step.h"

FGSGD_NAMESPACE_BEGIN

// The argument records UnaryArgs and TensorSlot are in types.h.

template <class S, class T>
FGSGD_HD void proj_at(const S& s, const UnaryArgs<T>& a, int64_t i) {
  const int64_t off = i * s.size();
  T x[S::kCap], u[S::kCap];
  load(s, a.x + off, x);
  load(s, a.u + off, u);
  proj(s, a.code, x, u, u);
  store(s, u, a.out + off);
}

template <class S, class T>
FGSGD_HD void retr_at(const S& s, const UnaryArgs<T>& a, int64_t i) {
  const int64_t off = i * s.size();
  T x[S::kCap], v[S::kCap], y[S::kCap];
  load(s, a.x + off, x);
  load(s, a.u + off, v);
  retr(s, a.code, x, v, y);
  store(s, y, a.out + off);
}

template <class S, class T>
FGSGD_HD void projx_at(const S& s, const UnaryArgs<T>& a, int64_t i) {
  const int64_t off = i * s.size();
  T x[S::kCap];
  load(s, a.x + off, x);
  projx_inplace(s, a.code, x);
  store(s, x, a.out + off);
}

template <class S, class T>
FGSGD_HD void norms_at(const S& s, const UnaryArgs<T>& a, int64_t i) {
  T x[S::kCap];
  load(s, a.x + i * s.size(), x);
  norms(s, x, a.out + 3 * i, a.out + 3 * i + 1, a.out + 3 * i + 2);
}

// Packed codes (types.h): the 2-bit palette slot of component i, and the code of palette slot v (word 0).
FGSGD_HD uint32_t packed_slot(const uint32_t* packed, int64_t i) {
  return (packed[1 + (i >> 4)] >> (2 * (i & 15))) & 3u;
}
FGSGD_HD int palette_code(const uint32_t* packed, uint32_t v) { return int((packed[0] >> (8 * v)) & 0xffu); }

// The code of component i: one byte each, or 2 bits each through the tensor's palette (types.h).
template <class T>
FGSGD_HD int code_at(const TensorSlot<T>& t, int64_t i) {
  if (t.packed_codes == nullptr) return int(t.codes[i]);
  return palette_code(t.packed_codes, packed_slot(t.packed_codes, i));
}

template <class T>
FGSGD_HD T rescale_at(const TensorSlot<T>& t, int64_t i) {
  return t.rescale ? t.rescale[i] : T(1);
}

template <class T>
FGSGD_HD T step_scale_at(const TensorSlot<T>& t, int64_t i) {
  return t.group_scale ? t.group_scale[t.group_index[i]] : T(1);
}

// Where component i's entries are in p and g (TensorSlot::interleave): entry e at first + e·stride.
struct Entries {
  int64_t first, stride;
};
template <class T>
FGSGD_HD Entries entries_of(const TensorSlot<T>& t, int S, int64_t i) {
  if (t.interleave == 0) return Entries{i * S, 1};
  const int64_t o = i / t.interleave;
  return Entries{o * S * t.interleave + (i - o * t.interleave), t.interleave};
}

template <class S, class T>
FGSGD_HD void load_entries(const S& s, const T* src, Entries at, T* dst) {
  if (at.stride == 1) return load(s, src + at.first, dst);
  const int n = s.size();
  FGSGD_UNROLL
  for (int e = 0; e < n; ++e) dst[e] = src[at.first + e * at.stride];
}

template <class S, class T>
FGSGD_HD void store_entries(const S& s, const T* src, Entries at, T* dst) {
  if (at.stride == 1) return store(s, src, dst + at.first);
  const int n = s.size();
  FGSGD_UNROLL
  for (int e = 0; e < n; ++e) dst[at.first + e * at.stride] = src[e];
}

// The step of component i (p and g where entries_of says; m contiguous).
template <class S, class T>
FGSGD_HD void step_at(const S& s, const TensorSlot<T>& t, const StepHParams<T>& h, int64_t i) {
  const int64_t off = i * s.size();
  const Entries at = entries_of(t, s.size(), i);
  T p[S::kCap], g[S::kCap], m[S::kCap];
  load_entries(s, t.p, at, p);
  load_entries(s, t.g, at, g);
  const bool use_m = h.momentum != T(0);
  if (use_m && !h.first_step) {
    load(s, t.m + off, m);
  } else {
    for (int e = 0; e < s.size(); ++e) m[e] = T(0);  // not read (first step, or no momentum)
  }
  component_step(s, code_at(t, i), p, g, m, rescale_at(t, i), step_scale_at(t, i), h);
  store_entries(s, p, at, t.p);
  if (use_m) store(s, m, t.m + off);
}

template <class S, class T>
FGSGD_HD void sqnorm_at(const S& s, const TensorSlot<T>& t, T wd, int64_t i) {
  const Entries at = entries_of(t, s.size(), i);
  T p[S::kCap], g[S::kCap];
  load_entries(s, t.p, at, p);
  load_entries(s, t.g, at, g);
  const int code = code_at(t, i);
  t.out[i] = tangent_sqnorm(s, code, p, g, rescale_at(t, i), manifold_of(code) == kManEuclidean ? wd : T(0));
}

// p ← R·projx(p/R) in place (moving a weight onto its manifolds, and `stabilize`).
template <class S, class T>
FGSGD_HD void projx_slot_at(const S& s, const TensorSlot<T>& t, int64_t i) {
  const int64_t off = i * s.size();
  const T r = rescale_at(t, i), inv_r = T(1) / r;
  T x[S::kCap];
  load(s, t.p + off, x);
  for (int k = 0; k < s.size(); ++k) x[k] *= inv_r;
  projx_inplace(s, code_at(t, i), x);
  for (int k = 0; k < s.size(); ++k) x[k] *= r;
  store(s, x, t.p + off);
}

// p ← ratio·p per component (a new rescale R_new = ratio·R_old).
template <class S, class T>
FGSGD_HD void rescale_slot_at(const S& s, const TensorSlot<T>& t, int64_t i) {
  const int64_t off = i * s.size();
  const T f = t.rescale[i];
  for (int k = 0; k < s.size(); ++k) t.p[off + k] *= f;
}

FGSGD_NAMESPACE_END
