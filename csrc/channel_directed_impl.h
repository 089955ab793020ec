// The torch-facing implementation of channel_directed_ (csrc/fgsgd/channel_directed.h), written once for the CPU
// (channel_directed_ops.cpp) and CUDA (channel_directed_ops_cuda.cpp) backends. Checks name the argument.
#pragma once
#include <cmath>
#include <vector>

#include "op_impl.h"

namespace fgsgd {
namespace ops {

enum class FiberMetric : int { kReweighted = 0, kSobolev = 1 };

inline FiberMetric fiber_metric(c10::string_view name, double lam) {
  const bool sobolev = name == "sobolev", reweighted = name == "reweighted";
  TORCH_CHECK(sobolev || reweighted, "fgsgd: metric must be 'sobolev' or 'reweighted', got '", std::string(name), "'");
  TORCH_CHECK(std::isfinite(lam) && (sobolev ? lam >= 0 : lam > 0), "fgsgd: lam must be finite and ",
              sobolev ? ">= 0 for the sobolev metric" : "> 0 for the reweighted metric", ", got ", std::to_string(lam));
  return sobolev ? FiberMetric::kSobolev : FiberMetric::kReweighted;
}

// The (outer, L, C) view of every gradient, fibers along `dim`; all of one dtype and device, contiguous.
template <class T>
std::vector<FiberSlot<T>> fiber_slots(TensorList grads, int64_t dim) {
  std::vector<FiberSlot<T>> slots;
  slots.reserve(grads.size());
  for (size_t k = 0; k < grads.size(); ++k) {
    const Tensor& g = grads[k];
    const ArgName name("grads", k);
    check_dense(g, name);
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type() && g.device() == grads[0].device(), "fgsgd: ", name.str(),
                " differs in dtype or device from grads[0] (", g.scalar_type(), " on ", g.device(), " against ",
                grads[0].scalar_type(), " on ", grads[0].device(), ")");
    TORCH_CHECK(dim < g.dim(), "fgsgd: dim ", num(dim), " is out of range for ", name.str(), " of shape ", shape_str(g));
    TORCH_CHECK(g.is_contiguous(), "fgsgd: ", name.str(), " must be contiguous");
    FiberSlot<T> s{g.data_ptr<T>(), 1, g.size(dim), 1};
    for (int64_t d = 0; d < dim; ++d) s.outer *= g.size(d);
    for (int64_t d = dim + 1; d < g.dim(); ++d) s.C *= g.size(d);
    if (g.numel() > 0) slots.push_back(s);
  }
  return slots;
}

// channel_directed_(grads, dim, metric, lam): every fiber of every gradient along `dim` in place (re-weighted L2
// or Sobolev, DESIGN.md §1).
template <class Backend>
void channel_directed_(TensorList grads, int64_t dim, c10::string_view metric, double lam) {
  const FiberMetric m = fiber_metric(metric, lam);
  TORCH_CHECK(dim >= 0, "fgsgd: dim must be >= 0, got ", num(dim));
  if (grads.empty()) return;
  check_dense(grads[0], ArgName("grads", 0));
  TORCH_CHECK(grads[0].scalar_type() == at::kFloat || grads[0].scalar_type() == at::kDouble,
              "fgsgd: grads must be float32 or float64, got ", grads[0].scalar_type());
  FGSGD_FLOATING(grads[0].scalar_type(), [&] {
    const std::vector<FiberSlot<T>> slots = fiber_slots<T>(grads, dim);
    if (!slots.empty()) Backend::channel_directed(slots, m, lam, grads[0]);
  });
}

}  // namespace ops
}  // namespace fgsgd
