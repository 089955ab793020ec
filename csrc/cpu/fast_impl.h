// The CPU fast path of the fused step (included once per instruction set by fast_*.cpp, which
// define FGSGD_ISA and FGSGD_FAST_ENTRY). No math of its own: it runs the shared component_step
// of csrc/fgsgd/step.h on Lanes<E, W>, W components at a time.
//
// A range of components is cut into chunks of kChunk. In a chunk, the components are bucketed by
// code (a counting sort of their indices), so every block of W lanes has a single code: the
// manifold switch of the shared math is resolved once per block at compile time (one
// instantiation per code), and lanes never mix manifolds whatever the interleaving of codes.
// A bucket whose size is not a multiple of W is padded with copies of its last index: the copies
// load the same inputs and store the same results, which is harmless. The chunk's p, g, m stay
// in L2 while its buckets run.
#if defined(__GNUC__) && !defined(__clang__)
// Copies of lane arrays must stay vector moves: as memcpy calls (or `rep movs`) they cost more
// than the math and break store-to-load forwarding.
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif
#include "fast.h"
#include "lanes.h"
#include "../fgsgd/batched.h"

FGSGD_NAMESPACE_BEGIN
namespace simd {
namespace {

constexpr int kChunk = 1024;
#ifndef FGSGD_SIMD_REGS
#define FGSGD_SIMD_REGS 2
#endif
template <class E>
using Block = Lanes<E, FGSGD_SIMD_REGS>;  // the lane type: W = Block<E>::kWidth components

// One block: the W components idx[0..W) of chunk base c0 (indices relative to c0). kPlain: no
// rescale and no group step size, so R = s_g = 1 are compile-time constants and their products fold.
template <int kCode, bool kPlain, class S, class E>
__attribute__((flatten)) void step_block(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h,
                                         int64_t c0, const int32_t* idx) {
  using L = Block<E>;
  constexpr int W = L::kWidth;
  constexpr int N = S::kCap;
  E* pp[W];
  const E* gp[W];
  E* mp[W];
  const bool use_m = h.momentum != E(0);
  for (int c = 0; c < W; ++c) {
    const int64_t off = (c0 + idx[c]) * N;
    pp[c] = t.p + off;
    gp[c] = t.g + off;
    mp[c] = use_m ? t.m + off : nullptr;
  }
  L p[N], g[N], m[N];
  load_soa<N>(pp, p);
  load_soa<N>(gp, g);
  if (use_m && !h.first_step) load_soa<N>(mp, m);
  L r(E(1)), sg(E(1));
  if (!kPlain) {
    if (t.rescale) r = L::gather(t.rescale + c0, idx);
    if (t.group_scale)
      for (int c = 0; c < W; ++c) sg.set_lane(c, t.group_scale[t.group_index[c0 + idx[c]]]);
  }
#ifndef FGSGD_EXPERIMENT_NOMATH
  component_step(s, kCode, p, g, m, r, sg, h);
#endif
  store_soa<N>(p, pp);
  if (use_m) store_soa<N>(m, mp);
}

template <int kCode, class S, class E>
void step_blocks(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t c0, const int32_t* idx,
                 int count) {
  constexpr int W = Block<E>::kWidth;
  if (!t.rescale && !t.group_scale) {
    for (int b = 0; b < count; b += W) step_block<kCode, true>(s, t, h, c0, idx + b);
  } else {
    for (int b = 0; b < count; b += W) step_block<kCode, false>(s, t, h, c0, idx + b);
  }
}

template <class S, class E>
void run_code(int k, const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t c0, const int32_t* idx,
              int count) {
  switch (k) {
    case 0: step_blocks<0>(s, t, h, c0, idx, count); break;
    case 1: step_blocks<1>(s, t, h, c0, idx, count); break;
    case 2: step_blocks<2>(s, t, h, c0, idx, count); break;
    case 3: step_blocks<3>(s, t, h, c0, idx, count); break;
    case 4: step_blocks<4>(s, t, h, c0, idx, count); break;
    case 5: step_blocks<5>(s, t, h, c0, idx, count); break;
    default: step_blocks<6>(s, t, h, c0, idx, count); break;
  }
}

template <class S, class E>
void step_range(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t begin, int64_t end) {
  constexpr int W = Block<E>::kWidth;
  static const struct Iota {
    int32_t v[kChunk + W];
    Iota() {
      for (int i = 0; i < kChunk + W; ++i) v[i] = i < kChunk ? i : kChunk - 1;
    }
  } iota;
  int32_t order[kChunk + W];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int n = int(end - c0 < kChunk ? end - c0 : kChunk);
    const uint8_t* codes = t.codes + c0;
    // Counts per code: one vectorisable pass per code (no store-to-load chains on a histogram).
    int count[kNumCodes], known = 0;
    for (int k = 0; k < kNumCodes; ++k) {
      int c = 0;
      for (int i = 0; i < n; ++i) c += codes[i] == k;
      count[k] = c;
      known += c;
    }
    for (int k = 0; k < kNumCodes; ++k) {
      if (count[k] == 0) continue;
      const int32_t* idx;
      if (count[k] == n && n % W == 0) {
        idx = iota.v;  // one code in the whole chunk: blocks of consecutive components
      } else {
        int q = 0;  // the indices with code k, in order (branch-free compaction)
        for (int i = 0; i < n; ++i) {
          order[q] = i;
          q += codes[i] == k;
        }
        for (; q % W; ++q) order[q] = order[q - 1];  // pad the last block with copies
        idx = order;
      }
      run_code(k, s, t, h, c0, idx, (count[k] + W - 1) / W * W);
    }
    if (known != n)  // codes >= kNumCodes: the scalar path (its default branches), as without SIMD
      for (int i = 0; i < n; ++i)
        if (codes[i] >= kNumCodes) step_at(s, t, h, c0 + i);
  }
}

template <class E>
void step_any(const TensorSlot<E>& t, const StepHParams<E>& h, int A, int B, int64_t begin, int64_t end) {
  if (A == 3 && B == 3) step_range(Fixed<3, 3>{}, t, h, begin, end);
}

}  // namespace
}  // namespace simd
FGSGD_NAMESPACE_END

namespace fgsgd {
namespace cpu {
void FGSGD_FAST_ENTRY(step_range)(const TensorSlot<float>& t, const StepHParams<float>& h, int A, int B,
                                  int64_t begin, int64_t end) {
  ::fgsgd::FGSGD_ISA::simd::step_any(t, h, A, B, begin, end);
}
void FGSGD_FAST_ENTRY(step_range)(const TensorSlot<double>& t, const StepHParams<double>& h, int A, int B,
                                  int64_t begin, int64_t end) {
  ::fgsgd::FGSGD_ISA::simd::step_any(t, h, A, B, begin, end);
}
}  // namespace cpu
}  // namespace fgsgd
