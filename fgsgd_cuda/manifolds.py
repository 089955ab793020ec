"""The manifolds of FG-SGD in plain torch: the readable specification (DESIGN.md §1, Table "Manifolds").

Every function works on a batch of components ``x`` of shape ``(N, A, B)`` (one A×B matrix per
component, the k×k filter of one (output, input) channel pair) and is exact in float64. Every
compiled and Triton kernel is tested against these classes.

One class per manifold, in the style of geoopt: ``proj`` (tangent projection Π_x, alias ``proju``),
``retr`` (the retraction chosen at construction), ``transp`` (vector transport by projection onto
the tangent space at the new point), ``projx`` (exact projection onto the manifold) and ``norms``.
"""
from __future__ import annotations

import torch

from . import codes as _codes


def _inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product per component, shape (N, 1, 1)."""
    return (x * y).sum(dim=(-2, -1), keepdim=True)


def _nonzero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m > 0, m, torch.ones_like(m))


def _normalize(x: torch.Tensor, dim) -> torch.Tensor:
    """x / ‖x‖ over ``dim``, computed on x / max|x| so that no norm overflows (the result is scale-invariant)."""
    y = x / _nonzero(x.abs().amax(dim=dim, keepdim=True))
    return y / y.norm(dim=dim, keepdim=True)


def _exp(x: torch.Tensor, v: torch.Tensor, dim) -> torch.Tensor:
    """cos(t)·x + sin(t)·u/t over ``dim`` (the exp map of the sphere, per column for the oblique manifold) along the
    tangent part u = v − ⟨x,v⟩x of v, t = ‖u‖: v is tangent, but its computed radial part is the rounding of the
    projection, which a mostly radial gradient makes large relative to ‖v‖ (csrc manifold.h exp_of_large; exact:
    ⟨x,v⟩ = 0). Where ‖v‖ overflows, from v = m·w, m = max|v|: t = m‖w⊥‖, u/t = w⊥/‖w⊥‖. Where x is on its sphere to
    rounding (``ON_SPHERE_TOL``), the x part that rounding leaves in w⊥ (ε·|⟨x,w⟩|, large against ‖w⊥‖ far along x)
    is removed again: a second Gram–Schmidt pass, as exp_of_large does; off its sphere, x keeps the formula's meaning.
    A tangent part at the rounding of v (``EXP_ROUNDING_SQ``; always for a one-entry column, whose tangent space is
    {0}) is no step."""
    m = v.abs().amax(dim=dim, keepdim=True)
    big = ~torch.isfinite(v.square().sum(dim=dim, keepdim=True))
    scale = torch.where(big, _nonzero(m), torch.ones_like(m))  # ‖v/scale‖² is finite
    w = v / scale
    w = w - (x * w).sum(dim=dim, keepdim=True) * x
    on_sphere = ((x * x).sum(dim=dim, keepdim=True) - 1).abs() <= ON_SPHERE_TOL.get(x.dtype, 0.0)
    w = w - torch.where(on_sphere, (x * w).sum(dim=dim, keepdim=True), torch.zeros_like(m)) * x
    nw = w.norm(dim=dim, keepdim=True)
    # a tangent part at the rounding of v (relative to max|v|) is no step: always so for a one-entry column
    moves = nw.square() > EXP_ROUNDING_SQ.get(x.dtype, 0.0) * (m / scale).square()
    nw = torch.where(moves, nw, torch.zeros_like(nw))
    t = scale * nw
    return torch.cos(t) * x + torch.sin(t) * (w / _nonzero(nw))


# |‖x‖² − 1| up to which a point counts as on its sphere (csrc/fgsgd/small_linalg.h on_sphere_tol_of)
ON_SPHERE_TOL = {torch.float32: 2.0 ** -17, torch.float64: 2.0 ** -46}
# ‖v⊥‖²/max|v|² up to which an exp step's tangent part is the rounding of v: no step (small_linalg.h exp_rounding_sq_of)
EXP_ROUNDING_SQ = {torch.float32: 2.0 ** -42, torch.float64: 2.0 ** -100}


# Large Cayley steps: K = W/2 is scaled down to ‖K‖_F ≤ √2·τ, τ about 1/√ε (csrc/fgsgd/manifold.h, clamp_cayley)
CAYLEY_CLAMP = {torch.float32: 2.0 ** 12, torch.float64: 2.0 ** 26}


def sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.transpose(-2, -1))


def qr_positive(y: torch.Tensor) -> torch.Tensor:
    """Q factor of the thin QR of y with diag(R) > 0 (the unique one)."""
    q, r = torch.linalg.qr(y, mode="reduced")
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return q * sign.unsqueeze(-2)


class Manifold:
    """Base class: a product of N copies of one manifold of A×B matrices."""

    name = "manifold"
    retractions: tuple[str, ...] = ()

    def __init__(self, retraction: str | None = None):
        self.retraction = _codes.DEFAULT_RETRACTION[self.name] if retraction is None else retraction
        self.code = _codes.code_of(self.name, self.retraction)

    def check_shape(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"x: expected a batch of matrices of shape (N, A, B), got shape {tuple(x.shape)}")

    def proj(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    proju = proj

    def retr(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transp(self, x_new: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport of a tangent vector to x_new by projection (DESIGN.md §1 step 4)."""
        return self.proj(x_new, v)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        return norms(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(retraction={self.retraction!r})"


class Euclidean(Manifold):
    name = "euclidean"

    def proj(self, x, u):
        return u.clone()

    proju = proj

    def retr(self, x, v):
        return x + v

    def projx(self, x):
        return x.clone()


class Sphere(Manifold):
    """‖x‖_F = 1 per component."""

    name = "sphere"

    def proj(self, x, u):
        return u - _inner(x, u) * x

    proju = proj

    def retr(self, x, v):
        if self.retraction == "exp":
            return _exp(x, v, (-2, -1))
        return self.projx(x + v)

    def projx(self, x):
        return _normalize(x, (-2, -1))


class Oblique(Manifold):
    """Every column of every component has unit norm."""

    name = "oblique"

    def proj(self, x, u):
        return u - (x * u).sum(dim=-2, keepdim=True) * x

    proju = proj

    def retr(self, x, v):
        if self.retraction == "exp":
            return _exp(x, v, -2)
        return self.projx(x + v)

    def projx(self, x):
        return _normalize(x, -2)


class Stiefel(Manifold):
    """xᵀx = I_B per component (A ≥ B)."""

    name = "stiefel"

    def check_shape(self, x):
        super().check_shape(x)
        if x.shape[-2] < x.shape[-1]:
            raise ValueError(f"x: the stiefel manifold needs A >= B, got components of shape {tuple(x.shape[-2:])}")

    def proj(self, x, u):
        return u - x @ sym(x.transpose(-2, -1) @ u)

    proju = proj

    def retr(self, x, v):
        if self.retraction == "cayley":
            return self.cayley(x, v)
        return qr_positive(x + v)

    @staticmethod
    def cayley(x, v):
        """Y = (I − W/2)⁻¹ (I + W/2) x with W = P v xᵀ − x (P v)ᵀ, P = I − x xᵀ/2 (Wen & Yin).

        Large steps (‖K‖_F² > 2, K = W/2): K is first scaled down to ‖K‖_F ≤ √2·τ (``CAYLEY_CLAMP``, about
        1/√ε; Cayley(K) moves by O(1/‖K‖) beyond it), and Y is put back onto the manifold by QR, since the
        solve's error, about ‖K‖ε, is then above rounding."""
        eye = torch.eye(x.shape[-2], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
        pv = v - 0.5 * x @ (x.transpose(-2, -1) @ v)
        k = 0.5 * (pv @ x.transpose(-2, -1) - x @ pv.transpose(-2, -1))
        m = k.abs().amax(dim=(-2, -1), keepdim=True)
        norm = m * (k / _nonzero(m)).norm(dim=(-2, -1), keepdim=True) / 2 ** 0.5
        tau = CAYLEY_CLAMP.get(x.dtype, CAYLEY_CLAMP[torch.float32])
        k = k * torch.where(norm > tau, tau / _nonzero(norm), torch.ones_like(norm))
        y = torch.linalg.solve(eye - k, (eye + k) @ x)
        large = (norm > 1).reshape(-1)
        if bool(large.any()):
            y = torch.where(large.view(-1, 1, 1), qr_positive(y), y)
        return y

    def projx(self, x):
        """The Q factor of QR with positive diagonal (our choice; not the polar factor)."""
        return qr_positive(x)


MANIFOLD_CLASSES = {cls.name: cls for cls in (Euclidean, Sphere, Oblique, Stiefel)}


def manifold(name: str, retraction: str | None = None) -> Manifold:
    """The manifold object for ``name`` (``sphere``, ``oblique``, ``stiefel``, ``euclidean``)."""
    _codes.code_of(name, retraction)  # validates both names with a clear error
    return MANIFOLD_CLASSES[name](retraction)


def from_code(code: int) -> Manifold:
    return manifold(_codes.manifold_of(code), _codes.retraction_of(code))


def norms(x: torch.Tensor) -> torch.Tensor:
    """(N, 3): Frobenius, spectral and ℓ2→1 (sum of row norms) norm of every component."""
    fro = x.norm(dim=(-2, -1))
    spectral = torch.linalg.matrix_norm(x, ord=2)
    l21 = x.norm(dim=-1).sum(dim=-1)
    return torch.stack([fro, spectral, l21], dim=-1)


def table1_norms(name: str, b: int) -> dict[str, float]:
    """The norms the paper's Table 1 prescribes for a component of the given manifold with B columns."""
    if name == "sphere":
        return {"frobenius": 1.0}
    if name == "oblique":
        return {"frobenius": b ** 0.5}
    if name == "stiefel":
        return {"frobenius": b ** 0.5, "spectral": 1.0}
    return {}
