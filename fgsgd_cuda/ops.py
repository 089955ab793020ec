"""The FG-SGD ops with input checks, on any backend (``backend="auto"|"cpu"|"cuda"|"triton"|"torch"``).

Single-tensor ops take components ``x`` of shape (N, A, B). Multi-tensor ops take lists of such
tensors of one component shape, dtype and device, and do all of them in one kernel launch (or a
small constant number); see csrc/ops.cpp for the schemas of the compiled ops behind them. Their tensors
may also be (..., A, B): the last two dimensions are the components, N the product of the others (a conv
weight (O, I, kh, kw) and its gradient and momentum as they are, with no view to make).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import checks, controls, dispatch
from . import codes as _codes

Tensors = Sequence[torch.Tensor]


def _unary(x, u, code, backend, op):
    checks.components(x, "x")
    if u is not None:
        checks.like(u, x, "u" if op == "proj" else "v", "x")
    checks.code_for_shape(code, x.shape[1], x.shape[2])
    impl = dispatch.get(backend, x.device)
    return getattr(impl, op)(x, u, code) if u is not None else impl.projx(x, code)


def proj(x: torch.Tensor, u: torch.Tensor, code: int, backend: str = "auto") -> torch.Tensor:
    """Π_x(u): the tangent projection of u at x for the manifold of ``code``."""
    return _unary(x, u, code, backend, "proj")


def retr(x: torch.Tensor, v: torch.Tensor, code: int, backend: str = "auto") -> torch.Tensor:
    """Retr_x(v) with the manifold and retraction of ``code``."""
    return _unary(x, v, code, backend, "retr")


def transp(x_new: torch.Tensor, v: torch.Tensor, code: int, backend: str = "auto") -> torch.Tensor:
    """Vector transport to x_new by projection (DESIGN.md §1 step 4)."""
    return proj(x_new, v, code, backend)


def projx(x: torch.Tensor, code: int, backend: str = "auto") -> torch.Tensor:
    """The exact projection of x onto the manifold of ``code`` (stiefel: Q of QR, diag(R) > 0)."""
    return _unary(x, None, code, backend, "projx")


def norms(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(N, 3): Frobenius, spectral and ℓ2→1 norm of every component."""
    checks.components(x, "x")
    return dispatch.get(backend, x.device).norms(x)


def check_lists(params: Tensors, grads: Tensors | None, momenta: Tensors | None, codes: Tensors,
                rescale: Tensors | None = None, group_index: Tensors | None = None,
                group_scale: Tensors | None = None, *, rescale_name: str = "rescale", rows: bool = False,
                interleaved: bool = False) -> None:
    """The per-tensor checks of the multi-tensor ops (cheap: shapes, dtypes and devices only).

    ``rescale_name`` names the per-component scale list in errors (``ratio`` for :func:`rescale_`);
    ``rows``: n×1 components of any length are allowed too (step_, tangent_sqnorm); ``interleaved``: channels-last
    (O, I, kh, kw) weights with channels-last gradients too (a backend with ``interleaved_weights``)."""
    n = len(params)
    for name, lst in (("grads", grads), ("momentum_buffers", momenta), ("codes", codes), (rescale_name, rescale),
                      ("group_index", group_index), ("group_scale", group_scale)):
        if lst is not None and len(lst) not in ((n,) if name in ("grads", "codes") else (0, n)):
            raise ValueError(f"{name}: expected one tensor per parameter ({n}), got {len(lst)}")
    if bool(group_index) != bool(group_scale):
        raise ValueError("group_index and group_scale must both be given or both be empty")
    for k, p in enumerate(params):
        checks.components(p, f"params[{k}]", rows=rows, leading=True, interleaved=interleaved)
        if k and (p.shape[-2:] != params[0].shape[-2:] or p.dtype != params[0].dtype or p.device != params[0].device):
            raise ValueError(f"params[{k}]: one call takes one component shape, dtype and device; got "
                             f"{tuple(p.shape[-2:])} {p.dtype} {p.device} after {tuple(params[0].shape[-2:])} "
                             f"{params[0].dtype} {params[0].device}")
        nc = checks.num_components(p)  # its components
        if grads is not None:
            checks.like(grads[k], p, f"grads[{k}]", f"params[{k}]", same_layout=interleaved)
        if momenta:
            checks.like(momenta[k], p, f"momentum_buffers[{k}]", f"params[{k}]")
        c = codes[k]
        if not _codes.fits(c, nc) or c.device != p.device:
            raise ValueError(f"codes[{k}]: expected a uint8 tensor of shape ({nc},) or its packed int32 form "
                             f"of shape ({_codes.packed_len(nc)},) (fgsgd_cuda.codes.pack) on {p.device}, got "
                             f"{c.dtype} {tuple(c.shape)} on {c.device}")
        if rescale:
            r = rescale[k]
            if r.shape != (nc,) or r.dtype != p.dtype or r.device != p.device:
                raise ValueError(f"{rescale_name}[{k}]: expected shape ({nc},) {p.dtype} on {p.device}, got "
                                 f"{tuple(r.shape)} {r.dtype} on {r.device}")
        if group_index:
            gi = group_index[k]
            if gi.shape != (nc,) or gi.dtype != torch.int32 or gi.device != p.device:
                raise ValueError(f"group_index[{k}]: expected an int32 tensor of shape ({nc},) on "
                                 f"{p.device}, got {gi.dtype} {tuple(gi.shape)} on {gi.device}")
            gs = group_scale[k]
            if gs.dim() != 1 or gs.dtype != p.dtype or gs.device != p.device:
                raise ValueError(f"group_scale[{k}]: expected a 1-D {p.dtype} tensor on {p.device}")


def check_disjoint(written: dict, read: dict | None = None) -> None:
    """No tensor that an op writes (``written``: list name -> tensors) shares memory with another tensor it is given
    (``written`` or ``read``): one launch works on all of them in parallel, so an overlap (a weight listed twice, a
    gradient that is a view of its weight) would be a race. Reads the tensors' addresses, which traced (fake)
    tensors do not have: skipped under torch.compile."""
    if torch.compiler.is_compiling():
        return
    named = [(f"{name}[{k}]", t) for lists in (written, read or {}) for name, lst in lists.items()
             for k, t in enumerate(lst)]
    pair = checks.overlapping([t for _, t in named], set(range(sum(len(lst) for lst in written.values()))))
    if pair is not None:
        i, j = sorted(pair)
        raise ValueError(f"{named[j][0]}: shares memory with {named[i][0]}; the op writes {' and '.join(written)} "
                         "in one parallel launch, so none of them may overlap another of its tensors (pass each "
                         "tensor once, in memory of its own)")


def _host_readable(t: torch.Tensor) -> bool:
    """Whether a check may read t's values: a dense CPU tensor outside torch.compile (reading CUDA values would
    synchronise; traced tensors have none)."""
    return t.device.type == "cpu" and t.layout == torch.strided and not torch.compiler.is_compiling()


def check_code_values(params: Tensors, codes: Tensors) -> None:
    """Every code fits its tensor's components (stiefel needs A >= B, cayley A <= 8, codes 0..6): one max per tensor
    (checks.code_limit; of the palette when packed), on the host for CPU tensors only: reading CUDA codes would
    synchronise. There (and in torch.ops.fgsgd called directly) a component whose code does not fit its shape is
    left as it is or comes out NaN. FGSGD checks its codes when it makes them and when it loads them."""
    for k, (p, c) in enumerate(zip(params, codes)):
        if c.numel() == 0 or not _host_readable(c):
            continue  # (a sparse tensor of codes: the op names it)
        top = int((c[:1].view(torch.uint8) if _codes.is_packed(c) else c).max())
        if top >= checks.code_limit(p.shape[-2], p.shape[-1]):
            checks.code_for_shape(top, p.shape[-2], p.shape[-1], f"codes[{k}]")


def check_group_index_values(group_index: Tensors, group_scale: Tensors) -> None:
    """Every group index of a CPU tensor points into its group_scale (the kernels read group_scale[group_index[i]]
    without a bound: out of range is an out-of-bounds read, on CUDA an illegal address). CUDA values are not read."""
    for k, (gi, gs) in enumerate(zip(group_index, group_scale)):
        if gi.numel() and _host_readable(gi) and not (0 <= int(gi.min()) and int(gi.max()) < gs.numel()):
            raise ValueError(f"group_index[{k}]: values must lie in [0, {gs.numel()}) (the length of group_scale[{k}]), "
                             f"got [{int(gi.min())}, {int(gi.max())}]")


def _backend_of(backend: str, params: Tensors):
    """The backend that runs params (None when params[0] is no tensor: check_lists says so)."""
    return dispatch.get(backend, params[0].device) if isinstance(params[0], torch.Tensor) else None


def step_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, codes: Tensors, *, lr: float,
          momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
          first_step: bool = False, stabilize: bool = False, rescale: Tensors = (), group_index: Tensors = (),
          group_scale: Tensors = (), steps: Tensors = (), found_inf: torch.Tensor | None = None,
          lr_tensor: torch.Tensor | None = None, stabilize_every: int = 0, grad_scale: torch.Tensor | None = None,
          backend: str = "auto") -> None:
    """The fused FG-SGD step (DESIGN.md §1 steps 1, 3, 4, 5) of many tensors, in place.

    Components are A×B with A·B <= 64, or n×1 rows of any length (euclidean, sphere, oblique and stiefel
    with qr; every backend streams them: csrc/fgsgd/row_step.h, triton_kernels/rows.py). ``codes[k]`` is a
    uint8 (N,) tensor, or its packed form (int32, 2 bits per component: :func:`fgsgd_cuda.codes.pack`).
    Tensors are contiguous; the ``cpu``, ``cuda`` and ``triton`` backends also step a channels-last (O, I, kh, kw)
    weight with kh·kw <= 64 and its channels-last gradient where they are (csrc/cpu/interleaved.h,
    csrc/cuda/staged.cuh, triton_kernels/codegen.py Frame.interleaved; the momentum buffer stays contiguous).

    ``group_scale[k][group_index[k][i]]`` is the group step size s_g of component i of tensor k
    (both empty: s_g = 1); ``rescale[k]`` is R per component (empty: R = 1). With ``first_step`` the
    momentum buffers are written, not read (m = s_g·ξ).

    Run-time controls (:mod:`fgsgd_cuda.controls`): ``found_inf`` skips the step when nonzero, ``lr_tensor``
    replaces ``lr``, per-tensor ``steps`` counts replace ``stabilize`` (``stabilize_every``) and decide the
    first step (count 0), which ``first_step=True`` still forces (buffers that are new whatever the count: momentum
    switched on later), and are incremented, and ``grad_scale`` (GradScaler's scale) makes the step read
    g / grad_scale. The ``cpu``, ``cuda`` and ``triton`` backends read them in the step (no host
    synchronisation: capturable in a CUDA graph); ``torch`` reads them on the host.
    """
    if not params:
        return
    impl = _backend_of(backend, params)
    check_lists(params, grads, momentum_buffers if momentum else None, codes, rescale, group_index, group_scale,
                rows=True, interleaved=getattr(impl, "interleaved_weights", False))
    if momentum and len(momentum_buffers) != len(params):
        raise ValueError(f"momentum_buffers: momentum={momentum} needs one buffer per parameter ({len(params)}), "
                         f"got {len(momentum_buffers)}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov: needs momentum > 0 and dampening = 0")
    check_disjoint({"params": params, "momentum_buffers": momentum_buffers if momentum else ()}, {"grads": grads})
    check_code_values(params, codes)
    check_group_index_values(group_index, group_scale)
    controls.check(params, steps, found_inf, lr_tensor, stabilize_every, grad_scale, weight_decay)
    controls.step(impl, list(params), list(grads), list(momentum_buffers),
                  list(codes), list(rescale), list(group_index), list(group_scale), lr, momentum, dampening, nesterov,
                  weight_decay, first_step, stabilize, list(steps), found_inf, lr_tensor, stabilize_every, grad_scale)


def tangent_sqnorm(params: Tensors, grads: Tensors, codes: Tensors, *, rescale: Tensors = (),
                   weight_decay: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """‖Π_ω(R·g)‖_F² of every component, concatenated over the tensors (step 2's input), float64 for every dtype
    (a float32 ‖ξ_i‖² overflows from ‖ξ_i‖ = 1.8e19, where group_clip's s_g = c/‖ξ_g‖ is still finite)."""
    if not params:
        raise ValueError("params: needs at least one tensor")
    impl = _backend_of(backend, params)
    check_lists(params, grads, None, codes, rescale, rows=True, interleaved=getattr(impl, "interleaved_weights", False))
    check_code_values(params, codes)
    return impl.tangent_sqnorm(
        list(params), list(grads), list(codes), list(rescale), weight_decay)


def check_group_scale(sqnorm, members, offsets, group_clip, dtype=None) -> None:
    """The checks of :func:`group_scale` (shapes, dtypes, devices)."""
    if sqnorm.dim() != 1 or sqnorm.dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"sqnorm: expected a 1-D float32 or float64 tensor, got {sqnorm.dtype} {tuple(sqnorm.shape)}")
    if members.dtype not in (torch.int64, torch.int32) or members.shape != sqnorm.shape or \
            members.device != sqnorm.device:
        raise ValueError(f"members: expected an int64 or int32 tensor of shape {tuple(sqnorm.shape)} on "
                         f"{sqnorm.device}, got {members.dtype} {tuple(members.shape)} on {members.device}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1 or offsets.device != sqnorm.device:
        raise ValueError(f"offsets: expected a 1-D int64 tensor of G + 1 >= 1 entries on {sqnorm.device}, got "
                         f"{offsets.dtype} {tuple(offsets.shape)} on {offsets.device}")
    if not group_clip > 0:
        raise ValueError(f"group_clip: must be positive, got {group_clip!r}")
    if dtype is not None and dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"dtype: expected torch.float32 or torch.float64 (the dtype of s_g), got {dtype}")


def group_scale(sqnorm: torch.Tensor, members: torch.Tensor, offsets: torch.Tensor, group_clip: float,
                backend: str = "auto", *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """s_g = 1 / max(1, ‖ξ_g‖/c) of every group (DESIGN.md §1 step 2), ‖ξ_g‖² summed in float64 over
    ``members[offsets[g]:offsets[g+1]]`` (indices into ``sqnorm``, the ‖ξ_i‖² of tangent_sqnorm) in that order;
    in ``dtype`` (the parameters' dtype, which the step reads; default: sqnorm's)."""
    check_group_scale(sqnorm, members, offsets, group_clip, dtype)
    if _host_readable(offsets) and offsets.numel() > 1:  # the kernels read members[offsets[g] .. offsets[g+1]) unbounded
        if int(offsets[0]) < 0 or bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > members.numel():
            raise ValueError(f"offsets: must rise from >= 0 to at most {members.numel()} (the length of members), got "
                             f"{offsets.tolist() if offsets.numel() <= 8 else tuple(offsets.shape)}")
        if members.numel() and not (0 <= int(members.min()) and int(members.max()) < sqnorm.numel()):
            raise ValueError(f"members: values must lie in [0, {sqnorm.numel()}) (the length of sqnorm), got "
                             f"[{int(members.min())}, {int(members.max())}]")
    return dispatch.get(backend, sqnorm.device).group_scale(sqnorm, members, offsets, group_clip, dtype)


def projx_(params: Tensors, codes: Tensors, *, rescale: Tensors = (), backend: str = "auto") -> None:
    """p ← R·projx(p/R) in place: every component moved exactly onto its manifold."""
    if not params:
        return
    check_lists(params, None, None, codes, rescale)
    check_disjoint({"params": params})
    check_code_values(params, codes)
    dispatch.get(backend, params[0].device).projx_(list(params), list(codes), list(rescale))


def rescale_(params: Tensors, codes: Tensors, ratio: Tensors, *, backend: str = "auto") -> None:
    """p ← ratio·p per component in place (applies a new rescale R_new = ratio·R_old)."""
    if not params:
        return
    if len(ratio) != len(params):
        raise ValueError(f"ratio: expected one tensor per parameter ({len(params)}), got {len(ratio)}")
    check_lists(params, None, None, codes, ratio, rescale_name="ratio")
    check_disjoint({"params": params})
    dispatch.get(backend, params[0].device).rescale_(list(params), list(codes), list(ratio))
