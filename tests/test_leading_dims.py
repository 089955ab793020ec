"""The multi-tensor ops take (..., A, B) tensors as they are: a conv weight (O, I, kh, kw), its gradient and its
momentum buffer with kh×kw components, N = O·I (the optimizer passes them so, with no views to make). Every
backend gives the same bits as with the (N, A, B) views of the same tensors; a mismatch is refused by name."""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import backends_on, make_gen, make_step_tensors
from fgsgd_cuda import ops

BACKENDS = backends_on((("cpu", "cpu"), ("torch", "cpu"), ("triton", "cpu"), ("cuda", "cuda")))
# (leading shape of each tensor, component shape): conv weights of 3×3 and 7×7 filters, a 5-D tensor, and
# (N, A, B) itself beside them
LAYOUTS = [([(4, 3), (6, 2), (5,)], (3, 3)), ([(2, 3)], (7, 7)), ([(2, 2, 3), (7,)], (3, 2))]


def _tensors(layout, dtype, device, seed):
    """The step inputs of make_step_tensors reshaped to the leading shapes (p, g, m), and their (N, A, B) twins."""
    leads, shape = layout
    sizes = [int(torch.tensor(lead).prod()) for lead in leads]
    ts = make_step_tensors(sizes, shape, dtype, make_gen(seed))
    nd = [{k: (v.reshape(*lead, *shape).to(device) if k in ("p", "g", "m") else v.to(device)) if v is not None
           else None for k, v in t.items()} for t, lead in zip(ts, leads)]
    flat = [{k: (v.clone().reshape(-1, *shape) if k in ("p", "g", "m") else v) for k, v in t.items()} for t in nd]
    return nd, flat


def _lists(ts):
    return ([t["p"] for t in ts], [t["g"] for t in ts], [t["m"] for t in ts], [t["codes"] for t in ts],
            [t["r"] for t in ts], [t["gi"] for t in ts], [t["gs"] for t in ts])


@pytest.mark.parametrize("layout", LAYOUTS, ids=["conv3x3", "conv7x7", "5d-3x2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_on_leading_dims_match_the_views(backend, device, dtype, layout):
    nd, flat = _tensors(layout, dtype, device, zlib.crc32(repr((backend, dtype, layout)).encode()))
    (p, g, m, c, r, gi, gs), (pf, gf, mf, cf, rf, gif, gsf) = _lists(nd), _lists(flat)
    shapes = [t.shape for t in p]
    sq = ops.tangent_sqnorm(p, g, c, rescale=r, weight_decay=0.01, backend=backend)
    sqf = ops.tangent_sqnorm(pf, gf, cf, rescale=rf, weight_decay=0.01, backend=backend)
    assert torch.equal(sq, sqf) and sq.shape == (sum(t.shape[0] for t in pf),)
    hp = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, backend=backend)
    ops.step_(p, g, m, c, rescale=r, group_index=gi, group_scale=gs, **hp)
    ops.step_(pf, gf, mf, cf, rescale=rf, group_index=gif, group_scale=gsf, **hp)
    for k in range(len(p)):
        assert p[k].shape == shapes[k]
        assert torch.equal(p[k].reshape(pf[k].shape), pf[k]), f"params[{k}]"
        assert torch.equal(m[k].reshape(mf[k].shape), mf[k]), f"momentum_buffers[{k}]"
        assert not torch.equal(pf[k], flat[k]["p"].new_zeros(pf[k].shape))
    ratio = [1.0 + torch.rand(t.shape[0], dtype=dtype).to(device) for t in pf]
    ops.rescale_(p, c, ratio, backend=backend)
    ops.rescale_(pf, cf, ratio, backend=backend)
    ops.projx_(p, c, rescale=[r_ * q for r_, q in zip(r, ratio)], backend=backend)
    ops.projx_(pf, cf, rescale=[r_ * q for r_, q in zip(rf, ratio)], backend=backend)
    for k in range(len(p)):
        assert torch.equal(p[k].reshape(pf[k].shape), pf[k]), f"params[{k}] after rescale_ and projx_"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_leading_dims_mismatches_are_refused_by_name(backend, device):
    nd, _ = _tensors(LAYOUTS[0], torch.float32, device, 5)
    p, g, m, c, r, gi, gs = _lists(nd)
    before = [t.clone() for t in p]
    with pytest.raises(ValueError, match=r"^grads\[1\]: has shape \(3, 4, 3, 3\) but params\[1\] has shape "
                                         r"\(6, 2, 3, 3\)"):
        ops.step_(p, [g[0], g[1].reshape(3, 4, 3, 3), g[2]], m, c, lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match=r"^params\[1\]: one call takes one component shape"):
        ops.step_([p[0], p[1].reshape(6, 2, 9, 1)], g[:2], m[:2], c[:2], lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match=r"^codes\[0\]: expected a uint8 tensor of shape \(12,\)"):
        ops.step_(p[:1], g[:1], m[:1], [c[2]], lr=0.1, momentum=0.9, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(p, before))


def test_compiled_op_checks_leading_dims_by_name():
    """The C++ checks behind the compiled ops (called directly, past the Python ones)."""
    pytest.importorskip("fgsgd_cuda._C")
    nd, _ = _tensors(LAYOUTS[0], torch.float32, "cpu", 6)
    p, g, m, c, *_ = _lists(nd)
    with pytest.raises(RuntimeError, match=r"fgsgd: grads\[1\] has shape \(3, 4, 3, 3\) but params\[1\] has shape "
                                           r"\(6, 2, 3, 3\)"):
        torch.ops.fgsgd.step_(p, [g[0], g[1].reshape(3, 4, 3, 3), g[2]], m, c, [], [], [], 0.1, 0.9, 0.0, False,
                              0.0, False, False)
    with pytest.raises(RuntimeError, match=r"fgsgd: codes\[0\] must have shape \(12,\), got \(12, 1\)"):
        torch.ops.fgsgd.step_(p[:1], g[:1], m[:1], [c[0].reshape(12, 1)], [], [], [], 0.1, 0.9, 0.0, False, 0.0,
                              False, False)
    with pytest.raises(RuntimeError, match=r"fgsgd: params\[0\] must have shape \(N, A, B\) or \(\.\.\., A, B\), "
                                           r"got \(12, 9\)"):
        torch.ops.fgsgd.step_([p[0].reshape(12, 9)], [g[0].reshape(12, 9)], [], [c[0]], [], [], [], 0.1, 0.0, 0.0,
                              False, 0.0, False, False)
