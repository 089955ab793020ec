"""Finite gradients of any size give a finite step on the manifold, on every backend (conftest.check_large_steps):
the C++ header's overflow guards and large-step paths (rescaled norms for normalize and exp, Householder QR,
the closed-form 3-row Cayley rescaled, the pivoted and clamped Cayley for more rows) on the cpu and cuda
backends, and the torch manifolds' rescaled norms and clamped Cayley. Before them a diverging run could turn
weights into NaN with finite gradients (|g| ~ 1e20 in fp32; 1e5 for a 5×3 Cayley step). tests/test_cpu_fast_path.py
runs the check on every CPU instruction set, tests/test_triton.py both checks on the Triton backend. The single-tensor
ops retr and projx are checked too (conftest.check_large_single_ops), and 100×1 components in the step: the row
kernels (csrc/fgsgd/row_step.h) sum ‖v‖² while streaming the row, and where it overflows, sum it again scaled."""
from __future__ import annotations

import pytest

from conftest import (CPU_TORCH_CUDA, LARGE_SHAPES, SHORT_ROW, backend_step_pm, check_large_single_ops,
                      check_large_steps, shape_code_cases)


@shape_code_cases(LARGE_SHAPES + [(100, 1), SHORT_ROW])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_large_finite_steps_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_large_steps(backend_step_pm(backend, device), code, shape, dtype)


@shape_code_cases(LARGE_SHAPES)
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_large_single_ops_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_large_single_ops(backend, device, code, shape, dtype)
