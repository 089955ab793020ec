// The CPU fast path of the fused step (included once per instruction set by fast_*.cpp, which
// define FGSGD_ISA and FGSGD_FAST_ENTRY). No math of its own: it runs the shared component_step
// of csrc/fgsgd/step.h on Lanes<E, W>, W components at a time.
//
// Every block of W lanes has a single code (step_range below), so the manifold switch of the shared
// math is resolved at compile time (one instantiation per code) and lanes never mix manifolds.
#if defined(__GNUC__) && !defined(__clang__)
// Copies of lane arrays must stay vector moves: as memcpy calls (or `rep movs`) they cost more
// than the math and break store-to-load forwarding.
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#include "fast.h"
#include "lanes.h"
#include "serial_row.h"
#include "../fgsgd/batched.h"

FGSGD_NAMESPACE_BEGIN
namespace simd {
namespace {

// Registers per lane value: 1 keeps the code of a block small (a mix of codes runs the blocks of
// three codes in turn, which must share the instruction cache); at least 4 lanes per block.
#ifndef FGSGD_SIMD_REGS
#define FGSGD_SIMD_REGS 1
#endif
template <class E>
constexpr int block_regs() {
  constexpr int h = kRegBytes / int(sizeof(E));
  return FGSGD_SIMD_REGS * h >= 4 ? FGSGD_SIMD_REGS : 4 / h;
}
template <class E>
using Block = Lanes<E, block_regs<E>()>;  // the lane type: W = Block<E>::kWidth components

// One block: the W components idx[0..W) of span base c0 (indices relative to c0).
// kCommon: the common configuration, known at compile time so that its branches and products fold
// and the block's code stays small (the blocks of the codes of a mix must share the instruction
// cache): momentum on, no dampening, no nesterov, not the first step, no stabilize, no rescale (R = 1), no group
// step size (s_g = 1; kGroup: s_g read per component, group_clip's step). Any other configuration takes the
// general instantiation.
template <class E>
bool is_common(const TensorSlot<E>& t, const StepHParams<E>& h) {
  return h.momentum != E(0) && h.dampening == E(0) && !h.nesterov && !h.first_step && !h.stabilize && !t.rescale;
}

template <int kCode, bool kCommon, class S, class E, bool kGroup = false, bool kContig = false>
__attribute__((flatten)) void step_block(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h_in,
                                         int64_t c0, const int32_t* idx) {
  using L = Block<E>;
  constexpr int W = L::kWidth;
  constexpr int N = S::kCap;
  StepHParams<E> h = h_in;
  if (kCommon) {
    h.dampening = E(0);
    h.nesterov = false;
    h.first_step = false;
    h.stabilize = false;
  }
  const bool use_m = kCommon || h.momentum != E(0);
  const bool load_m = kCommon || (use_m && !h.first_step);
  int32_t off[W];  // element offsets of the components from the span base (< 2^31: spans are short)
  for (int c = 0; c < W; ++c) off[c] = (kContig ? c : idx[c]) * N;  // kContig: idx is 0..W-1, known here
  // Runtime offsets stay in memory, read by each access (one load, folded into its address): left to
  // itself the compiler vectorizes idx·N and extracts every lane into registers it then spills, which
  // cost more than the loads (AVX2 sphere block: +147 instructions over the compile-time offsets).
  if constexpr (!kContig) asm("" : "+m"(off));
  E* const pb = t.p + c0 * N;
  const E* const gb = t.g + c0 * N;
  E* const mb = use_m ? t.m + c0 * N : nullptr;
  L r(E(1)), sg(E(1));
  if (!kCommon && t.rescale) r = L::gather(t.rescale + c0, idx);
  if ((!kCommon || kGroup) && t.group_scale)
    for (int c = 0; c < W; ++c) sg.set_lane(c, t.group_scale[t.group_index[c0 + idx[c]]]);
  L w[N], xi[N];
  {
    L p[N], g[N];
    load_soa<N>(pb, off, p);
    load_soa<N>(gb, off, g);
    step_tangent(s, kCode, p, g, r, sg, h, w, xi);
  }
  L p[N], m[N];  // m fetched only now: fewer values live at once (fewer register spills)
  if (load_m) {
    load_soa<N>(mb, off, m);
  } else {
    for (int e = 0; e < N; ++e) m[e] = L(E(0));  // not read (first step, or no momentum)
  }
  step_update(s, kCode, w, xi, m, r, h, p);
  store_soa<N>(p, pb, off);
  if (use_m) store_soa<N>(m, mb, off);
}

template <class S, class E>
using BlockFn = void (*)(const S&, const TensorSlot<E>&, const StepHParams<E>&, int64_t, const int32_t*);

template <class S, class E, bool kCommon, bool kGroup = false, bool kContig = false>
struct BlockTable {
  static constexpr BlockFn<S, E> fn[kNumCodes] = {
      &step_block<0, kCommon, S, E, kGroup, kContig>, &step_block<1, kCommon, S, E, kGroup, kContig>,
      &step_block<2, kCommon, S, E, kGroup, kContig>, &step_block<3, kCommon, S, E, kGroup, kContig>,
      &step_block<4, kCommon, S, E, kGroup, kContig>, &step_block<5, kCommon, S, E, kGroup, kContig>,
      &step_block<6, kCommon, S, E, kGroup, kContig>};
};

// ‖ξ‖² (tangent_sqnorm) of the W components idx[0..W) of span base c0 into t.out; h carries only the
// weight decay (euclidean components). Same block structure as step_block: the loads and the tangent
// projection of the shared math, then a per-lane sum of squares.
template <int kCode, class S, class E>
__attribute__((flatten)) void sqnorm_block(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t c0,
                                           const int32_t* idx) {
  using L = Block<E>;
  constexpr int W = L::kWidth;
  constexpr int N = S::kCap;
  int32_t off[W];
  for (int c = 0; c < W; ++c) off[c] = idx[c] * N;
  L r(E(1));
  if (t.rescale) r = L::gather(t.rescale + c0, idx);
  L p[N], g[N], w[N], xi[N];
  load_soa<N>(t.p + c0 * N, off, p);
  load_soa<N>(t.g + c0 * N, off, g);
  tangent(s, kCode, p, g, r, manifold_of(kCode) == kManEuclidean ? h.weight_decay : E(0), w, xi);
  const L sq = dot(s, xi, xi);
  for (int c = 0; c < W; ++c) {
    const E v = sq.lane(c);
    if (v <= big_sq_<E>()) {
      t.out[c0 + idx[c]] = double(v);
    } else {  // ‖ξ‖² leaves the float range: the scalar path sums it in double (step.h tangent_sqnorm)
      sqnorm_at(s, t, h.weight_decay, c0 + idx[c]);
    }
  }
}

template <class S, class E>
struct SqnormTable {
  static constexpr BlockFn<S, E> fn[kNumCodes] = {
      &sqnorm_block<0, S, E>, &sqnorm_block<1, S, E>, &sqnorm_block<2, S, E>, &sqnorm_block<3, S, E>,
      &sqnorm_block<4, S, E>, &sqnorm_block<5, S, E>, &sqnorm_block<6, S, E>};
};

// The scalar path of one component (unknown codes: its default branches, as without SIMD).
template <class S, class E>
using ScalarFn = void (*)(const S&, const TensorSlot<E>&, const StepHParams<E>&, int64_t);
template <class S, class E>
void step_scalar(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t i) { step_at(s, t, h, i); }
template <class S, class E>
void sqnorm_scalar(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t i) {
  sqnorm_at(s, t, h.weight_decay, i);
}

// True when the n codes at c all equal k (n a multiple of 4; word compares).
inline bool all_equal(const uint8_t* c, int n, uint8_t k) {
  const uint32_t kk = 0x01010101u * k;
  uint32_t diff = 0;
  for (int i = 0; i < n; i += 4) {
    uint32_t w;
    memcpy(&w, c + i, 4);
    diff |= w ^ kk;
  }
  return diff == 0;
}

// mk[k], bit j: c[j] == k, for the G (4, 8, or with AVX-512 16) symbols at c and every symbol k < K.
template <int G, int K>
FGSGD_LANE void code_masks(const uint8_t* c, uint32_t* mk) {
#if defined(FGSGD_SIMD_AVX512)
  if constexpr (G == 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
    for (int k = 0; k < K; ++k) mk[k] = _mm_cmpeq_epi8_mask(v, _mm_set1_epi8(char(k)));
    return;
  }
#endif
#if defined(__SSE2__)
  __m128i v;
  if constexpr (G == 8) {
    v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c));
  } else {
    int32_t w;
    memcpy(&w, c, 4);
    v = _mm_cvtsi32_si128(w);
  }
  for (int k = 0; k < K; ++k)
    mk[k] = uint32_t(_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(char(k))))) & ((1u << G) - 1);
#else
  for (int k = 0; k < K; ++k) {
    uint32_t m = 0;
    for (int j = 0; j < G; ++j) m |= uint32_t(c[j] == k) << j;
    mk[k] = m;
  }
#endif
}

// For every 8-bit mask: the positions of its set bits, and how many there are.
struct CompressLut {
  uint8_t pos[256][8];
  uint8_t count[256];
  constexpr CompressLut() : pos{}, count{} {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int j = 0; j < 8; ++j)
        if ((m >> j) & 1) pos[m][c++] = uint8_t(j);
      count[m] = uint8_t(c);
    }
  }
};
constexpr CompressLut kCompress{};

// Software prefetch of the p, g and m of W components kAhead components ahead of the pass. The hardware
// prefetcher alone falls behind when the blocks' cost varies in bursts (e.g. runs of cheap sphere blocks
// after QR blocks, or a mix of codes): measured on an AMD EPYC (AVX2, 1 thread, 1.2 M components, fp32),
// runs of 48 components per code 15.7 → 8.5 ms, a random code per component 14.3 → 11.9 ms, one code
// unchanged (benchmarks/cpu_step.py). 32 to 128 components ahead measured the same.
constexpr int kPrefetchAhead = 64;

template <int N, int W, class E>
FGSGD_LANE void prefetch_ahead(const TensorSlot<E>& t, int64_t c, int64_t end) {
  if (c + kPrefetchAhead + W > end) return;
  const int64_t e0 = (c + kPrefetchAhead) * N;
  for (int b = 0; b < W * N * int(sizeof(E)); b += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(t.p + e0) + b, 1);
    __builtin_prefetch(reinterpret_cast<const char*>(t.g + e0) + b, 0);
    if (t.m) __builtin_prefetch(reinterpret_cast<const char*>(t.m + e0) + b, 1);
  }
}

// Packed codes (2 bits per component, types.h) of components [i0, i0 + n) as bytes into out: a byte of four
// codes at a time through a table (`lut`: packed byte -> four bytes), the ends one by one. The bytes are the
// codes (the tensor's palette), or with `slots` the 2-bit palette indices themselves.
struct PackedDecoder {
  uint32_t lut[256];
  uint8_t pal[4];
  PackedDecoder(const uint32_t* packed, bool slots) {
    for (int v = 0; v < 4; ++v) pal[v] = slots ? uint8_t(v) : uint8_t(palette_code(packed, v));
    for (int b = 0; b < 256; ++b) {
      uint32_t w = 0;
      for (int j = 0; j < 4; ++j) w |= uint32_t(pal[(b >> (2 * j)) & 3]) << (8 * j);
      lut[b] = w;
    }
  }
  template <class E>
  void decode(const TensorSlot<E>& t, int64_t i0, int n, uint8_t* out) const {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(t.packed_codes + 1);  // little endian: 4 codes a byte
    int q = 0;
    for (; q < n && ((i0 + q) & 3) != 0; ++q) out[q] = at(t, i0 + q);
    for (; q + 4 <= n; q += 4) memcpy(out + q, &lut[bytes[(i0 + q) >> 2]], 4);
    for (; q < n; ++q) out[q] = at(t, i0 + q);
  }
  template <class E>
  uint8_t at(const TensorSlot<E>& t, int64_t i) const {
    return pal[packed_slot(t.packed_codes, i)];
  }
};

// One pass over the components in order. W consecutive components of one code (a run, or the
// whole tensor) form a block as they are, run by `contig` (the same blocks with their offsets known at
// compile time: 1.2 M components of one code, 1 thread, AVX-512: sphere 4.75 → 4.44 ms); otherwise
// each component joins the pending block of its code (branch-free: a compare mask per code and a
// table of bit positions); every kFlush components the full pending blocks run, code by code
// (checking for a full block after every append instead mispredicted about once per 8 components:
// a random code per component, AVX2, 1 thread, 1.2 M components: 11.7 → 10.2 ms). So every block
// has a single code whatever the interleaving, and touches only components seen in the last few
// blocks: memory is read in order, once, as by a plain stream. The shorter that window the better: on an
// AMD Zen 4, packed random codes, 1.2 M components, 1 thread, kFlush 32 → 16: AVX2 14.3 → 12.8 ms, AVX-512
// 16.2 → 12.4 ms (kFlush 128: 24 ms; kFlush = W = 8 on AVX2: 13.2 ms); single codes unchanged.
// Pending blocks left at the end are padded with copies of their last index (the copies load the
// same inputs and store the same results: harmless). Packed codes are decoded kChunk at a time first.
//
// The pass classifies by symbols 0..K-1: the codes (K = kNumCodes), or for packed codes the 4 palette slots
// (fn and contig indexed by slot), which leaves fewer masks to build and scan per component. Symbols >= K
// (unknown codes) take the scalar path.
template <int K, class S, class E>
void classify_blocks(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t begin, int64_t end,
                     const BlockFn<S, E>* fn, const BlockFn<S, E>* contig, ScalarFn<S, E> scalar,
                     const PackedDecoder* dec) {
  constexpr int W = Block<E>::kWidth;
#if defined(FGSGD_SIMD_AVX512)
  constexpr int kMaskCodes = 16;  // codes one compare mask covers (code_masks)
#else
  constexpr int kMaskCodes = 8;
#endif
  constexpr int G = W < kMaskCodes ? W : kMaskCodes;  // codes classified per mask
  static_assert(W % 4 == 0, "groups of 4, 8 or 16 codes");
  constexpr int64_t kSpan = int64_t(1) << 24;  // int32 element offsets from the span start (x 64 elements)
  static const struct Iota {
    int32_t v[W];
    Iota() {
      for (int i = 0; i < W; ++i) v[i] = i;
    }
  } iota;
  constexpr int kChunk = 4096;  // packed codes decoded per chunk (a multiple of W, G and kFlush)
  alignas(64) uint8_t decoded[kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kSpan) {
    const int n = int(end - c0 < kSpan ? end - c0 : kSpan);
    const uint8_t* codes = nullptr;  // codes[i - j0]: the code of component c0 + i, for i in the chunk [j0, j1)
    int j0 = 0;
    constexpr int kFlush = W > 16 ? W : 16;  // components classified between two flushes of the pending blocks
    static_assert(kFlush % W == 0 && kChunk % kFlush == 0, "flushes at block and chunk boundaries");
    int32_t pending[K][kFlush + W + 16];  // a flush leaves < W; then kFlush more, 8 or 16 per append
    int count[K] = {};
    auto append = [&](int k, int base, uint32_t m) {  // the components base + (bits of m), code k
      int32_t* pk = pending[k] + count[k];
#if defined(FGSGD_SIMD_AVX512)
      if constexpr (G == 16) {  // 16 bits: the set bits' positions compressed out of 0..15 in one register
        const __m512i at = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(base));
        _mm512_storeu_si512(pk, _mm512_maskz_compress_epi32(__mmask16(m), at));
        count[k] += __builtin_popcount(m);
        return;
      }
#endif
      for (int j = 0; j < 8; ++j) pk[j] = base + kCompress.pos[m][j];
      count[k] += kCompress.count[m];
    };
    auto flush = [&] {  // every full block of pending components, code by code
      for (int k = 0; k < K; ++k) {
        int32_t* pk = pending[k];
        const int cnt = count[k];
        if (cnt < W) continue;
        int b = 0;
        for (; b + W <= cnt; b += W) fn[k](s, t, h, c0, pk + b);
        // the < W left over, moved to the front as one register (b >= W: no overlap; b + W <= kFlush + 2W: in
        // bounds); a copy of the exact count mispredicted on a random mix of codes
        memcpy(pk, pk + b, W * sizeof(int32_t));
        count[k] = cnt - b;
      }
    };
    auto classify = [&](int base, int g) {  // g codes at base, g <= G (a tail: one by one)
      uint32_t mk[K], seen = 0;
      const uint8_t* cb = codes + (base - j0);
      if (g == G) {
        code_masks<G, K>(cb, mk);
      } else {
        for (int k = 0; k < K; ++k) {
          mk[k] = 0;
          for (int j = 0; j < g; ++j) mk[k] |= uint32_t(cb[j] == k) << j;
        }
      }
      for (int k = 0; k < K; ++k) {
        if (mk[k]) append(k, base, mk[k]);
        seen |= mk[k];
      }
      // unknown codes: the scalar path (its default branches), as without SIMD
      for (uint32_t u = ~seen & ((1u << g) - 1); u; u &= u - 1) scalar(s, t, h, c0 + base + __builtin_ctz(u));
    };
    int i = 0;
    for (j0 = 0; j0 < n; j0 += kChunk) {
      const int j1 = n - j0 < kChunk ? n : j0 + kChunk;
      if (dec) {
        dec->decode(t, c0 + j0, j1 - j0, decoded);
        codes = decoded;
      } else {
        codes = t.codes + c0 + j0;
      }
      for (; i + W <= j1; i += W) {
        prefetch_ahead<S::kCap, W>(t, c0 + i, end);
        const uint8_t* ci = codes + (i - j0);
        const int k = ci[0];
        if (k < K && all_equal(ci, W, uint8_t(k))) {
          contig[k](s, t, h, c0 + i, iota.v);  // W consecutive components of one code
        } else {
          for (int j = 0; j < W; j += G) classify(i + j, G);
        }
        if ((i + W) % kFlush == 0) flush();
      }
      if (j1 < n) continue;
      for (; i < n; i += G) classify(i, n - i < G ? n - i : G);
    }
    flush();
    for (int k = 0; k < K; ++k) {
      if (count[k] == 0) continue;
      for (int q = count[k]; q < W; ++q) pending[k][q] = pending[k][count[k] - 1];
      fn[k](s, t, h, c0, pending[k]);
    }
  }
}

template <class S, class E>
void blocks_range(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t begin, int64_t end,
                  const BlockFn<S, E>* fn, const BlockFn<S, E>* contig, ScalarFn<S, E> scalar) {
  if (t.packed_codes == nullptr) return classify_blocks<kNumCodes>(s, t, h, begin, end, fn, contig, scalar, nullptr);
  BlockFn<S, E> slot_fn[4], slot_contig[4];
  bool known = true;
  for (int v = 0; v < 4; ++v) {
    const int k = palette_code(t.packed_codes, v);
    known = known && k < kNumCodes;
    slot_fn[v] = known ? fn[k] : nullptr;
    slot_contig[v] = known ? contig[k] : nullptr;
  }
  if (known) {
    const PackedDecoder dec(t.packed_codes, true);
    classify_blocks<4>(s, t, h, begin, end, slot_fn, slot_contig, scalar, &dec);
  } else {  // a palette with an unknown code: classify by codes, the unknown ones on the scalar path
    const PackedDecoder dec(t.packed_codes, false);
    classify_blocks<kNumCodes>(s, t, h, begin, end, fn, contig, scalar, &dec);
  }
}

template <class S, class E>
void step_range(const S& s, const TensorSlot<E>& t, const StepHParams<E>& h, int64_t begin, int64_t end) {
  const bool common = is_common(t, h);
  const BlockFn<S, E>* fn = !common ? BlockTable<S, E, false>::fn
                            : t.group_scale ? BlockTable<S, E, true, true>::fn : BlockTable<S, E, true>::fn;
  const BlockFn<S, E>* contig = common && !t.group_scale ? BlockTable<S, E, true, false, true>::fn : fn;
  blocks_range(s, t, h, begin, end, fn, contig, &step_scalar<S, E>);
}

template <class E>
void step_any(const TensorSlot<E>& t, const StepHParams<E>& h, int A, int B, int64_t begin, int64_t end) {
  if (A == 3 && B == 3) step_range(Fixed<3, 3>{}, t, h, begin, end);
}

template <class E>
void sqnorm_any(const TensorSlot<E>& t, E wd, int A, int B, int64_t begin, int64_t end) {
  StepHParams<E> h{};
  h.weight_decay = wd;
  if (A == 3 && B == 3)
    blocks_range(Fixed<3, 3>{}, t, h, begin, end, SqnormTable<Fixed<3, 3>, E>::fn, SqnormTable<Fixed<3, 3>, E>::fn,
                 &sqnorm_scalar<Fixed<3, 3>, E>);
}

// Channels-last tiles (interleaved.h) of 3×3 components: W components at a time, entry e of all W one load (or
// store) of a lane value at src + e·stride, the tile side through the AoS <-> SoA transposes of the blocks.
template <class E>
struct TileOffsets {
  int32_t v[Block<E>::kWidth];  // component c of a block at element 9c of the tile
  TileOffsets() {
    for (int c = 0; c < Block<E>::kWidth; ++c) v[c] = 9 * c;
  }
};

// kIn: the interleaved src (entry e of component j at src[e·stride + j]) into the tile dst (dst[9j + e]); else the
// tile src back into the interleaved dst.
template <bool kIn, class E>
void interleaved_copy(const E* src, int64_t stride, int64_t n, E* dst) {
  using L = Block<E>;
  constexpr int W = L::kWidth;
  static const TileOffsets<E> off;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    L lanes[9];
    if constexpr (kIn) {
      for (int e = 0; e < 9; ++e) memcpy(&lanes[e], src + e * stride + j, sizeof(L));
      store_soa<9>(lanes, dst + 9 * j, off.v);
    } else {
      load_soa<9>(src + 9 * j, off.v, lanes);
      for (int e = 0; e < 9; ++e) memcpy(dst + e * stride + j, &lanes[e], sizeof(L));
    }
  }
  for (; j < n; ++j)
    for (int e = 0; e < 9; ++e) (kIn ? dst[9 * j + e] : dst[e * stride + j]) = kIn ? src[e * stride + j] : src[9 * j + e];
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
void FGSGD_FAST_ENTRY(sqnorm_range)(const TensorSlot<float>& t, float wd, int A, int B, int64_t begin, int64_t end) {
  ::fgsgd::FGSGD_ISA::simd::sqnorm_any(t, wd, A, B, begin, end);
}
#if !defined(FGSGD_FAST_FLOAT_ONLY)  // (the AVX-512 unit forwards double to the AVX2 lanes)
void FGSGD_FAST_ENTRY(step_range)(const TensorSlot<double>& t, const StepHParams<double>& h, int A, int B,
                                  int64_t begin, int64_t end) {
  ::fgsgd::FGSGD_ISA::simd::step_any(t, h, A, B, begin, end);
}
void FGSGD_FAST_ENTRY(sqnorm_range)(const TensorSlot<double>& t, double wd, int A, int B, int64_t begin, int64_t end) {
  ::fgsgd::FGSGD_ISA::simd::sqnorm_any(t, wd, A, B, begin, end);
}
#endif
void FGSGD_FAST_ENTRY(interleaved_in)(const float* src, int64_t stride, int, int64_t n, float* tile) {
  ::fgsgd::FGSGD_ISA::simd::interleaved_copy<true>(src, stride, n, tile);
}
void FGSGD_FAST_ENTRY(interleaved_out)(const float* tile, int64_t stride, int, int64_t n, float* dst) {
  ::fgsgd::FGSGD_ISA::simd::interleaved_copy<false>(tile, stride, n, dst);
}
#if !defined(FGSGD_FAST_FLOAT_ONLY)
void FGSGD_FAST_ENTRY(interleaved_in)(const double* src, int64_t stride, int, int64_t n, double* tile) {
  ::fgsgd::FGSGD_ISA::simd::interleaved_copy<true>(src, stride, n, tile);
}
void FGSGD_FAST_ENTRY(interleaved_out)(const double* tile, int64_t stride, int, int64_t n, double* dst) {
  ::fgsgd::FGSGD_ISA::simd::interleaved_copy<false>(tile, stride, n, dst);
}
#endif
void FGSGD_FAST_ENTRY(step_rows)(const TensorSlot<float>& t, const StepHParams<float>& h, int64_t n, int64_t begin,
                                 int64_t end) {
  ::fgsgd::FGSGD_ISA::cpu_rows::step_rows(t, h, n, begin, end);
}
void FGSGD_FAST_ENTRY(step_rows)(const TensorSlot<double>& t, const StepHParams<double>& h, int64_t n, int64_t begin,
                                 int64_t end) {
  ::fgsgd::FGSGD_ISA::cpu_rows::step_rows(t, h, n, begin, end);
}
void FGSGD_FAST_ENTRY(sqnorm_rows)(const TensorSlot<float>& t, float wd, int64_t n, int64_t begin, int64_t end) {
  ::fgsgd::FGSGD_ISA::cpu_rows::sqnorm_rows(t, wd, n, begin, end);
}
void FGSGD_FAST_ENTRY(sqnorm_rows)(const TensorSlot<double>& t, double wd, int64_t n, int64_t begin, int64_t end) {
  ::fgsgd::FGSGD_ISA::cpu_rows::sqnorm_rows(t, wd, n, begin, end);
}
}  // namespace cpu
}  // namespace fgsgd
