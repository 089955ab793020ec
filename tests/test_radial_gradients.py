"""Gradients mostly along the point (conftest.check_radial_gradients) on every backend: the exp retraction steps along
the tangent part of the direction (csrc/fgsgd/manifold.h retr and exp_of_large, manifolds._exp, the Triton codegen's
exp_terms and rows), so the rounding of the tangent projection, about ε‖g‖, no longer takes the step off the
manifold. tests/test_cpu_fast_path.py runs the check on every CPU instruction set, tests/test_triton.py on Triton."""
from __future__ import annotations

import pytest

import torch

from conftest import CPU_TORCH_CUDA, RADIAL_SHAPES, backends_on, SHORT_ROW, backend_step_pm, check_radial_gradients, shape_code_cases


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
