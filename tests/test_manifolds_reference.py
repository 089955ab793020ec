"""The float64 torch reference (fgsgd_cuda.manifolds) against the math of DESIGN.md §1.

The reference is the oracle of every backend, so it is checked here against properties computed
independently with torch.linalg: Table 1 norms, tangency, idempotence, first-order retractions,
the closed-form Cayley transform and the norms.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import SHAPES, codes_for, make_gen, random_points, random_tangents
from fgsgd_cuda import codes as C
from fgsgd_cuda import manifolds as M
from manifold_checks import constraint_error, has_tangents, tangent_error

F64 = torch.float64
TOL = 1e-12
N = 32
CASES = [pytest.param(code, shape, id=f"{C.manifold_of(code)}-{C.retraction_of(code)}-{shape[0]}x{shape[1]}")
         for shape in SHAPES for code in codes_for(*shape)]
MANIFOLD_CASES = [c for c in CASES if c.values[0] != C.EUCLIDEAN]


def _gen(code, shape, salt=0):
    return make_gen(1000 * code + 10 * shape[0] + shape[1] + 7919 * salt)


def _raw(n, shape, gen):
    """Random matrices far from any manifold: random scale per component, never zero."""
    x = torch.randn(n, *shape, generator=gen, dtype=F64)
    return x * (0.2 + 3 * torch.rand(n, 1, 1, generator=gen, dtype=F64))


def _unit_tangents(x, code, gen):
    v = random_tangents(x, code, gen)
    return v / torch.linalg.matrix_norm(v, ord="fro").reshape(-1, 1, 1)


# ----------------------------------------------------------------------------------------------
# projx: the exact projection onto the manifold
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code,shape", MANIFOLD_CASES)
def test_projx_lands_on_manifold(code, shape):
    gen = _gen(code, shape)
    x = _raw(N, shape, gen)
    assert constraint_error(x, code) > 1e-3          # the input is really off the manifold
    y = M.from_code(code).projx(x)
    assert y.dtype == F64 and y.shape == x.shape
    assert constraint_error(y, code) <= TOL


@pytest.mark.parametrize("code,shape", MANIFOLD_CASES)
def test_projx_is_the_stated_projection(code, shape):
    """sphere: x/‖x‖; oblique: every column scaled by a positive number; stiefel: Q of x = QR with
    diag(R) > 0 (so R = Qᵀx is upper triangular with a positive diagonal and QR = x)."""
    gen = _gen(code, shape, 1)
    x = _raw(N, shape, gen)
    y = M.from_code(code).projx(x)
    man = C.manifold_of(code)
    if man == "sphere":
        scale = torch.linalg.matrix_norm(x, ord="fro").reshape(-1, 1, 1)
        assert torch.allclose(y * scale, x, rtol=0, atol=TOL * 10)
    elif man == "oblique":
        scale = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        assert torch.allclose(y * scale, x, rtol=0, atol=TOL * 10)
    else:
        r = y.transpose(-2, -1) @ x
        assert torch.allclose(torch.tril(r, diagonal=-1), torch.zeros_like(r), rtol=0, atol=TOL * 10)
        assert bool((torch.diagonal(r, dim1=-2, dim2=-1) > 0).all())
        assert torch.allclose(y @ r, x, rtol=0, atol=TOL * 10)


@pytest.mark.parametrize("code,shape", CASES)
def test_projx_is_idempotent(code, shape):
    gen = _gen(code, shape, 2)
    man = M.from_code(code)
    y = man.projx(_raw(N, shape, gen))
    assert torch.allclose(man.projx(y), y, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------
# proj: the tangent projection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code,shape", CASES)
def test_proj_is_tangent_and_idempotent(code, shape):
    gen = _gen(code, shape, 3)
    x = random_points(N, *shape, code, gen)
    u = torch.randn(N, *shape, generator=gen, dtype=F64)
    man = M.from_code(code)
    xi = man.proj(x, u)
    if code != C.EUCLIDEAN and has_tangents(code, *shape):
        assert tangent_error(x, u, code) > 1e-3       # u itself is not tangent: the projection did something
    assert tangent_error(x, xi, code) <= TOL
    assert torch.allclose(man.proj(x, xi), xi, rtol=0, atol=TOL)
    # orthogonal projection: the removed part is normal, i.e. orthogonal to the tangent part
    residual_dot = ((u - xi) * xi).sum(dim=(-2, -1))
    assert float(residual_dot.abs().max()) <= TOL * 10
    # and tangent vectors are left alone
    t = random_tangents(x, code, gen)
    assert torch.allclose(man.proj(x, t), t, rtol=0, atol=TOL)
    if code == C.EUCLIDEAN:
        assert torch.equal(xi, u)
    if not has_tangents(code, *shape):
        assert float(xi.abs().max()) <= TOL            # T_x = {0}


@pytest.mark.parametrize("code,shape", MANIFOLD_CASES)
def test_proj_formulas(code, shape):
    """The table of DESIGN.md §1 written out once more, per component, with plain loops."""
    gen = _gen(code, shape, 4)
    x = random_points(4, *shape, code, gen)
    u = torch.randn(4, *shape, generator=gen, dtype=F64)
    xi = M.from_code(code).proj(x, u)
    man = C.manifold_of(code)
    for i in range(4):
        w, g = x[i], u[i]
        if man == "sphere":
            want = g - torch.trace(w.T @ g) * w
        elif man == "oblique":
            want = torch.stack([g[:, j] - torch.dot(w[:, j], g[:, j]) * w[:, j] for j in range(shape[1])], dim=1)
        else:
            s = w.T @ g
            want = g - w @ ((s + s.T) / 2)
        assert torch.allclose(xi[i], want, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------
# retractions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("code,shape", MANIFOLD_CASES)
def test_retraction_lands_on_manifold(code, shape, scale):
    gen = _gen(code, shape, 5)
    x = random_points(N, *shape, code, gen)
    if has_tangents(code, *shape):
        v = random_tangents(x, code, gen, scale=scale)
        assert float(v.abs().max()) > 0
    else:                                          # T_x = {0}: the only tangent vector
        v = torch.zeros_like(x)
    y = M.from_code(code).retr(x, v)
    assert constraint_error(y, code) <= TOL
    if not has_tangents(code, *shape):
        assert torch.allclose(y, x, rtol=0, atol=TOL)


@pytest.mark.parametrize("code,shape", CASES)
def test_retraction_is_first_order(code, shape):
    """‖Retr_ω(tV) − (ω + tV)‖ = O(t²) for ‖V‖_F = 1: err/t² stays bounded and err/t → 0."""
    if not has_tangents(code, *shape):
        pytest.skip("the tangent space is {0} here: there is no direction to retract along")
    gen = _gen(code, shape, 6)
    x = random_points(N, *shape, code, gen)
    v = _unit_tangents(x, code, gen)
    man = M.from_code(code)
    ts = [1e-1, 1e-2, 1e-3, 1e-4]
    errs = []
    for t in ts:
        diff = man.retr(x, t * v) - (x + t * v)
        errs.append(float(torch.linalg.matrix_norm(diff, ord="fro").max()))
    by_t2 = [e / t ** 2 for e, t in zip(errs, ts)]
    by_t = [e / t for e, t in zip(errs, ts)]
    assert max(by_t2) <= 1.5, by_t2                       # bounded second-order term (about 0.5 here)
    assert by_t[-1] <= 1e-3, by_t                         # err/t → 0 ...
    for a, b in zip(by_t, by_t[1:]):                      # ... linearly in t
        assert b <= 0.2 * a + 1e-13, by_t
    if code != C.EUCLIDEAN:
        assert by_t2[-1] > 1e-3                           # a genuine curve, not x + tV


@pytest.mark.parametrize("code,shape", CASES)
def test_retraction_of_zero_is_identity(code, shape):
    gen = _gen(code, shape, 7)
    x = random_points(N, *shape, code, gen)
    y = M.from_code(code).retr(x, torch.zeros_like(x))
    assert torch.allclose(y, x, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (3, 2), (2, 2)])
def test_sphere_exp_is_the_great_circle(shape):
    """exp: distance along the sphere equals ‖V‖ (for ‖V‖ < π): ⟨ω, Exp_ω(V)⟩ = cos‖V‖."""
    gen = make_gen(11)
    x = random_points(N, *shape, C.SPHERE_EXP, gen)
    v = _unit_tangents(x, C.SPHERE_EXP, gen) * (0.1 + 3 * torch.rand(N, 1, 1, generator=gen, dtype=F64))
    y = M.from_code(C.SPHERE_EXP).retr(x, v)
    t = torch.linalg.matrix_norm(v, ord="fro")
    assert torch.allclose((x * y).sum(dim=(-2, -1)), torch.cos(t), rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (3, 2), (7, 7)])
def test_oblique_exp_is_per_column_great_circle(shape):
    gen = make_gen(12)
    x = random_points(N, *shape, C.OBLIQUE_EXP, gen)
    v = random_tangents(x, C.OBLIQUE_EXP, gen, scale=0.7)
    y = M.from_code(C.OBLIQUE_EXP).retr(x, v)
    t = torch.linalg.vector_norm(v, dim=-2)
    assert torch.allclose((x * y).sum(dim=-2), torch.cos(t), rtol=0, atol=TOL)


@pytest.mark.parametrize("code", [C.SPHERE_NORMALIZE, C.OBLIQUE_NORMALIZE, C.STIEFEL_QR])
@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (3, 2), (7, 7)])
def test_normalize_and_qr_retractions_are_projx_of_the_sum(code, shape):
    gen = make_gen(13 + code)
    x = random_points(N, *shape, code, gen)
    v = random_tangents(x, code, gen, scale=0.5)
    man = M.from_code(code)
    y = man.retr(x, v)
    s = x + v
    if code == C.SPHERE_NORMALIZE:
        want = s / torch.linalg.matrix_norm(s, ord="fro").reshape(-1, 1, 1)
    elif code == C.OBLIQUE_NORMALIZE:
        want = s / torch.linalg.vector_norm(s, dim=-2, keepdim=True)
    else:
        q, r = torch.linalg.qr(s)
        want = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    assert torch.allclose(y, want, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------
# Cayley
# ----------------------------------------------------------------------------------------------

def _cayley_woodbury(x, v):
    """(I − W/2)⁻¹(I + W/2)x with W = U Zᵀ, U = [PV, x], Z = [x, −PV], P = I − xxᵀ/2, evaluated with the
    Sherman–Morrison–Woodbury identity (only a 2B×2B solve): an independent closed form."""
    a, b = x.shape[-2:]
    pv = v - 0.5 * x @ (x.transpose(-2, -1) @ v)
    u = torch.cat([pv, x], dim=-1)
    z = torch.cat([x, -pv], dim=-1)
    eye2b = torch.eye(2 * b, dtype=x.dtype).expand(x.shape[0], -1, -1)
    rhs = x + 0.5 * u @ (z.transpose(-2, -1) @ x)                       # (I + W/2) x
    inner = torch.linalg.solve(eye2b - 0.5 * z.transpose(-2, -1) @ u, z.transpose(-2, -1) @ rhs)
    return rhs + 0.5 * u @ inner                                           # (I − UZᵀ/2)⁻¹ rhs


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (7, 7), (3, 2), (8, 3), (2, 1)])
def test_stiefel_cayley_equals_closed_form(shape, scale):
    gen = make_gen(17)
    x = random_points(N, *shape, C.STIEFEL_CAYLEY, gen)
    v = random_tangents(x, C.STIEFEL_CAYLEY, gen, scale=scale)
    y = M.Stiefel("cayley").retr(x, v)
    want = _cayley_woodbury(x, v)
    assert torch.allclose(y, want, rtol=0, atol=1e-11)
    # the implicit form of the Cayley curve: Y = x + W (x + Y)/2
    pv = v - 0.5 * x @ (x.transpose(-2, -1) @ v)
    w = pv @ x.transpose(-2, -1) - x @ pv.transpose(-2, -1)
    assert torch.allclose(w, -w.transpose(-2, -1), rtol=0, atol=TOL)      # W is skew-symmetric
    assert torch.allclose(y, x + 0.5 * w @ (x + y), rtol=0, atol=1e-11)
    assert torch.allclose(w @ x, v, rtol=0, atol=1e-11)                   # W x = V for tangent V
    assert constraint_error(y, C.STIEFEL_CAYLEY) <= 1e-11


def test_default_retractions():
    assert M.manifold("stiefel").retraction == "qr"
    assert M.manifold("stiefel", "cayley").code == C.STIEFEL_CAYLEY
    assert M.manifold("sphere").retraction == "normalize"
    assert M.manifold("oblique").retraction == "normalize"


# ----------------------------------------------------------------------------------------------
# transport
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code,shape", CASES)
def test_transport_is_tangent_at_new_point(code, shape):
    if not has_tangents(code, *shape):
        pytest.skip("the tangent space is {0} here")
    gen = _gen(code, shape, 8)
    man = M.from_code(code)
    x = random_points(N, *shape, code, gen)
    x_new = man.retr(x, random_tangents(x, code, gen, scale=0.8))
    w = random_tangents(x, code, gen)
    if code != C.EUCLIDEAN:
        assert tangent_error(x_new, w, code) > 1e-3    # not tangent at the new point before transport
    out = man.transp(x_new, w)
    assert tangent_error(x_new, out, code) <= TOL
    assert torch.allclose(out, man.proj(x_new, w), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# norms
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES + [(2, 3), (1, 5), (8, 8)])
def test_norms_match_torch_linalg(shape):
    gen = make_gen(19)
    x = _raw(N, shape, gen)
    got = M.norms(x)
    assert got.shape == (N, 3) and got.dtype == F64
    fro = torch.sqrt((x * x).sum(dim=(-2, -1)))
    spectral = torch.linalg.svdvals(x)[..., 0]
    l21 = torch.sqrt((x * x).sum(dim=-1)).sum(dim=-1)        # sum of row norms
    assert torch.allclose(got[:, 0], fro, rtol=TOL, atol=0)
    assert torch.allclose(got[:, 1], spectral, rtol=TOL, atol=0)
    assert torch.allclose(got[:, 2], l21, rtol=TOL, atol=0)
    for name in ("sphere", "oblique", "stiefel", "euclidean"):
        assert torch.equal(M.manifold(name).norms(x), got)


@pytest.mark.parametrize("code,shape", MANIFOLD_CASES)
def test_table1_norms_of_points(code, shape):
    """fgsgd_cuda.manifolds.table1_norms agrees with the norms of points on the manifold."""
    gen = _gen(code, shape, 9)
    x = M.from_code(code).projx(_raw(N, shape, gen))
    nrm = M.norms(x)
    want = M.table1_norms(C.manifold_of(code), shape[1])
    assert want, "Table 1 prescribes a norm for every manifold"
    for key, col in (("frobenius", 0), ("spectral", 1)):
        if key in want:
            assert torch.allclose(nrm[:, col], torch.full((N,), want[key], dtype=F64), rtol=0, atol=TOL)
    assert want["frobenius"] == pytest.approx({"sphere": 1.0}.get(C.manifold_of(code), shape[1] ** 0.5))


# ----------------------------------------------------------------------------------------------
# names, codes, errors
# ----------------------------------------------------------------------------------------------

def test_codes_round_trip_and_match_the_cpp_header():
    for code in C.ALL_CODES:
        assert C.code_of(C.manifold_of(code), C.retraction_of(code)) == code
        man = M.from_code(code)
        assert man.code == code and man.name == C.manifold_of(code)
    header = (Path(__file__).resolve().parents[1] / "csrc" / "fgsgd" / "codes.h").read_text()
    names = {"kEuclidean": C.EUCLIDEAN, "kSphereNormalize": C.SPHERE_NORMALIZE, "kSphereExp": C.SPHERE_EXP,
             "kObliqueNormalize": C.OBLIQUE_NORMALIZE, "kObliqueExp": C.OBLIQUE_EXP, "kStiefelQR": C.STIEFEL_QR,
             "kStiefelCayley": C.STIEFEL_CAYLEY, "kNumCodes": len(C.ALL_CODES)}
    for name, value in names.items():
        m = re.search(rf"\b{name}\s*=\s*(\d+)", header)
        assert m is not None, name
        assert int(m.group(1)) == value, name


@pytest.mark.parametrize("name", ["hyperbolic", "Sphere", "", "grassmann"])
def test_unknown_manifold_name(name):
    with pytest.raises(ValueError, match=r"manifold: unknown manifold"):
        M.manifold(name)
    with pytest.raises(ValueError, match=r"manifold"):
        C.code_of(name)


@pytest.mark.parametrize("name,retraction", [("sphere", "qr"), ("oblique", "cayley"), ("stiefel", "exp"),
                                             ("stiefel", "normalize"), ("euclidean", "exp"), ("sphere", "polar")])
def test_unknown_retraction_name(name, retraction):
    with pytest.raises(ValueError, match=rf"retraction: '{retraction}' is not a retraction of the {name}"):
        M.manifold(name, retraction)
    with pytest.raises(ValueError, match=r"retraction"):
        M.MANIFOLD_CLASSES[name](retraction)


def test_stiefel_shape_check():
    with pytest.raises(ValueError, match=r"x: the stiefel manifold needs A >= B"):
        M.Stiefel().check_shape(torch.ones(2, 2, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"x: expected a batch of matrices"):
        M.Sphere().check_shape(torch.ones(2, 9, dtype=F64))
    M.Stiefel().check_shape(torch.ones(2, 3, 2, dtype=F64))


@pytest.mark.parametrize("code", [C.STIEFEL_QR, C.STIEFEL_CAYLEY])
def test_torch_backend_ops_return_contiguous_results_the_ops_take(code):
    """ops.projx/retr/proj on the torch backend return contiguous tensors, as the compiled and Triton ops do: the
    stiefel results came out of torch.linalg.qr column-major, and the same ops then refused them as input."""
    from fgsgd_cuda import ops
    gen = make_gen(31)
    x = ops.projx(torch.randn(9, 3, 2, generator=gen), code, backend="torch")
    u = torch.randn(9, 3, 2, generator=gen)
    for out in (x, ops.retr(x, ops.proj(x, u, code, backend="torch"), code, backend="torch")):
        assert out.is_contiguous()
    ops.proj(x, u, code, backend="torch")
