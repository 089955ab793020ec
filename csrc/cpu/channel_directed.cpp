// CPU kernel of channel_directed_: at::parallel_for over blocks of kLanes adjacent fibers, each running the shared
// math of csrc/fgsgd/channel_directed.h on its lanes. A block reads 1 KiB of each row of an (L, C) block: rows C·4
// bytes apart are pages apart in a large conv's gradient, and one cache line per row (16 lanes) left the
// prefetchers and the TLB behind (ResNet-50's convs, 2 threads: 19 ms; 1 KiB: 13.6 ms, about one
// SGD(foreach, momentum) step on them; 0.5-2 KiB within the noise, and so were narrower sub-blocks for long
// fibers that keep L rows within 512 KiB of L2 between the passes).
#include "channel_directed.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "../fgsgd/channel_directed.h"

namespace fgsgd {
namespace cpu {
namespace {

template <class T>
constexpr int kLanes = 1024 / int(sizeof(T));  // 1 KiB of each row

template <class T>
void fibers(T* x, int64_t L, int64_t C, int n, bool sobolev, const SobolevCoeffs<T>& c, T inv_lam) {
  constexpr int W = kLanes<T>;
  if (sobolev) {
    if (n == W) sobolev_fibers<T, W>(x, L, C, W, c);  // the full block: constant trip counts
    else sobolev_fibers<T, W>(x, L, C, n, c);
  } else {
    if (n == W) reweighted_fibers<T, W>(x, L, C, W, inv_lam);
    else reweighted_fibers<T, W>(x, L, C, n, inv_lam);
  }
}

}  // namespace

template <class T>
void channel_directed(const std::vector<FiberSlot<T>>& slots, bool sobolev, double lam) {
  constexpr int W = kLanes<T>;
  // tasks: (slot, outer block, lane block), numbered slot after slot
  std::vector<int64_t> first(slots.size() + 1, 0);
  std::vector<SobolevCoeffs<T>> coeffs(slots.size());
  for (size_t k = 0; k < slots.size(); ++k) {
    const FiberSlot<T>& s = slots[k];
    first[k + 1] = first[k] + s.outer * ((s.C + W - 1) / W);
    if (sobolev) coeffs[k] = cast_coeffs<T>(sobolev_coeffs(lam, s.L, kSobolevTail<T>));
  }
  const T inv_lam = sobolev ? T(1) : T(1.0 / lam);
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    size_t k = size_t(std::upper_bound(first.begin(), first.end(), begin) - first.begin()) - 1;
    for (int64_t t = begin; t < end; ++t) {
      while (t >= first[k + 1]) ++k;
      const FiberSlot<T>& s = slots[k];
      const int64_t blocks = (s.C + W - 1) / W, local = t - first[k];
      const int64_t o = local / blocks, c0 = (local % blocks) * W;
      const int n = int(std::min<int64_t>(W, s.C - c0));
      fibers<T>(s.x + o * s.L * s.C + c0, s.L, s.C, n, sobolev, coeffs[k], inv_lam);
    }
  });
}

template void channel_directed<float>(const std::vector<FiberSlot<float>>&, bool, double);
template void channel_directed<double>(const std::vector<FiberSlot<double>>&, bool, double);

}  // namespace cpu
}  // namespace fgsgd
