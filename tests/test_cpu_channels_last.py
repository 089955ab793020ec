"""The CPU step and tangent_sqnorm on channels-last conv weights, which the ``cpu`` backend reads where they are
(csrc/cpu/interleaved.h: the filters of a run of components go through a tile in cache), against the float64
reference, on every instruction set of the fast path this machine runs and on the scalar path.

A channels-last (O, I, kh, kw) weight holds entry e of filter (o, i) at o·kh·kw·I + e·I + i. The sizes put I below
the tile (512 3×3 components) and above it, tiles across output channels and channels across tiles, and I at a
multiple of no lane width; 3×3 filters take the fast path, 5×5 and 3×1 the scalar one, and 12×1 (short rows: the
contiguous ones take the row kernel, which once read channels-last ones as contiguous) too. Every call mixes channels-last and
contiguous weights, packed and plain codes. Besides the reference, each result is compared with the same step
on the contiguous weight: a few units in the last place apart at most (the SIMD blocks group components
differently in the tiles, and the math has branches uniform over a block's lanes).
"""
from __future__ import annotations

import pytest
import torch

from conftest import codes_for, make_gen, rel_err, requires_cpu_kernels
from fgsgd_cuda import codes as C
from fgsgd_cuda import ops
from fgsgd_cuda import reference as R
from test_cpu_fast_path import CASES, _inputs, _tol, isa  # noqa: F401  (isa: the fixture, every instruction set)

pytestmark = requires_cpu_kernels

CL = torch.channels_last
SHAPES = [(3, 3), (5, 5), (3, 1), (12, 1)]
SIZES = [(7, 37), (3, 300), (2, 64), (2, 700)]  # (O, I)


def _weights(shape, dtype, gen, hp, packed_every=2):
    """Per (O, I) of SIZES and one contiguous extra: (p, g, m, codes, R, group_index, group_scale, s_g) in float64
    as (O, I, a, b), the codes random over the shape's codes (every other tensor's packed)."""
    a, b = shape
    allowed = codes_for(a, b)
    out = []
    for k, (o, i) in enumerate(SIZES + [(5, 11)]):
        n = o * i
        codes = torch.tensor(allowed, dtype=torch.uint8)[torch.randint(len(allowed), (n,), generator=gen)]
        p, g, m, r, gi, gs, sg = _inputs(n, a, b, codes, gen, torch.float64, hp.get("rescale", False),
                                         hp.get("group_scale", False))
        kind = C.pack(codes) if k % packed_every == 0 else codes
        out.append(([x.reshape(o, i, a, b) for x in (p, g, m)], codes, kind, r, gi, gs, sg))
    return out


def _layouts(n):
    """Channels-last for all but the last (contiguous) tensor."""
    return [k < n - 1 for k in range(n)]


def _copy(x, dtype, fmt=torch.contiguous_format):
    """A fresh dtype copy of x in the layout fmt (the step works in place: the float64 inputs must survive it)."""
    return torch.empty_like(x, dtype=dtype, memory_format=fmt).copy_(x)


def _step(weights, dtype, hp, channels_last):
    kw = {k: v for k, v in hp.items() if k not in ("rescale", "group_scale")}
    fmt = [CL if cl else torch.contiguous_format for cl in channels_last]
    p = [_copy(w[0][0], dtype, f) for w, f in zip(weights, fmt)]
    g = [_copy(w[0][1], dtype, f) for w, f in zip(weights, fmt)]
    m = [_copy(w[0][2], dtype) for w in weights]  # the momentum buffer stays contiguous
    rs = [w[3].to(dtype) for w in weights if w[3] is not None]
    gis = [w[4] for w in weights if w[4] is not None]
    gss = [w[5].to(dtype) for w in weights if w[5] is not None]
    ops.step_(p, g, m if kw.get("momentum") else [], [w[2] for w in weights], backend="cpu", rescale=rs,
              group_index=gis, group_scale=gss, **kw)
    for x, f in zip(p, fmt):
        assert x.is_contiguous(memory_format=f), "the step kept the weight's layout"
    return p, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_on_channels_last_weights(isa, case, dtype):
    hp = CASES[case]
    kw = {k: v for k, v in hp.items() if k not in ("rescale", "group_scale")}
    ulp = torch.finfo(dtype).eps
    for shape in SHAPES:
        weights = _weights(shape, dtype, make_gen(list(CASES).index(case) + 10 * shape[0] + shape[1]), hp)
        cl = _layouts(len(weights))
        # 12×1: the contiguous weights take the row kernel, the channels-last ones the per-component path (another
        # order of operations: up to 13 ulp apart in fp64, each within the reference's tolerance)
        close = (32 if shape == (12, 1) else 8) * ulp
        got_p, got_m = _step(weights, dtype, hp, cl)
        flat_p, flat_m = _step(weights, dtype, hp, [False] * len(weights))  # the same step, contiguous weights
        for k, ((p, g, m), codes, _, r, _, _, sg) in enumerate(weights):
            n = codes.numel()
            flat = [x.reshape(n, *shape) for x in (p, g, m)]
            ref_p, ref_m = R.step(*flat, codes.long(), r, sg, **kw)
            what = f"{isa} {case} {shape} tensor {k} ({'channels-last' if cl[k] else 'contiguous'})"
            pairs = [(got_p[k], ref_p, flat_p[k])] + ([(got_m[k], ref_m, flat_m[k])] if kw.get("momentum") else [])
            for got, ref, same in pairs:
                e = rel_err(got.reshape(n, *shape), ref)
                assert e <= _tol(dtype), f"{what}: relative error {e:.3g} > {_tol(dtype):g}"
                torch.testing.assert_close(got, same, rtol=close, atol=close, msg=f"{what}: against contiguous")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tangent_sqnorm_on_channels_last_weights(isa, dtype):
    for shape in SHAPES:
        weights = _weights(shape, dtype, make_gen(40 + shape[0]), {"rescale": True})
        cl = _layouts(len(weights))
        ps = [_copy(w[0][0], dtype, CL if c else torch.contiguous_format) for w, c in zip(weights, cl)]
        gs = [_copy(w[0][1], dtype, CL if c else torch.contiguous_format) for w, c in zip(weights, cl)]
        rs = [w[3].to(dtype) for w in weights]
        got = ops.tangent_sqnorm(ps, gs, [w[2] for w in weights], rescale=rs, weight_decay=0.01, backend="cpu")
        ref = torch.cat([R.tangent_sqnorm(w[0][0].reshape(-1, *shape), w[0][1].reshape(-1, *shape), w[1].long(),
                                          w[3], weight_decay=0.01) for w in weights])
        e = rel_err(got, ref)
        assert e <= _tol(dtype), f"{isa} {shape}: relative error {e:.3g}"


def test_channels_last_layout_errors():
    """The gradient must have the weight's layout and the momentum buffer must be contiguous; other strides, the
    ops that do not take channels-last weights and channels-last n×1 row filters (streamed contiguous only) are
    refused by name, and nothing is changed."""
    gen = make_gen(5)
    p = torch.randn(4, 6, 3, 3, generator=gen).contiguous(memory_format=CL)
    g = torch.randn(4, 6, 3, 3, generator=gen)
    m = torch.zeros(4, 6, 3, 3)
    codes = torch.full((24,), 1, dtype=torch.uint8)
    before = p.clone()
    with pytest.raises(ValueError, match=r"^grads\[0\]: must be channels-last, as params\[0\] is"):
        ops.step_([p], [g], [m], [codes], lr=0.1, momentum=0.9, backend="cpu")
    with pytest.raises(RuntimeError, match=r"fgsgd: grads\[0\] must be channels-last, as params\[0\] is"):
        torch.ops.fgsgd.step_([p], [g], [m], [codes], [], [], [], 0.1, 0.9, 0.0, False, 0.0, False, False)
    gcl = g.contiguous(memory_format=CL)
    with pytest.raises(ValueError, match=r"^momentum_buffers\[0\]: must be contiguous"):
        ops.step_([p], [gcl], [m.contiguous(memory_format=CL)], [codes], lr=0.1, momentum=0.9, backend="cpu")
    odd = torch.randn(6, 4, 3, 3, generator=gen).transpose(0, 1)  # neither contiguous nor channels-last
    with pytest.raises(ValueError, match=r"^params\[0\]: must be contiguous .*or a channels-last"):
        ops.step_([odd], [odd.clone()], [m], [codes], lr=0.1, momentum=0.9, backend="cpu")
    with pytest.raises(RuntimeError, match=r"fgsgd: params\[0\] must be contiguous \(or a channels-last"):
        torch.ops.fgsgd.tangent_sqnorm([odd], [odd.clone()], [codes], [], 0.0)
    with pytest.raises(ValueError, match=r"^params\[0\]: must be contiguous"):
        ops.projx_([p], [codes], backend="cpu")
    rows = torch.randn(4, 6, 65, 1, generator=gen).contiguous(memory_format=CL)  # 65×1 row components
    rows_before = rows.clone()
    with pytest.raises(ValueError, match=r"^params\[0\]: must be contiguous"):
        ops.step_([rows], [rows.clone()], [], [codes], lr=0.1, backend="cpu")
    with pytest.raises(RuntimeError, match=r"fgsgd: params\[0\] must be contiguous"):
        torch.ops.fgsgd.step_([rows], [rows.clone()], [], [codes], [], [], [], 0.1, 0.0, 0.0, False, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"fgsgd: params\[0\] must be contiguous"):
        torch.ops.fgsgd.tangent_sqnorm([rows], [rows.clone()], [codes], [], 0.0)
    assert torch.equal(rows, rows_before)
    with pytest.raises(ValueError, match=r"^params\[0\]: must be contiguous"):
        ops.step_([p], [gcl], [m], [codes], lr=0.1, momentum=0.9, backend="torch")
    assert torch.equal(p, before) and torch.equal(m, torch.zeros_like(m))
