"""group_clip with gradients beyond the float32 range of ‖ξ_i‖² (‖ξ_i‖ > 1.8e19) on every backend
(conftest.check_huge_group_clip; tests/test_triton.py runs it on Triton): ‖ξ_i‖² is float64 from tangent_sqnorm
on, so s_g = c/‖ξ_g‖ stays the clip it is, where a float32 sum made s_g = 0 and the step dropped the gradient.
Also through FGSGD itself (fgsgd_cuda/functional.py passes the parameters' dtype to group_scale)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CLIP_SHAPES, CPU_TORCH_CUDA, SHORT_ROW, check_huge_group_clip, rel_err, step_tolerances
from fgsgd_cuda import FGSGD, reference as R


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", CLIP_SHAPES + [SHORT_ROW], ids=[f"{a}x{b}" for a, b in CLIP_SHAPES + [SHORT_ROW]])
@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_huge_gradients_are_clipped(backend, device, shape, dtype):
    check_huge_group_clip(backend, device, shape, dtype)


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_optimizer_clips_huge_float32_gradients(backend, device):
    """FGSGD(group_clip=c) on float32 weights whose gradient has ‖ξ_i‖ ~ 1e25 (3×3 filters and 100×1 rows): the
    step is the float64 reference's, s_g = c/‖ξ_g‖, not a dropped gradient."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(8, 4, 3, 3), (6, 100, 1, 1)]
    ws = [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    opt = FGSGD([dict(params=ws[:1], manifolds=["sphere", "oblique", "stiefel"]),
                 dict(params=ws[1:], manifolds=["sphere", "oblique"])],  # rows: no stiefel
                lr=0.1, momentum=0.9, group_size=3, group_clip=2.0, backend=backend)
    before = [w.detach().cpu().double() for w in ws]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) * 1e25 for s in shapes]
    for w, g in zip(ws, grads):
        w.grad = g.to(torch.float32).to(device)
    opt.step()
    tol = step_tolerances(torch.float32)[0]
    for w, x, g in zip(ws, before, grads):
        st = opt.state[w]
        a, b = st["shape"]
        codes = opt.codes(w).long().cpu()
        grouping = opt.grouping(w)
        gi = grouping.group_index.cpu()
        x, g = x.reshape(-1, a, b), g.to(torch.float32).double().reshape(-1, a, b)
        s = R.group_step_size(R.tangent_sqnorm(x, g, codes), gi, st["num_groups"], 2.0)
        assert bool((s < 1e-20).all()), "every group is clipped by about 1e-25"
        p_ref, m_ref = R.step(x, g, None, codes, None, s[gi.long()], lr=0.1, momentum=0.9, first_step=True)
        assert rel_err(w.detach().cpu().reshape(-1, a, b), p_ref) <= tol, f"{tuple(w.shape)}: params"
        assert rel_err(st["momentum_buffer"].cpu().reshape(-1, a, b), m_ref) <= tol, f"{tuple(w.shape)}: momentum"
