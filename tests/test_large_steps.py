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
import torch

from conftest import (CPU_TORCH_CUDA, LARGE_SHAPES, SHORT_ROW, UNEVEN_SHAPES, backend_step_pm, check_large_single_ops,
                      check_large_steps, check_tiny_components, check_uneven_columns, make_gen, requires_cpu_kernels,
                      shape_code_cases)


@shape_code_cases(LARGE_SHAPES + [(100, 1), SHORT_ROW])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_large_finite_steps_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_large_steps(backend_step_pm(backend, device), code, shape, dtype)


@shape_code_cases(LARGE_SHAPES)
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_large_single_ops_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_large_single_ops(backend, device, code, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", UNEVEN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_qr_of_columns_of_very_different_sizes(backend, device, shape, dtype):
    check_uneven_columns(backend, device, shape, dtype)


@shape_code_cases(LARGE_SHAPES)
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_tiny_components_are_projected(backend, device, code, shape, dtype):
    check_tiny_components(backend, device, code, shape, dtype)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_cpu_kernels), "torch"])
def test_fgsgd_moves_tiny_filters_onto_their_manifolds(backend):
    """FGSGD's projection at construction takes filters of 1e-23 (fp32: their norms underflow to 0; they were refused
    as all-zero) and 1e-22 (landed with norm 1.01 on the sphere) to their manifolds."""
    from torch import nn

    from fgsgd_cuda import FGSGD

    gen = make_gen(31)
    for scale in (1e-22, 1e-23):
        conv = nn.Conv2d(4, 6, 3)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * scale)
        FGSGD([{"params": [conv.weight], "manifolds": ["sphere"], "backend": backend}], lr=0.1)
        norms = conv.weight.detach().double().flatten(1).reshape(-1, 9).norm(dim=1)
        assert float((norms - 1).abs().max()) < 1e-6, scale
