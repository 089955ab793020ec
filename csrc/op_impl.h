// The torch-facing implementation of every op, written once and instantiated for each device
// backend (CPU in ops.cpp, CUDA in ops_cuda.cpp). Checks name the argument and the problem.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fgsgd/batched.h"
#include "fgsgd/group_scale.h"
#include "fgsgd/step_control.h"

namespace fgsgd {
namespace ops {

using at::Tensor;
using at::TensorList;

// Numbers go into error messages as strings made by std::to_string, never through an ostream: where the
// extension ends up with its own copy of libstdc++'s stream code (seen with torch 2.11's CUDA build on an
// Ubuntu 24.04 image, where _C linked no libstdc++.so), inserting an integer into c10::str's stream
// used the locale facets of the other copy and crashed (or, in a local -static-libstdc++ build, cut the
// message off at the first number).
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// An argument's name in error messages ("x", "params[3]", "codes[3] (packed: int32)"), spelled out only when a
// check fails: building the strings of every tensor on every call cost more host time than the checks.
struct ArgName {
  const char* base;
  int64_t index = -1;
  const char* suffix = "";
  ArgName(const char* b) : base(b) {}  // NOLINT: implicit, so that checks take a plain name too
  ArgName(const char* b, size_t k, const char* sfx = "") : base(b), index(int64_t(k)), suffix(sfx) {}
  std::string str() const { return std::string(base) + (index >= 0 ? "[" + num(index) + "]" : "") + suffix; }
};

// Checked first: sparse tensors have no strides (is_contiguous() would throw a message that names
// no argument), and they reach these kernels through the SparseCPU/SparseCUDA registrations.
inline void check_dense(const Tensor& t, const ArgName& name) {
  TORCH_CHECK(t.layout() == at::kStrided, "fgsgd: ", name.str(), " must be dense, got a sparse tensor (layout ",
              t.layout(), ")");
}

// A conv weight (O, I, kh, kw) in torch.channels_last that is not also contiguous, with kh·kw <= kMaxElems: its
// kh×kw components are interleaved (csrc/cpu/interleaved.h), L = I apart. Longer kh×1 filters are row components
// (row_step.h), streamed in their contiguous layout only: such a weight is refused as not contiguous.
inline bool is_interleaved(const Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.size(2) * x.size(3) <= kMaxElems &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x must be (N, A, B), contiguous, float32/float64, A*B <= 64; with `rows`, also (N, n, 1) for any n
// (row components: csrc/fgsgd/row_step.h); with `leading` (the multi-tensor ops), any (..., A, B): the
// components are the last two dimensions (a conv weight (O, I, kh, kw) as it is), N the product of the others;
// with `interleaved`, a channels-last conv weight too.
inline void check_components(const Tensor& x, const ArgName& name, bool rows = false, bool leading = false,
                             bool interleaved = false) {
  check_dense(x, name);
  TORCH_CHECK(leading ? x.dim() >= 3 : x.dim() == 3, "fgsgd: ", name.str(), " must have shape (N, A, B)",
              leading ? " or (..., A, B)" : "", ", got ", shape_str(x));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fgsgd: ", name.str(),
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() || (interleaved && is_interleaved(x)), "fgsgd: ", name.str(), " must be contiguous",
              interleaved ? " (or a channels-last (O, I, kh, kw) weight)" : "");
  const int64_t A = x.size(-2), B = x.size(-1);
  if (rows && B == 1 && A > kMaxElems) {  // the backends take A as an int (rows_of)
    TORCH_CHECK(A <= INT32_MAX, "fgsgd: ", name.str(), " rows must have at most 2^31 - 1 entries, got ", num(A));
    return;
  }
  TORCH_CHECK(A >= 1 && B >= 1 && A * B <= kMaxElems, "fgsgd: ", name.str(), " components must have 1 <= A*B <= ",
              num(kMaxElems), rows ? " (or be n×1 rows of any length)" : "", ", got ", num(A), "x", num(B));
}

// A and B of a checked (..., A, B) tensor's components, and their number.
inline int rows_of(const Tensor& x) { return int(x.size(-2)); }
inline int cols_of(const Tensor& x) { return int(x.size(-1)); }
// The number of A×B components of a checked (..., A, B) tensor.
inline int64_t components_of(const Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 0; d + 2 < x.dim(); ++d) n *= x.size(d);
  return n;
}

// t like ref: shape, dtype, device; contiguous, or with `same_layout` in ref's layout (both channels-last).
inline void check_like(const Tensor& t, const Tensor& ref, const ArgName& name, const ArgName& ref_name,
                       bool same_layout = false) {
  check_dense(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "fgsgd: ", name.str(), " has shape ", shape_str(t), " but ", ref_name.str(),
              " has shape ", shape_str(ref));
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fgsgd: ", name.str(), " has dtype ", t.scalar_type(), " but ",
              ref_name.str(), " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fgsgd: ", name.str(), " is on ", t.device(), " but ", ref_name.str(),
              " is on ", ref.device());
  if (same_layout && is_interleaved(ref)) {
    TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "fgsgd: ", name.str(), " must be channels-last, as ",
                ref_name.str(), " is");
    return;
  }
  TORCH_CHECK(t.is_contiguous(), "fgsgd: ", name.str(), " must be contiguous");
}

inline void check_vector(const Tensor& t, int64_t n, at::ScalarType dtype, const Tensor& ref, const ArgName& name) {
  check_dense(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fgsgd: ", name.str(), " must have shape (", num(n), ",), got ",
              shape_str(t));
  TORCH_CHECK(t.scalar_type() == dtype, "fgsgd: ", name.str(), " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fgsgd: ", name.str(), " is on ", t.device(), " but the parameters are on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), "fgsgd: ", name.str(), " must be contiguous");
}

inline void check_code(int64_t code, const Tensor& x) {
  TORCH_CHECK(code >= 0 && code < kNumCodes, "fgsgd: code must be in [0, ", num(kNumCodes - 1), "], got ", num(code));
  const int64_t A = x.size(-2), B = x.size(-1);
  if (manifold_of(int(code)) == kManStiefel)
    TORCH_CHECK(A >= B, "fgsgd: code ", num(code), " selects the stiefel manifold, which needs components with A >= B, "
                "got ", num(A), "x", num(B));
  if (code == kStiefelCayley)
    TORCH_CHECK(A <= kMaxCayleyRows, "fgsgd: code ", num(code), " selects the cayley retraction, which supports A <= ",
                num(kMaxCayleyRows), ", got A = ", num(A));
}

template <class T>
UnaryArgs<T> unary_args(const Tensor& x, const Tensor* u, Tensor& out, int64_t code) {
  return UnaryArgs<T>{x.data_ptr<T>(), u ? u->data_ptr<T>() : nullptr, out.data_ptr<T>(), x.size(0), int(code)};
}

#define FGSGD_FLOATING(dtype, ...)                                    \
  [&] {                                                               \
    if ((dtype) == at::kDouble) {                                     \
      using T = double;                                               \
      return __VA_ARGS__();                                           \
    }                                                                 \
    using T = float;                                                  \
    return __VA_ARGS__();                                             \
  }()

template <class Backend>
Tensor proj(const Tensor& x, const Tensor& u, int64_t code) {
  check_components(x, "x");
  check_like(u, x, "u", "x");
  check_code(code, x);
  Tensor out = at::empty_like(x);
  FGSGD_FLOATING(x.scalar_type(), [&] { Backend::proj(unary_args<T>(x, &u, out, code), x); });
  return out;
}

template <class Backend>
Tensor retr(const Tensor& x, const Tensor& v, int64_t code) {
  check_components(x, "x");
  check_like(v, x, "v", "x");
  check_code(code, x);
  Tensor out = at::empty_like(x);
  FGSGD_FLOATING(x.scalar_type(), [&] { Backend::retr(unary_args<T>(x, &v, out, code), x); });
  return out;
}

template <class Backend>
Tensor projx(const Tensor& x, int64_t code) {
  check_components(x, "x");
  check_code(code, x);
  Tensor out = at::empty_like(x);
  FGSGD_FLOATING(x.scalar_type(), [&] { Backend::projx(unary_args<T>(x, nullptr, out, code), x); });
  return out;
}

template <class Backend>
Tensor norms(const Tensor& x) {
  check_components(x, "x");
  Tensor out = at::empty({x.size(0), 3}, x.options());
  FGSGD_FLOATING(x.scalar_type(), [&] { Backend::norms(unary_args<T>(x, nullptr, out, 0), x); });
  return out;
}

// Optional per-tensor lists are either empty (value 1 / unused) or one entry per parameter.
inline void check_list_len(TensorList l, size_t n, const char* name) {
  TORCH_CHECK(l.empty() || l.size() == n, "fgsgd: ", name, " must be empty or hold one tensor per parameter (", num(n),
              "), got ", num(l.size()));
}

// Validates the parameter lists shared by the multi-tensor ops and builds the slots. `interleaved` (the step and
// sqnorm of a backend that runs channels-last weights): a channels-last (O, I, kh, kw) parameter is taken as it is
// (TensorSlot::interleave = I), and its gradient must be channels-last too (the momentum buffer stays contiguous).
template <class T>
std::vector<TensorSlot<T>> make_slots(TensorList params, TensorList grads, TensorList momenta, TensorList codes,
                                      TensorList rescale, TensorList group_index, TensorList group_scale,
                                      const char* rescale_name = "rescale", bool rows = false,
                                      bool interleaved = false) {
  const size_t n = params.size();
  check_list_len(grads, n, "grads");
  check_list_len(momenta, n, "momentum_buffers");
  check_list_len(codes, n, "codes");
  check_list_len(rescale, n, rescale_name);
  check_list_len(group_index, n, "group_index");
  check_list_len(group_scale, n, "group_scale");
  TORCH_CHECK(group_index.size() == group_scale.size(), "fgsgd: group_index and group_scale must both be given or both be empty");
  TORCH_CHECK(codes.size() == n, "fgsgd: codes must hold one tensor per parameter");
  std::vector<TensorSlot<T>> slots(n);
  for (size_t k = 0; k < n; ++k) {
    const Tensor& p = params[k];
    check_components(p, ArgName("params", k), rows, /*leading=*/true, interleaved);
    if (k > 0) {
      TORCH_CHECK(p.size(-2) == params[0].size(-2) && p.size(-1) == params[0].size(-1), "fgsgd: ",
                  ArgName("params", k).str(), " has components of shape ", num(p.size(-2)), "x", num(p.size(-1)),
                  " but params[0] has ", num(params[0].size(-2)), "x", num(params[0].size(-1)),
                  "; one call takes one component shape");
      TORCH_CHECK(p.scalar_type() == params[0].scalar_type() && p.device() == params[0].device(), "fgsgd: ",
                  ArgName("params", k).str(), " differs in dtype or device from params[0]");
    }
    const int64_t N = components_of(p);
    TensorSlot<T>& s = slots[k];
    s = TensorSlot<T>{p.data_ptr<T>(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, N};
    s.interleave = interleaved && is_interleaved(p) ? p.size(1) : 0;
    if (!grads.empty()) {
      check_like(grads[k], p, ArgName("grads", k), ArgName("params", k), /*same_layout=*/true);
      s.g = grads[k].data_ptr<T>();
    }
    if (!momenta.empty()) {
      check_like(momenta[k], p, ArgName("momentum_buffers", k), ArgName("params", k));
      s.m = momenta[k].data_ptr<T>();
    }
    if (codes[k].scalar_type() == at::kInt) {  // packed, 2 bits per component (fgsgd_cuda/codes.py)
      check_vector(codes[k], 1 + (N + 15) / 16, at::kInt, p, ArgName("codes", k, " (packed: int32)"));
      s.codes = nullptr;
      s.packed_codes = reinterpret_cast<const uint32_t*>(codes[k].data_ptr<int32_t>());
    } else {
      check_vector(codes[k], N, at::kByte, p, ArgName("codes", k));
      s.codes = codes[k].data_ptr<uint8_t>();
    }
    if (!rescale.empty()) {
      check_vector(rescale[k], N, p.scalar_type(), p, ArgName(rescale_name, k));
      s.rescale = rescale[k].data_ptr<T>();
    }
    if (!group_index.empty()) {
      check_vector(group_index[k], N, at::kInt, p, ArgName("group_index", k));
      const Tensor& gs = group_scale[k];
      check_dense(gs, ArgName("group_scale", k));
      TORCH_CHECK(gs.dim() == 1 && gs.scalar_type() == p.scalar_type() && gs.device() == p.device() && gs.is_contiguous(),
                  "fgsgd: ", ArgName("group_scale", k).str(),
                  " must be a contiguous 1-D tensor of the parameters' dtype and device");
      s.group_index = group_index[k].data_ptr<int32_t>();
      s.group_scale = gs.data_ptr<T>();
    }
  }
  return slots;
}

// A one-element float32 (or, for lr, float64) tensor on the parameters' device: the step reads it when it runs.
inline void check_scalar(const Tensor& t, const Tensor& ref, const ArgName& name, bool allow_f64) {
  check_dense(t, name);
  TORCH_CHECK(t.numel() == 1 && (t.scalar_type() == at::kFloat || (allow_f64 && t.scalar_type() == at::kDouble)),
              "fgsgd: ", name.str(), " must be a one-element float32", allow_f64 ? " or float64" : "", " tensor, got ",
              shape_str(t), " ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fgsgd: ", name.str(), " is on ", t.device(), " but the parameters are on ",
              ref.device());
}

// The step's run-time controls (csrc/fgsgd/step_control.h): GradScaler's found_inf, a learning-rate tensor, and
// per-tensor step counts that decide first_step and stabilize in place of the flags (then incremented by
// the step unless found_inf skips it).
inline StepControl make_control(TensorList steps, const std::optional<Tensor>& found_inf,
                                const std::optional<Tensor>& lr_tensor, int64_t stabilize_every,
                                const std::optional<Tensor>& grad_scale, double weight_decay, TensorList params) {
  StepControl c{nullptr, nullptr, nullptr, nullptr, stabilize_every};
  TORCH_CHECK(stabilize_every >= 0 && stabilize_every < (int64_t(1) << 31), "fgsgd: stabilize_every must be >= 0 and "
              "< 2^31, got ", num(stabilize_every));
  check_list_len(steps, params.size(), "steps");
  for (size_t k = 0; k < steps.size(); ++k) check_scalar(steps[k], params[k], ArgName("steps", k), false);
  if (found_inf.has_value()) {
    check_scalar(*found_inf, params[0], "found_inf", false);
    c.found_inf = found_inf->data_ptr<float>();
  }
  if (grad_scale.has_value()) {
    check_scalar(*grad_scale, params[0], "grad_scale", false);
    TORCH_CHECK(weight_decay == 0, "fgsgd: grad_scale needs weight_decay = 0 (the step folds 1/scale into s_g, "
                "which weight decay breaks); unscale the gradients first");
    c.grad_scale = grad_scale->data_ptr<float>();
  }
  if (lr_tensor.has_value()) {
    check_scalar(*lr_tensor, params[0], "lr_tensor", true);
    if (lr_tensor->scalar_type() == at::kFloat)
      c.lr_f32 = lr_tensor->data_ptr<float>();
    else
      c.lr_f64 = lr_tensor->data_ptr<double>();
  }
  return c;
}

template <class Backend>
void step_(TensorList params, TensorList grads, TensorList momenta, TensorList codes, TensorList rescale,
           TensorList group_index, TensorList group_scale, double lr, double momentum, double dampening, bool nesterov,
           double weight_decay, bool first_step, bool stabilize, std::optional<TensorList> steps_opt,
           const std::optional<Tensor>& found_inf, const std::optional<Tensor>& lr_tensor, int64_t stabilize_every,
           const std::optional<Tensor>& grad_scale) {
  if (params.empty()) return;
  TORCH_CHECK(grads.size() == params.size(), "fgsgd: grads must hold one tensor per parameter (", num(params.size()),
              "), got ", num(grads.size()));
  TORCH_CHECK(momentum == 0 || momenta.size() == params.size(), "fgsgd: momentum_buffers must hold one tensor per "
              "parameter (", num(params.size()), ") when momentum != 0, got ", num(momenta.size()));
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0), "fgsgd: nesterov needs momentum > 0 and dampening = 0");
  const TensorList steps = steps_opt.value_or(TensorList());
  const StepControl ctl = make_control(steps, found_inf, lr_tensor, stabilize_every, grad_scale, weight_decay, params);
  FGSGD_FLOATING(params[0].scalar_type(), [&] {
    // every backend's step runs channels-last weights in place (TensorSlot::interleave: the CPU's tiles,
    // csrc/cpu/interleaved.h; the CUDA kernels' gathers, csrc/cuda/staged.cuh)
    auto slots = make_slots<T>(params, grads, momentum == 0 ? TensorList() : momenta, codes, rescale, group_index,
                               group_scale, "rescale", /*rows=*/true, /*interleaved=*/true);
    for (size_t k = 0; k < steps.size(); ++k) slots[k].step = steps[k].data_ptr<float>();
    StepHParams<T> h{T(lr), T(momentum), T(dampening), T(weight_decay), nesterov, first_step, stabilize};
    Backend::step(slots, params[0], h, ctl);
  });
}

template <class Backend>
Tensor tangent_sqnorm(TensorList params, TensorList grads, TensorList codes, TensorList rescale, double weight_decay) {
  TORCH_CHECK(!params.empty(), "fgsgd: params must hold at least one tensor (tangent_sqnorm)");
  TORCH_CHECK(grads.size() == params.size(), "fgsgd: grads must hold one tensor per parameter (", num(params.size()),
              "), got ", num(grads.size()));
  int64_t total = 0;
  for (const Tensor& p : params) total += p.dim() >= 3 ? components_of(p) : 0;
  Tensor out = at::empty({total}, params[0].options().dtype(at::kDouble));  // float64 for every dtype (types.h)
  FGSGD_FLOATING(params[0].scalar_type(), [&] {
    auto slots = make_slots<T>(params, grads, {}, codes, rescale, {}, {}, "rescale", /*rows=*/true,
                               /*interleaved=*/true);  // as the step's
    double* o = out.data_ptr<double>();
    for (auto& s : slots) { s.out = o; o += s.n; }
    Backend::sqnorm(slots, params[0], T(weight_decay));
  });
  return out;
}

template <class Backend>
void projx_(TensorList params, TensorList codes, TensorList rescale) {
  if (params.empty()) return;
  FGSGD_FLOATING(params[0].scalar_type(), [&] {
    Backend::projx_slots(make_slots<T>(params, {}, {}, codes, rescale, {}, {}), params[0]);
  });
}

template <class Backend>
void rescale_(TensorList params, TensorList codes, TensorList ratio) {
  if (params.empty()) return;
  TORCH_CHECK(ratio.size() == params.size(), "fgsgd: ratio must hold one tensor per parameter (", num(params.size()),
              "), got ", num(ratio.size()));
  FGSGD_FLOATING(params[0].scalar_type(), [&] {
    Backend::rescale_slots(make_slots<T>(params, {}, {}, codes, ratio, {}, {}, "ratio"), params[0]);
  });
}

template <class Backend>
Tensor group_scale(const Tensor& sqnorm, const Tensor& members, const Tensor& offsets, double group_clip,
                   std::optional<at::ScalarType> dtype) {
  check_dense(sqnorm, "sqnorm");
  TORCH_CHECK(sqnorm.dim() == 1 && (sqnorm.scalar_type() == at::kFloat || sqnorm.scalar_type() == at::kDouble) &&
                  sqnorm.is_contiguous(),
              "fgsgd: sqnorm must be a contiguous 1-D float32 or float64 tensor, got ", shape_str(sqnorm), " ",
              sqnorm.scalar_type());
  const bool members32 = members.scalar_type() == at::kInt;  // int64 or int32 indices
  check_vector(members, sqnorm.size(0), members32 ? at::kInt : at::kLong, sqnorm, "members");
  check_dense(offsets, "offsets");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong &&
                  offsets.device() == sqnorm.device() && offsets.is_contiguous(),
              "fgsgd: offsets must be a contiguous 1-D int64 tensor of G + 1 >= 1 entries on the device of sqnorm");
  TORCH_CHECK(group_clip > 0, "fgsgd: group_clip must be positive");
  const at::ScalarType out_type = dtype.value_or(sqnorm.scalar_type());
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kDouble,
              "fgsgd: dtype (of s_g) must be float32 or float64, got ", out_type);
  Tensor out = at::empty({offsets.size(0) - 1}, sqnorm.options().dtype(out_type));
  if (out.numel() == 0) return out;
  // the sums are in double (group_scale.h); a float32 sqnorm (made by the caller) is widened first
  const Tensor sq = sqnorm.scalar_type() == at::kDouble ? sqnorm : sqnorm.to(at::kDouble);
  FGSGD_FLOATING(out_type, [&] {
    Backend::group_scale(GroupScaleArgs<T>{sq.data_ptr<double>(), members32 ? nullptr : members.data_ptr<int64_t>(),
                                           members32 ? members.data_ptr<int32_t>() : nullptr,
                                           offsets.data_ptr<int64_t>(), out.data_ptr<T>(), out.numel(), group_clip},
                         sqnorm);
  });
  return out;
}

// Registers every op of one device backend under `m`.
template <class Backend>
void register_impls(torch::Library& m) {
  m.impl("proj", &proj<Backend>);
  m.impl("retr", &retr<Backend>);
  m.impl("projx", &projx<Backend>);
  m.impl("norms", &norms<Backend>);
  m.impl("step_", &step_<Backend>);
  m.impl("tangent_sqnorm", &tangent_sqnorm<Backend>);
  m.impl("projx_", &projx_<Backend>);
  m.impl("rescale_", &rescale_<Backend>);
  m.impl("group_scale", &group_scale<Backend>);
}

}  // namespace ops
}  // namespace fgsgd
