"""One million random 3×3 components: the compiled CPU ops against the float64 reference for every
manifold and retraction (proj, retr, projx), and one fused step_ over a million mixed components."""
from __future__ import annotations

import pytest
import torch

from conftest import FP32_RTOL, make_gen, random_codes, random_points, random_tangents, rel_err, requires_cpu_kernels
from fgsgd_cuda import codes as C
from fgsgd_cuda import manifolds as M
from fgsgd_cuda import reference as R
from manifold_checks import constraint_error

# About 37 s of CPU time (≈105 s wall on the shared 2-core machine it was written on), over the 40 s
# budget of the default suite: marked slow.
pytestmark = [requires_cpu_kernels, pytest.mark.slow]
N = 1_000_000
F64 = torch.float64


class _Data:
    """Inputs made once per module (the expensive part is the float64 reference), and the reference
    pieces that several codes share (one per manifold), made lazily."""

    def __init__(self):
        gen = make_gen(10 ** 6)
        self.x32 = torch.randn(N, 3, 3, generator=gen, dtype=torch.float32)      # off-manifold, never zero
        self.u32 = torch.randn(N, 3, 3, generator=gen, dtype=torch.float32)
        self._points = {}
        self._tangents = {}

    def points(self, man: str):
        """(projx reference of x32 in float64, the same points in fp32)."""
        if man not in self._points:
            ref = M.manifold(man).projx(self.x32.double()).contiguous()
            self._points[man] = (ref, ref.float())
        return self._points[man]

    def proj_ref(self, man: str):
        """Π at the fp32 points of the fp32 u, in float64."""
        if man not in self._tangents:
            _, p32 = self.points(man)
            self._tangents[man] = M.manifold(man).proj(p32.double(), self.u32.double())
        return self._tangents[man]


@pytest.fixture(scope="module")
def data():
    return _Data()


@pytest.mark.parametrize("code", C.ALL_CODES, ids=[f"{C.manifold_of(c)}-{C.retraction_of(c)}" for c in C.ALL_CODES])
def test_million_proj_retr_projx(data, code):
    man_name = C.manifold_of(code)
    man = M.from_code(code)
    points_ref, p32 = data.points(man_name)

    got = torch.ops.fgsgd.proj(p32, data.u32, code)
    xi_ref = data.proj_ref(man_name)
    assert rel_err(got, xi_ref) <= FP32_RTOL

    v32 = (0.3 * xi_ref).float()                      # tangent, ‖v‖ ~ 0.5
    got = torch.ops.fgsgd.retr(p32, v32, code)
    assert rel_err(got, man.retr(p32.double(), v32.double())) <= FP32_RTOL
    assert constraint_error(got, code, spectral=False) <= 1e-5

    got = torch.ops.fgsgd.projx(data.x32, code)
    assert rel_err(got, points_ref) <= FP32_RTOL
    assert constraint_error(got, code, spectral=False) <= 1e-5


def test_million_step(data):
    gen = make_gen(10 ** 6 + 1)
    codes = random_codes(N, 3, 3, gen)
    counts = torch.bincount(codes.long(), minlength=len(C.ALL_CODES))
    assert bool((counts > 100_000).all())              # every code is there, many times
    r = 0.5 + 1.5 * torch.rand(N, generator=gen, dtype=F64)
    w = random_points(N, 3, 3, codes, gen)
    p = (w * r.reshape(-1, 1, 1)).float()
    m = random_tangents(w, codes, gen, scale=0.5).float()
    g = data.u32
    group_index = torch.randint(N // 4, (N,), generator=gen, dtype=torch.int32)
    group_scale = (0.2 + 0.8 * torch.rand(N // 4, generator=gen, dtype=F64)).float()
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, first_step=False,
              stabilize=False)
    p_ref, m_ref = R.step(p.double(), g.double(), m.double(), codes, r.float().double(),
                          group_scale.double()[group_index.long()], **hp)
    p_new, m_new = p.clone(), m.clone()
    torch.ops.fgsgd.step_([p_new], [g], [m_new], [codes], [r.float()], [group_index], [group_scale], hp["lr"],
                          hp["momentum"], hp["dampening"], hp["nesterov"], hp["weight_decay"], hp["first_step"],
                          hp["stabilize"])
    assert rel_err(p_new, p_ref) <= FP32_RTOL
    assert rel_err(m_new, m_ref) <= FP32_RTOL
    w_new = p_new.double() / r.float().double().reshape(-1, 1, 1)
    for code in C.ALL_CODES:
        mask = codes == code
        assert rel_err(p_new[mask], p_ref[mask]) <= FP32_RTOL, C.manifold_of(code)
        assert constraint_error(w_new[mask], code, spectral=False) <= 1e-5
