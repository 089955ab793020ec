"""Gradients mostly along the point (conftest.check_radial_gradients) on every backend: the exp retraction steps along
the tangent part of the direction (csrc/fgsgd/small_linalg.h exp_coeffs_, manifolds._exp, the Triton codegen's
exp_terms and rows), so the rounding of the tangent projection, about ε‖g‖, no longer takes the step off the
manifold. tests/test_cpu_fast_path.py runs the check on every CPU instruction set, tests/test_triton.py on Triton."""
from __future__ import annotations

import pytest

from conftest import RADIAL_SHAPES, backend_step_pm, backends_on, check_radial_gradients, shape_code_cases

BACKENDS = backends_on((("cpu", "cpu"), ("torch", "cpu"), ("cuda", "cuda")))  # triton: tests/test_triton.py


@shape_code_cases(RADIAL_SHAPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_radial_gradients_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_radial_gradients(backend_step_pm(backend, device), code, shape, dtype)
