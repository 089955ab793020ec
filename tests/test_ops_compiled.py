"""Every op of fgsgd_cuda.ops on the compiled backends (cpu; cuda where a GPU exists) against the
float64 reference, on fresh random inputs, for every component shape, size and valid code."""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import (FP32_RTOL, SHAPES, SIZES, codes_for, compiled_backends, make_gen, make_row_tensors,
                      make_step_tensors,
                      random_codes, random_points, random_tangents, rel_err, requires_cpu_kernels)
from fgsgd_cuda import codes as C
from fgsgd_cuda import dispatch, ops
from fgsgd_cuda import manifolds as M
from fgsgd_cuda import reference as R
from manifold_checks import constraint_error, has_tangents

F64 = torch.float64
TOL = {torch.float32: FP32_RTOL, torch.float64: 1e-12}
ON_MANIFOLD = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
BACKENDS = compiled_backends()



def _case_id(code, shape):
    return f"{C.manifold_of(code)}-{C.retraction_of(code)}-{shape[0]}x{shape[1]}"


# Every code × shape × dtype at the small sizes; the large sizes (several blocks / parallel chunks) on a
# selection of shapes, so that the suite stays fast: 3×3 is the unrolled path, the others the generic one.
LARGE = {1000: [((3, 3), torch.float32), ((5, 5), torch.float64)],
         1237: [((3, 3), torch.float64), ((7, 7), torch.float32), ((3, 2), torch.float32)]}
UNARY_CASES = [pytest.param(code, shape, dtype, n, id=f"{_case_id(code, shape)}-{str(dtype)[6:]}-N{n}")
               for n in SIZES for shape in SHAPES for code in codes_for(*shape)
               for dtype in (torch.float32, torch.float64)
               if n < 1000 or (shape, dtype) in LARGE[n]]


def _seed(*parts) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across runs, unlike hash())."""
    return make_gen(zlib.crc32(repr(parts).encode()))


def _assert_close(got, ref, tol):
    """rel_err ≤ tol; where the reference is exactly zero (a trivial tangent space), |got| ≤ tol."""
    assert got.shape == ref.shape
    assert bool(torch.isfinite(got).all())
    if float(ref.double().norm()) == 0.0:
        assert float(got.double().abs().max()) <= tol
    else:
        err = rel_err(got, ref)
        assert err <= tol, f"relative error {err:.3g} > {tol:.1g}"


def _off_manifold(n, shape, code, gen):
    """Random inputs of projx: a point moved off its manifold and rescaled (well conditioned), never zero."""
    x = random_points(n, *shape, code, gen)
    x = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=F64)
    return x * (0.5 + 1.5 * torch.rand(n, 1, 1, generator=gen, dtype=F64))


def _retr_direction(x, code, gen):
    """A random tangent vector (norm ~0.5 per component); a random small vector where T_x = {0}."""
    a, b = x.shape[1:]
    if has_tangents(code, a, b):
        return random_tangents(x, code, gen, scale=0.5 / max(1.0, (a * b) ** 0.5))
    return 0.3 * torch.randn(x.shape, generator=gen, dtype=F64)


def _point_check(y, code, dtype):
    if C.manifold_of(code) != "euclidean":
        assert constraint_error(y, code) <= ON_MANIFOLD[dtype]


def test_auto_backend_is_compiled_for_cpu_tensors():
    if not dispatch.available("cpu", "cpu"):
        pytest.skip("fgsgd_cuda._C is not built")
    assert dispatch.resolve("auto", "cpu") == "cpu"
    assert type(dispatch.get("auto", "cpu")).__name__ == "CompiledBackend"


# ----------------------------------------------------------------------------------------------
# single-tensor ops
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code,shape,dtype,n", UNARY_CASES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_proj(backend, device, code, shape, dtype, n):
    gen = _seed("proj", code, shape, dtype, n)
    x = random_points(n, *shape, code, gen).to(dtype)
    u = torch.randn(n, *shape, generator=gen, dtype=F64).to(dtype)
    x_in, u_in = x.clone(), u.clone()
    got = ops.proj(x.to(device), u.to(device), code, backend=backend).cpu()
    assert got.dtype == dtype
    ref = M.from_code(code).proj(x.double(), u.double())
    _assert_close(got, ref, TOL[dtype])
    assert torch.equal(x, x_in) and torch.equal(u, u_in)     # out of place


@pytest.mark.parametrize("code,shape,dtype,n", UNARY_CASES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_retr(backend, device, code, shape, dtype, n):
    gen = _seed("retr", code, shape, dtype, n)
    x = random_points(n, *shape, code, gen)
    v = _retr_direction(x, code, gen)
    x, v = x.to(dtype), v.to(dtype)
    x_in, v_in = x.clone(), v.clone()
    got = ops.retr(x.to(device), v.to(device), code, backend=backend).cpu()
    assert got.dtype == dtype
    ref = M.from_code(code).retr(x.double(), v.double())
    _assert_close(got, ref, TOL[dtype])
    if has_tangents(code, *shape) or C.retraction_of(code) not in ("exp",):
        _point_check(got, code, dtype)
    assert torch.equal(x, x_in) and torch.equal(v, v_in)
    # transp is proj at the new point
    got_t = ops.transp(got.to(device), v.to(device), code, backend=backend).cpu()
    ref_t = M.from_code(code).proj(got.double(), v.double())
    if has_tangents(code, *shape):
        _assert_close(got_t, ref_t, TOL[dtype])
    else:  # T = {0}: the exact result is v·(1 − y²) with y = ±1 up to rounding, pure cancellation
        assert float((got_t.double() - ref_t).norm()) <= TOL[dtype] * float(v.double().norm())


@pytest.mark.parametrize("code,shape,dtype,n", UNARY_CASES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_projx(backend, device, code, shape, dtype, n):
    gen = _seed("projx", code, shape, dtype, n)
    x = _off_manifold(n, shape, code, gen).to(dtype)
    x_in = x.clone()
    got = ops.projx(x.to(device), code, backend=backend).cpu()
    assert got.dtype == dtype
    _assert_close(got, M.from_code(code).projx(x.double()), TOL[dtype])
    _point_check(got, code, dtype)
    assert torch.equal(x, x_in)


NORM_CASES = [pytest.param(shape, dtype, n, id=f"{shape[0]}x{shape[1]}-{str(dtype)[6:]}-N{n}")
              for n in SIZES for shape in SHAPES + [(2, 3), (8, 8)] for dtype in (torch.float32, torch.float64)
              if n < 1000 or shape in ((3, 3), (7, 7), (2, 3))]


@pytest.mark.parametrize("shape,dtype,n", NORM_CASES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_norms(backend, device, shape, dtype, n):
    gen = _seed("norms", shape, dtype, n)
    x = (torch.randn(n, *shape, generator=gen, dtype=F64) * (0.2 + 3 * torch.rand(n, 1, 1, generator=gen,
                                                                                     dtype=F64))).to(dtype)
    got = ops.norms(x.to(device), backend=backend).cpu()
    assert got.shape == (n, 3) and got.dtype == dtype
    ref = M.norms(x.double())
    for col in range(3):
        _assert_close(got[:, col], ref[:, col], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device, dtype):
    x = torch.empty(0, 3, 3, dtype=dtype, device=device)
    assert ops.proj(x, x, C.SPHERE_NORMALIZE, backend=backend).shape == (0, 3, 3)
    assert ops.retr(x, x, C.STIEFEL_CAYLEY, backend=backend).shape == (0, 3, 3)
    assert ops.projx(x, C.OBLIQUE_EXP, backend=backend).shape == (0, 3, 3)
    assert ops.norms(x, backend=backend).shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# multi-tensor ops
# ----------------------------------------------------------------------------------------------

def _to(t, device):
    return None if t is None else t.to(device)


def _cat(ts, key, fill=None):
    """One float64 tensor of ``key`` over all tensors (the reference is per component, so one call on the
    concatenation equals one call per tensor); None when absent."""
    if ts[0][key] is None:
        return None
    return torch.cat([t[key].double() if key != "codes" else t[key] for t in ts])


def _reference_step(ts, hp):
    """The float64 reference of all tensors of one call, from the (possibly fp32) inputs."""
    s = (torch.cat([t["gs"].double()[t["gi"].long()] for t in ts]) if ts[0]["gi"] is not None else None)
    m = _cat(ts, "m") if hp["momentum"] else None
    return R.step(_cat(ts, "p"), _cat(ts, "g"), m, _cat(ts, "codes"), _cat(ts, "r"), s, **hp)


def _run_step(ts, hp, backend, device, *, rescale, groups):
    params = [t["p"].clone().to(device) for t in ts]
    momenta = [t["m"].clone().to(device) for t in ts] if ts[0]["m"] is not None else []
    ops.step_(params, [_to(t["g"], device) for t in ts], momenta, [_to(t["codes"], device) for t in ts],
              rescale=[_to(t["r"], device) for t in ts] if rescale else (),
              group_index=[_to(t["gi"], device) for t in ts] if groups else (),
              group_scale=[_to(t["gs"], device) for t in ts] if groups else (),
              backend=backend, **hp)
    return [p.cpu() for p in params], [m.cpu() for m in momenta]


STEP_CONFIGS = {
    "sgd": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "momentum-first": dict(momentum=0.9, first_step=True),
    "dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "nesterov-first-stabilize": dict(momentum=0.5, nesterov=True, first_step=True, stabilize=True),
    "stabilize": dict(momentum=0.0, stabilize=True),
    "wd": dict(momentum=0.9, weight_decay=0.05),
    "wd-sgd": dict(momentum=0.0, weight_decay=0.1),
}
VARIANTS = {"plain": (False, False), "rescale": (True, False), "groups": (False, True), "both": (True, True)}


def _check_step(ts, hp, dtype, got_p, got_m):
    tol = TOL[dtype]
    p_ref, m_ref = _reference_step(ts, hp)
    start = 0
    for k, t in enumerate(ts):                 # tensor by tensor, so that a mixed-up slot shows
        stop = start + t["p"].shape[0]
        _assert_close(got_p[k], p_ref[start:stop], tol)
        if hp["momentum"]:
            _assert_close(got_m[k], m_ref[start:stop], tol)
        elif got_m:
            assert torch.equal(got_m[k], t["m"])               # momentum == 0: buffers untouched
        start = stop
    # every component on its manifold after the step (p/R); d is tangent, so every retraction lands on it
    codes = _cat(ts, "codes")
    r = _cat(ts, "r")
    w = torch.cat([p.double() for p in got_p]) / (r.reshape(-1, 1, 1) if r is not None else 1.0)
    for code in torch.unique(codes).tolist():
        _point_check(w[codes == code], code, dtype)


# every option with rescale and groups on, for every shape; the four rescale/group variants on two shapes
STEP_CASES = ([(shape, config, "both") for shape in SHAPES for config in STEP_CONFIGS]
              + [(shape, config, variant) for shape in [(3, 3), (3, 2)] for config in ("momentum", "wd-sgd")
                 for variant in ("plain", "rescale", "groups")])


@pytest.mark.parametrize("shape,config,variant", [pytest.param(*c, id=f"{c[0][0]}x{c[0][1]}-{c[1]}-{c[2]}")
                                                  for c in STEP_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step(backend, device, dtype, shape, config, variant):
    rescale, groups = VARIANTS[variant]
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(STEP_CONFIGS[config])
    gen = _seed("step", dtype, shape, config, variant)
    ts = make_step_tensors([1, 7, 60], shape, dtype, gen, rescale=rescale, groups=groups)
    got_p, got_m = _run_step(ts, hp, backend, device, rescale=rescale, groups=groups)
    for k, t in enumerate(ts):             # the step really moved every component that can move
        movable = torch.tensor([has_tangents(int(c), *shape) for c in t["codes"]], dtype=torch.bool)
        if bool(movable.any()):
            assert not torch.equal(got_p[k][movable], t["p"][movable])
    _check_step(ts, hp, dtype, got_p, got_m)


@pytest.mark.parametrize("shape", [(3, 3), (7, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_large(backend, device, dtype, shape):
    """The large sizes (and a many-block grid on CUDA) with every option on."""
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, first_step=False,
              stabilize=True)
    gen = _seed("step-large", dtype, shape)
    ts = make_step_tensors([1000, 1237, 1, 7] if shape == (3, 3) else [1237, 1, 7], shape, dtype, gen)
    got_p, got_m = _run_step(ts, hp, backend, device, rescale=True, groups=True)
    _check_step(ts, hp, dtype, got_p, got_m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_many_tensors(backend, device, dtype):
    """More tensors than one CUDA launch carries (40), different N, one of them empty."""
    hp = dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.02, first_step=False,
              stabilize=False)
    gen = _seed("many", dtype)
    sizes = [int(s) for s in torch.randint(1, 40, (45,), generator=gen)]
    sizes[17] = 0
    sizes[3] = 300
    ts = make_step_tensors(sizes, (3, 3), dtype, gen)
    got_p, got_m = _run_step(ts, hp, backend, device, rescale=True, groups=True)
    _check_step([t for t in ts if t["p"].shape[0]], hp, dtype,
                [p for p in got_p if p.shape[0]], [m for m in got_m if m.shape[0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_weight_decay_only_touches_euclidean(backend, device, dtype):
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, first_step=False, stabilize=False)
    gen = _seed("wd-only", dtype)
    ts = make_step_tensors([200, 60], (3, 3), dtype, gen)
    with_wd, m_wd = _run_step(ts, dict(hp, weight_decay=0.1), backend, device, rescale=True, groups=True)
    without, m_no = _run_step(ts, dict(hp, weight_decay=0.0), backend, device, rescale=True, groups=True)
    for k, t in enumerate(ts):
        euclid = t["codes"] == C.EUCLIDEAN
        assert bool(euclid.any()) and bool((~euclid).any())
        assert torch.equal(with_wd[k][~euclid], without[k][~euclid])
        assert torch.equal(m_wd[k][~euclid], m_no[k][~euclid])
        assert not torch.equal(with_wd[k][euclid], without[k][euclid])


@pytest.mark.parametrize("opts", [dict(momentum=0.0, weight_decay=0.0), dict(momentum=0.9, weight_decay=1e-2),
                                  dict(momentum=0.9, dampening=0.2, weight_decay=0.0),
                                  dict(momentum=0.8, nesterov=True, weight_decay=5e-3)],
                         ids=["plain", "momentum-wd", "dampening", "nesterov-wd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_euclidean_components_follow_torch_sgd(backend, device, dtype, opts):
    """DESIGN.md §1: euclidean components (R = 1, s_g = 1) follow torch.optim.SGD exactly, over 3 steps."""
    gen = _seed("sgd", dtype, str(opts))
    p0 = torch.randn(50, 3, 3, generator=gen, dtype=F64).to(dtype)
    grads = [torch.randn(50, 3, 3, generator=gen, dtype=F64).to(dtype) for _ in range(3)]
    ref = p0.clone().requires_grad_(True)
    sgd = torch.optim.SGD([ref], lr=0.1, **opts)
    p = p0.clone().to(device)
    m = torch.full_like(p, 7.0)                                   # garbage: must be overwritten on the first step
    codes = torch.zeros(50, dtype=torch.uint8, device=device)
    hp = dict(lr=0.1, momentum=opts.get("momentum", 0.0), dampening=opts.get("dampening", 0.0),
              nesterov=opts.get("nesterov", False), weight_decay=opts.get("weight_decay", 0.0))
    for i, g in enumerate(grads):
        ref.grad = g.clone()
        sgd.step()
        ops.step_([p], [g.to(device)], [m], [codes], first_step=(i == 0), backend=backend, **hp)
        _assert_close(p.cpu(), ref.detach(), TOL[dtype])
    assert not torch.equal(p.cpu(), p0)


@pytest.mark.parametrize("wd", [0.0, 0.03])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tangent_sqnorm(backend, device, dtype, shape, wd):
    gen = _seed("sqnorm", dtype, shape, wd)
    sizes = [7, 1, 1237, 30] if (shape == (3, 3) and wd) else [7, 1, 100]
    ts = make_step_tensors(sizes, shape, dtype, gen, groups=False, momentum=False)
    got = ops.tangent_sqnorm([_to(t["p"], device) for t in ts], [_to(t["g"], device) for t in ts],
                             [_to(t["codes"], device) for t in ts], rescale=[_to(t["r"], device) for t in ts],
                             weight_decay=wd, backend=backend).cpu()
    assert got.shape == (sum(t["p"].shape[0] for t in ts),) and got.dtype == torch.float64  # for every dtype
    ref = R.tangent_sqnorm(_cat(ts, "p"), _cat(ts, "g"), _cat(ts, "codes"), _cat(ts, "r"), wd)
    _assert_close(got, ref, TOL[dtype])
    # without rescale: R = 1
    got1 = ops.tangent_sqnorm([_to(t["p"], device) for t in ts], [_to(t["g"], device) for t in ts],
                              [_to(t["codes"], device) for t in ts], weight_decay=wd, backend=backend).cpu()
    ref1 = R.tangent_sqnorm(_cat(ts, "p"), _cat(ts, "g"), _cat(ts, "codes"), None, wd)
    _assert_close(got1, ref1, TOL[dtype])


@pytest.mark.parametrize("use_rescale", [True, False], ids=["rescale", "no-rescale"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_projx_inplace(backend, device, dtype, shape, use_rescale):
    gen = _seed("projx_", dtype, shape, use_rescale)
    params, codes, rescale = [], [], []
    for n in ([7, 1, 1000] if shape in ((3, 3), (7, 7)) else [7, 1, 50]):
        c = random_codes(n, *shape, gen)
        r = 0.5 + 1.5 * torch.rand(n, generator=gen, dtype=F64)
        x = torch.empty(n, *shape, dtype=F64)
        for code in torch.unique(c).tolist():
            mask = c == code
            x[mask] = _off_manifold(int(mask.sum()), shape, code, gen)
        params.append((x * r.reshape(-1, 1, 1) if use_rescale else x).to(dtype))
        codes.append(c)
        rescale.append(r.to(dtype))
    work = [p.clone().to(device) for p in params]
    ops.projx_(work, [c.to(device) for c in codes], rescale=[r.to(device) for r in rescale] if use_rescale else (),
               backend=backend)
    for p, got, c, r in zip(params, work, codes, rescale):
        got = got.cpu()
        rr = r.double() if use_rescale else None
        _assert_close(got, R.projx(p.double(), c, rr), TOL[dtype])
        w = got.double() / (rr.reshape(-1, 1, 1) if use_rescale else 1.0)
        for code in torch.unique(c).tolist():
            _point_check(w[c == code], code, dtype)
        euclid = c == C.EUCLIDEAN
        if not use_rescale:
            assert torch.equal(got[euclid], p[euclid])              # euclidean components are left alone


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rescale_inplace(backend, device, dtype):
    gen = _seed("rescale_", dtype)
    params, codes, ratio = [], [], []
    for n, shape in [(7, (3, 3)), (1237, (3, 3)), (1, (3, 3))]:
        c = random_codes(n, *shape, gen)
        params.append(random_points(n, *shape, c, gen).to(dtype))
        codes.append(c)
        ratio.append((0.5 + 1.5 * torch.rand(n, generator=gen, dtype=F64)).to(dtype))
    work = [p.clone().to(device) for p in params]
    ops.rescale_(work, [c.to(device) for c in codes], [r.to(device) for r in ratio], backend=backend)
    for p, got, r in zip(params, work, ratio):
        want = p * r.reshape(-1, 1, 1)
        assert torch.equal(got.cpu(), want)                          # one multiplication: exact
        assert not torch.equal(got.cpu(), p)


# ----------------------------------------------------------------------------------------------
# the torch backend (the reference run in fp32)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code,shape", [(C.STIEFEL_CAYLEY, (3, 3)), (C.OBLIQUE_EXP, (3, 2)),
                                        (C.SPHERE_NORMALIZE, (5, 5)), (C.STIEFEL_QR, (7, 7))])
def test_torch_backend_single_tensor_ops(code, shape):
    gen = _seed("torch", code, shape)
    n = 300
    x = random_points(n, *shape, code, gen).float()
    u = torch.randn(n, *shape, generator=gen, dtype=F64).float()
    v = _retr_direction(x.double(), code, gen).float()
    y = _off_manifold(n, shape, code, gen).float()
    man = M.from_code(code)
    _assert_close(ops.proj(x, u, code, backend="torch"), man.proj(x.double(), u.double()), FP32_RTOL)
    got = ops.retr(x, v, code, backend="torch")
    _assert_close(got, man.retr(x.double(), v.double()), FP32_RTOL)
    _point_check(got, code, torch.float32)
    got = ops.projx(y, code, backend="torch")
    _assert_close(got, man.projx(y.double()), FP32_RTOL)
    _point_check(got, code, torch.float32)
    _assert_close(ops.norms(y, backend="torch"), M.norms(y.double()), FP32_RTOL)


@pytest.mark.parametrize("config", ["momentum", "nesterov-first-stabilize", "wd"])
def test_torch_backend_step(config):
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(STEP_CONFIGS[config])
    gen = _seed("torch-step", config)
    ts = make_step_tensors([7, 130], (3, 3), torch.float32, gen)
    got_p, got_m = _run_step(ts, hp, "torch", "cpu", rescale=True, groups=True)
    _check_step(ts, hp, torch.float32, got_p, got_m)
    got = ops.tangent_sqnorm([t["p"] for t in ts], [t["g"] for t in ts], [t["codes"] for t in ts],
                             rescale=[t["r"] for t in ts], weight_decay=0.01, backend="torch")
    ref = R.tangent_sqnorm(_cat(ts, "p"), _cat(ts, "g"), _cat(ts, "codes"), _cat(ts, "r"), 0.01)
    _assert_close(got, ref, FP32_RTOL)


@requires_cpu_kernels
def test_compiled_and_torch_backends_agree_in_fp64():
    """The two implementations of the step, both in float64, on one mixed batch: agree to 1e-12."""
    hp = dict(lr=0.2, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01, first_step=False,
              stabilize=True)
    gen = _seed("agree")
    ts = make_step_tensors([500], (3, 2), torch.float64, gen)
    a_p, a_m = _run_step(ts, hp, "cpu", "cpu", rescale=True, groups=True)
    b_p, b_m = _run_step(ts, hp, "torch", "cpu", rescale=True, groups=True)
    _assert_close(a_p[0], b_p[0], 1e-12)
    _assert_close(a_m[0], b_m[0], 1e-12)


# ----------------------------------------------------------------------------------------------
# row components: n×1 with n > 64 (the row view of 1×1 convs and linear weights), streamed; the CPU streams the
# shorter n×1 with n > 8 too (csrc/cpu/kernels.cpp, takes_row_kernel): 9, 16 and 64 cross that path's limits
# ----------------------------------------------------------------------------------------------

ROW_CASES = ([(n, config) for n in (9, 16, 64, 65, 300) for config in STEP_CONFIGS]
             + [(2048, config) for config in ("momentum", "nesterov-first-stabilize", "wd-sgd")])


@pytest.mark.parametrize("n,config", [pytest.param(*c, id=f"{c[0]}x1-{c[1]}") for c in ROW_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_rows(backend, device, dtype, n, config):
    """Rows of any length: every option, every row code (euclidean, sphere, oblique, stiefel-qr), R and s_g."""
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(STEP_CONFIGS[config])
    gen = _seed("rows", dtype, n, config)
    # with stabilize, ω drifted off its sphere: only the re-projection brings the exp rows back
    ts = make_row_tensors([1, 9, 40], n, dtype, gen, drift=hp["stabilize"])
    assert set(torch.cat([t["codes"] for t in ts]).tolist()) == set(codes_for(n, 1))  # every row code is hit
    got_p, got_m = _run_step(ts, hp, backend, device, rescale=True, groups=True)
    for k, t in enumerate(ts):
        assert not torch.equal(got_p[k], t["p"])
    _check_step(ts, hp, dtype, got_p, got_m)


@pytest.mark.parametrize("wd", [0.0, 0.03])
@pytest.mark.parametrize("n", [9, 40, 65, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tangent_sqnorm_rows(backend, device, dtype, n, wd):
    gen = _seed("sqnorm-rows", dtype, n, wd)
    ts = make_row_tensors([3, 1, 50], n, dtype, gen, groups=False, momentum=False)
    got = ops.tangent_sqnorm([_to(t["p"], device) for t in ts], [_to(t["g"], device) for t in ts],
                             [_to(t["codes"], device) for t in ts], rescale=[_to(t["r"], device) for t in ts],
                             weight_decay=wd, backend=backend).cpu()
    ref = R.tangent_sqnorm(_cat(ts, "p"), _cat(ts, "g"), _cat(ts, "codes"), _cat(ts, "r"), wd)
    _assert_close(got, ref, TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rows_other_long_shapes_are_refused(backend, device):
    """Only n×1 rows may be longer than 64 entries; a 9×8 or 1×100 component is refused by name."""
    for shape in [(9, 8), (1, 100)]:
        p = torch.randn(4, *shape, device=device)
        codes = torch.zeros(4, dtype=torch.uint8, device=device)
        with pytest.raises(ValueError, match=r"params\[0\]: components must have 1 <= A\*B <= 64 \(or be n×1 rows"):
            ops.step_([p], [p.clone()], [], [codes], lr=0.1, backend=backend)
        with pytest.raises(RuntimeError, match=r"params\[0\] components must have 1 <= A\*B <= 64 \(or be n×1 rows"):
            torch.ops.fgsgd.step_([p], [p.clone()], [], [codes], [], [], [], 0.1, 0.0, 0.0, False, 0.0, False, False)


# ----------------------------------------------------------------------------------------------
# group_scale: s_g from the ‖ξ_i‖² of each group's members (step 2)
# ----------------------------------------------------------------------------------------------

def _group_inputs(n, groups, gen, dtype):
    """‖ξ_i‖² (random, > 0), a random group per component (group 3 left empty), its CSR form, the reference."""
    sq = (torch.rand(n, generator=gen, dtype=F64) * 3).to(dtype)
    gi = torch.randint(groups, (n,), generator=gen)
    gi[gi == 3] = 4
    members = torch.argsort(gi, stable=True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(gi, minlength=groups).cumsum(0)])
    return sq, members, offsets, gi


@pytest.mark.parametrize("index", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("n,groups", [(1, 5), (257, 20), (5000, 400)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("torch", "cpu", id="torch")])
def test_group_scale(backend, device, dtype, n, groups, index):
    """Members as int64 or int32 indices (FGSGD caches them as int32)."""
    gen = _seed("group-scale", dtype, n, groups)
    sq, members, offsets, gi = _group_inputs(n, groups, gen, dtype)
    members = members.to(index)
    clip = 2.0
    got = ops.group_scale(sq.to(device), members.to(device), offsets.to(device), clip, backend=backend).cpu()
    ref = R.group_step_size(sq.double(), gi.to(torch.int32), groups, clip)
    assert got.shape == (groups,) and got.dtype == dtype
    assert float(got[3]) == 1.0                                    # an empty group: s_g = 1
    if n > groups:
        assert bool((got < 1).any()) and bool((got == 1).any())    # some groups clipped, some not
    _assert_close(got, ref, TOL[dtype])
    for out in (torch.float32, torch.float64):  # s_g in the parameters' dtype (sqnorm is float64 from tangent_sqnorm, or float32 here)
        got = ops.group_scale(sq.to(device), members.to(device), offsets.to(device), clip, backend=backend,
                              dtype=out).cpu()
        assert got.dtype == out
        _assert_close(got, ref, TOL[out])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_scale_refuses_bad_input_by_name(backend, device):
    sq, members, offsets, _ = _group_inputs(50, 6, make_gen(1), torch.float32)
    sq, members, offsets = sq.to(device), members.to(device), offsets.to(device)
    with pytest.raises(ValueError, match=r"^members: expected an int64 or int32 tensor of shape \(50,\)"):
        ops.group_scale(sq, members.short(), offsets, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"^offsets: expected a 1-D int64 tensor"):
        ops.group_scale(sq, members, offsets.float(), 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"^group_clip: must be positive"):
        ops.group_scale(sq, members, offsets, 0.0, backend=backend)
    with pytest.raises(ValueError, match=r"^dtype: expected torch.float32 or torch.float64 \(the dtype of s_g\)"):
        ops.group_scale(sq, members, offsets, 1.0, backend=backend, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"fgsgd: members must have dtype Long"):
        torch.ops.fgsgd.group_scale(sq, members.short(), offsets, 1.0)
    with pytest.raises(RuntimeError, match=r"fgsgd: dtype \(of s_g\) must be float32 or float64"):
        torch.ops.fgsgd.group_scale(sq, members, offsets, 1.0, torch.int32)
