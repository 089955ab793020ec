"""Independent checks of the manifold constraints (DESIGN.md §1, Table 1) and of tangency.

Written directly with torch.linalg, not with fgsgd_cuda.manifolds, so that they can catch a wrong
reference as well as a wrong kernel. Every function works in float64 and returns the worst
violation over the batch.
"""
from __future__ import annotations

import torch

from fgsgd_cuda import codes as C


def has_tangents(code: int, a: int, b: int) -> bool:
    """False where the tangent space is {0}: sphere of 1×1, oblique with one row, stiefel 1×1."""
    man = C.manifold_of(code)
    if man == "sphere":
        return a * b > 1
    if man == "oblique":
        return a > 1
    if man == "stiefel":
        return a > 1
    return True


def constraint_error(x: torch.Tensor, code: int, spectral: bool = True) -> float:
    """Largest violation of the constraint and of the Table 1 norms of the manifold of ``code``.

    sphere: |‖ω‖_F − 1|; oblique: every column unit and ‖ω‖_F = √B; stiefel: ωᵀω = I_B,
    ‖ω‖₂ = 1 (skipped with ``spectral=False``: an SVD per component, slow for huge batches; implied by
    ωᵀω = I) and ‖ω‖_F = √B; euclidean: 0.
    """
    x = x.double()
    man = C.manifold_of(code)
    if man == "euclidean" or x.shape[0] == 0:
        return 0.0
    b = x.shape[-1]
    fro = torch.linalg.matrix_norm(x, ord="fro")
    if man == "sphere":
        return float((fro - 1).abs().max())
    if man == "oblique":
        cols = torch.linalg.vector_norm(x, dim=-2)
        return float(max((cols - 1).abs().max(), (fro - b ** 0.5).abs().max()))
    eye = torch.eye(b, dtype=torch.float64)
    gram = x.transpose(-2, -1) @ x
    err = max(float((gram - eye).abs().max()), float((fro - b ** 0.5).abs().max()))
    if spectral:
        err = max(err, float((torch.linalg.svdvals(x)[..., 0] - 1).abs().max()))
    return err


def tangent_error(x: torch.Tensor, xi: torch.Tensor, code: int) -> float:
    """How far xi is from the tangent space at x: sphere |⟨ω,ξ⟩|, oblique max_j |ω_jᵀξ_j|,
    stiefel max |ωᵀξ + ξᵀω| (ωᵀξ must be skew-symmetric); each divided by max(1, ‖ξ_i‖_F)."""
    x, xi = x.double(), xi.double()
    man = C.manifold_of(code)
    if man == "euclidean" or x.shape[0] == 0:
        return 0.0
    scale = torch.linalg.matrix_norm(xi, ord="fro").clamp_min(1.0)
    if man == "sphere":
        bad = (x * xi).sum(dim=(-2, -1)).abs()
    elif man == "oblique":
        bad = (x * xi).sum(dim=-2).abs().amax(dim=-1)
    else:
        s = x.transpose(-2, -1) @ xi
        bad = (s + s.transpose(-2, -1)).abs().amax(dim=(-2, -1))
    return float((bad / scale).max())
