"""Gradients mostly along the point (conftest.check_radial_gradients) on every backend: the exp retraction steps along
the tangent part of the direction (csrc/fgsgd/manifold.h retr and exp_of_large, manifolds._exp, the Triton codegen's
exp_retr and rows), so the rounding of the tangent projection, about ε‖g‖, no longer takes the step off the
manifold. tests/test_cpu_fast_path.py runs the check on every CPU instruction set, tests/test_triton.py on Triton."""
from __future__ import annotations

import pytest
import torch

from conftest import (CPU_TORCH_CUDA, EXP_CODES, FAR_RADIAL, FAR_SHAPES, ONE_ENTRY_CASES, RADIAL_SHAPES, SHORT_ROW,
                      backend_step_pm, check_one_entry_columns, check_radial_gradients, check_rows_near_an_axis,
                      shape_code_cases)


@shape_code_cases(RADIAL_SHAPES + [SHORT_ROW])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_radial_gradients_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_radial_gradients(backend_step_pm(backend, device), code, shape, dtype)


@shape_code_cases(FAR_SHAPES, EXP_CODES)
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_gradients_far_along_the_point_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_radial_gradients(backend_step_pm(backend, device), code, shape, dtype, lams=FAR_RADIAL[dtype])


@pytest.mark.parametrize("n", [9, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_rows_near_an_axis_far_along_the_point_stay_on_the_sphere(backend, device, dtype, n):
    check_rows_near_an_axis(backend, device, dtype, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("code,shape", ONE_ENTRY_CASES, ids=[f"{c}-{a}x{b}" for c, (a, b) in ONE_ENTRY_CASES])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_one_entry_columns_do_not_move(backend, device, code, shape, dtype):
    check_one_entry_columns(backend, device, code, shape, dtype)
