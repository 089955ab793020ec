// Plain argument records shared by every build of the math (host, device, and each CPU instruction
// set of csrc/cpu): data only, no code, so they stay in namespace fgsgd itself (config.h).
#pragma once
#include <stdint.h>

namespace fgsgd {

// Hyper-parameters of the step (scalars, also when the math runs on lane types).
template <class T>
struct StepHParams {
  T lr, momentum, dampening, weight_decay;
  bool nesterov, first_step, stabilize;
  // 1 / GradScaler's scale: the gradients arrive scaled and the step unscales them on the fly, folded into
  // s_g (ξ is linear in g when weight_decay = 0, which is then required: csrc/op_impl.h)
  T grad_unscale = T(1);
};

// What a step reads from memory when it runs (step_control.h); null pointers: the launch's values.
struct StepControl {
  const float* found_inf;   // torch.amp.GradScaler's flag (float32): nonzero skips the whole step
  const float* lr_f32;      // the learning rate as a one-element tensor, float32 or float64
  const double* lr_f64;
  const float* grad_scale;  // GradScaler's scale (float32): the step reads g / scale
  int64_t stabilize_every;  // with per-tensor step counts: re-project when (step + 1) % stabilize_every == 0
};

// Elementwise (single-tensor) ops on x of shape (N, A, B).
template <class T>
struct UnaryArgs {  // proj, retr: out_i = op(x_i, u_i); projx: out_i = op(x_i)
  const T* x;
  const T* u;
  T* out;
  int64_t n;
  int code;
};

// One tensor of a multi-tensor launch: N components of one shape, their codes (uint8), and the
// optional rescale R (per component), group index (int32, per component) and group step size
// s_g (per group). A null optional pointer means 1 (R, s_g).
template <class T>
struct TensorSlot {
  T* p;
  const T* g;
  T* m;
  const uint8_t* codes;
  const T* rescale;
  const int32_t* group_index;
  const T* group_scale;
  double* out;  // tangent_sqnorm: N outputs, in double (a float ‖ξ_i‖² overflows from ‖ξ_i‖ ≈ 1.8e19)
  int64_t n;
  float* step;  // the step: this tensor's count of steps taken (float32, one element), or null (step_control.h)
  // codes packed 2 bits per component (fgsgd_cuda/codes.py): word 0 the palette (byte v: the code of value v),
  // component i in bits 2·(i mod 16) of word 1 + i/16; when set, `codes` is null (batched.h code_at)
  const uint32_t* packed_codes;
  // Where p and g hold the entries of a component (batched.h entries_of). 0: contiguous, entry e of component i at
  // i·S + e (S = A·B). L > 0: the channels-last filters of a conv weight (O, L, kh, kw): component i = o·L + j (output
  // o, input j) has entry e at o·S·L + e·L + j, so consecutive components are adjacent. m, R, the group indices
  // and the codes are per component and contiguous either way.
  int64_t interleave;
};

// The group step sizes of G groups (group_scale.h): members[offsets[g] .. offsets[g+1]) (int64 or int32) are the
// components of group g (indices into sqnorm, ‖ξ_i‖² per component, in double); out[g] = s_g (in T); clip = c.
template <class T>
struct GroupScaleArgs {
  const double* sqnorm;
  const int64_t* members;    // int64 indices, or (members null) the int32 ones below
  const int32_t* members32;
  const int64_t* offsets;
  T* out;
  int64_t groups;
  double clip;
};

// One tensor of channel_directed_ (channel_directed.h): `outer` blocks of (L, C) values, contiguous; its fibers are
// the C columns of each block (length L, their entries C apart).
template <class T>
struct FiberSlot {
  T* x;
  int64_t outer, L, C;
};

}  // namespace fgsgd
