"""Fake (meta) kernels of the compiled ops, so torch.compile and FakeTensor tracing see their shapes."""
from __future__ import annotations

import torch


def register() -> None:
    lib = "fgsgd::"

    @torch.library.register_fake(lib + "proj")
    def _proj(x, u, code):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "retr")
    def _retr(x, v, code):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "projx")
    def _projx(x, code):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "norms")
    def _norms(x):
        return x.new_empty((x.shape[0], 3))

    @torch.library.register_fake(lib + "tangent_sqnorm")
    def _sqnorm(params, grads, codes, rescale, weight_decay):
        return params[0].new_empty((sum(p.shape[0] for p in params),))

    @torch.library.register_fake(lib + "step_")
    def _step(params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening,
              nesterov, weight_decay, first_step, stabilize):
        return None

    @torch.library.register_fake(lib + "projx_")
    def _projx_(params, codes, rescale):
        return None

    @torch.library.register_fake(lib + "rescale_")
    def _rescale_(params, codes, ratio):
        return None
