// Registration of channel_directed_ (schema and CPU implementation): channel-directed gradients, in place.
//   channel_directed_(grads, dim, metric, lam): every fiber of every gradient along `dim` (length L) becomes its
//   gradient under the re-weighted L2 metric ('reweighted': f/λ + mean(f)(1 − 1/λ)) or the Sobolev metric
//   ('sobolev': (I − λΔ)⁻¹ f, Δ the periodic second difference); float32 or float64, contiguous, one dtype and
//   device. DESIGN.md §1, csrc/fgsgd/channel_directed.h.
#include "channel_directed_impl.h"
#include "cpu/channel_directed.h"

namespace fgsgd {
namespace ops {

struct CpuFibers {
  template <class T>
  static void channel_directed(const std::vector<FiberSlot<T>>& s, FiberMetric m, double lam, const Tensor&) {
    cpu::channel_directed(s, m == FiberMetric::kSobolev, lam);
  }
};

}  // namespace ops
}  // namespace fgsgd

TORCH_LIBRARY_FRAGMENT(fgsgd, m) {
  m.def("channel_directed_(Tensor(a!)[] grads, int dim, str metric, float lam) -> ()");
}

TORCH_LIBRARY_IMPL(fgsgd, CPU, m) { m.impl("channel_directed_", &fgsgd::ops::channel_directed_<fgsgd::ops::CpuFibers>); }
TORCH_LIBRARY_IMPL(fgsgd, SparseCPU, m) {
  m.impl("channel_directed_", &fgsgd::ops::channel_directed_<fgsgd::ops::CpuFibers>);
}
