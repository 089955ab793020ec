"""Gradients mostly along the point (conftest.check_radial_gradients) on every backend: the exp retraction steps along
the tangent part of the direction (csrc/fgsgd/manifold.h retr and exp_of_large, manifolds._exp, the Triton codegen's
exp_terms and rows), so the rounding of the tangent projection, about ε‖g‖, no longer takes the step off the
manifold. tests/test_cpu_fast_path.py runs the check on every CPU instruction set, tests/test_triton.py on Triton."""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import (CPU_TORCH_CUDA, RADIAL_SHAPES, SHORT_ROW, backend_step_pm, backends_on, check_radial_gradients,
                      make_gen, shape_code_cases)


@shape_code_cases(RADIAL_SHAPES + [SHORT_ROW])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_radial_gradients_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_radial_gradients(backend_step_pm(backend, device), code, shape, dtype)


# far along the point: ‖V‖² − a² cancels (λ²ε against ‖ξ‖²), so the C++ exp retractions form V⊥ there (manifold.h
# mostly_radial_: an fp32 2×6 oblique step landed 0.57 off its manifold at λ = 1e12). The torch reference and the
# Triton kernels form V⊥ once (off by up to 3e-4 there), the C++ header twice.
FAR = {torch.float32: [1e10, 1e20, 1e30], torch.float64: [1e20, 1e100, 1e200]}


@shape_code_cases([(3, 3), (5, 3), (7, 7), (2, 2)])
@pytest.mark.parametrize("backend,device", backends_on((("cpu", "cpu"), ("cuda", "cuda"))))
def test_gradients_far_along_the_point_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_radial_gradients(backend_step_pm(backend, device), code, shape, dtype, lams=FAR[dtype])


@pytest.mark.parametrize("n", [9, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend,device", backends_on((("cpu", "cpu"), ("cuda", "cuda"))))
def test_rows_near_an_axis_far_along_the_point_stay_on_the_sphere(backend, device, dtype, n):
    """n×1 exp rows near a coordinate axis, gradients λ·ω + noise: the rounding of the tangent projection falls on
    the axis entry, so the direction is mostly radial and ‖d‖² − ⟨ω,d⟩² cancels in the streamed row kernels (a 9×1
    row landed 0.05 off its sphere at λ = 1e20 in fp32). They form d⊥ in double with a second Gram–Schmidt pass
    (csrc/fgsgd/row_step.h); the bound is 1e-12 in fp64, where double is no wider than the row."""
    from fgsgd_cuda import ops

    gen = make_gen(zlib.crc32(repr(("rows-axis", n, str(dtype))).encode()))
    rows = 20
    bound = 1e-6 if dtype == torch.float32 else 1e-12
    for lam in FAR[dtype]:
        w = 1e-3 * torch.randn(rows, n, 1, generator=gen, dtype=torch.float64)
        w[:, 0] = 1.0
        w = w / w.norm(dim=1, keepdim=True)
        g = (lam * w + torch.randn(rows, n, 1, generator=gen, dtype=torch.float64)).to(dtype)
        p = w.to(dtype).to(device)
        codes = torch.tensor([2, 4] * (rows // 2), dtype=torch.uint8, device=device)
        ops.step_([p], [g.to(device)], [torch.zeros_like(p)], [codes], lr=0.5, backend=backend)
        off = float((p.double().norm(dim=1) - 1).abs().max())
        assert off <= bound, f"n = {n}, λ = {lam:g}: off the sphere by {off:.3g}"
