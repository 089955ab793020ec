// Registration of every fgsgd op (schemas) and its CPU implementation.
//
// Schemas (all tensors contiguous, except that step_ and tangent_sqnorm take a channels-last (O, I, kh, kw)
// weight with its channels-last gradient, on every device; components are (N, A, B) with A*B <= 64; float32 or float64):
//   proj(x, u, code) -> Π_x(u)                      retr(x, v, code) -> Retr_x(v)
//   projx(x, code)   -> exact projection of x       norms(x) -> (N, 3) [Frobenius, spectral, ℓ2→1]
//   step_(params, grads, momentum_buffers, codes, rescale, group_index, group_scale, lr, momentum,
//         dampening, nesterov, weight_decay, first_step, stabilize, steps=None, found_inf=None, lr_tensor=None,
//         stabilize_every=0, grad_scale=None)
//       the fused FG-SGD step (DESIGN.md §1 steps 1, 3, 4, 5) of many tensors of one component shape, in
//       place. codes: uint8 (N,), or packed 2 bits each (int32, 1 + ceil(N/16): fgsgd_cuda/codes.py), per
//       tensor; rescale R: (N,) or an empty list (R = 1);
//       group_index int32 (N,) with group_scale (G,): the group step size s_g, or both empty (s_g = 1).
//       Run-time controls (csrc/fgsgd/step_control.h), read when the step runs, never on the host of a CUDA
//       step: found_inf (float32, one element) skips the whole step when nonzero; lr_tensor replaces lr;
//       steps (one float32 count per tensor) replace stabilize (stabilize_every) and decide first_step (count
//       0), which first_step = true still forces (new buffers), and are incremented by a step that is not skipped; grad_scale (float32, one element: GradScaler's scale) makes
//       the step read g / grad_scale (weight_decay must be 0).
//   tangent_sqnorm(params, grads, codes, rescale, weight_decay) -> ‖Π_ω(R·g)‖² of every component,
//       concatenated over the tensors (the input of the group step size, step 2), float64 for every dtype.
//   projx_(params, codes, rescale): p ← R·projx(p/R) in place.
//   rescale_(params, codes, ratio): p ← ratio·p per component, in place (a new rescale R).
//   group_scale(sqnorm, members, offsets, group_clip, dtype=None) -> s_g of every group (step 2), in dtype (default:
//       sqnorm's): members (int64 or int32) lists the components of group g at [offsets[g], offsets[g+1]) (int64,
//       G + 1 entries); sqnorm float64 (or float32, taken as float64).
#include "op_impl.h"
#include "cpu/kernels.h"

namespace fgsgd {
namespace ops {

struct CpuBackend {
  template <class T> static void proj(const UnaryArgs<T>& a, const Tensor& x) { cpu::proj(a, rows_of(x), cols_of(x)); }
  template <class T> static void retr(const UnaryArgs<T>& a, const Tensor& x) { cpu::retr(a, rows_of(x), cols_of(x)); }
  template <class T> static void projx(const UnaryArgs<T>& a, const Tensor& x) { cpu::projx(a, rows_of(x), cols_of(x)); }
  template <class T> static void norms(const UnaryArgs<T>& a, const Tensor& x) { cpu::norms(a, rows_of(x), cols_of(x)); }
  // The controls are read here, on the host: tensors whose resolved hyper-parameters agree run together.
  template <class T>
  static void step(const std::vector<TensorSlot<T>>& s, const Tensor& p0, const StepHParams<T>& h,
                   const StepControl& c) {
    if (step_skipped(c)) return;
    std::vector<TensorSlot<T>> part[4];  // by (first_step, stabilize)
    StepHParams<T> hp[4];
    for (const TensorSlot<T>& t : s) {
      const StepHParams<T> r = resolve_step(h, c, t.step);
      const int k = 2 * int(r.first_step) + int(r.stabilize);
      part[k].push_back(t);
      hp[k] = r;
    }
    for (int k = 0; k < 4; ++k)
      if (!part[k].empty()) cpu::multi_step(part[k], rows_of(p0), cols_of(p0), hp[k]);
    for (const TensorSlot<T>& t : s)
      if (t.step != nullptr) *t.step += 1.0f;
  }
  template <class T>
  static void sqnorm(const std::vector<TensorSlot<T>>& s, const Tensor& p0, T wd) {
    cpu::multi_sqnorm(s, rows_of(p0), cols_of(p0), wd);
  }
  template <class T> static void projx_slots(const std::vector<TensorSlot<T>>& s, const Tensor& p0) {
    cpu::multi_projx(s, rows_of(p0), cols_of(p0));
  }
  template <class T> static void rescale_slots(const std::vector<TensorSlot<T>>& s, const Tensor& p0) {
    cpu::multi_rescale(s, rows_of(p0), cols_of(p0));
  }
  template <class T> static void group_scale(const GroupScaleArgs<T>& a, const Tensor&) { cpu::group_scale(a); }
};

}  // namespace ops
}  // namespace fgsgd

TORCH_LIBRARY(fgsgd, m) {
  m.def("proj(Tensor x, Tensor u, int code) -> Tensor");
  m.def("retr(Tensor x, Tensor v, int code) -> Tensor");
  m.def("projx(Tensor x, int code) -> Tensor");
  m.def("norms(Tensor x) -> Tensor");
  m.def(
      "step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] codes, Tensor[] rescale, "
      "Tensor[] group_index, Tensor[] group_scale, float lr, float momentum, float dampening, bool nesterov, "
      "float weight_decay, bool first_step, bool stabilize, Tensor(c!)[]? steps=None, Tensor? found_inf=None, "
      "Tensor? lr_tensor=None, int stabilize_every=0, Tensor? grad_scale=None) -> ()");
  m.def("tangent_sqnorm(Tensor[] params, Tensor[] grads, Tensor[] codes, Tensor[] rescale, float weight_decay) -> Tensor");
  m.def("projx_(Tensor(a!)[] params, Tensor[] codes, Tensor[] rescale) -> ()");
  m.def("rescale_(Tensor(a!)[] params, Tensor[] codes, Tensor[] ratio) -> ()");
  m.def("group_scale(Tensor sqnorm, Tensor members, Tensor offsets, float group_clip, ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fgsgd, CPU, m) { fgsgd::ops::register_impls<fgsgd::ops::CpuBackend>(m); }
// Sparse inputs dispatch to SparseCPU: the same implementation, whose checks reject them by name.
TORCH_LIBRARY_IMPL(fgsgd, SparseCPU, m) { fgsgd::ops::register_impls<fgsgd::ops::CpuBackend>(m); }

// The Python module fgsgd_cuda._C: importing it registers the ops above; `with_cuda` says whether
// this build has the CUDA kernels.
#include <torch/extension.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef FGSGD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // The CPU step's instruction set (csrc/cpu/kernels.h): "avx2", "base" or "scalar".
  m.def("_cpu_isa", [] { return std::string(fgsgd::cpu::isa()); });
  m.def("_set_cpu_isa", [](const std::string& name) { return fgsgd::cpu::set_isa(name.c_str()); });
}
