"""The ``triton`` backend: the generated Triton kernels of :mod:`fgsgd_cuda.triton_kernels`.

Same methods and semantics as :class:`fgsgd_cuda.backends.torch_ref.TorchBackend`. The multi-tensor methods check
their lists (shapes, dtypes, devices: :func:`fgsgd_cuda.ops.check_lists`) before they launch, as the compiled
backends do in C++: one launch reads every tensor through one kernel of one dtype, so a tensor that does not fit
would be read and written out of bounds (FGSGD calls the backends directly, not through the ops). The kernels read
packed codes (2 bits per component, fgsgd_cuda/codes.py) as they are.
"""
from __future__ import annotations

from .. import ops as _ops
from ..triton_kernels import launch as _k
from . import as_components
from .torch_ref import group_scale as _torch_group_scale


class TritonBackend:
    name = "triton"

    def proj(self, x, u, code):
        return _k.proj(x, u, code)

    def retr(self, x, v, code):
        return _k.retr(x, v, code)

    def projx(self, x, code):
        return _k.projx(x, code)

    def norms(self, x):
        return _k.norms(x)

    #: the step reads found_inf, a tensor lr, GradScaler's scale and per-tensor step counts in its kernels
    #: (fgsgd_cuda/controls.py)
    device_controls = True

    #: step_ and tangent_sqnorm take a channels-last (O, I, kh, kw) weight and its channels-last gradient as they
    #: are (kernels generated with ``interleaved``: triton_kernels/codegen.py Frame.interleaved)
    interleaved_weights = True

    def step_(self, params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening,
              nesterov, weight_decay, first_step, stabilize, steps=(), found_inf=None, lr_tensor=None,
              stabilize_every=0, grad_scale=None):
        if not params:
            return
        _ops.check_lists(params, grads, momenta if momentum else None, codes, rescale, group_index, group_scale,
                         rows=True, interleaved=True)
        _k.step_(as_components(params, True), as_components(grads, True), as_components(momenta), list(codes),
                 list(rescale), list(group_index), list(group_scale), float(lr), float(momentum), float(dampening),
                 bool(nesterov), float(weight_decay), bool(first_step), bool(stabilize), list(steps), found_inf,
                 lr_tensor, int(stabilize_every), grad_scale)

    def tangent_sqnorm(self, params, grads, codes, rescale, weight_decay):
        _ops.check_lists(params, grads, None, codes, rescale, rows=True, interleaved=True)
        return _k.tangent_sqnorm(as_components(params, True), as_components(grads, True), list(codes),
                                 list(rescale), float(weight_decay))

    def projx_(self, params, codes, rescale):
        if params:
            _ops.check_lists(params, None, None, codes, rescale)
            _k.projx_(as_components(params), list(codes), list(rescale))

    def rescale_(self, params, codes, ratio):
        if params:
            _ops.check_lists(params, None, None, codes, ratio, rescale_name="ratio")
            _k.rescale_(as_components(params), list(codes), list(ratio))  # the kernel does not read the codes

    def group_scale(self, sqnorm, members, offsets, group_clip, dtype=None):
        return _torch_group_scale(sqnorm, members, offsets, group_clip, dtype)  # torch ops: no Triton kernel of its own

    def channel_directed_(self, grads, dim, metric, lam):
        from ..triton_kernels import fibers  # imports triton: on first use only
        fibers.channel_directed_(grads, dim, metric, lam)
