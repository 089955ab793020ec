"""Channel-directed gradients (Lao et al., arXiv 2008.10766; DESIGN.md §1) for any optimizer.

A convolution's weight gradient G of shape (O, I, kh, kw) is a field over the output channels: every fiber
f = G[:, i, y, x] (length O, taken as periodic) is replaced by its gradient under another metric,

- ``"sobolev"`` (H¹): the solution of (I − λΔ) f_new = f, Δ the periodic second difference along the fiber. It
  keeps the fiber's mean and damps its frequency k by 1/(1 + 4λ sin²(πk/O)): a smoother gradient across channels;
- ``"reweighted"`` (H⁰): f_new = mean(f) + (f − mean(f))/λ.

Call :func:`channel_directed_` between ``backward()`` and ``optimizer.step()``, like
``torch.nn.utils.clip_grad_norm_``::

    loss.backward()
    fgsgd_cuda.channel_directed_(fgsgd_cuda.conv_weights(model), metric="sobolev", lam=1.0)
    optimizer.step()                     # any optimizer: torch.optim.SGD, Adam, FGSGD, ...

The map is linear, so it commutes with DDP's gradient averaging (all ranks get the same result) and with
GradScaler's scaling (call it before or after ``scaler.unscale_``). An inf or nan in a fiber spreads over that
fiber, where GradScaler still finds it. Kernels: compiled CPU and CUDA (O(L) per fiber:
csrc/fgsgd/channel_directed.h, all tensors in one call), Triton (one launch per tensor), and torch ops (the
Sobolev solve by FFT; also float16 and bfloat16 gradients, computed in float32).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from . import checks, dispatch

METRICS = ("sobolev", "reweighted")
_TORCH_ONLY_DTYPES = (torch.float16, torch.bfloat16)  # the torch backend only (in float32); the kernels take FLOAT_DTYPES


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of every ``nn.Conv2d`` of ``model`` that require grad (each once): what the paper preconditions."""
    out, seen = [], set()
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append(module.weight)
    return out


def check_options(metric: str, lam: float, dim: int) -> None:
    """The metric, λ and dim of :func:`channel_directed_`; errors name the argument."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam: expected a number, got {type(lam).__name__}")
    if not math.isfinite(lam) or (lam < 0 if metric == "sobolev" else lam <= 0):
        raise ValueError(f"lam: must be finite and {'>= 0' if metric == 'sobolev' else '> 0'} for the {metric} "
                         f"metric, got {lam}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
        raise ValueError(f"dim: expected an int >= 0 (the fiber axis), got {dim!r}")


def check_gradient(g: torch.Tensor, name: str, dim: int, dtypes=checks.FLOAT_DTYPES) -> None:
    """``g`` is dense, of one of ``dtypes``, and has an axis ``dim`` (the checks of :func:`channel_directed_` and of
    the op's fake kernel)."""
    if g.is_sparse or g.layout != torch.strided:
        raise ValueError(f"{name}: sparse gradients are not supported (layout {g.layout})")
    if g.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype one of {', '.join(str(d)[6:] for d in dtypes)}, got {g.dtype}")
    if g.dim() <= dim:
        raise ValueError(f"{name}: has shape {tuple(g.shape)}, which has no axis dim={dim}")
    expanded = next((d for d in range(g.dim()) if g.stride(d) == 0 and g.shape[d] > 1), None)
    if expanded is not None:
        raise ValueError(f"{name}: is expanded (stride 0 along axis {expanded} of shape {tuple(g.shape)}): its "
                         "entries share memory, so it cannot be written in place; give the parameter a gradient of "
                         "its own (p.grad = p.grad.clone())")


def _fiber_layout(g: torch.Tensor, dim: int) -> tuple[torch.Tensor, int] | None:
    """A contiguous view of ``g`` with the same fibers (the axes before ``dim`` stay before it, those after stay
    after, in any order: the kernels treat the columns independently) and the fiber axis in it; None when the
    strides allow none (then the caller copies). Channels-last conv gradients get (O, kh, kw, I)."""
    if g.is_contiguous():
        return g, dim
    perm = sorted(range(g.dim()), key=lambda d: (-g.stride(d), d))
    if sorted(perm[:dim]) != list(range(dim)) or perm[dim] != dim:
        return None
    view = g.permute(perm)
    return (view, dim) if view.is_contiguous() else None


def channel_directed_(parameters: torch.Tensor | Iterable[torch.Tensor], metric: str = "sobolev", lam: float = 1.0,
                      *, dim: int = 0, backend: str = "auto") -> None:
    """Replace the gradient of every parameter by its channel-directed gradient, in place.

    parameters: a tensor or tensors (``conv_weights(model)``); those without ``.grad`` are skipped.
    metric: ``"sobolev"`` ((I − λΔ)⁻¹ f, λ >= 0; λ = 0 is the identity) or ``"reweighted"`` (mean(f) +
    (f − mean(f))/λ, λ > 0; λ = 1 is the identity). dim: the axis of the fibers, 0 = output channels (the
    default; the paper reports that the other directions hurt). backend: ``auto``, ``cpu``, ``cuda``,
    ``triton`` or ``torch`` (fgsgd_cuda.dispatch).

    Every gradient is checked before any is changed: a bad one raises and leaves all of them as they were.
    """
    check_options(metric, lam, dim)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads, seen = [], {}
    for k, p in enumerate(parameters):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters[{k}]: expected a tensor, got {type(p).__name__}")
        g = p.grad
        if g is None:
            continue
        name = f"parameters[{k}].grad"
        j = seen.setdefault(id(g), k)
        if j != k:  # one launch maps all gradients in parallel: twice would be a race, not two maps
            raise ValueError(f"{name}: the same gradient as parameters[{j}].grad (a parameter listed twice); pass "
                             "each parameter once")
        check_gradient(g, name, dim, checks.FLOAT_DTYPES + _TORCH_ONLY_DTYPES)
        if g.dtype in _TORCH_ONLY_DTYPES and backend not in ("auto", "torch"):
            raise TypeError(f"{name}: backend {backend!r} takes float32 and float64 gradients, got {g.dtype} "
                            "(backend='auto' or 'torch' computes it in float32)")
        grads.append(g)
    # one call per (device, dtype, backend), every layout resolved before the first one runs
    batches: dict = {}
    copies = []
    for g in grads:
        if g.numel() == 0:
            continue
        layout = _fiber_layout(g, dim)
        if layout is None:
            work = g.contiguous()
            copies.append((g, work))
            layout = (work, dim)
        view, d = layout
        name = "torch" if g.dtype in _TORCH_ONLY_DTYPES else backend
        impl = dispatch.get(name, g.device)
        batches.setdefault((g.device, g.dtype, impl.name, d), (impl, []))[1].append(view)
    for (_, _, _, d), (impl, views) in batches.items():
        impl.channel_directed_(views, d, metric, float(lam))
    for g, work in copies:
        g.copy_(work)
