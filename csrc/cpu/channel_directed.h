// CPU kernel of channel_directed_ (csrc/fgsgd/channel_directed.h): every fiber of every slot, in place.
#pragma once
#include <vector>

#include "../fgsgd/types.h"

namespace fgsgd {
namespace cpu {

// sobolev: (I − λΔ)⁻¹ f; else the re-weighted L2 metric, f/λ + mean(f)(1 − 1/λ).
template <class T>
void channel_directed(const std::vector<FiberSlot<T>>& slots, bool sobolev, double lam);

}  // namespace cpu
}  // namespace fgsgd
