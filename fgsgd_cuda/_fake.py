"""Fake (meta) kernels of the compiled ops, so torch.compile and FakeTensor tracing see their shapes.

They run the same argument checks as :mod:`fgsgd_cuda.ops`: the dispatcher also sends a call that
mixes meta and real tensors here (the Meta key wins), which must fail by name, not return garbage.
"""
from __future__ import annotations

import torch

from . import checks


def _unary(x, u, code, u_name):
    checks.components(x, "x")
    if u is not None:
        checks.like(u, x, u_name, "x")
    checks.code_for_shape(code, x.shape[1], x.shape[2])


def _lists(params, grads, momenta, codes, rescale=None, group_index=None, group_scale=None, rescale_name="rescale",
           rows=False):
    from .ops import check_lists
    check_lists(params, grads, momenta, codes, rescale, group_index, group_scale, rescale_name=rescale_name,
                rows=rows)


def register() -> None:
    lib = "fgsgd::"

    @torch.library.register_fake(lib + "proj")
    def _proj(x, u, code):
        _unary(x, u, code, "u")
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "retr")
    def _retr(x, v, code):
        _unary(x, v, code, "v")
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "projx")
    def _projx(x, code):
        _unary(x, None, code, "")
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "norms")
    def _norms(x):
        checks.components(x, "x")
        return x.new_empty((x.shape[0], 3))

    @torch.library.register_fake(lib + "tangent_sqnorm")
    def _sqnorm(params, grads, codes, rescale, weight_decay):
        if not params:
            raise ValueError("params: needs at least one tensor")
        _lists(params, grads, None, codes, rescale, rows=True)
        return params[0].new_empty((sum(checks.num_components(p) for p in params),), dtype=torch.float64)

    @torch.library.register_fake(lib + "step_")
    def _step(params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening,
              nesterov, weight_decay, first_step, stabilize, steps=None, found_inf=None, lr_tensor=None, stabilize_every=0,
              grad_scale=None):
        if params:
            if momentum and len(momenta) != len(params):
                raise ValueError(f"momentum_buffers: momentum={momentum} needs one buffer per parameter "
                                 f"({len(params)}), got {len(momenta)}")
            _lists(params, grads, momenta if momentum else None, codes, rescale, group_index, group_scale, rows=True)
        return None

    @torch.library.register_fake(lib + "projx_")
    def _projx_(params, codes, rescale):
        if params:
            _lists(params, None, None, codes, rescale)
        return None

    @torch.library.register_fake(lib + "group_scale")
    def _group_scale(sqnorm, members, offsets, group_clip, dtype=None):
        from .ops import check_group_scale
        check_group_scale(sqnorm, members, offsets, group_clip, dtype)
        return sqnorm.new_empty((offsets.shape[0] - 1,), dtype=dtype or sqnorm.dtype)

    @torch.library.register_fake(lib + "rescale_")
    def _rescale_(params, codes, ratio):
        if params:
            if len(ratio) != len(params):
                raise ValueError(f"ratio: expected one tensor per parameter ({len(params)}), got {len(ratio)}")
            _lists(params, None, None, codes, ratio, rescale_name="ratio")
        return None

    @torch.library.register_fake(lib + "channel_directed_")
    def _channel_directed_(grads, dim, metric, lam):
        from .channel_directed import check_gradient, check_options
        check_options(metric, lam, dim)
        for k, g in enumerate(grads):
            check_gradient(g, f"grads[{k}]", dim)
        return None
