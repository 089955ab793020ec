"""The ``torch`` backend: the reference of :mod:`fgsgd_cuda.reference` run in the tensors' own dtype.

Slow (a loop over tensors and codes in Python) but available everywhere; also the fallback when the
compiled extension is missing.
"""
from __future__ import annotations

import torch

from .. import checks
from .. import codes as _codes
from .. import manifolds as _m
from .. import reference as _ref
from . import as_components


def group_scale(sqnorm, members, offsets, group_clip, dtype=None):
    """s_g = 1/max(1, ‖ξ_g‖/c) in ``dtype`` (default: sqnorm's) from the ‖ξ_i‖² of the members of each group, in
    torch ops (the torch and triton backends): a float64 cumulative sum in member order, differenced at the group
    ends (deterministic on every device: no atomics)."""
    csum = torch.cat([sqnorm.new_zeros(1, dtype=torch.float64), sqnorm[members].double().cumsum(0)])
    total = csum[offsets[1:]] - csum[offsets[:-1]]
    return (1.0 / torch.clamp(total.sqrt() / group_clip, min=1.0)).to(dtype or sqnorm.dtype)


def channel_directed_(grads, dim, metric, lam):
    """Channel-directed gradients in torch ops (the torch backend, and float16/bfloat16 on every backend): the
    re-weighted metric directly, the Sobolev metric by FFT along ``dim``: (I − λΔ) is circulant, its eigenvalue
    at frequency k is 1 + 4λ sin²(πk/L). Computed in float32 at least, written back in place. Both are linear, so a
    float32/float64 fiber is mapped as x/m with m = max|x| and scaled back: its sums (the mean, the FFT) cannot
    overflow (a fiber of 2e38 had come out NaN, even at λ = 0); float16/bfloat16 ones, upcast, cannot."""
    for g in grads:
        x = g if g.dtype in checks.FLOAT_DTYPES else g.float()
        m = None
        if g.dtype in checks.FLOAT_DTYPES:
            m = x.abs().amax(dim=dim, keepdim=True)
            m = torch.where(m > 0, m, torch.ones_like(m))  # inf and nan fibers stay non-finite
            x = x / m
        L = x.shape[dim]
        if metric == "reweighted":
            mean = x.mean(dim=dim, keepdim=True)
            out = x / lam + mean * (1.0 - 1.0 / lam)
        else:
            k = torch.arange(L // 2 + 1, device=x.device, dtype=x.dtype)
            gain = 1.0 / (1.0 + 4.0 * lam * torch.sin(torch.pi * k / L) ** 2)
            shape = [1] * x.dim()
            shape[dim] = gain.numel()
            out = torch.fft.irfft(torch.fft.rfft(x, dim=dim) * gain.view(shape), n=L, dim=dim)
        g.copy_(out if m is None else out * m)


def _check_fits(params, grads, momenta, rescale) -> None:
    """Every gradient and momentum buffer has its weight's shape, dtype and device, and every rescale one entry per
    component in the weight's dtype: checked before anything is written, as the compiled kernels do (for components
    of any shape: this backend also steps those the kernels do not take, e.g. 11×11 filters)."""
    for k, p in enumerate(params):
        n = p.shape[:-2].numel()
        wanted = [("grads", grads[k], p.shape)] + ([("momentum_buffers", momenta[k], p.shape)] if momenta else []) + \
            ([("rescale", rescale[k], (n,))] if rescale else [])
        for name, t, shape in wanted:
            if tuple(t.shape) != tuple(shape) or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"{name}[{k}]: expected {p.dtype} of shape {tuple(shape)} on {p.device} (as "
                                 f"params[{k}]), got {t.dtype} of shape {tuple(t.shape)} on {t.device}")


class TorchBackend:
    name = "torch"

    def channel_directed_(self, grads, dim, metric, lam):
        channel_directed_(grads, dim, metric, lam)

    # contiguous results, as the compiled and Triton ops return (the stiefel ones come out of torch.linalg.qr
    # column-major, which the ops then refused as input)
    def proj(self, x, u, code):
        return _m.from_code(code).proj(x, u).contiguous()

    def retr(self, x, v, code):
        return _m.from_code(code).retr(x, v).contiguous()

    def projx(self, x, code):
        return _m.from_code(code).projx(x).contiguous()

    def norms(self, x):
        return _m.norms(x)

    def step_(self, params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening,
              nesterov, weight_decay, first_step, stabilize):
        """As the compiled kernels: the tensors checked first (shapes, dtypes, devices), and every new value
        computed before any is written, so a step that raises changes nothing."""
        _check_fits(params, grads, momenta if momentum else (), rescale)
        params, grads, momenta = as_components(params), as_components(grads), as_components(momenta)
        codes = _codes.unpacked(codes, params)
        new = []
        for k, p in enumerate(params):
            s = group_scale[k][group_index[k].long()] if group_scale else None
            r = rescale[k] if rescale else None
            m = momenta[k] if momentum else None
            new.append(_ref.step(p, grads[k], m, codes[k], r, s, lr=lr, momentum=momentum, dampening=dampening,
                                 nesterov=nesterov, weight_decay=weight_decay, first_step=first_step,
                                 stabilize=stabilize))
        for k, (p_new, m_new) in enumerate(new):
            params[k].copy_(p_new)
            if momentum:
                momenta[k].copy_(m_new)

    def tangent_sqnorm(self, params, grads, codes, rescale, weight_decay):
        params, grads = as_components(params), as_components(grads)
        codes = _codes.unpacked(codes, params)
        return torch.cat([_ref.tangent_sqnorm(p, grads[k], codes[k], rescale[k] if rescale else None, weight_decay)
                          for k, p in enumerate(params)])

    def projx_(self, params, codes, rescale):
        params = as_components(params)
        codes = _codes.unpacked(codes, params)
        for k, p in enumerate(params):
            p.copy_(_ref.projx(p, codes[k], rescale[k] if rescale else None))

    def rescale_(self, params, codes, ratio):
        for k, p in enumerate(as_components(params)):
            p.mul_(ratio[k].reshape(-1, 1, 1))

    def group_scale(self, sqnorm, members, offsets, group_clip, dtype=None):
        return group_scale(sqnorm, members, offsets, group_clip, dtype)
