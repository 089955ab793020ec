"""The torch.library registration of the ops: names, schemas, fake kernels (opcheck), torch.compile,
and the import fallback when the compiled extension is missing."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import (compile_unusable, make_gen, random_codes, random_points, random_tangents, rel_err,
                      requires_cpu_kernels)
from fgsgd_cuda import _ext
from fgsgd_cuda import codes as C
from fgsgd_cuda import manifolds as M

ROOT = Path(__file__).resolve().parents[1]
OPS = ["proj", "retr", "projx", "norms", "step_", "tangent_sqnorm", "projx_", "rescale_", "group_scale",
       "channel_directed_"]
MUTATED = {"step_": {"params", "momentum_buffers", "steps"}, "projx_": {"params"}, "rescale_": {"params"},
           "channel_directed_": {"grads"}}


@requires_cpu_kernels
def test_extension_loaded_without_warning():
    assert _ext.LOAD_ERROR is None
    assert _ext.HAS_CPU_KERNELS


@requires_cpu_kernels
@pytest.mark.parametrize("name", OPS)
def test_op_is_registered(name):
    assert hasattr(torch.ops.fgsgd, name), f"torch.ops.fgsgd.{name} is missing"
    op = getattr(torch.ops.fgsgd, name)
    schema = op.default._schema
    assert schema.name == f"fgsgd::{name}"
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == MUTATED.get(name, set())
    if name in MUTATED:
        assert len(schema.returns) == 0
    else:
        assert [str(r.type) for r in schema.returns] == ["Tensor"]
    qualified = f"fgsgd::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta")      # the fake kernel


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, aot dispatch
# ----------------------------------------------------------------------------------------------

def _samples():
    gen = make_gen(5)
    out = []
    for dtype, shape in ((torch.float32, (3, 3)), (torch.float64, (3, 2))):
        for code in (C.SPHERE_EXP, C.STIEFEL_CAYLEY, C.OBLIQUE_NORMALIZE):
            x = random_points(6, *shape, code, gen).to(dtype)
            u = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
            v = random_tangents(x.double(), code, gen, scale=0.3).to(dtype)
            tag = f"{str(dtype)[6:]}-{shape[0]}x{shape[1]}-{code}"
            out += [("proj", (x, u, code), tag), ("retr", (x, v, code), tag), ("projx", (u, code), tag)]
        out.append(("norms", (u,), f"{str(dtype)[6:]}-{shape[0]}x{shape[1]}"))
        params, grads, moms, codes, rescale, gidx, gscale = [], [], [], [], [], [], []
        for n in (5, 9):
            c = random_codes(n, *shape, gen)
            w = random_points(n, *shape, c, gen)
            r = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
            params.append((w * r.reshape(-1, 1, 1)).to(dtype))
            grads.append(torch.randn(w.shape, generator=gen, dtype=torch.float64).to(dtype))
            moms.append(random_tangents(w, c, gen).to(dtype))
            codes.append(c)
            rescale.append(r.to(dtype))
            gidx.append(torch.randint(3, (n,), generator=gen, dtype=torch.int32))
            gscale.append((0.5 + torch.rand(3, generator=gen, dtype=torch.float64)).to(dtype))
        tag = f"{str(dtype)[6:]}-{shape[0]}x{shape[1]}"
        out += [
            ("step_", (params, grads, moms, codes, rescale, gidx, gscale, 0.1, 0.9, 0.0, True, 0.01, False, True), tag),
            ("step_", (params, grads, [], codes, [], [], [], 0.1, 0.0, 0.0, False, 0.0, True, False), tag + "-plain"),
            ("step_", (params, grads, moms, codes, rescale, [], [], 0.1, 0.9, 0.0, False, 0.0, True, False,
                       [torch.tensor(3.0), torch.tensor(0.0)], torch.zeros(()), torch.tensor(0.05, dtype=torch.float64),
                       4), tag + "-controls"),
            ("tangent_sqnorm", (params, grads, codes, rescale, 0.01), tag),
            ("projx_", ([p * 1.3 for p in params], codes, rescale), tag),
            ("rescale_", (params, codes, [r * 1.1 for r in rescale]), tag),
            ("group_scale", (torch.rand(14, generator=gen, dtype=torch.float64).to(dtype) * 3,
                             torch.randperm(14, generator=gen), torch.tensor([0, 5, 5, 9, 14]), 1.5), tag),
            # the optimizer's call: a float64 sqnorm (tangent_sqnorm's), s_g in the parameters' dtype
            ("group_scale", (torch.rand(14, generator=gen, dtype=torch.float64) * 3,
                             torch.randperm(14, generator=gen).int(), torch.tensor([0, 5, 5, 9, 14]), 1.5, dtype),
             tag + "-dtype"),
        ]
        grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ((6, 2, 3, 3), (5, 4))]
        out += [("channel_directed_", (grads, 0, "sobolev", 0.7), tag + "-sobolev"),
                ("channel_directed_", (grads, 1, "reweighted", 2.0), tag + "-reweighted")]
    return [pytest.param(name, args, id=f"{name}-{tag}") for name, args, tag in out]


@requires_cpu_kernels
@pytest.mark.parametrize("name,args", _samples())
def test_opcheck(name, args):
    # fresh copies: opcheck runs the (in-place) op several times
    args = tuple([t.clone() for t in a] if isinstance(a, list) else (a.clone() if isinstance(a, torch.Tensor) else a)
                 for a in args)
    result = torch.library.opcheck(getattr(torch.ops.fgsgd, name), args)
    assert set(result.values()) == {"SUCCESS"}, result


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

@requires_cpu_kernels
def test_torch_compile_fullgraph_proj_retr():
    why = compile_unusable("inductor")
    if why:
        pytest.skip(why)
    torch._dynamo.reset()

    def step(x, g, code: int):
        xi = torch.ops.fgsgd.proj(x, g, code)
        y = torch.ops.fgsgd.retr(x, -0.1 * xi, code)
        return y, torch.ops.fgsgd.norms(y)

    compiled = torch.compile(step, fullgraph=True)
    gen = make_gen(21)
    for code in (C.STIEFEL_QR, C.SPHERE_EXP):
        x = random_points(40, 3, 3, code, gen).float()
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64).float()
        y_eager, n_eager = step(x, g, code)
        y_comp, n_comp = compiled(x, g, code)
        assert rel_err(y_comp, y_eager) <= 1e-6 and rel_err(n_comp, n_eager) <= 1e-6
        # and it is the math: the float64 reference
        man = M.from_code(code)
        ref = man.retr(x.double(), -0.1 * man.proj(x.double(), g.double()))
        assert rel_err(y_comp, ref) <= 1e-5


@requires_cpu_kernels
@pytest.mark.parametrize("api", ["torch.ops", "fgsgd_cuda.ops"])
def test_torch_compile_fullgraph_multi_tensor_step(api):
    """The mutating list op traces too (functionalized through its schema), called directly or through the Python
    ops and their checks (the overlap check, which reads addresses, stands aside); aot_eager, to keep it quick."""
    why = compile_unusable("aot_eager")
    if why:
        pytest.skip(why)
    torch._dynamo.reset()
    from fgsgd_cuda import ops

    def run(params, grads, moms, codes, rescale):
        if api == "torch.ops":
            torch.ops.fgsgd.step_(params, grads, moms, codes, rescale, [], [], 0.1, 0.9, 0.0, False, 0.0, False, True)
            torch.ops.fgsgd.rescale_(params, codes, rescale)
            return torch.ops.fgsgd.tangent_sqnorm(params, grads, codes, [], 0.0)
        ops.step_(params, grads, moms, codes, rescale=rescale, lr=0.1, momentum=0.9, stabilize=True, backend="cpu")
        ops.rescale_(params, codes, rescale, backend="cpu")
        return ops.tangent_sqnorm(params, grads, codes, backend="cpu")

    gen = make_gen(22)
    sizes = (7, 30)
    codes = [random_codes(n, 3, 3, gen) for n in sizes]
    params = [random_points(n, 3, 3, c, gen).float() for n, c in zip(sizes, codes)]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).float() for p in params]
    moms = [random_tangents(p.double(), c, gen).float() for p, c in zip(params, codes)]
    rescale = [(0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).float() for n in sizes]
    eager = ([p.clone() for p in params], [m.clone() for m in moms])
    out_eager = run(eager[0], grads, eager[1], codes, rescale)
    comp = ([p.clone() for p in params], [m.clone() for m in moms])
    out_comp = torch.compile(run, fullgraph=True, backend="aot_eager")(comp[0], grads, comp[1], codes, rescale)
    assert rel_err(out_comp, out_eager) <= 1e-6
    for a, b, p0 in zip(comp[0], eager[0], params):
        assert rel_err(a, b) <= 1e-6 and not torch.equal(a, p0)     # the inputs were updated in place
    for a, b in zip(comp[1], eager[1]):
        assert rel_err(a, b) <= 1e-6


# ----------------------------------------------------------------------------------------------
# import without the compiled extension
# ----------------------------------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent(r"""
    import json, sys, warnings
    sys.modules["fgsgd_cuda._C"] = None            # makes `from . import _C` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import fgsgd_cuda
        from fgsgd_cuda import _ext, dispatch, ops, reference as R, manifolds as M
        import fgsgd_cuda.ops                      # a second import: no second warning

        g = torch.Generator().manual_seed(3)
        n = 50
        codes = torch.randint(0, 7, (n,), generator=g, dtype=torch.uint8)
        x = R.projx(torch.randn(n, 3, 3, generator=g, dtype=torch.float64), codes)
        u = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
        errs = {}
        def rel(a, b):
            return float((a.double() - b).norm() / b.norm())
        man = M.from_code(5)
        xs = R.projx(x, torch.full((n,), 5, dtype=torch.uint8))
        errs["proj"] = rel(ops.proj(xs.float(), u.float(), 5), man.proj(xs.float().double(), u.float().double()))
        v = 0.3 * man.proj(xs, u)
        errs["retr"] = rel(ops.retr(xs.float(), v.float(), 5), man.retr(xs.float().double(), v.float().double()))
        errs["projx"] = rel(ops.projx(u.float(), 5), man.projx(u.float().double()))
        errs["norms"] = rel(ops.norms(u.float()), M.norms(u.float().double()))
        p, m = x.float().clone(), (0.1 * u).float().clone()
        p_ref, m_ref = R.step(p.double(), u.float().double(), m.double(), codes, lr=0.1, momentum=0.9)
        ops.step_([p], [u.float()], [m], [codes], lr=0.1, momentum=0.9)
        errs["step_p"], errs["step_m"] = rel(p, p_ref), rel(m, m_ref)
        errs["sqnorm"] = rel(ops.tangent_sqnorm([x.float()], [u.float()], [codes]),
                             R.tangent_sqnorm(x.float().double(), u.float().double(), codes))
        try:
            ops.projx(u.float(), 5, backend="cpu")
            cpu_error = None
        except RuntimeError as exc:
            cpu_error = str(exc)
    ours = [w for w in caught if "fgsgd" in str(w.message)]
    print(json.dumps({
        "warnings": [[w.category.__name__, str(w.message)] for w in ours],
        "has_cpu": _ext.HAS_CPU_KERNELS, "load_error": _ext.LOAD_ERROR,
        "auto": dispatch.resolve("auto", "cpu"), "has_torch_op": hasattr(torch.ops.fgsgd, "proj"),
        "errs": errs, "cpu_error": cpu_error,
    }))
""")


def test_import_falls_back_without_extension():
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, cwd=str(ROOT),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["warnings"]) == 1, res["warnings"]
    category, message = res["warnings"][0]
    assert category == "RuntimeWarning"
    assert "the compiled extension fgsgd_cuda._C could not be loaded" in message
    assert "falling back to the pure-torch backend" in message
    assert "pip install --no-build-isolation -e ." in message
    assert "fgsgd_cuda._C" in res["load_error"] and res["load_error"] in message   # says why
    assert res["has_cpu"] is False and res["has_torch_op"] is False
    assert res["auto"] == "torch"
    assert res["cpu_error"] is not None and res["cpu_error"].startswith("backend: 'cpu' is not available")
    for name, err in res["errs"].items():
        assert err <= 1e-5, (name, err)
