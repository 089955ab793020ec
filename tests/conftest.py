"""Shared test helpers: random inputs on the manifolds (never zeros) and the error measure.

Every kernel test compares a backend against the float64 reference of fgsgd_cuda.manifolds /
fgsgd_cuda.reference on inputs made here.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
from torch import nn

from fgsgd_cuda import _ext, codes as C, manifolds as M, reference as R

SHAPES = [(3, 3), (1, 1), (5, 5), (7, 7), (3, 2)]          # component shapes (A, B) every backend must handle
SIZES = [1, 7, 1000, 1237]                                 # N: 1237 is a multiple of no block size
FP32_RTOL = 1e-5


# Tests that take minutes, started first: under ``pytest -n 2 --dist worksteal`` (README's test command) one worker
# runs such a test while the other runs the rest and steals the first one's queue, instead of the long test starting
# last, alone (test_suite_under_triton_interpreter: 6 of the suite's 9.5 minutes on 2 cores).
LONG_TESTS = ("test_triton.py::test_suite_under_triton_interpreter",)


def pytest_collection_modifyitems(config, items) -> None:
    """The LONG_TESTS first, the rest in collection order."""
    items.sort(key=lambda item: not item.nodeid.endswith(LONG_TESTS))


def codes_for(a: int, b: int) -> list[int]:
    """The codes valid for A×B components (stiefel needs A >= B, cayley A <= 8)."""
    out = []
    for code in C.ALL_CODES:
        if C.manifold_of(code) == "stiefel" and a < b:
            continue
        if code == C.STIEFEL_CAYLEY and a > 8:
            continue
        out.append(code)
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64."""
    ref = ref.double()
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_points(n, a, b, codes, gen, dtype=torch.float64) -> torch.Tensor:
    """N components, each on the manifold of its code (a tensor of codes, or one int)."""
    codes = torch.full((n,), int(codes), dtype=torch.uint8) if isinstance(codes, int) else codes
    x = torch.randn(n, a, b, generator=gen, dtype=torch.float64)
    return R.projx(x, codes).to(dtype).contiguous()


def random_tangents(x, codes, gen, scale=1.0) -> torch.Tensor:
    """A random tangent vector at every component of x."""
    codes = torch.full((x.shape[0],), int(codes), dtype=torch.uint8) if isinstance(codes, int) else codes
    u = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    out = torch.empty_like(x)
    for code in torch.unique(codes).tolist():
        mask = codes == code
        out[mask] = M.from_code(code).proj(x[mask], u[mask])
    return (scale * out).contiguous()


def random_codes(n, a, b, gen) -> torch.Tensor:
    allowed = torch.tensor(codes_for(a, b), dtype=torch.uint8)
    return allowed[torch.randint(len(allowed), (n,), generator=gen)]


def make_step_tensors(sizes, shape, dtype, gen, *, rescale=True, groups=True, momentum=True):
    """Per tensor: codes (random mix), R, ω on the manifolds, p = R·ω, gradient, momentum (tangent at ω),
    group index and group step sizes: the inputs of a multi-tensor step_. Made in float64 for all tensors at
    once, then split and cast; keys codes, r, p, g, m, gi, gs (r, m, gi, gs None when switched off)."""
    total = sum(sizes)
    codes = random_codes(total, *shape, gen)
    r = 0.5 + 1.5 * torch.rand(total, generator=gen, dtype=torch.float64)
    w = random_points(total, *shape, codes, gen)
    p = w * r.reshape(-1, 1, 1) if rescale else w
    g = torch.randn(total, *shape, generator=gen, dtype=torch.float64)
    m = random_tangents(w, codes, gen, scale=0.5)
    cast = (lambda t: None if t is None else t.to(dtype).contiguous())
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        start += n
        if groups:
            num_groups = max(1, n // 3)
            gi = torch.randint(num_groups, (n,), generator=gen, dtype=torch.int32)
            gs = 0.2 + 0.8 * torch.rand(num_groups, generator=gen, dtype=torch.float64)
        else:
            gi = gs = None
        out.append(dict(codes=codes[sl].clone(), r=cast(r[sl]) if rescale else None, p=cast(p[sl]), g=cast(g[sl]),
                        m=cast(m[sl]) if momentum else None, gi=gi, gs=cast(gs)))
    return out


def make_row_tensors(sizes, n, dtype, gen, *, drift=False, **kw):
    """make_step_tensors for n×1 row components, with g and m scaled by 1/√n (a step of realistic size on a
    long row); ``drift``: ω moved off its sphere by up to 1e-3 (only a re-projection brings exp rows back)."""
    ts = make_step_tensors(sizes, (n, 1), dtype, gen, **kw)
    for t in ts:
        t["g"] = (t["g"] / n ** 0.5).contiguous()
        if t["m"] is not None:
            t["m"] = (t["m"] / n ** 0.5).contiguous()
        if drift:
            f = 1 + 1e-3 * torch.rand(t["p"].shape[0], 1, 1, generator=gen, dtype=torch.float64)
            t["p"] = (t["p"].double() * f).to(dtype)
    return ts


requires_cpu_kernels = pytest.mark.skipif(not _ext.HAS_CPU_KERNELS,
                                          reason=f"fgsgd_cuda._C is not built: {_ext.LOAD_ERROR}")
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_KERNELS),
                                   reason="needs a CUDA GPU and fgsgd_cuda._C built with CUDA")


def compiled_backends() -> list:
    """The compiled backends to test here: cpu always, cuda where a GPU and a CUDA build exist."""
    out = [pytest.param("cpu", "cpu", marks=requires_cpu_kernels)]
    out.append(pytest.param("cuda", "cuda", marks=requires_cuda))
    return out


def backends_on(pairs) -> list:
    """pytest params (backend, device) for the (name, device) pairs, id "name-device"; a pair that cannot run
    here (no GPU, no build, no Triton) is skipped with the reason."""
    from fgsgd_cuda import dispatch
    out = []
    for name, device in pairs:
        ok = (device == "cpu" or torch.cuda.is_available()) and dispatch.available(name, torch.device(device))
        out.append(pytest.param(name, device, id=f"{name}-{device}",
                                marks=() if ok else pytest.mark.skip(reason=f"{name} is not available on {device}")))
    return out


# the backends of the checks run on every backend but Triton (tests/test_triton.py runs them there, on its device)
CPU_TORCH_CUDA = backends_on((("cpu", "cpu"), ("torch", "cpu"), ("cuda", "cuda")))

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def compile_unusable(backend: str) -> str | None:
    """None when torch.compile works here at all (on a function without our ops), else why not."""
    try:
        fn = torch.compile(lambda t: torch.sin(t) * 2 + 1, fullgraph=True, backend=backend)
        t = torch.linspace(0, 1, 8)
        torch.testing.assert_close(fn(t), torch.sin(t) * 2 + 1)
    except Exception as exc:  # noqa: BLE001  (no C++ compiler, unsupported Python, ...)
        return f"torch.compile(backend={backend!r}) is not usable on this machine: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-tensor tests on one torch thread (much faster than two on a shared CPU); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def backend_step_pm(backend, device):
    """run(p, g, m, codes, hp) for check_large_steps: one ``ops.step_`` on ``backend``/``device`` of CPU tensors p and
    m, updated in place."""
    from fgsgd_cuda import ops

    def run(p, g, m, codes, hp):
        pd, gd, md = (t.to(device, copy=True).contiguous() for t in (p, g, m))
        ops.step_([pd], [gd], [md], [codes.to(device)], backend=backend, **hp)
        p.copy_(pd.cpu())
        m.copy_(md.cpu())
    return run


def with_zero_momentum(step):
    """run(p, g, codes, hp) for check_step_sizes from a run(p, g, m, codes, hp) that steps p and m in place: the step
    with a zero momentum buffer, returning the stepped p."""
    def run(p, g, codes, hp):
        step(p, g, torch.zeros_like(p), codes, hp)
        return p
    return run


def backend_step(backend, device):
    """run(p, g, codes, hp) for check_step_sizes: backend_step_pm's step with a zero momentum buffer."""
    return with_zero_momentum(backend_step_pm(backend, device))


def step_tolerances(dtype):
    """(relative error against the float64 reference, distance to the manifold) that a step in ``dtype`` must meet."""
    return (FP32_RTOL, 2e-6) if dtype == torch.float32 else (1e-12, 1e-14)


def check_step_sizes(run, code, shape, dtype):
    """The step's retraction of ``code`` (2 sphere exp, 4 oblique exp, 5 stiefel qr, 6 stiefel cayley) at steps
    from ‖lr·d‖ = 1e-3 to 300 (the spectral norm for stiefel, the Frobenius norm otherwise), each size alone and all
    of them interleaved, against the float64 reference, with the result on the manifold at rounding level.
    run(p, g, codes, hp) -> the stepped p (in ``dtype``).

    The header takes shortcuts for steps of ordinary size, chosen per block of lanes, with the general method as
    the fallback: qr by Cholesky QR where every lane has ‖lr·d‖_F <= 1, else Householder (qr_q_of_step_inplace;
    Cholesky QR alone loses orthogonality as κ²ε = (1 + ‖lr·d‖²)ε: 1e-3 at 100 in fp32); exp by the Taylor
    series of cos and sinc in ‖V‖² where every lane (column) has ‖V‖ <= 1/2 (cos_sinc_sq_); cayley for more than
    3 rows by elimination without pivoting where every lane has ‖W‖_F² <= 8, else with pivoting and a final QR.
    The header's closed form for 3 rows holds at every size. Triton and the torch backend solve Cayley with
    pivoting, then take a QR where ‖K‖_F² > 2 (the solve's error grows as ‖K‖ε), and Triton's qr is Householder."""
    a, b = shape
    gen = make_gen(zlib.crc32(repr((code, shape, str(dtype))).encode()))
    n = 333
    codes = torch.full((n,), code, dtype=torch.uint8)
    w = random_points(n, a, b, codes, gen)
    g = torch.randn(n, a, b, generator=gen, dtype=torch.float64)
    xi = R.tangent(w, g, codes.long())[1]
    xi_norm = torch.linalg.matrix_norm(xi, ord=2 if code in (5, 6) else "fro")
    hp = dict(lr=0.5, momentum=0.9, first_step=True)  # d = ξ: ‖lr·d‖ = size
    tol, bound = step_tolerances(dtype)
    sizes = [1e-3, 0.3, 3.0, 30.0, 300.0]
    mixed = torch.tensor(sizes, dtype=torch.float64)[torch.randint(len(sizes), (n,), generator=gen)]
    for size in sizes + ["mixed"]:
        target = mixed if size == "mixed" else torch.full((n,), size, dtype=torch.float64)
        gs = g * (target / (hp["lr"] * xi_norm)).reshape(n, 1, 1)
        ref_p, _ = R.step(w, gs, torch.zeros_like(w), codes.long(), None, None, **hp)
        got = run(w.to(dtype, copy=True), gs.to(dtype, copy=True), codes, hp)  # copies: run may step in place
        e = rel_err(got.cpu(), ref_p)
        assert e <= tol, f"code {code} {shape} size {size}: relative error {e:.3g} > {tol:g}"
        off = off_manifold(got, code)
        assert off <= bound, f"code {code} {shape} size {size}: off the manifold by {off:.3g} > {bound:g}"


def off_manifold(q: torch.Tensor, code: int) -> float:
    """How far the (N, A, B) components q are from the manifold of ``code``, in float64 (inf if not finite)."""
    q = q.cpu().double()
    if not bool(torch.isfinite(q).all()):
        return float("inf")
    if code in (5, 6):
        off = q.transpose(1, 2) @ q - torch.eye(q.shape[2], dtype=torch.float64)
    elif code in (3, 4):
        off = q.square().sum(1) - 1
    else:
        off = q.square().sum((1, 2)) - 1
    return float(off.abs().amax())


LARGE_SCALES = {torch.float32: [1e5, 1e10, 1e20, 1e30, 1e37], torch.float64: [1e50, 1e100, 1e160, 1e250, 1e300]}
LARGE_SHAPES = [(3, 3), (5, 3), (4, 4), (7, 7)]  # + (100, 1) for the step: a row component (csrc/fgsgd/row_step.h)
SHORT_ROW = (16, 1)  # n×1, 8 < n <= 64: a small component everywhere but on the CPU, which streams it as a row
LARGE_CODES = {1: "sphere-normalize", 2: "sphere-exp", 3: "oblique-normalize", 4: "oblique-exp", 5: "qr", 6: "cayley"}


def check_large_steps(run, code, shape, dtype):
    """Finite gradients of any size, up to near the largest float, give a finite step that lands on the manifold
    (the header's overflow guards and large-step paths, the torch manifolds' rescaled norms): two steps (the
    momentum buffer written, then read and transported) with |g| ~ scale in half the components and ordinary
    gradients in the other half, interleaved so that ordinary components share blocks of lanes with huge ones
    and go through the large-step paths too: those must still match the float64 reference. Normalize (codes 1, 3)
    is scale-invariant, so its huge fp32 steps must match the reference too (float64 has the range to spare).
    run(p, g, m, codes, hp) steps p and m in place."""
    a, b = shape
    gen = make_gen(zlib.crc32(repr(("large", code, shape, str(dtype))).encode()))
    n = 40
    codes = torch.full((n,), code, dtype=torch.uint8)
    huge = torch.arange(n) % 2 == 1
    tol, bound = step_tolerances(dtype)
    for scale in LARGE_SCALES[dtype]:
        w = random_points(n, a, b, codes, gen)
        gs = [torch.randn(n, a, b, generator=gen, dtype=torch.float64) for _ in range(2)]
        for g in gs:
            g[huge] *= scale
        p, m = w.to(dtype, copy=True), torch.zeros(n, a, b, dtype=dtype)
        ref_p, ref_m = w.clone(), torch.zeros_like(w)
        for k, g in enumerate(gs):
            hp = dict(lr=0.1, momentum=0.9, first_step=k == 0)
            run(p, g.to(dtype), m, codes, hp)
            ref_p, ref_m = R.step(ref_p, g, ref_m, codes.long(), None, None, **hp)
            off = off_manifold(p, code)
            assert off <= bound, f"code {code} {shape} scale {scale:g} step {k}: off the manifold by {off:.3g}"
            assert bool(torch.isfinite(m).all()), f"code {code} {shape} scale {scale:g} step {k}: momentum not finite"
            ordinary = ~huge if code not in (1, 3) or dtype == torch.float64 else torch.ones(n, dtype=torch.bool)
            e = rel_err(p.cpu()[ordinary], ref_p[ordinary])
            assert e <= tol, f"code {code} {shape} scale {scale:g} step {k}: relative error {e:.3g} > {tol:g}"


def check_large_single_ops(backend, device, code, shape, dtype):
    """``ops.retr`` with tangents and ``ops.projx`` with points of any finite size, up to near the largest float:
    finite and on the manifold, with huge and ordinary components interleaved (the ordinary ones against the
    float64 reference). projx is scale-invariant, so its huge components must match the reference too; a huge
    retr step only has to land on the manifold (x + V is numerically V, rank-deficient for a square Stiefel
    tangent, and a huge exp angle is rounding)."""
    from fgsgd_cuda import ops

    a, b = shape
    gen = make_gen(zlib.crc32(repr(("large-ops", code, shape, str(dtype))).encode()))
    n = 40
    huge = torch.arange(n) % 2 == 1
    man = M.from_code(code)
    tol, bound = step_tolerances(dtype)
    for scale in LARGE_SCALES[dtype]:
        x = random_points(n, a, b, code, gen)
        v = random_tangents(x, code, gen)
        y = torch.randn(n, a, b, generator=gen, dtype=torch.float64)
        v[huge] *= scale
        y[huge] *= scale
        got = ops.retr(x.to(dtype).to(device), v.to(dtype).to(device), code, backend=backend).cpu()
        off = off_manifold(got, code)
        assert off <= bound, f"retr {code} {shape} scale {scale:g}: off the manifold by {off:.3g}"
        e = rel_err(got[~huge], man.retr(x[~huge], v[~huge]))
        assert e <= tol, f"retr {code} {shape} scale {scale:g}: relative error {e:.3g} > {tol:g}"
        got = ops.projx(y.to(dtype).to(device), code, backend=backend).cpu()
        off = off_manifold(got, code)
        assert off <= bound, f"projx {code} {shape} scale {scale:g}: off the manifold by {off:.3g}"
        e = rel_err(got, man.projx(y))
        assert e <= tol, f"projx {code} {shape} scale {scale:g}: relative error {e:.3g} > {tol:g}"


UNEVEN = {torch.float32: [1e-10, 1e-20, 1e-30], torch.float64: [1e-100, 1e-160, 1e-250]}
UNEVEN_SHAPES = [(3, 3), (5, 2), (7, 7), (6, 4)]


def check_uneven_columns(backend, device, shape, dtype):
    """Stiefel QR of components whose columns differ in size by up to most of the float range. Q of X·D is Q of X for
    a positive diagonal D, so ``ops.projx`` of X·D must match the float64 reference's projx of X; and a QR step whose
    gradient has one column that large against the others lands finite on the manifold. (Householder reflections
    formed from the unscaled columns squared the small ones to subnormals, and β = 2/vᵀv came out inf: NaN columns,
    csrc/fgsgd/small_linalg.h qr_q_inplace, triton codegen qr_q.)"""
    from fgsgd_cuda import ops

    a, b = shape
    gen = make_gen(zlib.crc32(repr(("uneven", shape, str(dtype))).encode()))
    n = 24
    tol, bound = step_tolerances(dtype)
    run = backend_step_pm(backend, device)
    codes = torch.full((n,), C.STIEFEL_QR, dtype=torch.uint8)
    for scale in UNEVEN[dtype]:
        x = torch.randn(n, a, b, generator=gen, dtype=torch.float64)
        d = scale ** (torch.arange(b, dtype=torch.float64) / max(b - 1, 1))  # columns from 1 down to scale
        got = ops.projx((x * d).to(dtype).to(device), C.STIEFEL_QR, backend=backend).cpu()
        e = rel_err(got, M.from_code(C.STIEFEL_QR).projx((x * d).to(dtype).double()))
        assert e <= tol, f"projx {shape} columns down to {scale:g}: relative error {e:.3g} > {tol:g}"
        p = random_points(n, a, b, C.STIEFEL_QR, gen)
        v = random_tangents(p, C.STIEFEL_QR, gen)
        v[..., 0] /= scale  # one column of the gradient 1/scale times the others
        p, g = p.to(dtype), v.to(dtype)
        run(p, g, torch.zeros_like(p), codes, dict(lr=1.0))
        off = off_manifold(p, C.STIEFEL_QR)
        assert off <= bound, f"step {shape} gradient column 1/{scale:g}: off the manifold by {off:.3g}"


TINY = {torch.float32: [1e-18, 1e-23, 1e-30], torch.float64: [1e-160, 1e-170, 1e-250]}


def check_tiny_components(backend, device, code, shape, dtype):
    """``ops.projx`` of components whose entries are tiny (their squares underflow to subnormals or 0) equals the
    float64 reference's projx of the same components (projections onto the sphere, oblique and Stiefel manifolds are
    scale-invariant): normalize rescales where ‖x‖² underflows as it does where it overflows (a 1e-23 fp32 filter
    came out NaN, one of 1e-22 with norm 1.01)."""
    from fgsgd_cuda import ops

    a, b = shape
    gen = make_gen(zlib.crc32(repr(("tiny", code, shape, str(dtype))).encode()))
    tol, _ = step_tolerances(dtype)
    for scale in TINY[dtype]:
        y = torch.randn(24, a, b, generator=gen, dtype=torch.float64)
        x = (y * scale).to(dtype)
        got = ops.projx(x.to(device), code, backend=backend).cpu()
        e = rel_err(got, M.from_code(code).projx(x.double() / scale))
        assert e <= tol, f"projx {code} {shape} entries of {scale:g}: relative error {e:.3g} > {tol:g}"


RADIAL = {torch.float32: [10.0, 1e3, 1e5], torch.float64: [10.0, 1e6, 1e10]}
RADIAL_SHAPES = [(3, 3), (5, 3), (7, 7), (100, 1)]  # (100, 1): a row component (csrc/fgsgd/row_step.h)


def check_radial_gradients(run, code, shape, dtype, lams=None):
    """Gradients mostly along the point, g = ξ + λ·ω with ‖ξ‖_F = 2 and λ up to 1e5 (fp32) or 1e10 (fp64): the
    tangent part is then known only to about ε‖g‖, and the rounding of its radial part must not take an exp step
    off the manifold (it did by sin 2t·ελ: 1e-2 in fp32 at λ = 1e5; csrc/fgsgd/manifold.h exp_of_large). Two
    steps of size about 1 (the momentum buffer written, then read and transported), each landing on the manifold
    at rounding level with a finite momentum; at λ = 10, where the rounding of ξ is below the tolerance, against
    the float64 reference of the same rounded gradient. run(p, g, m, codes, hp) steps p and m in place. ``lams``: other
    values of λ."""
    a, b = shape
    gen = make_gen(zlib.crc32(repr(("radial", code, shape, str(dtype))).encode()))
    n = 40 if b > 1 else 4
    codes = torch.full((n,), code, dtype=torch.uint8)
    tol, bound = step_tolerances(dtype)
    for lam in lams or RADIAL[dtype]:
        p = random_points(n, a, b, codes, gen).to(dtype)
        m = torch.zeros_like(p)
        ref_m = torch.zeros(n, a, b, dtype=torch.float64)
        for k in range(2):
            w = p.double().clone()  # float64 p: a copy, not p itself (run steps p in place)
            xi = random_tangents(w, codes, gen)
            xi = xi * (2.0 / xi.flatten(1).norm(dim=1)).reshape(n, 1, 1)
            g = (xi + lam * w).to(dtype)
            hp = dict(lr=0.5, momentum=0.9, first_step=k == 0)
            run(p, g, m, codes, hp)
            ref_p, ref_m = R.step(w, g.double(), ref_m, codes.long(), None, None, **hp)
            off = off_manifold(p, code)
            assert off <= bound, f"code {code} {shape} radial {lam:g} step {k}: off the manifold by {off:.3g}"
            assert bool(torch.isfinite(m).all()), f"code {code} {shape} radial {lam:g} step {k}: momentum not finite"
            if lam <= 10:
                e = rel_err(p.cpu(), ref_p)
                assert e <= tol, f"code {code} {shape} radial {lam:g} step {k}: relative error {e:.3g} > {tol:g}"


# far along the point: ‖V‖² − a² cancels (λ²ε against ‖ξ‖²), so every backend forms V⊥ there with a second
# Gram–Schmidt pass (csrc/fgsgd/manifold.h mostly_radial_ and exp_of_large, row_step.h, manifolds._exp, the Triton
# codegen's exp_retr and rows): before, an fp32 2×6 oblique step landed 0.57 off its manifold at λ = 1e12 (C++), the
# torch reference and Triton about 3e-5 off (components), Triton rows near an axis 8e-3 off.
FAR_RADIAL = {torch.float32: [1e10, 1e20, 1e30], torch.float64: [1e20, 1e100, 1e200]}
FAR_SHAPES = [(3, 3), (5, 3), (7, 7), (2, 2)]
EXP_CODES = (2, 4)  # sphere and oblique with exp: the retractions that take V's direction


def check_rows_near_an_axis(backend, device, dtype, n):
    """n×1 exp rows near a coordinate axis, gradients λ·ω + noise: the rounding of the tangent projection falls on
    the axis entry, so the direction is mostly radial and ‖d‖² − ⟨ω,d⟩² cancels in the streamed row kernels (a 9×1
    row landed 0.05 off its sphere at λ = 1e20 in fp32, C++). They form d⊥ in double with a second Gram–Schmidt
    pass (csrc/fgsgd/row_step.h, triton_kernels/rows.py); the bound is 1e-12 in fp64, where double is no wider
    than the row."""
    from fgsgd_cuda import ops

    gen = make_gen(zlib.crc32(repr(("rows-axis", n, str(dtype))).encode()))
    rows = 20
    bound = 1e-6 if dtype == torch.float32 else 1e-12
    for lam in FAR_RADIAL[dtype]:
        w = 1e-3 * torch.randn(rows, n, 1, generator=gen, dtype=torch.float64)
        w[:, 0] = 1.0
        w = w / w.norm(dim=1, keepdim=True)
        g = (lam * w + torch.randn(rows, n, 1, generator=gen, dtype=torch.float64)).to(dtype)
        p = w.to(dtype).to(device)
        codes = torch.tensor([2, 4] * (rows // 2), dtype=torch.uint8, device=device)
        ops.step_([p], [g.to(device)], [torch.zeros_like(p)], [codes], lr=0.5, backend=backend)
        off = float((p.double().norm(dim=1) - 1).abs().max())
        assert off <= bound, f"n = {n}, λ = {lam:g}: off the sphere by {off:.3g}"


ONE_ENTRY_CASES = [(2, (1, 1)), (4, (1, 3)), (4, (1, 1))]  # (code, shape): sphere 1×1, oblique 1×k (exp)


def check_one_entry_columns(backend, device, code, shape, dtype):
    """Exp steps of components whose columns have one entry (an oblique 1×k filter, a 1×1 sphere component): the
    manifold is {±1}^k, its tangent space {0}, so no gradient moves them. The rounding that the tangent projection
    leaves (ω as a kernel's projx makes it, e.g. −0.99999994 in fp32) is along ω, and stepping by it left the
    manifold by O(1) for large gradients (cpu 0.2 at λ = 1e20 in fp32, Triton 1.6e-2 at 1e12): no step where
    ‖U⊥‖ is rounding (csrc/fgsgd/small_linalg.h exp_rounding_sq_of)."""
    from fgsgd_cuda import ops

    gen = make_gen(zlib.crc32(repr(("one-entry", code, shape, str(dtype))).encode()))
    n = 24
    codes = torch.full((n,), code, dtype=torch.uint8, device=device)
    bound = step_tolerances(dtype)[1]
    for lam in [1.0, 1e5] + FAR_RADIAL[dtype]:
        w = torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        ops.projx_([w], [codes], backend=backend)  # the point as the backend makes it
        p = w.clone()
        g = (lam * torch.randn(n, *shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
        ops.step_([p], [g], [torch.zeros_like(p)], [codes], lr=0.5, momentum=0.9, backend=backend)
        off = off_manifold(p, code)
        moved = float((p.double() - w.double()).abs().max())
        assert off <= bound and moved <= bound, f"code {code} {shape} λ = {lam:g}: off the manifold by {off:.3g}, " \
                                                f"moved by {moved:.3g} (no tangent space: no step)"


CLIP_SCALES = {torch.float32: [1e15, 1e25, 1e36], torch.float64: [1e100, 1e150]}
CLIP_SHAPES = [(3, 3), (5, 3), (100, 1)]  # (100, 1): a row component (csrc/fgsgd/row_step.h)


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max_i |got_i − ref_i| / |ref_i| in float64 (entries of very different sizes, each to its own precision)."""
    ref = ref.double()
    return float(((got.double().cpu() - ref).abs() / ref.abs().clamp_min(1e-300)).max())


def check_huge_group_clip(backend, device, shape, dtype):
    """group_clip with gradients whose ‖ξ_i‖² leaves the float32 range (‖ξ_i‖ > 1.8e19; in float64 up to near its
    own limit): ``ops.tangent_sqnorm`` is float64 and finite, ``ops.group_scale`` gives s_g = c/‖ξ_g‖ in the
    parameters' dtype, and the step with it matches the float64 reference. A float32 ‖ξ_i‖² made s_g = 0, a step
    that silently ignored the gradient. Huge and ordinary components alternate in each tensor (and share blocks
    of lanes); every code of the shape; euclidean components with weight decay."""
    from fgsgd_cuda import ops
    from fgsgd_cuda.functional import group_members

    gen = make_gen(zlib.crc32(repr(("huge-clip", shape, str(dtype))).encode()))
    sizes = [37, 4] if shape[1] > 1 else [6, 3]
    clip, wd = 1.5, 0.01
    tol = step_tolerances(dtype)[0]
    for scale in CLIP_SCALES[dtype]:
        ts = make_step_tensors(sizes, shape, dtype, gen)
        for t in ts:  # fresh groups: every other group huge
            t["gi"] = (torch.arange(t["p"].shape[0]) // 2).to(torch.int32)
            huge = t["gi"] % 2 == 1
            t["g"] = t["g"].double() * (0.1 / (shape[0] * shape[1]) ** 0.5)  # ordinary groups: ‖ξ_g‖ < c, s_g = 1
            t["g"][huge] *= scale
            t["g"] = t["g"].to(dtype)
        num = [int(t["gi"].max()) + 1 for t in ts]
        dev = [{k: (v.to(device, copy=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in ts]
        cat = (lambda key: torch.cat([t[key].double() if t[key].is_floating_point() else t[key] for t in ts]))
        what = f"{shape} {dtype} scale {scale:g}"
        sq = ops.tangent_sqnorm([t["p"] for t in dev], [t["g"] for t in dev], [t["codes"] for t in dev],
                                rescale=[t["r"] for t in dev], weight_decay=wd, backend=backend)
        ref_sq = R.tangent_sqnorm(cat("p"), cat("g"), cat("codes").long(), cat("r"), wd)
        assert sq.dtype == torch.float64, f"{what}: tangent_sqnorm gave {sq.dtype}"
        assert bool(torch.isfinite(sq).all()), f"{what}: ‖ξ_i‖² not finite"
        e = max_rel_err(sq, ref_sq)
        assert e <= tol, f"{what}: ‖ξ_i‖² relative error {e:.3g} > {tol:g}"
        members, offsets = group_members([t["gi"] for t in ts], num)
        s = ops.group_scale(sq, members.to(device), offsets.to(device), clip, backend=backend, dtype=dtype)
        ref_s = torch.cat([R.group_step_size(R.tangent_sqnorm(t["p"].double(), t["g"].double(), t["codes"].long(),
                                                              t["r"].double(), wd), t["gi"], n, clip)
                           for t, n in zip(ts, num)])
        assert s.dtype == dtype, f"{what}: s_g in {s.dtype}"
        assert bool((ref_s < 1e-6).any()) and bool((ref_s == 1).any()), f"{what}: the clip is not exercised"
        e = max_rel_err(s, ref_s)
        assert e <= tol, f"{what}: s_g relative error {e:.3g} > {tol:g}"
        gs = list(s.split(num))
        ops.step_([t["p"] for t in dev], [t["g"] for t in dev], [t["m"] for t in dev], [t["codes"] for t in dev],
                  rescale=[t["r"] for t in dev], group_index=[t["gi"] for t in dev], group_scale=gs, lr=0.1,
                  momentum=0.9, weight_decay=wd, backend=backend)
        for k, t in enumerate(ts):
            p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double(), t["codes"].long(),
                                  t["r"].double(), ref_s[sum(num[:k]):sum(num[:k + 1])][t["gi"].long()], lr=0.1,
                                  momentum=0.9, weight_decay=wd)
            e = rel_err(dev[k]["p"].cpu(), p_ref)
            assert e <= tol, f"{what}: params[{k}] relative error {e:.3g} > {tol:g}"
            e = rel_err(dev[k]["m"].cpu(), m_ref)
            assert e <= tol, f"{what}: momentum_buffers[{k}] relative error {e:.3g} > {tol:g}"


def shape_code_cases(shapes, codes=None):
    """A decorator parametrizing a test over dtype × (code, shape) for ``shapes`` and every code of LARGE_CODES (or
    of ``codes``) that the shape allows (cayley needs A <= 8: no row component has it)."""
    cases = [(code, shape) for shape in shapes for code in LARGE_CODES
             if (code != 6 or shape[0] <= 8) and (codes is None or code in codes)]
    marks = (pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"]),
             pytest.mark.parametrize("code,shape", cases, ids=[f"{LARGE_CODES[c]}-{a}x{b}" for c, (a, b) in cases]))

    def decorate(test):
        for mark in marks:
            test = mark(test)
        return test
    return decorate


def _two_dtype_weights(seed, device):
    torch.manual_seed(seed)
    return [nn.Parameter(nn.Conv2d(3, 4, 3).weight.detach().clone().to(device)),
            nn.Parameter(nn.Conv2d(4, 5, 3).weight.detach().double().clone().to(device))]


def _two_dtype_steps(params, backend, steps=3):
    """Three steps with group_clip (s_g per group, in the weight's dtype) and momentum; a grouping that does not
    depend on a weight's position in its group (sphere only, deterministic selection)."""
    from fgsgd_cuda import FGSGD
    opt = FGSGD([{"params": params, "manifolds": ["sphere"], "selection": "deterministic", "group_size": 3,
                  "group_clip": 0.05, "backend": backend}], lr=0.1, momentum=0.9)
    for k in range(steps):
        for p in params:  # each weight's own gradients, wherever it is in the group
            p.grad = torch.randn(p.shape, generator=make_gen(50 + k + 100 * p.shape[0]),
                                 dtype=torch.float64).to(p.dtype).to(p.device)
        opt.step()
    return opt


def check_two_dtype_group(backend, device, order):
    """A manifold group of a float32 and a float64 weight (tests/test_mixed_dtypes.py): each weight follows the same
    weight stepped alone, and stays on the sphere."""
    together = _two_dtype_weights(0, device)
    if order == "fp64-first":
        together = together[::-1]
    _two_dtype_steps(together, backend)
    for p in together:
        alone = [nn.Parameter(q.detach().clone()) for q in _two_dtype_weights(0, device) if q.dtype == p.dtype]
        _two_dtype_steps(alone, backend)
        tol = 1e-6 if p.dtype == torch.float32 else 1e-14
        assert float((p.detach() - alone[0].detach()).abs().max()) <= tol, f"{p.dtype} weight"
        norms = p.detach().double().reshape(-1, 9).norm(dim=1)
        assert float((norms - 1).abs().max()) <= 10 * torch.finfo(p.dtype).eps


def _rank_main(target, rank: int, out_dir: str, args) -> None:
    """One process of run_ranks: target(*args); a failure's traceback goes to ``out_dir/error<rank>.txt``."""
    try:
        target(*args)
    except BaseException:  # pragma: no cover - reported by the parent
        import traceback
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(target, world: int, args_of, out_dir, timeout: float = 120) -> None:
    """Runs target(*args_of(rank)) in ``world`` processes (fork where the OS has it: the children inherit the
    imported torch and fgsgd_cuda, cheaper than fresh interpreters) and fails with a rank's traceback
    (``out_dir/error<rank>.txt``) when one exits with an error or hangs."""
    import torch.multiprocessing as mp
    from fgsgd_cuda import FGSGD
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    FGSGD([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1)  # torch.optim's lazy imports, once, before forking
    procs = [ctx.Process(target=_rank_main, args=(target, r, str(out_dir), args_of(r))) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for r, p in enumerate(procs):
        err = os.path.join(str(out_dir), f"error{r}.txt")
        why = open(err).read() if os.path.exists(err) else ""
        assert p.exitcode == 0, f"rank {r} failed (exit code {p.exitcode}):\n{why}"
