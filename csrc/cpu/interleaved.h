// Channels-last conv weights on the CPU: "interleaved" components. A weight (O, I, kh, kw) in
// torch.channels_last holds its values as (O, kh, kw, I): component c = o·I + j (the kh×kw filter of output o,
// input j) has its entry e (row-major in the filter, S = kh·kw entries) at o·S·I + e·I + j, L = I apart. The
// step's kernels take contiguous components (entry e of c at c·S + e), so a run of components goes through a tile in
// cache: its p and g transposed in, the unchanged kernels run on the tile, p transposed back. Memory is read and
// written once, as for a contiguous weight; the alternative, a contiguous copy of the weight and its gradient made
// in memory before the step and the weight written back after (fgsgd_cuda/functional.py staged), moves every value
// three more times. The transposes cost compute, not memory: see prefetch_rows.
//
// The gradient has the weight's layout; the momentum buffer (and R, the group indices, the codes) are indexed by
// component and stay contiguous (the tile reads them in place).
#pragma once
#include <stdint.h>

#include <algorithm>

#include "../fgsgd/batched.h"

namespace fgsgd {
namespace cpu {

// Entry e of n components, `stride` apart in src (entry e of component j at src[e·stride + j]), to / from the
// contiguous tile dst (dst[j·S + e]); the SIMD ones (fast.h) for S = 9.
template <class T>
struct Transposer {
  void (*in)(const T* src, int64_t stride, int S, int64_t n, T* dst);
  void (*out)(const T* tile, int64_t stride, int S, int64_t n, T* dst);
};

template <class T>
void interleaved_in_scalar(const T* src, int64_t stride, int S, int64_t n, T* dst) {
  for (int e = 0; e < S; ++e)
    for (int64_t j = 0; j < n; ++j) dst[j * S + e] = src[e * stride + j];
}

template <class T>
void interleaved_out_scalar(const T* tile, int64_t stride, int S, int64_t n, T* dst) {
  for (int e = 0; e < S; ++e)
    for (int64_t j = 0; j < n; ++j) dst[e * stride + j] = tile[j * S + e];
}

// Calls f(q, k, offset) for the segments of components [b, b + n) that lie in one output channel each: k
// components from the tile's q-th, whose entries start at element `offset` of the weight.
template <class F>
void channel_segments(int64_t L, int S, int64_t b, int64_t n, F&& f) {
  for (int64_t q = 0; q < n;) {
    const int64_t o = (b + q) / L, j = b + q - o * L, k = std::min(n - q, L - j);
    f(q, k, o * L * S + j);
    q += k;
  }
}

// Software prefetch of k components' entries (S rows of k values, L apart, from element `at`) of p and g: the next
// tile's, fetched while the current one is computed. A tile reads 9 short streams per tensor, which the hardware
// prefetcher follows poorly: a step on a (512, 512, 3, 3) channels-last fp32 weight, one code, 1 thread, AVX-512,
// AMD EPYC Zen 4, took 4.67 ms without it and 3.92 ms with it (1.75 ms contiguous); the transposes alone, 2.1 ms.
template <class T>
inline void prefetch_rows(const TensorSlot<T>& t, int64_t L, int S, int64_t k, int64_t at) {
  const int64_t bytes = k * int64_t(sizeof(T));
  for (int e = 0; e < S; ++e) {
    const char* p = reinterpret_cast<const char*>(t.p + at + e * L);
    const char* g = t.g ? reinterpret_cast<const char*>(t.g + at + e * L) : nullptr;
    for (int64_t o = 0; o < bytes; o += 64) {
      __builtin_prefetch(p + o, 1);
      if (g) __builtin_prefetch(g + o, 0);
    }
  }
}

// Runs range(tile_slot, 0, n) over components [begin, end) of the interleaved slot t (L components per output
// channel, S entries each), a tile at a time. A tile may span output channels (L = 64 would otherwise leave the
// fast path a partial block per code in every tile). `writes_p`: the range changes p (the step), which then goes
// back; the sqnorm only reads. The tile slot's other pointers are t's, offset to the tile's first component;
// packed codes are unpacked into the tile's own bytes.
template <class T, class Range>
void interleaved_range(const TensorSlot<T>& t, int64_t L, int S, int64_t begin, int64_t end, bool writes_p,
                       const Transposer<T>& tr, Range&& range) {
  // 512 3×3 components: p and g tiles of 18 KiB each (fp32), a whole output channel of a 512-channel layer (256:
  // 4.18 ms instead of 3.86 ms on the weight above, without the prefetch)
  constexpr int kTileElems = 4608;
  alignas(64) T pt[kTileElems];
  alignas(64) T gt[kTileElems];
  alignas(64) uint8_t ct[kTileElems];
  const int64_t tile = std::max(1, kTileElems / S / 16 * 16);  // whole SIMD blocks where S allows
  for (int64_t b = begin; b < end;) {
    const int64_t n = std::min(end - b, tile);
    channel_segments(L, S, b, n, [&](int64_t q, int64_t k, int64_t at) {
      tr.in(t.p + at, L, S, k, pt + q * S);
      if (t.g) tr.in(t.g + at, L, S, k, gt + q * S);
    });
    const int64_t next = std::min(end - b - n, tile);  // the next tile's weight and gradient lines, fetched now
    if (next > 0)
      channel_segments(L, S, b + n, next, [&](int64_t, int64_t k, int64_t at) { prefetch_rows(t, L, S, k, at); });
    TensorSlot<T> s = t;
    s.interleave = 0;  // the tile is contiguous
    s.p = pt;
    s.g = t.g ? gt : nullptr;
    s.n = n;
    if (t.m) s.m = t.m + b * S;
    if (t.rescale) s.rescale = t.rescale + b;
    if (t.group_index) s.group_index = t.group_index + b;
    if (t.out) s.out = t.out + b;
    if (t.packed_codes) {
      for (int64_t q = 0; q < n; ++q) ct[q] = uint8_t(code_at(t, b + q));
      s.codes = ct;
      s.packed_codes = nullptr;
    } else {
      s.codes = t.codes + b;
    }
    range(s, int64_t(0), n);
    if (writes_p)
      channel_segments(L, S, b, n, [&](int64_t q, int64_t k, int64_t at) { tr.out(pt + q * S, L, S, k, t.p + at); });
    b += n;
  }
}

}  // namespace cpu
}  // namespace fgsgd
