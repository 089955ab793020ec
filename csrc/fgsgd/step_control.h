// Step controls read from memory when the step runs instead of fixed when it is launched: what lets the
// whole step live in a CUDA graph (FGSGD(capturable=True)) and run under torch.amp.GradScaler without a
// host synchronisation. The CPU reads them on the host before its kernels; the CUDA kernels read them
// at the top of every block (csrc/cuda/staged.cuh, rows.cuh, kernels.cu). One resolution, both places.
#pragma once
#include "config.h"
#include "types.h"

FGSGD_NAMESPACE_BEGIN

// True when the step must change nothing: GradScaler found inf/nan in this step's gradients.
FGSGD_HD bool step_skipped(const StepControl& c) { return c.found_inf != nullptr && *c.found_inf != 0.0f; }

// The hyper-parameters of one tensor's step: the launch's `h`, with the learning rate from c.lr and the
// gradients' unscale factor 1 / c.grad_scale (when given) and, when the tensor carries its own step count (TensorSlot::step = k, the steps it has taken),
// first_step = (momentum != 0 and (k == 0 or the launch's first_step: buffers that are new whatever the count, as when
// momentum is switched on after some steps)) and stabilize = ((k + 1) mod stabilize_every == 0), as
// fgsgd_cuda/functional.py decides them on the host from its own counts.
template <class T>
FGSGD_HD StepHParams<T> resolve_step(const StepHParams<T>& h, const StepControl& c, const float* step) {
  StepHParams<T> r = h;
  if (c.lr_f32 != nullptr) r.lr = T(*c.lr_f32);
  if (c.lr_f64 != nullptr) r.lr = T(*c.lr_f64);
  if (c.grad_scale != nullptr) r.grad_unscale = T(1) / T(*c.grad_scale);
  if (step != nullptr) {
    // counts are float32 (exact below 2^24) and stabilize_every < 2^31 (op_impl.h): 32-bit arithmetic
    const uint32_t k = uint32_t(*step);
    r.first_step = h.momentum != T(0) && (h.first_step || k == 0);  // the launch's: buffers new at any count
    r.stabilize = c.stabilize_every > 0 && (k + 1) % uint32_t(c.stabilize_every) == 0;
  }
  return r;
}

FGSGD_NAMESPACE_END
