"""The ``triton`` backend: the generated Triton kernels of :mod:`fgsgd_cuda.triton_kernels`.

Same methods and semantics as :class:`fgsgd_cuda.backends.torch_ref.TorchBackend`. The multi-tensor methods check
that every tensor of a call has params[0]'s dtype (and every weight its device) before they launch: one launch
reads every tensor through one kernel of one dtype, so a float64 tensor in a float32 call was read and written out
of bounds (FGSGD calls the backends directly; :mod:`fgsgd_cuda.ops` checks everything else before it calls them,
and FGSGD's own tensors have their weights' shapes: autograd's gradients, its buffers, load_state_dict's checks).
The kernels read packed codes (2 bits per component, fgsgd_cuda/codes.py) as they are.
"""
from __future__ import annotations

from ..triton_kernels import launch as _k
from . import as_components
from .torch_ref import group_scale as _torch_group_scale


def _check_one_dtype(params, **lists) -> None:
    """Every tensor of ``lists`` (name -> tensors, may be empty) has params[0]'s dtype, and every weight its device
    (about 0.2 µs a tensor: ops.check_lists' full checks cost 5 µs)."""
    d0, dev0 = params[0].dtype, params[0].device
    for k, p in enumerate(params):
        if p.dtype is not d0 or p.device != dev0:
            raise ValueError(f"params[{k}]: is {p.dtype} on {p.device}, but params[0] is {d0} on {dev0}; one call "
                             "takes one dtype and device")
    for name, lst in lists.items():
        for k, t in enumerate(lst or ()):
            if t.dtype is not d0:
                raise TypeError(f"{name}[{k}]: has dtype {t.dtype} but params[{k}] has dtype {d0}")


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
        _check_one_dtype(params, grads=grads, momentum_buffers=momenta if momentum else (), rescale=rescale,
                         group_scale=group_scale)
        _k.step_(as_components(params, True), as_components(grads, True), as_components(momenta), list(codes),
                 list(rescale), list(group_index), list(group_scale), float(lr), float(momentum), float(dampening),
                 bool(nesterov), float(weight_decay), bool(first_step), bool(stabilize), list(steps), found_inf,
                 lr_tensor, int(stabilize_every), grad_scale)

    def tangent_sqnorm(self, params, grads, codes, rescale, weight_decay):
        _check_one_dtype(params, grads=grads, rescale=rescale)
        return _k.tangent_sqnorm(as_components(params, True), as_components(grads, True), list(codes),
                                 list(rescale), float(weight_decay))

    def projx_(self, params, codes, rescale):
        if params:
            _check_one_dtype(params, rescale=rescale)
            _k.projx_(as_components(params), list(codes), list(rescale))

    def rescale_(self, params, codes, ratio):
        if params:
            _check_one_dtype(params, ratio=ratio)
            _k.rescale_(as_components(params), list(codes), list(ratio))  # the kernel does not read the codes

    def group_scale(self, sqnorm, members, offsets, group_clip, dtype=None):
        return _torch_group_scale(sqnorm, members, offsets, group_clip, dtype)  # torch ops: no Triton kernel of its own

    def channel_directed_(self, grads, dim, metric, lam):
        from ..triton_kernels import fibers  # imports triton: on first use only
        fibers.channel_directed_(grads, dim, metric, lam)
