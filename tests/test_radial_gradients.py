"""Gradients mostly along the point (conftest.check_radial_gradients) on every backend: the exp retraction steps along
the tangent part of the direction (csrc/fgsgd/manifold.h retr and exp_of_large, manifolds._exp, the Triton codegen's
exp_terms and rows), so the rounding of the tangent projection, about ε‖g‖, no longer takes the step off the
manifold. tests/test_cpu_fast_path.py runs the check on every CPU instruction set, tests/test_triton.py on Triton."""
from __future__ import annotations

import pytest

from conftest import CPU_TORCH_CUDA, RADIAL_SHAPES, SHORT_ROW, backend_step_pm, check_radial_gradients, shape_code_cases


@shape_code_cases(RADIAL_SHAPES + [SHORT_ROW])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_radial_gradients_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_radial_gradients(backend_step_pm(backend, device), code, shape, dtype)
