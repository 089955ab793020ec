"""The Triton backend against the float64 reference (fgsgd_cuda.manifolds / fgsgd_cuda.reference).

How it runs:
- ``pytest tests`` (no GPU, TRITON_INTERPRET unset): the kernel tests skip here, and
  ``test_suite_under_triton_interpreter`` reruns this file in a subprocess with TRITON_INTERPRET=1
  (it must be set before triton is imported); ``test_kernels_compile_for_sm90`` compiles
  representative kernels with the real Triton compiler for sm_90, which needs no GPU.
- ``TRITON_INTERPRET=1 pytest tests/test_triton.py``: the kernel tests directly, on CPU tensors.
- on a machine with a GPU: the kernel tests on CUDA tensors.

Sizes are small because the interpreter is slow; default block sizes are lowered in some tests
(BLOCK_OVERRIDE) so that a few components still make many programs and masked tails.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from conftest import (CLIP_SHAPES, EXP_CODES, FAR_RADIAL, FAR_SHAPES, FP32_RTOL, LARGE_SHAPES, ONE_ENTRY_CASES,
                      RADIAL_SHAPES, SHAPES, UNEVEN_SHAPES, backend_step, backend_step_pm, check_huge_group_clip,
                      check_large_single_ops, check_large_steps, check_one_entry_columns, check_radial_gradients,
                      check_rows_near_an_axis, check_step_sizes, check_tiny_components, check_two_dtype_group,
                      check_uneven_columns, codes_for, make_gen, make_row_tensors, make_step_tensors, random_points,
                      random_tangents, rel_err, shape_code_cases)
from fgsgd_cuda import codes as C, dispatch, manifolds as M, ops, reference as R

triton = pytest.importorskip("triton", reason="triton is not installed")

from fgsgd_cuda import triton_kernels  # noqa: E402
from fgsgd_cuda.triton_kernels import launch  # noqa: E402

if triton_kernels.interpreting():
    DEVICES = ["cpu"]
elif torch.cuda.is_available():
    DEVICES = ["cuda"]
else:
    DEVICES = []

NO_DEVICE = ("the Triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment to run on CPU "
             "tensors (test_suite_under_triton_interpreter reruns this file so)")

FP64_RTOL = 1e-10


@pytest.fixture(params=DEVICES or [pytest.param(None, marks=pytest.mark.skip(reason=NO_DEVICE))])
def device(request):
    return torch.device(request.param)


@pytest.fixture
def small_blocks(monkeypatch):
    """Four components per program: many programs and masked tails from a few components."""
    monkeypatch.setattr(launch, "BLOCK_OVERRIDE", 4)


def spread_codes(n, a, b, gen) -> torch.Tensor:
    """Every code valid for A×B components, each at least once when n >= their number, in random order."""
    allowed = torch.tensor(codes_for(a, b), dtype=torch.uint8)
    return allowed[torch.randperm(n, generator=gen) % len(allowed)]


def make_batch(sizes, a, b, gen, *, codes=None):
    """Float64 inputs of a multi-tensor call: ω = w on the manifold of its code, p = R·ω, g, m tangent at ω,
    R, group index and group step size per tensor; none of them zero."""
    out = {k: [] for k in ("w", "p", "g", "m", "codes", "rescale", "gidx", "gscale")}
    for n in sizes:
        c = spread_codes(n, a, b, gen) if codes is None else torch.full((n,), codes, dtype=torch.uint8)
        w = random_points(n, a, b, c, gen)
        r = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
        ng = 3
        out["w"].append(w)
        out["p"].append((w * r.view(-1, 1, 1)).contiguous())
        out["g"].append(torch.randn(w.shape, generator=gen, dtype=torch.float64))
        out["m"].append(random_tangents(w, c, gen))
        out["codes"].append(c)
        out["rescale"].append(r)
        out["gidx"].append(torch.randint(ng, (n,), generator=gen, dtype=torch.int32))
        out["gscale"].append(0.3 + torch.rand(ng, generator=gen, dtype=torch.float64))
    return out


def to(ts, dtype, device):
    """Tensors in the kernel's dtype (floats only) on the device; the reference then uses them in float64."""
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous() for t in ts]


def run_step_check(batch, device, dtype, *, lr, momentum, dampening, nesterov, weight_decay, first_step, stabilize,
                   use_rescale, use_groups, rtol):
    n_t = len(batch["p"])
    p, g, m = (to(batch[k], dtype, device) for k in ("p" if use_rescale else "w", "g", "m"))
    codes = to(batch["codes"], dtype, device)
    rescale = to(batch["rescale"], dtype, device) if use_rescale else []
    gidx = to(batch["gidx"], dtype, device) if use_groups else []
    gscale = to(batch["gscale"], dtype, device) if use_groups else []
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
              first_step=first_step, stabilize=stabilize)
    ref = []
    for k in range(n_t):  # the reference on the very values the kernel reads, in float64
        s = gscale[k].double().cpu()[gidx[k].long().cpu()] if use_groups else None
        ref.append(R.step(p[k].double().cpu(), g[k].double().cpu(), m[k].double().cpu(), codes[k].cpu(),
                          rescale[k].double().cpu() if use_rescale else None, s, **hp))
    ops.step_(p, g, m, codes, rescale=rescale, group_index=gidx, group_scale=gscale, backend="triton", **hp)
    for k in range(n_t):
        p_ref, m_ref = ref[k]
        assert rel_err(p[k].cpu(), p_ref) <= rtol, f"params[{k}]"
        if momentum:
            assert rel_err(m[k].cpu(), m_ref) <= rtol, f"momentum_buffers[{k}]"
    return p, codes, rescale


# -- availability and dispatch ------------------------------------------------------------------------

def test_available_and_dispatch(device):
    assert triton_kernels.available(device)
    assert dispatch.resolve("triton", device) == "triton"
    assert type(dispatch.get("triton", device)).__name__ == "TritonBackend"
    assert not triton_kernels.available("meta")
    assert triton_kernels.available("cpu") == triton_kernels.interpreting()


# -- single-tensor ops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", SHAPES)
def test_proj_retr_projx(device, a, b):
    """Every code of every shape; 37 components (7×7: two programs, the second one masked)."""
    gen = make_gen(100 * a + b)
    for code in codes_for(a, b):
        man = M.from_code(code)
        x = random_points(37, a, b, code, gen).float().to(device)
        u = torch.randn(x.shape, generator=gen).to(device)
        v = random_tangents(x.double().cpu(), code, gen, scale=0.4).float().to(device)
        y = (x + 0.3 * u).contiguous()
        xd, ud, vd, yd = (t.double().cpu() for t in (x, u, v, y))
        assert rel_err(ops.proj(x, u, code, backend="triton").cpu(), man.proj(xd, ud)) <= FP32_RTOL, f"proj {code}"
        assert rel_err(ops.retr(x, v, code, backend="triton").cpu(), man.retr(xd, vd)) <= FP32_RTOL, f"retr {code}"
        assert rel_err(ops.projx(y, code, backend="triton").cpu(), man.projx(yd)) <= FP32_RTOL, f"projx {code}"


@pytest.mark.parametrize("a,b", SHAPES + [(2, 3), (8, 8), (4, 16)])
def test_norms(device, a, b):
    gen = make_gen(7 * a + b)
    x = torch.randn(37, a, b, generator=gen).to(device)
    got = ops.norms(x, backend="triton").cpu()
    ref = M.norms(x.double().cpu())
    assert got.shape == (37, 3) and got.dtype == x.dtype
    for k, what in enumerate(("frobenius", "spectral", "l21")):
        assert rel_err(got[:, k], ref[:, k]) <= FP32_RTOL, what
        assert float(((got[:, k].double() - ref[:, k]).abs() / ref[:, k]).max()) <= 10 * FP32_RTOL, what


def test_retr_small_and_zero_steps(device):
    """The exp retractions' small-t branch (sinc Taylor series) and a zero tangent (t = 0)."""
    gen = make_gen(5)
    for code in (C.SPHERE_EXP, C.OBLIQUE_EXP):
        x = random_points(7, 3, 3, code, gen).float().to(device)
        for scale in (1e-6, 1e-3, 0.0):
            v = (random_tangents(x.double().cpu(), code, gen) * scale).float().to(device)
            got = ops.retr(x, v, code, backend="triton").cpu()
            assert torch.isfinite(got).all()
            assert rel_err(got, M.from_code(code).retr(x.double().cpu(), v.double().cpu())) <= FP32_RTOL


def test_single_ops_float64(device):
    gen = make_gen(6)
    for code in (C.SPHERE_EXP, C.OBLIQUE_NORMALIZE, C.STIEFEL_QR, C.STIEFEL_CAYLEY):
        man = M.from_code(code)
        x = random_points(7, 5, 5, code, gen).to(device)
        v = random_tangents(x.cpu(), code, gen, scale=0.5).to(device)
        assert rel_err(ops.retr(x, v, code, backend="triton").cpu(), man.retr(x.cpu(), v.cpu())) <= FP64_RTOL
        assert rel_err(ops.proj(x, v * 3 + x, code, backend="triton").cpu(),
                       man.proj(x.cpu(), (v * 3 + x).cpu())) <= FP64_RTOL
    x = torch.randn(7, 5, 4, generator=gen, dtype=torch.float64).to(device)
    assert rel_err(ops.norms(x, backend="triton").cpu(), M.norms(x.cpu())) <= FP64_RTOL


# -- the fused step ------------------------------------------------------------------------------------

# (momentum, dampening, nesterov, weight_decay, first_step, stabilize, rescale, groups)
STEP_CASES_FULL = [
    (0.0, 0.0, False, 0.0, False, False, False, False),   # plain: R = 1, s_g = 1
    (0.9, 0.0, False, 0.0, True, False, True, True),      # first step: m written, not read
    (0.9, 0.1, False, 0.01, False, True, True, True),     # dampening, weight decay, stabilize
    (0.9, 0.0, True, 0.0, False, False, False, True),     # nesterov
    (0.0, 0.0, False, 0.05, False, True, True, False),    # no momentum, weight decay, stabilize
]
STEP_CASES_SHORT = [STEP_CASES_FULL[2], STEP_CASES_FULL[3]]


def _step_cases():
    for a, b in SHAPES:
        for case in (STEP_CASES_FULL if (a, b) == (3, 3) else STEP_CASES_SHORT):
            yield pytest.param(a, b, *case, id=f"{a}x{b}-" + "-".join(map(str, case)))


@pytest.mark.parametrize("a,b,momentum,dampening,nesterov,wd,first,stabilize,use_rescale,use_groups",
                         list(_step_cases()))  # a list: pytest deprecates generators here
def test_step_mixed_codes(device, a, b, momentum, dampening, nesterov, wd, first, stabilize, use_rescale, use_groups):
    """Three tensors of one call (N = 7, 37, 1), every code of the shape mixed inside each tensor."""
    gen = make_gen(1000 * a + 10 * b + int(100 * momentum) + 2 * nesterov + first)
    batch = make_batch([7, 37, 1], a, b, gen)
    p, codes, rescale = run_step_check(batch, device, torch.float32, lr=0.1, momentum=momentum,
                                       dampening=dampening, nesterov=nesterov, weight_decay=wd, first_step=first,
                                       stabilize=stabilize, use_rescale=use_rescale, use_groups=use_groups,
                                       rtol=FP32_RTOL)
    # Table 1 after the step: every manifold component (ω = p/R) is on its manifold.
    for k in range(len(p)):
        w = p[k].double().cpu() / (rescale[k].double().cpu().view(-1, 1, 1) if use_rescale else 1.0)
        for i in range(w.shape[0]):
            man = C.manifold_of(int(codes[k][i]))
            nrm = M.norms(w[i:i + 1])[0]
            for name, want in M.table1_norms(man, b).items():
                got = float(nrm[0] if name == "frobenius" else nrm[1])
                assert abs(got - want) <= FP32_RTOL * max(1.0, want), (man, name, got, want)


def test_step_many_programs(device, small_blocks):
    """Blocks of 4 components: 2 + 10 + 2 + 3 programs over five tensors (one empty), so the pointer-table
    search (padded to 8 entries) and the masked tails are both exercised; components outside the
    tensors' storage are never written."""
    gen = make_gen(11)
    sizes = [7, 37, 0, 5, 9]
    batch = make_batch(sizes, 3, 3, gen)
    hp = dict(lr=0.05, momentum=0.8, dampening=0.0, nesterov=False, weight_decay=0.02, first_step=False,
              stabilize=False)
    # each tensor is the front of a larger buffer whose tail must stay untouched
    bufs = {key: [] for key in ("p", "m")}
    views = {key: [] for key in ("p", "m")}
    for key in ("p", "m"):
        for t in batch[key]:
            buf = torch.randn(t.shape[0] + 3, 3, 3, generator=gen).to(device)
            buf[:t.shape[0]] = t.float().to(device)
            bufs[key].append(buf)
            views[key].append(buf[:t.shape[0]])
    tails = [[b[-3:].clone() for b in bufs[key]] for key in ("p", "m")]
    g = to(batch["g"], torch.float32, device)
    codes = to(batch["codes"], torch.float32, device)
    rescale = to(batch["rescale"], torch.float32, device)
    gidx = to(batch["gidx"], torch.float32, device)
    gscale = to(batch["gscale"], torch.float32, device)
    ref = []
    for k in range(len(sizes)):
        s = gscale[k].double().cpu()[gidx[k].long().cpu()]
        ref.append(R.step(views["p"][k].double().cpu(), g[k].double().cpu(), views["m"][k].double().cpu(),
                          codes[k].cpu(), rescale[k].double().cpu(), s, **hp))
    ops.step_(views["p"], g, views["m"], codes, rescale=rescale, group_index=gidx, group_scale=gscale,
              backend="triton", **hp)
    for k, n in enumerate(sizes):
        if n:
            assert rel_err(views["p"][k].cpu(), ref[k][0]) <= FP32_RTOL, f"params[{k}]"
            assert rel_err(views["m"][k].cpu(), ref[k][1]) <= FP32_RTOL, f"momentum_buffers[{k}]"
        for j, key in enumerate(("p", "m")):
            assert torch.equal(bufs[key][k][-3:], tails[j][k]), f"{key}[{k}]: wrote past the end"


@pytest.mark.parametrize("a,b", [(3, 3), (5, 5)])
def test_step_float64(device, a, b):
    """float64 in, float64 arithmetic: hyper-parameters must reach the kernel unrounded."""
    gen = make_gen(21 + a)
    batch = make_batch([7, 5], a, b, gen)
    run_step_check(batch, device, torch.float64, lr=0.1, momentum=0.9, dampening=0.1, nesterov=False,
                   weight_decay=0.01, first_step=False, stabilize=True, use_rescale=True, use_groups=True,
                   rtol=FP64_RTOL)


@pytest.mark.parametrize("a,b", [(2, 3), (16, 1)])
def test_step_wide_and_row_shapes(device, a, b):
    """A < B (no stiefel) and a row view n×1 (sphere/oblique only)."""
    gen = make_gen(31 + a)
    batch = make_batch([7, 9], a, b, gen)
    run_step_check(batch, device, torch.float32, lr=0.1, momentum=0.9, dampening=0.0, nesterov=True,
                   weight_decay=0.01, first_step=False, stabilize=True, use_rescale=True, use_groups=False,
                   rtol=FP32_RTOL)


def test_step_one_code_per_tensor(device):
    """Each tensor all one manifold (the common layout), several steps in a row, momentum carried."""
    gen = make_gen(41)
    for code in C.ALL_CODES:
        batch = make_batch([7], 3, 3, gen, codes=code)
        p = to(batch["p"], torch.float32, "cpu")[0]
        m = to(batch["m"], torch.float32, "cpu")[0]
        pd, md = p.double(), m.double()
        c = batch["codes"][0]
        pt, mt = p.to(device), m.to(device)
        for it in range(3):
            g = torch.randn(p.shape, generator=gen)
            pd, md = R.step(pd, g.double(), md, c, None, None, lr=0.1, momentum=0.9, first_step=it == 0)
            ops.step_([pt], [g.to(device)], [mt], [c.to(device)], lr=0.1, momentum=0.9, first_step=it == 0,
                      backend="triton")
        assert rel_err(pt.cpu(), pd) <= FP32_RTOL, code
        assert rel_err(mt.cpu(), md) <= FP32_RTOL, code


# -- the other multi-tensor ops ------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", SHAPES)
def test_tangent_sqnorm(device, a, b):
    gen = make_gen(51 + a * b)
    batch = make_batch([7, 37], a, b, gen)
    p, g = to(batch["p"], torch.float32, device), to(batch["g"], torch.float32, device)
    codes, rescale = to(batch["codes"], torch.float32, device), to(batch["rescale"], torch.float32, device)
    for use_rescale, wd in ((False, 0.0), (True, 0.1)):
        got = ops.tangent_sqnorm(p, g, codes, rescale=rescale if use_rescale else (), weight_decay=wd,
                                 backend="triton").cpu()
        ref = torch.cat([R.tangent_sqnorm(p[k].double().cpu(), g[k].double().cpu(), codes[k].cpu(),
                                          rescale[k].double().cpu() if use_rescale else None, wd)
                         for k in range(len(p))])
        assert got.shape == ref.shape and got.dtype == torch.float64  # float64 for every dtype
        assert rel_err(got, ref) <= FP32_RTOL


@pytest.mark.parametrize("a,b", SHAPES)
def test_projx_(device, a, b, small_blocks):
    gen = make_gen(61 + a * b)
    batch = make_batch([7, 13], a, b, gen)
    codes, rescale = to(batch["codes"], torch.float32, device), to(batch["rescale"], torch.float32, device)
    for use_rescale in (False, True):
        p = [(t + 0.2 * torch.randn(t.shape, generator=gen, dtype=torch.float64)).float().to(device)
             for t in batch["p"]]
        ref = [R.projx(p[k].double().cpu(), codes[k].cpu(), rescale[k].double().cpu() if use_rescale else None)
               for k in range(len(p))]
        ops.projx_(p, codes, rescale=rescale if use_rescale else (), backend="triton")
        for k in range(len(p)):
            assert rel_err(p[k].cpu(), ref[k]) <= FP32_RTOL


def test_rescale_(device, small_blocks):
    gen = make_gen(71)
    for a, b in SHAPES:
        batch = make_batch([7, 13], a, b, gen)
        p = to(batch["p"], torch.float32, device)
        codes = to(batch["codes"], torch.float32, device)
        ratio = [(0.5 + torch.rand(t.shape[0], generator=gen)).to(device) for t in p]
        ref = [p[k].double().cpu() * ratio[k].double().cpu().view(-1, 1, 1) for k in range(len(p))]
        ops.rescale_(p, codes, ratio, backend="triton")
        for k in range(len(p)):
            assert rel_err(p[k].cpu(), ref[k]) <= FP32_RTOL


def test_pointer_table_is_one_launch_per_call(device, monkeypatch):
    """A call over many tensors is one kernel launch (the pointer table), whatever their number."""
    grids = []
    real = launch.kernel

    class Counting:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            grids.append(grid)
            return self.fn[grid]

    monkeypatch.setattr(launch, "kernel", lambda *args, **kwargs: Counting(real(*args, **kwargs)))
    gen = make_gen(81)
    sizes = [3, 130, 5, 1, 2, 9]
    batch = make_batch(sizes, 3, 3, gen)
    p, g = to(batch["p"], torch.float32, device), to(batch["g"], torch.float32, device)
    codes = to(batch["codes"], torch.float32, device)
    ref = [R.step(p[k].double().cpu(), g[k].double().cpu(), None, codes[k].cpu(), lr=0.1)[0] for k in range(6)]
    ops.step_(p, g, [], codes, lr=0.1, backend="triton")
    block = launch.config(9)[0]
    assert grids == [(sum(-(-n // block) for n in sizes),)]
    for k in range(6):
        assert rel_err(p[k].cpu(), ref[k]) <= FP32_RTOL


# -- the optimizer on the Triton backend -----------------------------------------------------------------

def _reference_backend() -> str:
    from fgsgd_cuda import _ext
    return "cpu" if _ext.HAS_CPU_KERNELS else "torch"


def _trajectory(backend, device, kind, retraction, *, nesterov, steps=4):
    from fgsgd_cuda.optimizer import FGSGD
    gen = make_gen(91)
    shapes = [(4, 3, 3, 3), (2, 4, 3, 3)] + ([] if kind == "stiefel" else [(3, 16)])  # + a row view (16×1)
    ws = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    opt = FGSGD([{"params": ws, "manifolds": [kind], "retraction": {kind: retraction}}], lr=0.05, momentum=0.9,
                dampening=0.0 if nesterov else 0.1, nesterov=nesterov, group_clip=1.5, stabilize=3, group_size=4,
                backend=backend)
    out = []
    for it in range(steps):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=gen).to(device)
        opt.step()
        if it == 1:  # new scales R: rescale_, then steps with R
            opt.set_rescale({w: 0.5 + torch.rand(opt.components(w).shape[0], generator=gen) for w in ws})
        out.append([w.detach().cpu().clone() for w in ws] +
                   [opt.state[w]["momentum_buffer"].detach().cpu().clone() for w in ws])
    return out


@pytest.mark.parametrize("kind,retraction", [(C.manifold_of(c), C.retraction_of(c)) for c in C.ALL_CODES])
def test_optimizer_trajectory_matches_cpu(device, kind, retraction):
    """FGSGD with backend="triton" follows backend="cpu" (or "torch" without the compiled extension) step by
    step: init projection, group step sizes (tangent_sqnorm), momentum, stabilize, set_rescale."""
    nesterov = retraction in ("exp", "cayley")
    ref = _trajectory(_reference_backend(), "cpu", kind, retraction, nesterov=nesterov)
    got = _trajectory("triton", device, kind, retraction, nesterov=nesterov)
    for it, (r_step, g_step) in enumerate(zip(ref, got)):
        for k, (r, g) in enumerate(zip(r_step, g_step)):
            assert rel_err(g, r) <= 2 * FP32_RTOL, f"step {it}, tensor {k}"


# -- compiled (not interpreted) Triton, without a GPU ---------------------------------------------------

COMPILE_CASES = [
    ("step", 3, 3, "fp32", dict(momentum=True, first_step=False, nesterov=True, stabilize=True, rescale=True,
                                group=True, weight_decay=True, log_tensors=3)),
    ("step", 3, 2, "fp64", dict(momentum=True, first_step=True, nesterov=False, stabilize=False, rescale=False,
                                group=False, weight_decay=False, log_tensors=0)),
    ("sqnorm", 5, 5, "fp32", dict(rescale=True, weight_decay=True, log_tensors=1)),
    # packed codes and every run-time control (found_inf, lr tensor, grad scale, step counts)
    ("step", 3, 3, "fp32", dict(momentum=True, first_step=False, nesterov=False, stabilize=False, rescale=True,
                                group=True, weight_decay=False, log_tensors=2, packed=True, controls="flus")),
    ("sqnorm", 3, 3, "fp64", dict(rescale=False, weight_decay=False, log_tensors=0, packed=True)),
    ("rowstep", 0, 1, "fp32", dict(momentum=True, first_step=False, nesterov=True, stabilize=False, rescale=True,
                                   group=True, weight_decay=False, log_tensors=1, packed=True, controls="flus")),
    ("rowsqnorm", 0, 1, "fp32", dict(rescale=True, weight_decay=True, log_tensors=1, packed=True)),
    # channels-last filters read and written where they are (codegen.Frame.interleaved)
    ("step", 3, 3, "fp32", dict(momentum=True, first_step=False, nesterov=True, stabilize=False, rescale=True,
                                group=True, weight_decay=False, log_tensors=2, packed=True, controls="flus",
                                interleaved=True)),
    ("sqnorm", 3, 3, "fp32", dict(rescale=True, weight_decay=True, log_tensors=1, interleaved=True)),
    ("projxm", 1, 1, "fp32", dict(rescale=True, log_tensors=2)),
    ("rescalem", 7, 7, "fp32", dict(log_tensors=1)),
    ("retr", 3, 3, "fp32", dict(code=C.STIEFEL_CAYLEY)),
    ("retr", 2, 3, "fp64", dict(code=C.OBLIQUE_EXP)),  # exp far along ω: the guarded second Gram–Schmidt pass
    ("rowstep", 0, 1, "fp64", dict(momentum=False, first_step=False, nesterov=False, stabilize=True, rescale=False,
                                   group=False, weight_decay=True, log_tensors=0)),
    ("proj", 3, 3, "fp32", dict(code=C.OBLIQUE_EXP)),
    ("norms", 4, 2, "fp32", dict(code=None)),
]


@pytest.mark.skipif(triton_kernels.interpreting(), reason="compiling needs a process without TRITON_INTERPRET=1 "
                    "(the plain `pytest tests` run does it)")
@pytest.mark.parametrize("kind,a,b,dtype,flags", COMPILE_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-{c[3]}" for c in COMPILE_CASES])
def test_kernels_compile_for_sm90(kind, a, b, dtype, flags):
    """The interpreter accepts any Python; this compiles representative generated kernels with the real
    Triton compiler for sm_90 (no GPU needed), so compiled-mode errors show up on CPU-only machines."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
        fn = launch.kernel(kind, a, b, dtype, **flags)
        fn = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)
        ptr = "*" + dtype
        types = {"meta": "*i64", "x_ptr": ptr, "u_ptr": ptr, "out_ptr": ptr, "out_base": ptr, "n": "i32",
                 "n_row": "i32", "found_ptr": "*fp32", "lr_ptr": "*fp32", "gs_ptr": "*fp32", "every": "i32",
                 "gsc_base": ptr}
        sig = {name: types[name] for name in fn.arg_names if name != "BLOCK"}
        block = 128 if kind.startswith("row") else launch.config(a * b)[0]
        src = ASTSource(fn=fn, signature={**sig, "BLOCK": "constexpr"}, constexprs={"BLOCK": block})
        target = GPUTarget("cuda", 90, 32)
    except Exception as exc:  # another Triton's API: this check is for CI's Triton
        pytest.skip(f"cannot set up an offline compile with this Triton: {type(exc).__name__}: {exc}")
    warps = 4 if kind.startswith("row") else launch.config(a * b)[1]
    compiled = triton.compile(src, target=target, options={"num_warps": warps, **launch.OPTIONS})
    assert ".entry" in compiled.asm["ptx"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(3, 3), (5, 3)], ids=["3x3", "5x3"])
@pytest.mark.parametrize("code", [2, 4, 5, 6], ids=["sphere-exp", "oblique-exp", "qr", "cayley"])
def test_retraction_at_every_step_size(device, code, shape, dtype):
    """Triton's exp, qr (Householder) and cayley (pivoted elimination, with a QR for large steps) retractions in
    the step at sizes ‖lr·d‖ from 1e-3 to 300, against the reference and on the manifold:
    conftest.check_step_sizes."""
    check_step_sizes(backend_step("triton", device), code, shape, dtype)



@shape_code_cases(LARGE_SHAPES + [(100, 1)])
def test_large_finite_steps_stay_on_the_manifold(device, code, shape, dtype):
    """Finite gradients up to near the largest float: the fused step lands finite and on the manifold (rescaled norms
    in normalize and exp, Householder QR, the clamped Cayley with its QR): conftest.check_large_steps."""
    check_large_steps(backend_step_pm("triton", device), code, shape, dtype)


@shape_code_cases(LARGE_SHAPES)
def test_large_single_ops_stay_on_the_manifold(device, code, shape, dtype):
    """The single-tensor retr and projx kernels (their code fixed in the source) with inputs up to near the largest
    float: conftest.check_large_single_ops."""
    check_large_single_ops("triton", device, code, shape, dtype)


@shape_code_cases(LARGE_SHAPES)
def test_tiny_components_are_projected(device, code, shape, dtype):
    """Norms rescaled where their squares underflow: conftest.check_tiny_components."""
    check_tiny_components("triton", device, code, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", UNEVEN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qr_of_columns_of_very_different_sizes(device, shape, dtype):
    """Householder reflectors formed from their columns scaled to max-entry 1: conftest.check_uneven_columns."""
    check_uneven_columns("triton", device, shape, dtype)


@shape_code_cases(RADIAL_SHAPES)
def test_radial_gradients_stay_on_the_manifold(device, code, shape, dtype):
    """Gradients mostly along the point: exp steps along the tangent part of the direction (codegen exp_retr and
    the row kernels): conftest.check_radial_gradients."""
    check_radial_gradients(backend_step_pm("triton", device), code, shape, dtype)


@shape_code_cases(FAR_SHAPES + [(100, 1)], EXP_CODES)
def test_gradients_far_along_the_point_stay_on_the_manifold(device, code, shape, dtype):
    """V far along ω: V⊥ formed with a second Gram–Schmidt pass (codegen exp_retr, rows.py _formed_terms)."""
    check_radial_gradients(backend_step_pm("triton", device), code, shape, dtype, lams=FAR_RADIAL[dtype])


@pytest.mark.parametrize("n", [9, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rows_near_an_axis_far_along_the_point_stay_on_the_sphere(device, dtype, n):
    check_rows_near_an_axis("triton", device, dtype, n)


@pytest.mark.parametrize("order", ["fp32-first", "fp64-first"])
def test_a_group_of_two_dtypes_steps_each_weight_as_alone(device, order):
    """FGSGD splits a group by dtype (the kernels had read a float64 weight as float32): conftest.check_two_dtype_group."""
    check_two_dtype_group("triton", device, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("code,shape", ONE_ENTRY_CASES, ids=[f"{c}-{a}x{b}" for c, (a, b) in ONE_ENTRY_CASES])
def test_one_entry_columns_do_not_move(device, code, shape, dtype):
    check_one_entry_columns("triton", device, code, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", CLIP_SHAPES, ids=[f"{a}x{b}" for a, b in CLIP_SHAPES])
def test_huge_gradients_are_clipped(device, shape, dtype):
    """group_clip where a float32 ‖ξ_i‖² overflows: the sqnorm kernels (components and rows) sum in float64, s_g is
    c/‖ξ_g‖ and the step matches the reference: conftest.check_huge_group_clip."""
    check_huge_group_clip("triton", device, shape, dtype)


# -- a plain `pytest tests` on a machine without a GPU -----------------------------------------------------

@pytest.mark.skipif(bool(DEVICES), reason="the tests of this file run directly in this process")
def test_suite_under_triton_interpreter():
    """Reruns this file with TRITON_INTERPRET=1 (it must be set before triton is imported, hence the
    subprocess), against the same fgsgd_cuda package as this process."""
    import fgsgd_cuda
    root = Path(fgsgd_cuda.__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p",
                           "no:cacheprovider", "-k", "not compile_for_sm90 and not under_triton_interpreter"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    print(f"under TRITON_INTERPRET=1: {tail[0]}")
    assert proc.returncode == 0, proc.stdout[-10000:] + proc.stderr[-3000:]
    assert re.search(r"\d+ passed", tail[0]) and "skipped" not in tail[0], tail[0]



ROW_CONFIGS = {"momentum": dict(momentum=0.9), "sgd-stabilize": dict(momentum=0.0, stabilize=True),
               "nesterov-first-wd": dict(momentum=0.5, nesterov=True, first_step=True, weight_decay=0.05),
               "dampening-wd-stabilize": dict(momentum=0.9, dampening=0.3, weight_decay=0.1, stabilize=True)}


@pytest.mark.parametrize("n", [65, 1500])  # 1500: two chunks of the 1024-element BLOCK
@pytest.mark.parametrize("config", list(ROW_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_step_rows(device, dtype, config, n):
    """Row components (n×1, n > 64; triton_kernels/rows.py): every row code, R and s_g, against the reference."""
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(ROW_CONFIGS[config])
    gen = make_gen(zlib.crc32(repr(("rows", dtype, config, n)).encode()))
    ts = make_row_tensors([1, 7, 30], n, dtype, gen, drift=hp["stabilize"])
    assert set(torch.cat([t["codes"] for t in ts]).tolist()) == set(codes_for(n, 1))
    ps = [t["p"].clone().to(device) for t in ts]
    ms = [t["m"].clone().to(device) for t in ts]
    ops.step_(ps, [t["g"].to(device) for t in ts], ms, [t["codes"].to(device) for t in ts],
              rescale=[t["r"].to(device) for t in ts], group_index=[t["gi"].to(device) for t in ts],
              group_scale=[t["gs"].to(device) for t in ts], backend="triton", **hp)
    tol = FP32_RTOL if dtype == torch.float32 else 1e-12
    for k, t in enumerate(ts):
        s = t["gs"].double()[t["gi"].long()]
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None,
                              t["codes"], t["r"].double(), s, **hp)
        assert rel_err(ps[k].cpu(), p_ref) <= tol, f"params[{k}]"
        if hp["momentum"]:
            assert rel_err(ms[k].cpu(), m_ref) <= tol, f"momentum_buffers[{k}]"
        else:
            assert torch.equal(ms[k].cpu(), t["m"])


@pytest.mark.parametrize("wd", [0.0, 0.03])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tangent_sqnorm_rows(device, dtype, wd):
    gen = make_gen(zlib.crc32(repr(("sqnorm-rows", dtype, wd)).encode()))
    ts = make_row_tensors([3, 1, 20], 1100, dtype, gen, groups=False, momentum=False)
    got = ops.tangent_sqnorm([t["p"].to(device) for t in ts], [t["g"].to(device) for t in ts],
                             [t["codes"].to(device) for t in ts], rescale=[t["r"].to(device) for t in ts],
                             weight_decay=wd, backend="triton").cpu()
    ref = R.tangent_sqnorm(torch.cat([t["p"].double() for t in ts]), torch.cat([t["g"].double() for t in ts]),
                           torch.cat([t["codes"] for t in ts]), torch.cat([t["r"].double() for t in ts]), wd)
    assert rel_err(got, ref) <= (FP32_RTOL if dtype == torch.float32 else 1e-12)



def test_group_scale_on_triton(device):
    """The triton backend's group_scale (torch ops on the device) against the float64 reference."""
    gen = make_gen(77)
    sq = torch.rand(300, generator=gen, dtype=torch.float64) * 3
    gi = torch.randint(40, (300,), generator=gen)
    members = torch.argsort(gi, stable=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(gi, minlength=40).cumsum(0)])
    got = ops.group_scale(sq.float().to(device), members.to(device), offsets.to(device), 2.0, backend="triton")
    ref = R.group_step_size(sq.float().double(), gi.to(torch.int32), 40, 2.0)
    assert rel_err(got.cpu(), ref) <= FP32_RTOL


@pytest.mark.parametrize("shape", [(3, 3), (100, 1)], ids=["3x3", "row100"])
def test_step_controls_read_on_the_host(device, shape):
    """The step's run-time controls on the Triton backend (read on the host: fgsgd_cuda/controls.py): counts, an
    lr tensor and grad_scale give the bits of the plain step with the flags they imply; found_inf skips
    (tests/test_step_controls.py runs these checks on every backend where it runs)."""
    import test_step_controls as SC
    SC.test_counts_and_lr_tensor_follow_the_plain_step("triton", device, torch.float32, shape)
    SC.test_grad_scale_reads_unscaled_gradients("triton", device, torch.float64, shape)
    SC.test_found_inf_skips_everything("triton", device, shape)


@pytest.mark.parametrize("shape", [(3, 3), (100, 1)], ids=["3x3", "row100"])
def test_packed_codes_read_by_the_kernels(device, shape):
    """Codes packed 2 bits per component (fgsgd_cuda/codes.py), decoded in the generated kernels: the same bits
    as one byte per component (tests/test_packed_codes.py runs the check on every backend where it runs)."""
    import test_packed_codes as PC
    PC.test_packed_codes_give_the_same_bits("triton", device, torch.float32, shape)


def test_capturable_optimizer_reads_its_controls_in_the_kernels(device):
    """FGSGD(capturable=True) on the Triton backend (step counts, lr tensor and check_finite's flag read by the
    generated kernels): 8 steps over re-projection boundaries with group_clip and the row view, bit for bit the
    eager Triton optimizer (tests/test_optimizer_capturable.py has the CPU models)."""
    if device.type != "cpu":
        pytest.skip("the models of test_optimizer_capturable live on the CPU (the interpreter rerun runs this)")
    import test_optimizer_capturable as OC
    m1, o1, m2, o2 = OC.follow_eager(True, backend="triton")
    OC.assert_same(m1, o1, m2, o2)
    assert [float(o2.state[p]["step"]) for p in OC.manifold_params(o2)] == [8.0, 7.0, 8.0, 8.0]


# (O, I) of channels-last filter banks: programs of 128 filters across output channels (I = 37, 3, 129), I = 300
CHANNELS_LAST = [(3, 37), (43, 3), (2, 129), (1, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("k", [3, 5], ids=["3x3", "5x5"])
def test_channels_last_filters_in_place(device, k, dtype):
    """Channels-last (O, I, k, k) weights read and written where they are (kernels generated with ``interleaved``,
    a launch of their own beside the contiguous tensor of the same call), with packed codes, R and s_g: the float64
    reference's step and tangent_sqnorm, and the same step on contiguous copies to a few units in the last place
    (equal bits under the interpreter); the weights keep their layout."""
    gen = make_gen(zlib.crc32(repr(("channels-last", k, dtype)).encode()))
    shapes = CHANNELS_LAST + [(5, 11)]
    ts = make_step_tensors([o * i for o, i in shapes], (k, k), dtype, gen)
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, first_step=False, stabilize=False)

    def weights(key, channels_last):  # fresh copies (the step works in place)
        fmt = [torch.channels_last if channels_last and j < len(CHANNELS_LAST) else torch.contiguous_format
               for j in range(len(ts))]
        return [torch.empty((o, i, k, k), dtype=dtype, device=device, memory_format=f).copy_(t[key].reshape(o, i, k, k))
                for t, (o, i), f in zip(ts, shapes, fmt)]

    for t in ts:  # at most four codes a tensor, packed for 3×3 (the kernels read packed codes when all are)
        keep = torch.unique(t["codes"])[:4]
        t["codes"] = torch.where(torch.isin(t["codes"], keep), t["codes"], keep[0])
    codes = [(C.pack(t["codes"]) if k == 3 else t["codes"]).to(device) for t in ts]
    assert all(C.is_packed(c) == (k == 3) for c in codes)
    got, flat = {}, {}
    for out, cl in ((got, True), (flat, False)):
        p, g, m = weights("p", cl), weights("g", cl), weights("m", False)
        rescale = [t["r"].to(device) for t in ts]
        out["sq"] = ops.tangent_sqnorm(p, g, codes, rescale=rescale, weight_decay=0.0, backend="triton").cpu()
        ops.step_(p, g, m, codes, rescale=rescale, group_index=[t["gi"].to(device) for t in ts],
                  group_scale=[t["gs"].to(device) for t in ts], backend="triton", **hp)
        out["p"], out["m"] = [x.cpu() for x in p], [x.cpu() for x in m]
        if cl:
            assert all(w.is_contiguous(memory_format=torch.channels_last) for w in p[:-1])
    tol = FP32_RTOL if dtype == torch.float32 else FP64_RTOL
    ulp = 0 if triton_kernels.interpreting() else 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(got["sq"], flat["sq"], rtol=ulp, atol=0)
    start = 0
    for j, t in enumerate(ts):
        n = t["codes"].numel()
        s = t["gs"].double()[t["gi"].long()]
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double(), t["codes"], t["r"].double(), s, **hp)
        sq_ref = R.tangent_sqnorm(t["p"].double(), t["g"].double(), t["codes"], t["r"].double(), 0.0)
        assert rel_err(got["sq"][start:start + n], sq_ref) <= tol, f"tangent_sqnorm of tensor {j}"
        start += n
        assert rel_err(got["p"][j].reshape(n, k, k), p_ref) <= tol, f"params[{j}]"
        assert rel_err(got["m"][j].reshape(n, k, k), m_ref) <= tol, f"momentum_buffers[{j}]"
        torch.testing.assert_close(got["p"][j], flat["p"][j], rtol=ulp, atol=ulp)
        torch.testing.assert_close(got["m"][j], flat["m"][j], rtol=ulp, atol=ulp)


@pytest.mark.parametrize("options", [{}, {"capturable": True}], ids=["plain", "capturable"])
def test_channels_last_weights(device, options):
    """Channels-last filter banks on Triton step (where they are) like contiguous ones (tests/test_channels_last.py
    runs the other backends)."""
    import test_channels_last as CLT
    CLT.test_channels_last_steps_like_contiguous("triton", device.type, torch.float32, options)


def test_channels_last_filters_are_not_copied(device, monkeypatch):
    """No copy of a channels-last filter bank or its gradient in a Triton step (tests/test_channels_last.py)."""
    import test_channels_last as CLT
    CLT.test_compiled_backends_step_channels_last_filters_in_place(monkeypatch, "triton", device.type)


# (gradient shapes, dim) of the channel-directed kernels (triton_kernels/fibers.py): L = 1 and 2, 130 columns (two
# programs of 128, the second masked), a long fiber, and fibers along the input channels
FIBER_CASES = {"conv": ([(12, 5, 3, 3)], 0), "short": ([(1, 4, 3, 3), (2, 3, 3, 3)], 0),
               "masked": ([(6, 130)], 0), "long": ([(200, 2, 1, 1)], 0), "input-dim": ([(3, 7, 3, 3)], 1)}


@pytest.mark.parametrize("metric,lam", [("sobolev", 0.0), ("sobolev", 0.05), ("sobolev", 2.0), ("sobolev", 1e4),
                                        ("reweighted", 0.5), ("reweighted", 4.0)])
@pytest.mark.parametrize("key", list(FIBER_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_channel_directed(device, dtype, key, metric, lam):
    """Channel-directed gradients on Triton against the float64 dense solve (fgsgd_cuda.reference.channel_directed)."""
    from torch import nn
    from fgsgd_cuda import channel_directed_
    shapes, dim = FIBER_CASES[key]
    gen = make_gen(zlib.crc32(repr(("fibers", key, metric, lam, str(dtype))).encode()))
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    refs = [R.channel_directed(g, metric, lam, dim) for g in grads]
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(g.shape, dtype=dtype, device=device))
        p.grad = g.to(device=device, dtype=dtype)
        params.append(p)
    channel_directed_(params, metric, lam, dim=dim, backend="triton")
    tol = (1e-6 if dtype == torch.float32 else 1e-13) * max(1.0, lam ** 0.5)
    for p, ref in zip(params, refs):
        assert rel_err(p.grad.cpu(), ref) <= tol, (tuple(ref.shape), rel_err(p.grad.cpu(), ref))


def test_channel_directed_constants_are_made_once(device):
    """A second call with the same settings reuses its constants (nothing copied from the host: a CUDA graph can
    capture it); other settings get their own, and both calls still match the reference."""
    from torch import nn
    from fgsgd_cuda import channel_directed_
    from fgsgd_cuda.triton_kernels import fibers
    gen = make_gen(11)
    g = torch.randn(9, 4, 3, 3, generator=gen, dtype=torch.float64)
    p = nn.Parameter(torch.zeros(g.shape, device=device))
    seen = []
    for lam in (0.7, 0.7, 0.3):
        p.grad = g.to(device=device, dtype=torch.float32)
        channel_directed_([p], "sobolev", lam, backend="triton")
        assert rel_err(p.grad.cpu(), R.channel_directed(g, "sobolev", lam, 0)) <= 1e-6
        seen.append(fibers.constants("sobolev", lam, 9, torch.float32, p.device)[0])
    assert seen[0] is seen[1] and seen[2] is not seen[0]
    assert fibers.constants("sobolev", 0.7, 9, torch.float64, p.device)[0].dtype == torch.float64


@pytest.mark.skipif(triton_kernels.interpreting(), reason="compiling needs a process without TRITON_INTERPRET=1 "
                    "(the plain `pytest tests` run does it)")
@pytest.mark.parametrize("name", ["_sobolev_kernel", "_reweighted_kernel"])
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_fiber_kernels_compile_for_sm90(name, dtype):
    """The channel-directed kernels (triton_kernels/fibers.py) with the real Triton compiler for sm_90, no GPU."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fgsgd_cuda.triton_kernels import fibers
        fn = getattr(fibers, name)
        types = {"x_ptr": "*" + dtype, "coef_ptr": "*" + dtype, "L": "i32", "C": "i32", "terms": "i32"}
        sig = {arg: types[arg] for arg in fn.arg_names if arg != "BLOCK"}
        src = ASTSource(fn=fn, signature={**sig, "BLOCK": "constexpr"}, constexprs={"BLOCK": fibers.BLOCK})
        target = GPUTarget("cuda", 90, 32)
    except Exception as exc:  # another Triton's API: this check is for CI's Triton
        pytest.skip(f"cannot set up an offline compile with this Triton: {type(exc).__name__}: {exc}")
    compiled = triton.compile(src, target=target, options={"num_warps": fibers.WARPS, **fibers.OPTIONS})
    assert ".entry" in compiled.asm["ptx"]
