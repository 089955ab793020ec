"""The ``cpu`` and ``cuda`` backends: the ops of the compiled extension (``torch.ops.fgsgd``)."""
from __future__ import annotations

import torch

from .. import controls


class CompiledBackend:
    def __init__(self, name: str):
        self.name = name

    @property
    def _ops(self):
        return torch.ops.fgsgd

    def proj(self, x, u, code):
        return self._ops.proj(x, u, int(code))

    def retr(self, x, v, code):
        return self._ops.retr(x, v, int(code))

    def projx(self, x, code):
        return self._ops.projx(x, int(code))

    def norms(self, x):
        return self._ops.norms(x)

    #: step_ and tangent_sqnorm take a channels-last (O, I, kh, kw) weight and its channels-last gradient as they
    #: are (the CPU kernels' tiles, csrc/cpu/interleaved.h; the CUDA kernels' coalesced gathers, csrc/cuda/staged.cuh)
    interleaved_weights = True

    #: the step reads found_inf, a tensor lr, per-tensor step counts and GradScaler's scale when it runs
    #: (csrc/fgsgd/step_control.h)
    device_controls = True

    def step_(self, params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening,
              nesterov, weight_decay, first_step, stabilize, steps=(), found_inf=None, lr_tensor=None,
              stabilize_every=0, grad_scale=None):
        args = (params, grads, momenta if momentum else [], codes, rescale, group_index, group_scale, float(lr),
                float(momentum), float(dampening), bool(nesterov), float(weight_decay), bool(first_step),
                bool(stabilize))
        if controls.given(steps, found_inf, lr_tensor, grad_scale):
            self._ops.step_(*args, list(steps), found_inf, lr_tensor, int(stabilize_every), grad_scale)
        else:
            self._ops.step_(*args)  # the plain step: fewer arguments to convert

    def tangent_sqnorm(self, params, grads, codes, rescale, weight_decay):
        return self._ops.tangent_sqnorm(params, grads, codes, rescale, float(weight_decay))

    def projx_(self, params, codes, rescale):
        self._ops.projx_(params, codes, rescale)

    def rescale_(self, params, codes, ratio):
        self._ops.rescale_(params, codes, ratio)

    def group_scale(self, sqnorm, members, offsets, group_clip, dtype=None):
        return self._ops.group_scale(sqnorm, members, offsets, float(group_clip), dtype)

    def channel_directed_(self, grads, dim, metric, lam):
        self._ops.channel_directed_(list(grads), int(dim), str(metric), float(lam))
