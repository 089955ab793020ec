"""Triton kernels of the channel-directed gradients (DESIGN.md §1): the math of csrc/fgsgd/channel_directed.h.

A tensor is viewed as ``outer`` contiguous (L, C) blocks whose C columns are the fibers. One program takes
``BLOCK`` adjacent columns of one block (lane i: column i, so every row is one coalesced load) and walks the
L rows: Sobolev in three passes (the K-term sum that starts w, the backward recursion w_j = x_j/a + r w_{j+1}
with the sum that starts f, the forward recursion f_j = w_j + r f_{j−1}), re-weighted L2 in two (the mean, then
f/λ + mean(1 − 1/λ)). One launch per tensor. The constants (r, 1/a, 1/(1 − r^L); 1/λ) come from the host in
float64 (csrc/fgsgd/channel_directed.h's sobolev_coeffs, mirrored by :func:`sobolev_coeffs`) and travel as a
small tensor of the gradient's dtype, so float64 gradients get float64 constants. The tensor is made once per
(metric, λ, L, dtype, device) and kept (:func:`constants`): a step with the same settings copies nothing from the
host, so it can be captured in a CUDA graph once a first call has made its constants.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 128
WARPS = 4
OPTIONS = dict(enable_fp_fusion=True)  # FMA contraction as nvcc's default (launch.OPTIONS; Triton 3.10 turns it off)
SOBOLEV_TAIL = {torch.float32: 3.55e-15, torch.float64: 1.23e-32}  # csrc/fgsgd/channel_directed.h kSobolevTail


def sobolev_coeffs(lam: float, L: int, tail: float) -> tuple[float, float, float, int]:
    """(r, 1/a, 1/(1 − r^L), K) of I − λΔ = a(1 − rS)(1 − rS⁻¹) on fibers of length L (channel_directed.h): K terms
    of the periodic sums, the first r^K below ``tail``."""
    d = 1.0 + 2.0 * lam + math.sqrt(1.0 + 4.0 * lam)
    r = 2.0 * lam / d
    terms, rk = 1, r
    while terms < L and rk >= tail:
        terms += 1
        rk *= r
    return r, 2.0 / d, 1.0 / (1.0 - r ** L), terms


_CONSTANTS: dict = {}
_MAX_CONSTANTS = 1024  # distinct (metric, λ, L, dtype, device): a network has a few dozen


def constants(metric: str, lam: float, L: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the kernel's constants on ``device``, K terms): (r, 1/a, 1/(1 − r^L)) for sobolev, (1/λ,) for reweighted;
    made on the first call with these settings, then reused."""
    key = (metric, float(lam), int(L), dtype, torch.device(device))
    hit = _CONSTANTS.get(key)
    if hit is None:
        if metric == "sobolev":
            r, inv_a, inv_1mrl, terms = sobolev_coeffs(lam, L, SOBOLEV_TAIL[dtype])
            values = [r, inv_a, inv_1mrl]
        else:
            values, terms = [1.0 / lam], 0
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        hit = _CONSTANTS[key] = (torch.tensor(values, dtype=dtype, device=device), terms)
    return hit


@triton.jit
def _sobolev_kernel(x_ptr, coef_ptr, L, C, terms, BLOCK: tl.constexpr):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    base = x_ptr + tl.program_id(0).to(tl.int64) * L * C + cols
    r = tl.load(coef_ptr)
    inv_a = tl.load(coef_ptr + 1)
    inv_1mrl = tl.load(coef_ptr + 2)
    zero = r * 0.0
    # w_{L-1} = (x_{L-1} + sum_{1<=k<K} r^k x_{k-1}) / (a (1 - r^L))
    w = tl.load(base + (L - 1) * C, mask=mask, other=0.0)
    rk = r
    for k in range(1, terms):
        w += rk * tl.load(base + (k - 1) * C, mask=mask, other=0.0)
        rk = rk * r
    w = w * inv_a * inv_1mrl
    tl.store(base + (L - 1) * C, w, mask=mask)
    # backward: w_j = x_j / a + r w_{j+1}; acc = w_0 + sum_{j>=1, L-j<K} r^{L-j} w_j
    rj = r
    acc = w * tl.where(L == 1, r * 0.0 + 1.0, rj)
    for jj in range(0, L - 1):
        j = L - 2 - jj
        rj = rj * r
        w = tl.load(base + j * C, mask=mask, other=0.0) * inv_a + r * w
        tl.store(base + j * C, w, mask=mask)
        coef = tl.where(L - j < terms, rj, zero)
        coef = tl.where(j == 0, zero + 1.0, coef)
        acc += coef * w
    # forward: f_0 = acc / (1 - r^L), f_j = w_j + r f_{j-1}
    acc = acc * inv_1mrl
    tl.store(base, acc, mask=mask)
    for j in range(1, L):
        acc = tl.load(base + j * C, mask=mask, other=0.0) + r * acc
        tl.store(base + j * C, acc, mask=mask)


@triton.jit
def _reweighted_kernel(x_ptr, coef_ptr, L, C, BLOCK: tl.constexpr):
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    base = x_ptr + tl.program_id(0).to(tl.int64) * L * C + cols
    inv_lam = tl.load(coef_ptr)
    total = tl.load(base, mask=mask, other=0.0) * 0.0
    for j in range(0, L):
        total += tl.load(base + j * C, mask=mask, other=0.0)
    keep = total * ((1.0 - inv_lam) / L)
    for j in range(0, L):
        tl.store(base + j * C, tl.load(base + j * C, mask=mask, other=0.0) * inv_lam + keep, mask=mask)


def channel_directed_(grads, dim: int, metric: str, lam: float) -> None:
    """Every fiber along ``dim`` of every (contiguous, float32/float64) gradient, in place; one launch each."""
    for g in grads:
        if g.numel() == 0:
            continue
        outer = math.prod(g.shape[:dim])
        L = g.shape[dim]
        C = math.prod(g.shape[dim + 1:])
        grid = (outer, triton.cdiv(C, BLOCK))
        coef, terms = constants(metric, lam, L, g.dtype, g.device)
        if metric == "sobolev":
            _sobolev_kernel[grid](g, coef, L, C, terms, BLOCK=BLOCK, num_warps=WARPS, **OPTIONS)
        else:
            _reweighted_kernel[grid](g, coef, L, C, BLOCK=BLOCK, num_warps=WARPS, **OPTIONS)
