"""The FG-SGD step for a batch of components in plain torch, and the channel-directed gradients: the oracle
of every backend.

``step`` is DESIGN.md §1, Algorithm 1, steps 1, 3, 4 and 5 for components that may each sit on a
different manifold (``codes``, see :mod:`fgsgd_cuda.codes`), with the group step size s_g of step 2
given per component. It is also the ``torch`` backend: run it in float64 to get the reference, or
in the parameters' dtype to get a slow but dependable fallback.
"""
from __future__ import annotations

import torch

from . import manifolds as _m


def _per_code(codes: torch.Tensor):
    """Yield (manifold, boolean mask) for every code present in ``codes``."""
    for code in torch.unique(codes).tolist():
        yield _m.from_code(code), codes == code


def _bcast(v: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if v is None:
        return torch.ones(n, 1, 1, dtype=like.dtype, device=like.device)
    return v.to(like.dtype).reshape(n, 1, 1)


def tangent(p, g, codes, rescale=None, weight_decay=0.0):
    """ξ = Π_ω(R·(g + wd·p)) with ω = p/R (step 1); weight decay acts on euclidean components only."""
    n = p.shape[0]
    r = _bcast(rescale, n, p)
    w = p / r
    grad = g
    if weight_decay:
        euclid = (codes == 0).reshape(n, 1, 1)
        grad = torch.where(euclid, g + weight_decay * p, g)
    xi = r * grad
    out = torch.empty_like(p)
    for man, mask in _per_code(codes):
        out[mask] = man.proj(w[mask], xi[mask])
    return w, out


def tangent_sqnorm(p, g, codes, rescale=None, weight_decay=0.0):
    """‖ξ_i‖_F² per component (the input of the group step size, step 2), summed in float64 (in float32 it
    overflows from ‖ξ_i‖ = 1.8e19, where s_g = c/‖ξ_g‖ is still finite)."""
    _, xi = tangent(p, g, codes, rescale, weight_decay)
    xi = xi.double()
    return (xi * xi).sum(dim=(-2, -1))


def group_step_size(sqnorm, group_index, num_groups, group_clip):
    """s_g = 1 / max(1, ‖ξ_g‖/c) per group, ‖ξ_g‖² = Σ_{i∈g} ‖ξ_i‖² (step 2)."""
    total = torch.zeros(num_groups, dtype=sqnorm.dtype, device=sqnorm.device)
    total.index_add_(0, group_index.long(), sqnorm)
    return 1.0 / torch.clamp(total.sqrt() / group_clip, min=1.0)


def step(p, g, m, codes, rescale=None, step_scale=None, *, lr, momentum=0.0, dampening=0.0,
         nesterov=False, weight_decay=0.0, first_step=False, stabilize=False):
    """One FG-SGD step; returns the new (p, m) and leaves the inputs alone.

    p, g, m: (N, A, B); codes: (N,) integer codes; rescale R: (N,) or None (= 1);
    step_scale: the group step size s_g of each component, (N,) or None (= 1);
    m is ignored (may be None) when momentum == 0 and when first_step is set.
    """
    n = p.shape[0]
    s = _bcast(step_scale, n, p)
    r = _bcast(rescale, n, p)
    w, xi = tangent(p, g, codes, rescale, weight_decay)
    sxi = s * xi
    if momentum != 0:
        buf = sxi.clone() if first_step else momentum * m + (1 - dampening) * sxi
        d = sxi + momentum * buf if nesterov else buf
    else:
        buf, d = None, sxi
    w_new = torch.empty_like(w)
    m_new = None if buf is None else torch.empty_like(buf)
    for man, mask in _per_code(codes):
        wn = man.retr(w[mask], -lr * d[mask])
        if stabilize:
            wn = man.projx(wn)
        w_new[mask] = wn
        if buf is not None:
            m_new[mask] = man.transp(wn, buf[mask])
    return r * w_new, m_new


def projx(p, codes, rescale=None):
    """p ← R·projx(p/R): every component moved onto its manifold."""
    n = p.shape[0]
    r = _bcast(rescale, n, p)
    w = p / r
    out = torch.empty_like(p)
    for man, mask in _per_code(codes):
        out[mask] = man.projx(w[mask])
    return r * out


def channel_directed(g, metric, lam, dim=0):
    """The channel-directed gradient of ``g`` (DESIGN.md §1): every fiber f along ``dim`` (length L, periodic)
    becomes mean(f) + (f − mean(f))/λ (``"reweighted"``, H⁰) or the solution of (I − λΔ) f_new = f
    (``"sobolev"``, H¹), Δ the periodic second difference, solved here as a dense L×L system (written for
    clarity: run it in float64 on small L). Returns a new tensor."""
    f = g.movedim(dim, 0)
    L = f.shape[0]
    cols = f.reshape(L, -1)
    if metric == "reweighted":
        mean = cols.mean(dim=0, keepdim=True)
        out = mean + (cols - mean) / lam
    elif metric == "sobolev":
        eye = torch.eye(L, dtype=g.dtype, device=g.device)
        shift = torch.roll(eye, 1, dims=0)            # (S f)_j = f_{j−1}, periodic
        laplacian = shift + shift.T - 2 * eye         # (Δf)_j = f_{j+1} − 2 f_j + f_{j−1}
        out = torch.linalg.solve(eye - lam * laplacian, cols)
    else:
        raise ValueError(f"metric: expected 'sobolev' or 'reweighted', got {metric!r}")
    return out.reshape(f.shape).movedim(0, dim)
