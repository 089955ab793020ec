"""Finite gradients of any size give a finite step on the manifold, on every backend (conftest.check_large_steps):
the C++ header's overflow guards and large-step paths (rescaled norms for normalize and exp, Householder QR,
the closed-form 3-row Cayley rescaled, the pivoted and clamped Cayley for more rows) on the cpu and cuda
backends, and the torch manifolds' rescaled norms and clamped Cayley. Before them a diverging run could turn
weights into NaN with finite gradients (|g| ~ 1e20 in fp32; 1e5 for a 5×3 Cayley step). tests/test_cpu_fast_path.py
runs the check on every CPU instruction set, tests/test_triton.py on the Triton backend."""
from __future__ import annotations

import pytest
import torch

from conftest import backend_step_pm, backends_on, check_large_steps

BACKENDS = backends_on((("cpu", "cpu"), ("torch", "cpu"), ("cuda", "cuda")))  # triton: tests/test_triton.py


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(3, 3), (5, 3), (4, 4), (7, 7)], ids=["3x3", "5x3", "4x4", "7x7"])
@pytest.mark.parametrize("code", [1, 2, 3, 4, 5, 6],
                         ids=["sphere-normalize", "sphere-exp", "oblique-normalize", "oblique-exp", "qr", "cayley"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_finite_steps_stay_on_the_manifold(backend, device, code, shape, dtype):
    check_large_steps(backend_step_pm(backend, device), code, shape, dtype)
