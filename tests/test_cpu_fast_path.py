"""The CPU fused step (``step_`` on the ``cpu`` backend) against the float64 reference, on every
instruction set of the CPU fast path this machine runs (csrc/cpu/fast*.{h,cpp}: "avx512", "avx2", "base")
and on the scalar per-component path ("scalar").

The fast path runs W components at once on SIMD lanes (W = 4..16): the sizes here are multiples of
no lane width, the codes vary lane to lane (random) and in runs, several tensors go in one call,
and every hyper-parameter path of the step is exercised. Shapes without a fast path (all but 3×3)
must give the same results through the scalar path.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from conftest import (FP32_RTOL, RADIAL_SHAPES, SHAPES, SHORT_ROW, check_large_steps, check_radial_gradients,
                      check_step_sizes, codes_for, make_gen, make_row_tensors, random_points, random_tangents, rel_err,
                      requires_cpu_kernels, shape_code_cases, with_zero_momentum)
from fgsgd_cuda import _ext, ops
from fgsgd_cuda import codes as C
from fgsgd_cuda import reference as R

pytestmark = requires_cpu_kernels

FP64_RTOL = 1e-12


def _isas() -> list[str]:
    """The instruction sets this build and CPU can run (the library's default first)."""
    if not _ext.HAS_CPU_KERNELS or not hasattr(_ext._C, "_cpu_isa"):
        return ["default"]
    default = _ext._C._cpu_isa()
    out = [default]
    for name in ("avx512", "avx2", "base", "scalar"):
        if name not in out and _ext._C._set_cpu_isa(name):
            out.append(name)
    _ext._C._set_cpu_isa(default)
    return out


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param == "default":
        yield request.param
        return
    before = _ext._C._cpu_isa()
    assert _ext._C._set_cpu_isa(request.param)
    yield request.param
    _ext._C._set_cpu_isa(before)


def _tol(dtype):
    return FP32_RTOL if dtype == torch.float32 else FP64_RTOL


# Hyper-parameter cases: every branch of component_step (momentum, dampening, nesterov, first step,
# stabilize, weight decay on euclidean components, rescale R, group step size s_g).
CASES = {
    "momentum": dict(lr=0.1, momentum=0.9),
    "plain_sgd": dict(lr=0.05),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.3),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "first_step": dict(lr=0.1, momentum=0.9, first_step=True),
    "stabilize": dict(lr=0.2, momentum=0.5, stabilize=True),
    "weight_decay": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "rescale": dict(lr=0.1, momentum=0.9, rescale=True),
    "group_scale": dict(lr=0.1, momentum=0.9, group_scale=True),
    "everything": dict(lr=0.3, momentum=0.7, nesterov=True, weight_decay=3e-3, stabilize=True, rescale=True,
                       group_scale=True),
}


def _inputs(n, a, b, codes, gen, dtype, rescale=False, group_scale=False):
    """(p, g, m, codes, R, group_index, group_scale, s_g per component) in float64 and the kernel dtype."""
    w = random_points(n, a, b, codes, gen)                       # on the manifolds (float64)
    r = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)) if rescale else None
    p = w if r is None else w * r.reshape(n, 1, 1)
    g = torch.randn(n, a, b, generator=gen, dtype=torch.float64)
    m = random_tangents(w, codes, gen, scale=0.3)
    if group_scale:
        groups = max(1, n // 5)
        gi = torch.randint(groups, (n,), generator=gen, dtype=torch.int32)
        gs = 0.2 + torch.rand(groups, generator=gen, dtype=torch.float64)
        sg = gs[gi.long()]
    else:
        gi = gs = sg = None
    return p, g, m, r, gi, gs, sg


def _run(ps, gs_, ms, codes, rs, gis, gss, dtype, hp):
    """The compiled step on dtype copies; returns the new (p, m) lists."""
    p = [x.to(dtype, copy=True).contiguous() for x in ps]  # copies: the step works in place
    g = [x.to(dtype, copy=True).contiguous() for x in gs_]
    m = [x.to(dtype, copy=True).contiguous() for x in ms]
    kw = {k: v for k, v in hp.items() if k not in ("rescale", "group_scale")}
    ops.step_(p, g, m if kw.get("momentum") else [], codes, backend="cpu",
              rescale=[r.to(dtype) for r in rs] if rs else (),
              group_index=gis if gis else (), group_scale=[s.to(dtype) for s in gss] if gss else (), **kw)
    return p, m


def _reference(p, g, m, codes, r, sg, hp):
    kw = {k: v for k, v in hp.items() if k not in ("rescale", "group_scale")}
    return R.step(p, g, m, codes.long(), r, sg, **kw)


def _check(tensors, dtype, hp, what):
    """tensors: list of (p, g, m, codes, R, group_index, group_scale, s_g) in float64."""
    ps, gs_, ms, cs, rs, gis, gss, sgs = map(list, zip(*tensors))
    got_p, got_m = _run(ps, gs_, ms, cs, [r for r in rs if r is not None], [x for x in gis if x is not None],
                        [x for x in gss if x is not None], dtype, hp)
    tol = _tol(dtype)
    for k, (p, g, m, c, r, _, _, sg) in enumerate(tensors):
        ref_p, ref_m = _reference(p, g, m, c, r, sg, hp)
        e = rel_err(got_p[k], ref_p)
        assert e <= tol, f"{what}: p[{k}] relative error {e:.3g} > {tol:g}"
        if hp.get("momentum"):
            e = rel_err(got_m[k], ref_m)
            assert e <= tol, f"{what}: m[{k}] relative error {e:.3g} > {tol:g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_every_code_and_mix(isa, shape, dtype):
    """Each code alone, and all codes random per component, against the reference."""
    a, b = shape
    allowed = codes_for(a, b)
    gen = make_gen(10 * a + b)
    n = 1237 if shape == (3, 3) else 67
    for code in allowed + ["mix"]:
        codes = (torch.tensor(allowed, dtype=torch.uint8)[torch.randint(len(allowed), (n,), generator=gen)]
                 if code == "mix" else torch.full((n,), code, dtype=torch.uint8))
        p, g, m, r, gi, gs, sg = _inputs(n, a, b, codes, gen, dtype)
        _check([(p, g, m, codes, r, gi, gs, sg)], dtype, CASES["momentum"], f"{isa} {shape} code {code}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_hyper_parameters(isa, case, dtype):
    """Every step option on 3×3 (the fast path) and 3×2 (the scalar path), mixed codes."""
    hp = CASES[case]
    for a, b in [(3, 3), (3, 2)]:
        gen = make_gen(list(CASES).index(case))
        allowed = codes_for(a, b)
        n = 517
        codes = torch.tensor(allowed, dtype=torch.uint8)[torch.randint(len(allowed), (n,), generator=gen)]
        p, g, m, r, gi, gs, sg = _inputs(n, a, b, codes, gen, dtype, hp.get("rescale", False),
                                         hp.get("group_scale", False))
        _check([(p, g, m, codes, r, gi, gs, sg)], dtype, hp, f"{isa} {case} {a}x{b}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_many_tensors_runs_and_chunks(isa, dtype):
    """Several tensors in one call, sizes past the chunk size (1024) and the parallel grain, codes in
    runs of varying length (the PIO layout) and random, some tensors of a single code."""
    gen = make_gen(7)
    tensors = []
    for n, layout in [(1, "single"), (15, "random"), (4099, "runs"), (2500, "random"), (3000, "single"),
                      (33, "runs")]:
        if layout == "single":
            codes = torch.full((n,), 5, dtype=torch.uint8)
        elif layout == "random":
            codes = torch.tensor([1, 3, 5], dtype=torch.uint8)[torch.randint(3, (n,), generator=gen)]
        else:
            lengths = torch.randint(1, 40, (n,), generator=gen)
            kinds = torch.tensor([1, 3, 5, 0, 6], dtype=torch.uint8)[torch.randint(5, (n,), generator=gen)]
            codes = kinds.repeat_interleave(lengths)[:n].contiguous()
        tensors.append((*_inputs(n, 3, 3, codes, gen, dtype)[:3], codes, None, None, None, None))
    _check(tensors, dtype, CASES["momentum"], f"{isa} many tensors")
    tensors = [(p, g, m, c, *_inputs(p.shape[0], 3, 3, c, gen, dtype, True, True)[3:]) for p, g, m, c, *_ in tensors]
    _check(tensors, dtype, CASES["everything"], f"{isa} many tensors, everything")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_edge_values(isa, dtype):
    """Zero gradients and momenta (the small-t branch of the exp retraction: t = 0), long exp steps
    (t up to ~20 rad: range reduction), and an exp step so long (t > 8192) that the fast path's sin/cos
    go through libm: there the result need only stay on the sphere."""
    gen = make_gen(3)
    n = 301
    for code in (2, 4):
        codes = torch.full((n,), code, dtype=torch.uint8)
        p, g, m, *_ = _inputs(n, 3, 3, codes, gen, dtype)
        zero = [(p, torch.zeros_like(g), torch.zeros_like(m), codes, None, None, None, None)]
        _check(zero, dtype, CASES["momentum"], f"{isa} zero step, code {code}")
        big = [(p, g * 20, m, codes, None, None, None, None)]
        _check(big, dtype, dict(lr=0.3, momentum=0.5), f"{isa} long exp step, code {code}")
    codes = torch.full((n,), 2, dtype=torch.uint8)
    p, g, m, *_ = _inputs(n, 3, 3, codes, gen, dtype)
    got_p, _ = _run([p], [g], [m], [codes], [], [], [], dtype, dict(lr=1e5, momentum=0.9))
    norms = got_p[0].double().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=10 * _tol(dtype)), "sphere exp with t > 8192"



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_writes_stay_inside_the_tensor(isa, dtype):
    """The fast path stores whole components (16-lane registers, masked stores): tensors that are slices of a
    larger buffer, at every offset modulo a lane width, step exactly as the same tensors on their own, and the
    elements around them keep their bits."""
    gen = make_gen(zlib.crc32(repr(("inside", isa, str(dtype))).encode()))
    for start, n in [(0, 33), (1, 17), (5, 16), (7, 1), (3, 100)]:
        codes = torch.tensor([1, 3, 5, 0], dtype=torch.uint8)[torch.randint(4, (n,), generator=gen)]
        p, g, m, *_ = _inputs(n, 3, 3, codes, gen, dtype)
        want_p, want_m = _run([p], [g], [m], [codes], [], [], [], dtype, CASES["momentum"])
        total = start + n + 3
        bufs = [torch.randn(total, 3, 3, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2)]
        before = [b.clone() for b in bufs]
        bufs[0][start:start + n] = p.to(dtype)
        bufs[1][start:start + n] = m.to(dtype)
        pv, mv = bufs[0][start:start + n], bufs[1][start:start + n]  # views with a storage offset
        ops.step_([pv], [g.to(dtype)], [mv], [codes], backend="cpu", **CASES["momentum"])
        assert torch.equal(pv, want_p[0]) and torch.equal(mv, want_m[0]), f"{isa}: start {start}, n {n}"
        for b, b0 in zip(bufs, before):
            assert torch.equal(b[:start], b0[:start]) and torch.equal(b[start + n:], b0[start + n:]), \
                f"{isa}: start {start}, n {n}: an element outside the tensor changed"

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(3, 3), (5, 3), (4, 4)], ids=["3x3", "5x3", "4x4"])
@pytest.mark.parametrize("code", [2, 4, 5, 6], ids=["sphere-exp", "oblique-exp", "qr", "cayley"])
def test_retraction_at_every_step_size(isa, code, shape, dtype):
    """The step's exp, qr and cayley retractions at steps from ‖lr·d‖ = 1e-3 to 300 on every instruction set
    (conftest.check_step_sizes; tests/test_step_sizes.py runs it on every backend)."""
    check_step_sizes(with_zero_momentum(_step_pm(dtype)), code, shape, dtype)


@shape_code_cases([(3, 3), (5, 3), (7, 7), SHORT_ROW])
def test_large_finite_steps_stay_on_the_manifold(isa, code, shape, dtype):
    """Gradients up to near the largest float on every instruction set (conftest.check_large_steps; the overflow
    guards and large-step paths are uniform branches over the lanes, so each ISA's blocks take them)."""
    check_large_steps(_step_pm(dtype), code, shape, dtype)


@shape_code_cases(RADIAL_SHAPES + [SHORT_ROW])
def test_radial_gradients_stay_on_the_manifold(isa, code, shape, dtype):
    """Gradients mostly along the point on every instruction set (conftest.check_radial_gradients)."""
    check_radial_gradients(_step_pm(dtype), code, shape, dtype)


def _step_pm(dtype):
    """run(p, g, m, codes, hp): the compiled step of p and m in place (conftest.backend_step_pm's contract)."""
    def run(p, g, m, codes, hp):
        p_new, m_new = _run([p], [g], [m], [codes], [], [], [], dtype, hp)
        p.copy_(p_new[0])
        m.copy_(m_new[0])
    return run


@pytest.mark.parametrize("packed", [False, True], ids=["bytes", "packed"])
def test_unknown_codes_match_scalar_path(isa, packed):
    """Codes outside 0..6 (never produced by fgsgd_cuda, refused by ops.step_ on the CPU, not checked per component
    by the kernels, for speed) take the scalar path's default branches on every instruction set, through the C++ op:
    the results are the scalar path's.
    (With stabilize off, an unknown code leaves p where it was and keeps m as its tangent.) Packed: a palette
    with unknown codes (the fast path then classifies by code, not by palette slot)."""
    if isa == "default" or "scalar" not in ISAS:
        pytest.skip("needs the instruction-set switch")
    gen = make_gen(11)
    n = 100
    kinds = [1, 7, 3, 200] if packed else [1, 7, 3, 200, 5, 9]
    codes = torch.tensor(kinds, dtype=torch.uint8)[torch.randint(len(kinds), (n,), generator=gen)]
    known = torch.where(codes > 6, torch.ones_like(codes), codes)
    p, g, m, *_ = _inputs(n, 3, 3, known, gen, torch.float32)
    unknown = codes > 6
    if packed:
        codes = C.pack(codes)
        assert codes.dtype == torch.int32
    def run():
        p1, g1, m1 = p.clone(), g.clone(), m.clone()
        torch.ops.fgsgd.step_([p1], [g1], [m1], [codes], [], [], [], 0.1, 0.9, 0.0, False, 0.0, False, False)
        return p1, m1
    assert CASES["momentum"] == dict(lr=0.1, momentum=0.9)
    got_p, got_m = run()
    _ext._C._set_cpu_isa("scalar")
    try:
        want_p, want_m = run()
    finally:
        _ext._C._set_cpu_isa(isa)
    # the same operations, up to rounding (the AVX2 and AVX-512 units contract a*b+c into FMAs)
    assert rel_err(got_p[unknown], want_p[unknown]) < 1e-6
    assert rel_err(got_m[unknown], want_m[unknown]) < 1e-6
    assert rel_err(got_p[~unknown], want_p[~unknown]) < 1e-5


def test_isa_switch():
    """The instruction-set switch: names this CPU cannot run are refused and change nothing."""
    if not hasattr(_ext._C, "_cpu_isa"):
        pytest.skip("no instruction-set switch in this build")
    before = _ext._C._cpu_isa()
    assert before in ("avx512", "avx2", "base", "scalar")
    assert not _ext._C._set_cpu_isa("no-such-isa")
    assert _ext._C._cpu_isa() == before
    assert _ext._C._set_cpu_isa("scalar") and _ext._C._cpu_isa() == "scalar"
    assert _ext._C._set_cpu_isa(before)



def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


def test_widest_instruction_set_is_the_default():
    """Where the CPU has AVX-512 F/VL/DQ/BW (Linux: /proc/cpuinfo) and the build has the fast paths, the
    AVX-512 lanes run by default (unless FGSGD_CPU_ISA chose); where it lacks them they are refused."""
    flags = _cpu_flags()
    if not hasattr(_ext._C, "_cpu_isa") or not flags:
        pytest.skip("needs the instruction-set switch and /proc/cpuinfo")
    before = _ext._C._cpu_isa()
    try:
        if not ({"avx2", "fma"} <= flags and _ext._C._set_cpu_isa("avx2")):
            pytest.skip("this build or CPU has no AVX2 fast path")
        has512 = {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= flags
        assert _ext._C._set_cpu_isa("avx512") == has512
        if "FGSGD_CPU_ISA" not in os.environ:
            assert before == ("avx512" if has512 else "avx2")
    finally:
        _ext._C._set_cpu_isa(before)

ROW_CASES = {"momentum": dict(momentum=0.9), "sgd-stabilize": dict(momentum=0.0, stabilize=True),
             "first-nesterov-wd": dict(momentum=0.5, nesterov=True, first_step=True, weight_decay=0.05),
             "nesterov-stabilize": dict(momentum=0.9, nesterov=True, stabilize=True),
             "first": dict(momentum=0.9, first_step=True, dampening=0.2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(ROW_CASES))
@pytest.mark.parametrize("n", [203, 23])
def test_rows_on_every_instruction_set(isa, case, dtype, n):
    """Row components (serial_row.h: one compiled copy per instruction set, vectorised loops) against the
    float64 reference: each momentum mode × nesterov specialisation, n odd and not a multiple of the lanes
    (23: a short row, streamed as well), ‖ω‖ drifted for stabilize, and ‖ξ‖² (tangent_sqnorm)."""
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(ROW_CASES[case])
    gen = make_gen(zlib.crc32(repr(("rows-isa", case, str(dtype), n)).encode()))
    ts = make_row_tensors([5, 33], n, dtype, gen, drift=hp["stabilize"])
    ps, ms = [t["p"].clone() for t in ts], [t["m"].clone() for t in ts]
    ops.step_(ps, [t["g"] for t in ts], ms, [t["codes"] for t in ts], rescale=[t["r"] for t in ts],
              group_index=[t["gi"] for t in ts], group_scale=[t["gs"] for t in ts], backend="cpu", **hp)
    tol = _tol(dtype)
    for k, t in enumerate(ts):
        s = t["gs"].double()[t["gi"].long()]
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None,
                              t["codes"], t["r"].double(), s, **hp)
        assert rel_err(ps[k], p_ref) <= tol, f"{isa}: params[{k}]"
        if hp["momentum"]:
            assert rel_err(ms[k], m_ref) <= tol, f"{isa}: momentum_buffers[{k}]"
    sq = ops.tangent_sqnorm([t["p"] for t in ts], [t["g"] for t in ts], [t["codes"] for t in ts],
                            rescale=[t["r"] for t in ts], weight_decay=0.03, backend="cpu")
    ref = R.tangent_sqnorm(torch.cat([t["p"].double() for t in ts]), torch.cat([t["g"].double() for t in ts]),
                           torch.cat([t["codes"] for t in ts]), torch.cat([t["r"].double() for t in ts]), 0.03)
    assert rel_err(sq, ref) <= tol, f"{isa}: tangent_sqnorm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_tangent_sqnorm_on_every_instruction_set(isa, wd, dtype):
    """‖ξ‖² of 3×3 components (the blocks of the fast path, sqnorm_block) against the float64 reference: every
    code interleaved, runs of one code, a tail, R, several tensors; unknown codes take the scalar path."""
    gen = make_gen(zlib.crc32(repr(("sqnorm-isa", wd, str(dtype))).encode()))
    sizes = [1, 37, 300, 1001]
    tensors = []
    for k, n in enumerate(sizes):
        if k == 2:   # runs of one code, as a deterministic grouping gives
            codes = torch.tensor(codes_for(3, 3), dtype=torch.uint8).repeat_interleave(48)[:n].contiguous()
        else:
            codes = torch.tensor(codes_for(3, 3), dtype=torch.uint8)[torch.randint(len(codes_for(3, 3)), (n,),
                                                                                    generator=gen)]
        p, g, _, r, *_ = _inputs(n, 3, 3, codes, gen, dtype, rescale=True)
        tensors.append((p, g, codes, r))
    got = ops.tangent_sqnorm([p.to(dtype) for p, *_ in tensors], [g.to(dtype) for _, g, *_ in tensors],
                             [c for *_, c, _ in tensors], rescale=[r.to(dtype) for *_, r in tensors],
                             weight_decay=wd, backend="cpu")
    ref = R.tangent_sqnorm(torch.cat([p for p, *_ in tensors]), torch.cat([g for _, g, *_ in tensors]),
                           torch.cat([c for *_, c, _ in tensors]).long(), torch.cat([r for *_, r in tensors]), wd)
    assert got.dtype == torch.float64  # for every dtype (ops.tangent_sqnorm)
    assert rel_err(got, ref) <= _tol(dtype), f"{isa}"
    # codes outside 0..6 (the scalar path's default branch: no projection) agree with the scalar ISA; through the
    # C++ op, as ops.tangent_sqnorm refuses them
    if isa != "default" and "scalar" in ISAS:
        codes = tensors[3][2].clone()
        codes[::7] = 9
        args = ([tensors[3][0].to(dtype)], [tensors[3][1].to(dtype)], [codes], [], wd)
        fast = torch.ops.fgsgd.tangent_sqnorm(*args)
        _ext._C._set_cpu_isa("scalar")
        try:
            slow = torch.ops.fgsgd.tangent_sqnorm(*args)
        finally:
            _ext._C._set_cpu_isa(isa)
        assert rel_err(fast, slow) <= _tol(dtype)
