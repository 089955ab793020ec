// The group step size (DESIGN.md §1, Algorithm 1, step 2) of one group from the ‖ξ_i‖² of its members:
// s_g = 1 / max(1, ‖ξ_g‖/c), ‖ξ_g‖² = Σ_{i∈g} ‖ξ_i‖², summed in double in the order of `members` (so the
// same bits on every run, thread count and device kind: no atomics).
#pragma once
#include "config.h"
#include "types.h"

FGSGD_NAMESPACE_BEGIN

template <class T>
FGSGD_HD T group_scale_at(const GroupScaleArgs<T>& a, int64_t g) {
  double acc = 0.0;
  if (a.members != nullptr) {
    for (int64_t k = a.offsets[g]; k < a.offsets[g + 1]; ++k) acc += a.sqnorm[a.members[k]];
  } else {
    for (int64_t k = a.offsets[g]; k < a.offsets[g + 1]; ++k) acc += a.sqnorm[a.members32[k]];
  }
  const double q = sqrt(acc) / a.clip;
  return T(1.0 / (q > 1.0 ? q : 1.0));
}

FGSGD_NAMESPACE_END
