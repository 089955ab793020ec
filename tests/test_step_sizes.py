"""The step's retractions at every step size on every backend (conftest.check_step_sizes): the C++ header's
shortcuts with their fallbacks (Cholesky QR / Householder, Taylor series / cos and sin) and its closed-form 3-row
Cayley on the cpu and cuda backends, and the torch backend's own algorithms. tests/test_cpu_fast_path.py runs the
cpu backend on every instruction set, tests/test_triton.py the Triton backend (on the GPU, or under
TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

from conftest import CPU_TORCH_CUDA, backend_step, check_step_sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(3, 3), (5, 3)], ids=["3x3", "5x3"])
@pytest.mark.parametrize("code", [2, 4, 5, 6], ids=["sphere-exp", "oblique-exp", "qr", "cayley"])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_retraction_at_every_step_size(backend, device, code, shape, dtype):
    check_step_sizes(backend_step(backend, device), code, shape, dtype)
