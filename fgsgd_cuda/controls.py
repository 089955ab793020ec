"""Run-time controls of the fused step (csrc/fgsgd/step_control.h): values the step reads when it runs, so
that it can live in a CUDA graph and run under ``torch.amp.GradScaler`` without a host synchronisation.

- ``found_inf``: a one-element float32 tensor; nonzero skips the whole step (parameters, buffers and step
  counts stay as they were).
- ``lr_tensor``: the learning rate as a one-element float32/float64 tensor (an LR schedule under a graph).
- ``steps``: one float32 one-element tensor per parameter, the steps it has taken (exact up to 2^24 steps,
  as torch's own capturable step counts). They decide the step's first_step (momentum != 0 and
  steps == 0) and stabilize ((steps + 1) % stabilize_every == 0) in place of the flags, and a step that is
  not skipped adds one to each.
- ``grad_scale``: GradScaler's scale (float32, one element): the gradients arrive scaled and the step
  reads g / grad_scale (folded into s_g, so weight_decay must be 0; the gradients are not written).

The ``cpu``, ``cuda`` and ``triton`` backends read them in their kernels (``device_controls``); for the
``torch`` reference :func:`step_on_host` reads them on the host (one synchronisation on a GPU) and calls
the plain step.
"""
from __future__ import annotations

import torch


def check(params, steps, found_inf, lr_tensor, stabilize_every, grad_scale=None, weight_decay=0.0) -> None:
    """Shapes, dtypes and devices of the controls (errors name the argument)."""
    if steps and len(steps) != len(params):
        raise ValueError(f"steps: expected one tensor per parameter ({len(params)}) or none, got {len(steps)}")
    device = params[0].device if params else None
    named = [(f"steps[{k}]", s, (torch.float32,)) for k, s in enumerate(steps or ())]
    named += [("found_inf", found_inf, (torch.float32,)), ("lr_tensor", lr_tensor, (torch.float32, torch.float64)),
              ("grad_scale", grad_scale, (torch.float32,))]
    for name, t, dtypes in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype not in dtypes or t.is_sparse:
            raise ValueError(f"{name}: expected a one-element {' or '.join(str(d) for d in dtypes)} tensor, got "
                             f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")
        if t.device != device:
            raise ValueError(f"{name}: is on {t.device} but the parameters are on {device}")
    if not isinstance(stabilize_every, int) or isinstance(stabilize_every, bool) or not 0 <= stabilize_every < 2 ** 31:
        raise ValueError(f"stabilize_every: must be a non-negative integer below 2^31, got {stabilize_every!r}")
    if grad_scale is not None and weight_decay != 0:
        raise ValueError("grad_scale: needs weight_decay = 0 (the step folds 1/scale into s_g, which weight decay "
                         "breaks); unscale the gradients first")


def step_on_host(impl, params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening,
                 nesterov, weight_decay, first_step, stabilize, steps, found_inf, lr_tensor, stabilize_every,
                 grad_scale=None) -> None:
    """The step with its controls read on the host, for backends whose kernels do not read them: the tensors
    whose counts give the same (first_step, stabilize) run together, as csrc/ops.cpp's CPU step does."""
    if found_inf is not None and float(found_inf) != 0:
        return
    if lr_tensor is not None:
        lr = float(lr_tensor)
    if grad_scale is not None:  # unscaled copies: the step does not write the gradients
        grads = list(torch._foreach_div(list(grads), grad_scale))
    parts: dict = {}
    for k in range(len(params)):
        first, stab = first_step, stabilize
        if steps:
            n = int(float(steps[k]))
            first = momentum != 0 and (bool(first_step) or n == 0)  # first_step: new buffers at any count
            stab = stabilize_every > 0 and (n + 1) % stabilize_every == 0
        parts.setdefault((first, stab), []).append(k)
    for (first, stab), idx in parts.items():
        pick = lambda lst: [lst[k] for k in idx] if lst else []  # noqa: E731
        impl.step_(pick(params), pick(grads), pick(momenta), pick(codes), pick(rescale), pick(group_index),
                   pick(group_scale), lr, momentum, dampening, nesterov, weight_decay, first, stab)
    for s in steps or ():
        s.add_(1)


def given(steps, found_inf, lr_tensor, grad_scale) -> bool:
    """Whether a step call carries any run-time control (else it is the plain step)."""
    return bool(steps) or found_inf is not None or lr_tensor is not None or grad_scale is not None


def step(impl, params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening, nesterov,
         weight_decay, first_step, stabilize, steps=(), found_inf=None, lr_tensor=None, stabilize_every=0,
         grad_scale=None) -> None:
    """impl's step with the controls: in its kernels when it reads them, else on the host (step_on_host)."""
    args = (params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening, nesterov,
            weight_decay, first_step, stabilize)
    if not given(steps, found_inf, lr_tensor, grad_scale):
        impl.step_(*args)
    elif getattr(impl, "device_controls", False):
        impl.step_(*args, list(steps), found_inf, lr_tensor, stabilize_every, grad_scale)
    else:
        step_on_host(impl, *args, list(steps), found_inf, lr_tensor, stabilize_every, grad_scale)
