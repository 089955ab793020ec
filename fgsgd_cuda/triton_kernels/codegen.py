"""Source generation of the Triton kernels: straight-line code for one component shape A×B.

Triton has no per-thread arrays, so the component math of csrc/fgsgd (``Fixed<A, B>``: every loop
over rows and columns unrolled) is written out here as Python source: every element of a component
is its own register vector of ``BLOCK`` values (one value per component of the block), and every
loop of the C++ code is unrolled at generation time. The generated kernels use only core Triton
(``load``/``store``/``where``/``sqrt``/``sin``/``cos``/``abs``/``maximum``/``program_id``/``arange``/
``.to``), which Triton 3.6 and 3.9, compiled and interpreted, all accept.

The algorithms follow csrc/fgsgd, up to rounding rather than operation for operation: QR by Householder
reflections on x/max|x| (the C++ step also takes Cholesky QR for steps with ‖lr·d‖_F <= 1:
qr_q_of_step_inplace), Cayley by Gaussian elimination with partial pivoting (the C++ solve pivots for large
steps only and has a closed form for 3 rows), and for a step with ‖K‖_F² > 2 the clamp of K and a final QR,
norms rescaled where their squares would overflow (BIG_SQ; tests/test_triton.py checks steps up to near the
largest float), exp along the tangent part of its direction, sinc with a Taylor branch for t <= 1e-4, the spectral
norm as the square root of the largest eigenvalue of the Gram matrix by cyclic Jacobi rotations
(a fixed number of sweeps here, enough for the sizes allowed; see ``jacobi_sweeps``).

A component's code (fgsgd_cuda.codes) is either known when the source is generated (single-tensor
ops: only that manifold's code is emitted) or read per component at run time (multi-tensor ops:
every manifold's branch is computed and the result chosen with ``tl.where``; the tangent projection
of all four manifolds shares one B×B product ωᵀU, see ``Math.proj``; the costly exp, QR and Cayley
retractions run only in blocks that hold a component needing them, behind a block-uniform ``if``,
see ``Src.guarded``; a model typically uses one retraction per manifold).

This module only builds strings; it does not import triton. The constants shared with the torch reference
(CAYLEY_CLAMP, ON_SPHERE_TOL, EXP_ROUNDING_SQ) are read from fgsgd_cuda.manifolds.
"""
from __future__ import annotations

import torch

from .. import codes as C
from .. import manifolds as _M

MAX_CAYLEY_ROWS = 8     # the Cayley retraction solves an A×A system (checks.MAX_CAYLEY_ROWS)
SINC_SMALL = 1e-4       # sinc(t) = 1 − t²/6 below this (csrc/fgsgd/small_linalg.h)
NUM_HYPER = 4           # lr, momentum, dampening, weight_decay (float64 bits at the head of the table)
ROW = 12                # int64 entries per tensor in the pointer table (see _prologue_multi)
TL_DTYPE = {"fp32": "tl.float32", "fp64": "tl.float64"}
# Overflow guards (csrc/fgsgd/small_linalg.h big_sq_, manifold.h clamp_cayley): squared norms above BIG_SQ take the
# rescaled path; a large Cayley step's K = W/2 is scaled down to ‖K‖_F ≤ √2·CAYLEY_CLAMP (manifolds.CAYLEY_CLAMP).
BIG_SQ = {"fp32": 2.0 ** 100, "fp64": 2.0 ** 900}


def _by_name(table: dict) -> dict:
    """A torch-dtype-keyed constant of fgsgd_cuda.manifolds (the torch reference's) keyed "fp32"/"fp64" as here."""
    return {"fp32": table[torch.float32], "fp64": table[torch.float64]}


CAYLEY_CLAMP = _by_name(_M.CAYLEY_CLAMP)
ROW_RESCALE = {"fp32": 2.0 ** -80, "fp64": 2.0 ** -600}  # the row kernels' rescue pass (small_linalg.h row_rescale_of)
TINY = {"fp32": 2.0 ** -126, "fp64": 2.0 ** -1022}  # the smallest normal number (small_linalg.h tiny_of)
ON_SPHERE_TOL = _by_name(_M.ON_SPHERE_TOL)  # |‖ω‖² − 1| of a point on its sphere (on_sphere_tol_of)
EXP_ROUNDING_SQ = _by_name(_M.EXP_ROUNDING_SQ)  # ‖U⊥‖² of no step (small_linalg.h exp_rounding_sq_of)


def jacobi_sweeps(m: int, dtype: str) -> int:
    """Cyclic Jacobi sweeps for an m×m symmetric matrix: converges quadratically, so a handful suffices."""
    if m <= 1:
        return 0
    if m == 2:
        return 1  # one rotation diagonalizes a 2×2 matrix exactly
    base = 4 if m <= 3 else 5 if m <= 5 else 6
    return base + (2 if dtype == "fp64" else 0)


class Src:
    """Lines of a function body and fresh SSA-style names."""

    def __init__(self):
        self.lines: list[str] = []
        self.count = 0
        self.depth = 1

    def let(self, expr: str, hint: str = "t") -> str:
        name = f"{hint}{self.count}"
        self.count += 1
        self.raw(f"{name} = {expr}")
        return name

    def raw(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def guarded(self, mask: str, defaults, body):
        """Values computed by ``body()`` only in blocks where some component has ``mask``.

        Emits ``if <any lane of mask>:`` (a block-uniform branch), with the results pre-set to
        ``defaults`` for blocks that skip it. Names created inside the branch must not be used after
        it except through the returned names (Triton yields only variables defined before the if).
        """
        outs = [self.let(d, "g") for d in defaults]
        self.raw(f"if tl.max({mask}.to(tl.int32), axis=0) > 0:")
        self.depth += 1
        vals = body()
        for o, v in zip(outs, vals):
            self.raw(f"{o} = {v}")
        self.depth -= 1
        return outs


def _sum(terms) -> str:
    terms = list(terms)
    return " + ".join(terms) if terms else "0.0"


class Math:
    """The manifold operators of csrc/fgsgd/manifold.h on one A×B component held as a list of names.

    ``code`` is an int (static: only that manifold is emitted) or None (dynamic: the kernel has an
    int32 tensor ``code`` and every branch is computed, then selected).
    """

    _MASKS = {
        "euc": "code == 0",
        "sph": "(code == 1) | (code == 2)",
        "obl": "(code == 3) | (code == 4)",
        "sti": "code >= 5",
        "exp": "(code == 2) | (code == 4)",
        "nrm": "(code == 1) | (code == 3)",
        "qr": "code == 5",
        "cay": "code == 6",
    }

    def __init__(self, src: Src, a: int, b: int, code: int | None, dtype: str = "fp32"):
        self.s, self.A, self.B, self.code, self.dtype = src, a, b, code, dtype
        self._masks: dict[str, str] = {}
        if code is None:  # all masks up front: a name first made inside a guarded branch is local to it
            for name in self._MASKS:
                self.mask(name)

    @property
    def dynamic(self) -> bool:
        return self.code is None

    @property
    def stiefel_possible(self) -> bool:
        return self.A >= self.B

    @property
    def cayley_possible(self) -> bool:
        return self.A >= self.B and self.A <= MAX_CAYLEY_ROWS

    def mask(self, name: str) -> str:
        if name not in self._masks:
            self._masks[name] = self.s.let(self._MASKS[name], "is_")
        return self._masks[name]

    def man(self) -> str:
        return C.manifold_of(self.code)

    # -- small building blocks -------------------------------------------------------------------
    def ix(self, r: int, c: int) -> int:
        return r * self.B + c

    def col_sq(self, x) -> list[str]:
        return self.col_dots(x, x, False)

    def total(self, cols) -> str:
        return cols[0] if len(cols) == 1 else self.s.let(_sum(cols))

    def largest(self, terms) -> str:
        terms = list(terms)
        acc = terms[0]
        for t in terms[1:]:
            acc = f"tl.maximum({acc}, {t})"
        return self.s.let(acc)

    def inv_or_one(self, m: str) -> str:
        """1/m where m > 0, else 1 (csrc inv_or_one_: scales a nonzero vector to max-entry 1, leaves 0 alone)."""
        pos = self.s.let(f"{m} > 0.0")
        return self.s.let(f"tl.where({pos}, 1.0 / tl.where({pos}, {m}, 1.0), 1.0)")

    def per_column(self, cols, sph, whole) -> list[str]:
        """One value per column → per column the component's value ``whole(cols)`` where ``sph``, else the column's
        own. ``sph``: True (a static sphere), False (a static oblique) or a mask name (a dynamic kernel)."""
        if self.B == 1 or sph is False:
            return list(cols)
        tot = whole(cols)
        if sph is True:
            return [tot] * self.B
        return [self.s.let(f"tl.where({sph}, {tot}, {c})") for c in cols]

    def per_column_sq(self, x, sph) -> list[str]:
        """Per column: ‖x‖_F² where the component is a sphere (see per_column), else ‖x_j‖²."""
        return self.per_column(self.col_sq(x), sph, self.total)

    def per_column_max(self, x, sph) -> list[str]:
        """Per column: max |x_i| over the component where it is a sphere, else over the column."""
        cols = [self.largest(f"tl.abs({x[self.ix(r, j)]})" for r in range(self.A)) for j in range(self.B)]
        return self.per_column(cols, sph, self.largest)

    def overflows(self, sq, among: str | None = None, tiny: bool = False):
        """(per column: ‖·‖² > BIG_SQ [or, ``tiny``, < 1/BIG_SQ: underflowed to subnormals] [and ``among``], the lanes
        where any column's is), for a guarded rescaled path."""
        cond = f" & ({among})" if among else ""
        small = f" | ({{c}} < {1 / BIG_SQ[self.dtype]!r})" if tiny else ""
        flags = {c: self.s.let(f"(({c} > {BIG_SQ[self.dtype]!r}){small.format(c=c)}){cond}", "big")
                 for c in dict.fromkeys(sq)}
        names = list(flags.values())
        return [flags[c] for c in sq], names[0] if len(names) == 1 else self.s.let(" | ".join(names), "big")

    def inv_norms(self, x, sph, among: str | None = None) -> list[str]:
        """1/‖·‖ per column (of the whole component where ``sph``, see per_column); where a squared norm would
        overflow or underflow, from the norms of x/max|x| (csrc normalize, normalize_columns: normalising is
        scale-invariant). ``among``: the lanes that use the result (others may overflow without taking the rescaled
        path)."""
        B, n = self.B, self.A * self.B
        sq = self.per_column_sq(x, sph)
        inv = [self.s.let(f"1.0 / tl.sqrt({c})") for c in sq]
        big, any_big = self.overflows(sq, among, tiny=True)

        def rescaled():
            im = [self.inv_or_one(m) for m in self.per_column_max(x, sph)]
            y = [self.s.let(f"{x[i]} * {im[i % B]}") for i in range(n)]
            return [self.s.let(f"tl.where({b}, {m} / tl.sqrt({c}), {v})")
                    for b, m, c, v in zip(big, im, self.per_column_sq(y, sph), inv)]
        return self.s.guarded(any_big, inv, rescaled)

    def col_dots(self, x, y, sph) -> list[str]:
        """Per column: ⟨x, y⟩ over the component where it is a sphere (see per_column), else x_jᵀy_j."""
        cols = [self.s.let(_sum(f"{x[self.ix(r, j)]} * {y[self.ix(r, j)]}" for r in range(self.A)))
                for j in range(self.B)]
        return self.per_column(cols, sph, self.total)

    def exp_retr(self, w, v, sph, among: str | None = None) -> list[str]:
        """Exp_ω(V⊥) (of the whole component where ``sph``, else per column, see per_column) along V⊥ = V − aω,
        a = ⟨ω,V⟩ (csrc manifold.h retr: V's computed radial part is rounding, large relative to ‖V‖ for a mostly
        radial gradient): c·ω + k·V with t = ‖V⊥‖, k = sinc t, c = cos t − k·a. Where ‖V‖² would overflow or V lies
        mostly along ω (‖V⊥‖² < ‖V‖²/4, where c's cancellation would take the step off the manifold; manifold.h
        mostly_radial_), csrc exp_of_large: U = V/m with m = max|V|, U⊥ = U − ⟨ω,U⟩ω, its ω part removed again
        where ω is on its sphere to rounding (ON_SPHERE_TOL; a second Gram–Schmidt pass), t = m‖U⊥‖, and
        cos t·ω + sin t·U⊥/‖U⊥‖; no step where ‖U⊥‖² is rounding (EXP_ROUNDING_SQ; a one-entry column).
        ``among``: the lanes that use the result."""
        B, n = self.B, self.A * self.B
        a = self.col_dots(w, v, sph)
        vp = [self.s.let(f"{v[i]} - {a[i % B]} * {w[i]}") for i in range(n)]
        sq = self.per_column_sq(vp, sph)
        ts = [self.s.let(f"tl.sqrt({c})") for c in sq]
        k = [self.sinc(t) for t in ts]
        c = [self.s.let(f"tl.cos({t}) - {kj} * {aj}") for t, kj, aj in zip(ts, k, a)]
        out = [self.s.let(f"{c[i % B]} * {w[i]} + {k[i % B]} * {v[i]}") for i in range(n)]
        vv = self.per_column_sq(v, sph)
        cond = f" & ({among})" if among else ""
        flags = {(q, t): self.s.let(f"(({q} > {BIG_SQ[self.dtype]!r}) | ({t} < 0.25 * {q})){cond}", "far")
                 for q, t in dict.fromkeys(zip(vv, sq))}
        far = [flags[q, t] for q, t in zip(vv, sq)]
        names = list(flags.values())
        any_far = names[0] if len(names) == 1 else self.s.let(" | ".join(names), "far")

        def formed():
            ms = self.per_column_max(v, sph)
            im = [self.inv_or_one(m) for m in ms]
            u = [self.s.let(f"{v[i]} * {im[i % B]}") for i in range(n)]
            wu = self.col_dots(w, u, sph)
            up = [self.s.let(f"{u[i]} - {wu[i % B]} * {w[i]}") for i in range(n)]
            ww = self.per_column_sq(w, sph)
            on = [self.s.let(f"tl.abs({q} - 1.0) <= {ON_SPHERE_TOL[self.dtype]!r}") for q in ww]
            wu2 = [self.s.let(f"tl.where({o}, {d}, 0.0)") for o, d in zip(on, self.col_dots(w, up, sph))]
            up = [self.s.let(f"{up[i]} - {wu2[i % B]} * {w[i]}") for i in range(n)]
            cos, sn = [], []
            for j, uu in enumerate(self.per_column_sq(up, sph)):
                pos = self.s.let(f"{uu} > {EXP_ROUNDING_SQ[self.dtype]!r}")  # else U⊥ is rounding: no step
                nu = self.s.let(f"tl.sqrt(tl.where({pos}, {uu}, 1.0))")
                t = self.s.let(f"tl.where({pos}, {ms[j]} * {nu}, 0.0)")
                cos.append(self.s.let(f"tl.cos({t})"))
                sn.append(self.s.let(f"tl.where({pos}, tl.sin({t}) / {nu}, 0.0)"))
            return [self.s.let(f"tl.where({far[i % B]}, {cos[i % B]} * {w[i]} + {sn[i % B]} * {up[i]}, {out[i]})")
                    for i in range(n)]
        return self.s.guarded(any_far, out, formed)

    def sinc(self, t: str) -> str:
        small = self.s.let(f"{t} > {SINC_SMALL}")
        return self.s.let(f"tl.where({small}, tl.sin({t}) / tl.where({small}, {t}, 1.0), 1.0 - {t} * {t} / 6.0)")

    def gram_t(self, x, u, diagonal_only: bool = False) -> dict:
        """xᵀu (B×B) as {(p, q): name}; only its diagonal with ``diagonal_only``."""
        A, B = self.A, self.B
        return {(p, q): self.s.let(_sum(f"{x[self.ix(r, p)]} * {u[self.ix(r, q)]}" for r in range(A)))
                for p in range(B) for q in range(B) if p == q or not diagonal_only}

    def minus_x_times(self, u, x, S) -> list[str]:
        """u − x·S for a B×B matrix S given as {(p, q): name or None (zero)}."""
        A, B = self.A, self.B
        out = []
        for r in range(A):
            for q in range(B):
                terms = [f"{x[self.ix(r, p)]} * {S[p, q]}" for p in range(B) if S.get((p, q)) is not None]
                out.append(self.s.let(f"{u[self.ix(r, q)]} - ({_sum(terms)})") if terms else u[self.ix(r, q)])
        return out

    # -- Π_x(u) -----------------------------------------------------------------------------------
    def proj(self, x, u) -> list[str]:
        A, B = self.A, self.B
        if not self.dynamic:
            man = self.man()
            if man == "euclidean":
                return list(u)
            if man == "sphere":  # u − ⟨x,u⟩x
                a = self.s.let(_sum(f"{x[i]} * {u[i]}" for i in range(A * B)))
                return [self.s.let(f"{u[i]} - {a} * {x[i]}") for i in range(A * B)]
            if man == "oblique":  # per column j: u_j − (x_jᵀu_j) x_j
                a = [self.s.let(_sum(f"{x[self.ix(r, j)]} * {u[self.ix(r, j)]}" for r in range(A))) for j in range(B)]
                return [self.s.let(f"{u[i]} - {a[i % B]} * {x[i]}") for i in range(A * B)]
            M = self.gram_t(x, u)  # stiefel: u − x·sym(xᵀu)
            S = {}
            for p in range(B):
                S[p, p] = M[p, p]
                for q in range(p + 1, B):
                    S[p, q] = S[q, p] = self.s.let(f"0.5 * ({M[p, q]} + {M[q, p]})")
            return self.minus_x_times(u, x, S)
        # Every manifold's projection is u − x·S with S from M = xᵀu: sphere S = tr(M)·I (tr(M) = ⟨x,u⟩),
        # oblique S = diag(M), stiefel S = sym(M), euclidean S = 0 (no stiefel when A < B: diagonal only).
        M = self.gram_t(x, u, diagonal_only=not self.stiefel_possible)
        euc = self.mask("euc")
        S = {}
        if B == 1:  # all three manifolds agree
            S[0, 0] = self.s.let(f"tl.where({euc}, 0.0, {M[0, 0]})")
        else:
            sph, sti = self.mask("sph"), self.mask("sti")
            tr = self.s.let(_sum(M[q, q] for q in range(B)))
            for p in range(B):
                S[p, p] = self.s.let(f"tl.where({sph}, {tr}, tl.where({euc}, 0.0, {M[p, p]}))")
                if self.stiefel_possible:
                    for q in range(p + 1, B):
                        S[p, q] = S[q, p] = self.s.let(f"tl.where({sti}, 0.5 * ({M[p, q]} + {M[q, p]}), 0.0)")
        return self.minus_x_times(u, x, S)

    # -- Q of QR (Householder) ------------------------------------------------------------------------
    def qr_q(self, x) -> list[str]:
        """Q of the thin QR of x with diag(R) > 0, by Householder reflections on x/max|x| (csrc qr_q_inplace): Q is
        orthogonal to rounding for every x, also a numerically rank-deficient one (a huge step ω + a·V), where
        Gram-Schmidt normalises rounding noise; each reflector formed from its column scaled to max-entry 1 (a tiny
        column's squares underflowed and β = 2/vᵀv overflowed); reflector signs by selects, no branch on values."""
        A, B, n = self.A, self.B, self.A * self.B
        im = self.inv_or_one(self.largest(f"tl.abs({e})" for e in x))
        x = [self.s.let(f"{e} * {im}") for e in x]
        refl = []  # (v: rows j.. of reflector j, beta_j)
        flips = []
        for j in range(B):
            cm = self.largest(f"tl.abs({x[self.ix(i, j)]})" for i in range(j, A))
            big = self.s.let(f"{cm} >= {TINY[self.dtype]!r}")
            ic = self.s.let(f"tl.where({big}, 1.0 / tl.where({big}, {cm}, 1.0), 0.0)")
            col = {i: self.s.let(f"{x[self.ix(i, j)]} * {ic}") for i in range(j, A)}
            x0 = col[j]
            tail = self.s.let(_sum(f"{col[i]} * {col[i]}" for i in range(j + 1, A))) if j + 1 < A else None
            sq0 = f"{tail} + {x0} * {x0}" if tail else f"{x0} * {x0}"
            nrm = self.s.let(f"tl.sqrt({sq0})")
            alpha = self.s.let(f"tl.where({x0} < 0.0, {nrm}, -{nrm})")  # H_j x_j = α e_j; v = x_j − α e_j
            v0 = self.s.let(f"{x0} - {alpha}")
            vv = self.s.let(f"{tail} + {v0} * {v0}" if tail else f"{v0} * {v0}")
            pos = self.s.let(f"{vv} > 0.0")
            beta = self.s.let(f"tl.where({pos}, 2.0 / tl.where({pos}, {vv}, 1.0), 0.0)")
            flips.append(self.s.let(f"tl.where({alpha} > 0.0, 1.0, -1.0)"))  # Q_j·sign(R_jj): diag(R) > 0
            refl.append(([v0] + [col[i] for i in range(j + 1, A)], beta))
            for k in range(j + 1, B):
                self.reflect(refl[j], j, x, k)
        q = ["1.0" if i // B == i % B else "0.0" for i in range(n)]  # [I_B; 0], then H_0 ⋯ H_{B−1} applied to it
        for j in reversed(range(B)):
            for k in range(j, B):  # columns k < j are still e_k
                self.reflect(refl[j], j, q, k)
        return [self.s.let(f"{q[i]} * {flips[i % B]}") for i in range(n)]

    def reflect(self, reflector, j: int, x: list, k: int) -> None:
        """Column k of x ← H_j x_k, H_j = I − β v vᵀ on rows j.. (csrc reflect_column); entries may be the
        constants "0.0" and "1.0" (the columns of Q before their first reflection)."""
        v, beta = reflector
        rows = range(j, self.A)
        terms = [vi if x[self.ix(i, k)] == "1.0" else f"{vi} * {x[self.ix(i, k)]}"
                 for vi, i in zip(v, rows) if x[self.ix(i, k)] != "0.0"]
        if not terms:
            return
        f = self.s.let(f"{beta} * ({_sum(terms)})")
        for vi, i in zip(v, rows):
            e = x[self.ix(i, k)]
            x[self.ix(i, k)] = self.s.let(f"-{f} * {vi}" if e == "0.0" else f"{e} - {f} * {vi}")

    # -- Gaussian elimination with partial pivoting (csrc solve_inplace) ----------------------------
    def solve(self, M, R, n: int, b: int):
        """Y with M Y = R for n×n M and n×b R given as lists of rows of names."""
        M = [list(row) for row in M]
        R = [list(row) for row in R]
        invs = {}
        for c in range(n):
            if c < n - 1:
                best = self.s.let(f"tl.abs({M[c][c]})")
                piv = str(c)
                for r in range(c + 1, n):
                    a = self.s.let(f"tl.abs({M[r][c]})")
                    better = self.s.let(f"{a} > {best}")
                    best = self.s.let(f"tl.where({better}, {a}, {best})")
                    piv = self.s.let(f"tl.where({better}, {r}, {piv})")
                sel = {r: self.s.let(f"{piv} == {r}") for r in range(c + 1, n)}
                for mat, cols in ((M, range(c, n)), (R, range(b))):
                    for k in cols:
                        old = mat[c][k]
                        new = old
                        for r in range(c + 1, n):
                            new = self.s.let(f"tl.where({sel[r]}, {mat[r][k]}, {new})")
                        for r in range(c + 1, n):
                            mat[r][k] = self.s.let(f"tl.where({sel[r]}, {old}, {mat[r][k]})")
                        mat[c][k] = new
            invs[c] = self.s.let(f"1.0 / {M[c][c]}")
            for r in range(c + 1, n):
                f = self.s.let(f"{M[r][c]} * {invs[c]}")
                for k in range(c + 1, n):
                    M[r][k] = self.s.let(f"{M[r][k]} - {f} * {M[c][k]}")
                for k in range(b):
                    R[r][k] = self.s.let(f"{R[r][k]} - {f} * {R[c][k]}")
        for c in reversed(range(n)):
            for k in range(b):
                terms = [f"{M[c][j]} * {R[j][k]}" for j in range(c + 1, n)]
                acc = f"({R[c][k]} - ({_sum(terms)}))" if terms else R[c][k]
                R[c][k] = self.s.let(f"{acc} * {invs[c]}")
        return R

    def cayley(self, w, v):
        """(Y, large): Y = (I − W/2)⁻¹(I + W/2)ω, W = P V ωᵀ − ω (P V)ᵀ, P = I − ωωᵀ/2 (csrc cayley), by a pivoted
        elimination. ``large`` (None for one row): the lanes with ‖K‖_F² > 2, K = W/2, whose K is first scaled down
        to ‖K‖_F ≤ √2·τ (CAYLEY_CLAMP; csrc clamp_cayley: Cayley(K) moves by O(1/‖K‖) beyond it) and whose Y the
        caller puts back on the manifold by QR (the solve's error grows as ‖K‖ε)."""
        A, B = self.A, self.B
        wtv = self.gram_t(w, v)
        pv = [self.s.let(f"{v[self.ix(r, q)]} - 0.5 * ({_sum(f'{w[self.ix(r, p)]} * {wtv[p, q]}' for p in range(B))})")
              for r in range(A) for q in range(B)]
        # M = I − W/2; W is skew-symmetric, so M_ii = 1 and M_ji = 2δ − M_ij.
        upper = [(i, j) for i in range(A) for j in range(i + 1, A)]
        mij = [self.s.let("-0.5 * ({})".format(_sum(f"{pv[self.ix(i, q)]} * {w[self.ix(j, q)]} - "
                                                    f"{w[self.ix(i, q)]} * {pv[self.ix(j, q)]}" for q in range(B))))
               for i, j in upper]
        large = None
        if upper:
            large = self.s.let(f"{self.total([f'{m} * {m}' for m in mij])} > 1.0", "big")

            def clamp():
                m = self.largest(f"tl.abs({e})" for e in mij)
                im = self.inv_or_one(m)
                norm = self.s.let(f"{m} * tl.sqrt({_sum(f'({e} * {im}) * ({e} * {im})' for e in mij)})")
                tau = repr(CAYLEY_CLAMP[self.dtype])
                over = self.s.let(f"{norm} > {tau}")
                f = self.s.let(f"tl.where({over}, {tau} / tl.where({over}, {norm}, 1.0), 1.0)")
                return [self.s.let(f"{e} * {f}") for e in mij]
            mij = self.s.guarded(large, mij, clamp)
        M = [["1.0"] * A for _ in range(A)]
        for (i, j), m in zip(upper, mij):
            M[i][j] = m
            M[j][i] = self.s.let(f"-{m}")
        # rhs = (I + W/2) ω = 2ω − M ω = ω − (M − I) ω
        R = [[self.s.let(f"{w[self.ix(i, q)]} - ({_sum(f'{M[i][j]} * {w[self.ix(j, q)]}' for j in range(A) if j != i)})")
              if A > 1 else w[self.ix(i, q)] for q in range(B)] for i in range(A)]
        Y = self.solve(M, R, A, B)
        return [Y[r][q] for r in range(A) for q in range(B)], large

    # -- Retr_w(v) ----------------------------------------------------------------------------------
    def retr(self, w, v) -> list[str]:
        B, n = self.B, self.A * self.B
        if not self.dynamic:
            code = self.code
            if code == C.STIEFEL_CAYLEY:
                y, large = self.cayley(w, v)
                if large is None:
                    return y
                return self.s.guarded(large, y, lambda: [self.s.let(f"tl.where({large}, {q}, {o})")
                                                         for q, o in zip(self.qr_q(y), y)])
            if code in (C.SPHERE_EXP, C.OBLIQUE_EXP):
                return self.exp_retr(w, v, code == C.SPHERE_EXP)
            y = [self.s.let(f"{w[i]} + {v[i]}") for i in range(n)]
            return self.projx(y, code)
        y = [self.s.let(f"{w[i]} + {v[i]}") for i in range(n)]
        # normalize: sphere by the Frobenius norm, oblique per column (one scale per column either way)
        sph, exp, nrm = self.mask("sph"), self.mask("exp"), self.mask("nrm")
        inv = self.inv_norms(y, sph, among=nrm)
        out = [self.s.let(f"tl.where({nrm}, {y[i]} * {inv[i % B]}, {y[i]})") for i in range(n)]
        # The exp, QR and Cayley retractions are computed only in blocks that hold such a component.

        def exp_branch():
            return [self.s.let(f"tl.where({exp}, {e}, {o})") for e, o in zip(self.exp_retr(w, v, sph, among=exp), out)]

        out = self.s.guarded(exp, out, exp_branch)
        qr_of = None  # the lanes whose QR is taken: the qr retraction's, and large Cayley steps' (one QR for both)
        if self.cayley_possible:
            cay = self.mask("cay")
            base = out

            def cayley_branch():
                c, large = self.cayley(w, v)
                return [self.s.let(f"tl.where({cay}, {ci}, {o})") for ci, o in zip(c, base)] + \
                       [f"{cay} & {large}" if large else "code < 0"]
            *out, qr_of = self.s.guarded(cay, base + ["code < 0"], cayley_branch)
        if self.stiefel_possible:
            qr = self.mask("qr")
            if qr_of is None:
                qr_of = qr
            else:
                qr_of = self.s.let(f"{qr} | {qr_of}")
            base = out

            def qr_branch():
                x = y if not self.cayley_possible else \
                    [self.s.let(f"tl.where({qr}, {a}, {o})") for a, o in zip(y, base)]
                return [self.s.let(f"tl.where({qr_of}, {q}, {o})") for q, o in zip(self.qr_q(x), base)]
            out = self.s.guarded(qr_of, base, qr_branch)
        return out

    # -- projx: the exact projection onto the manifold ----------------------------------------------
    def projx(self, x, code: int | None = None) -> list[str]:
        """``code`` overrides the static code (retr uses it for the normalize/qr retractions)."""
        B, n = self.B, self.A * self.B
        code = self.code if code is None else code
        if code is not None:
            man = C.manifold_of(code)
            if man == "euclidean":
                return list(x)
            if man == "stiefel":
                return self.qr_q(x)
            inv = self.inv_norms(x, man == "sphere")
            return [self.s.let(f"{x[i]} * {inv[i % B]}") for i in range(n)]
        euc = self.mask("euc")
        inv = self.inv_norms(x, self.mask("sph"), among="(code != 0)")
        out = [self.s.let(f"tl.where({euc}, {x[i]}, {x[i]} * {inv[i % B]})") for i in range(n)]
        if self.stiefel_possible:
            sti = self.mask("sti")
            base = out
            out = self.s.guarded(sti, base, lambda: [self.s.let(f"tl.where({sti}, {q}, {o})")
                                                     for q, o in zip(self.qr_q(x), base)])
        return out

    # -- norms ----------------------------------------------------------------------------------------
    def norms(self, x):
        """(Frobenius, spectral, ℓ2→1) of x."""
        A, B = self.A, self.B
        fro = self.s.let(f"tl.sqrt({_sum(f'{x[i]} * {x[i]}' for i in range(A * B))})")
        rows = [self.s.let(f"tl.sqrt({_sum(f'{x[self.ix(r, q)]} * {x[self.ix(r, q)]}' for q in range(B))})")
                for r in range(A)]
        l21 = self.s.let(_sum(rows))
        tall = A >= B
        m = B if tall else A
        G = [[None] * m for _ in range(m)]
        for p in range(m):
            for q in range(p, m):
                if tall:
                    g = _sum(f"{x[self.ix(r, p)]} * {x[self.ix(r, q)]}" for r in range(A))
                else:
                    g = _sum(f"{x[self.ix(p, c)]} * {x[self.ix(q, c)]}" for c in range(B))
                G[p][q] = G[q][p] = self.s.let(g)
        top = self.max_eig(G, m)
        spec = self.s.let(f"tl.sqrt(tl.maximum({top}, 0.0))")
        return fro, spec, l21

    def max_eig(self, G, m: int) -> str:
        """Largest eigenvalue of a symmetric m×m matrix by cyclic Jacobi sweeps (csrc sym_max_eig)."""
        G = [list(row) for row in G]
        for _ in range(jacobi_sweeps(m, self.dtype)):
            for p in range(m):
                for q in range(p + 1, m):
                    apq = G[p][q]
                    zero = self.s.let(f"{apq} == 0.0")
                    theta = self.s.let(f"({G[q][q]} - {G[p][p]}) / (2.0 * tl.where({zero}, 1.0, {apq}))")
                    t = self.s.let(f"tl.where({zero}, 0.0, tl.where({theta} >= 0.0, 1.0, -1.0) / "
                                   f"(tl.abs({theta}) + tl.sqrt({theta} * {theta} + 1.0)))")
                    c = self.s.let(f"1.0 / tl.sqrt({t} * {t} + 1.0)")
                    sn = self.s.let(f"{t} * {c}")
                    for k in range(m):
                        if k in (p, q):
                            continue
                        gkp, gkq = G[k][p], G[k][q]
                        G[k][p] = G[p][k] = self.s.let(f"{c} * {gkp} - {sn} * {gkq}")
                        G[k][q] = G[q][k] = self.s.let(f"{sn} * {gkp} + {c} * {gkq}")
                    gpp, gqq = G[p][p], G[q][q]
                    G[p][p] = self.s.let(f"{gpp} - {t} * {apq}")
                    G[q][q] = self.s.let(f"{gqq} + {t} * {apq}")
                    G[p][q] = G[q][p] = "0.0"
        best = G[0][0]
        for p in range(1, m):
            best = self.s.let(f"tl.maximum({best}, {G[p][p]})")
        return best


# -- kernels ----------------------------------------------------------------------------------------
#
# Compile time. Triton's coalescing pass (TritonGPUCoalesce) computes, for every load and store whose
# pointer is computed by an op, the transitive def-use slice of that access (mlir::getSlice), which
# here spans the whole unrolled kernel: its cost grows like (number of accesses) × (kernel size)², i.e.
# minutes for 5×5 components and far longer for 7×7. It skips accesses whose pointer is a block
# argument. So every kernel keeps one pointer tensor per element and array as a value carried by a
# `for` loop (a runtime trip count of one: each program still does one block of components), and
# loads and stores use those block arguments directly. The only access left with a computed pointer
# is the gather of the group step size s_g (one slice per kernel, and only with groups).

class Frame:
    """Pointer tensors carried by the kernel's loop, and the masked loads and stores through them."""

    def __init__(self, src: Src, ab: int):
        self.src, self.ab = src, ab
        self.ptrs: dict[str, list[str]] = {}
        self.advance: list[tuple[str, str]] = []
        self.il_split = False

    def elements(self, key: str, base: str) -> None:
        """One pointer tensor per element of the components of array ``base`` (a scalar pointer)."""
        names = [f"{key}_q{e}" for e in range(self.ab)]
        for e, nm in enumerate(names):
            self.src.raw(f"{nm} = {base} + offs * {self.ab} + {e}")
            self.advance.append((nm, f"BLOCK * {self.ab}"))
        self.ptrs[key] = names

    def interleaved(self, key: str, base: str) -> None:
        """As :meth:`elements` for the channels-last filters of a conv weight (O, L, kh, kw), L = ``il`` (the
        table's interleave column): component i = o·L + j has entry e at o·S·L + e·L + j, so the lanes of one load
        are consecutive input channels (coalesced; csrc/fgsgd/types.h TensorSlot::interleave). No advance: the
        frame's loop runs at most once (begin)."""
        if not self.il_split:  # output and input channel of every lane, once
            self.src.raw("il_o = offs // il")
            self.src.raw("il_j = offs - il_o * il")
            self.il_split = True
        names = [f"{key}_q{e}" for e in range(self.ab)]
        for e, nm in enumerate(names):
            self.src.raw(f"{nm} = {base} + il_o * ({self.ab} * il) + {e} * il + il_j")
        self.ptrs[key] = names

    def per_component(self, key: str, base: str, stride: int = 1, count: int = 1) -> None:
        """``count`` pointer tensors to entries ``stride·i + k`` of array ``base`` (k < count)."""
        names = [f"{key}_q{k}" for k in range(count)]
        for k, nm in enumerate(names):
            self.src.raw(f"{nm} = {base} + offs * {stride} + {k}" if stride != 1 or k else f"{nm} = {base} + offs")
            self.advance.append((nm, f"BLOCK * {stride}"))
        self.ptrs[key] = names

    def begin(self, start: str, cond: str | None = None) -> None:
        # one iteration, unknown to Triton; LLVM sees at most one and drops the loop (so the carried
        # pointers fold back into one base plus constant offsets, as in straight-line code); none when the
        # scalar `cond` is false
        self.src.raw(f"iters = ((n > {start}) & {cond}).to(tl.int32)" if cond else
                     f"iters = (n > {start}).to(tl.int32)")
        self.src.raw("for _it in range(0, iters):")
        self.src.depth += 1
        self.src.raw("mask = offs < n")

    def end(self) -> None:
        for nm, step in self.advance:
            self.src.raw(f"{nm} = {nm} + {step}")
        self.src.raw("offs = offs + BLOCK")
        self.src.depth -= 1

    def load(self, key: str, hint: str, other: str = "0.0") -> list[str]:
        return [self.src.let(f"tl.load({nm}, mask=mask, other={other})", hint) for nm in self.ptrs[key]]

    def store(self, key: str, vals) -> None:
        for nm, v in zip(self.ptrs[key], vals):
            self.src.raw(f"tl.store({nm}, {v}, mask=mask)")


def _function(name: str, args: str, body: Src) -> str:
    return "\n".join([f"def {name}({args}):"] + body.lines) + "\n"


def _prologue_multi(src: Src, dtype: str, log_tensors: int, hyper: bool, packed: bool = False,
                    bases: dict | None = None, interleaved: bool = False) -> None:
    """Find this program's tensor in the pointer table and its block of components.

    The table ``meta`` (int64) holds: NUM_HYPER float64 hyper-parameters (as bits); 2**log_tensors
    first-block indices (one per tensor, padded with a huge value; non-decreasing), searched
    bit by bit for the last tensor whose first block is <= program_id; then ROW entries per tensor:
    data pointers of p, g, m, codes, rescale, group_index, group_scale, out, then N, the first
    block index, the pointer of the tensor's step count (float32; 0 when the call has none) and the interleave L
    (the input channels of a channels-last conv weight whose filters are the components, read as ``il`` by
    ``interleaved`` kernels; 0 otherwise). Defines the scalar pointers ``<name>_ptr``, ``n``, ``start`` and
    ``offs``. ``packed``: the codes are int32 words, 2 bits per component (fgsgd_cuda/codes.py; _load_codes
    decodes them). ``bases`` maps a column to a kernel argument: the column then holds an element offset from that
    tensor (a column that would change every step, the outputs of group_scale or tangent_sqnorm, so that the table
    stays the same).
    """
    tl_dt = TL_DTYPE[dtype]
    src.raw("pid = tl.program_id(0)")
    src.raw("pos = pid * 0")
    for bit in reversed(range(log_tensors)):
        cand = src.let(f"pos + {1 << bit}")
        first = src.let(f"tl.load(meta + {NUM_HYPER} + {cand})")
        src.raw(f"pos = tl.where({first} <= pid, {cand}, pos)")
    src.raw(f"row = meta + {NUM_HYPER + (1 << log_tensors)} + pos * {ROW}")
    for k, (name, ty) in enumerate((("p", tl_dt), ("g", tl_dt), ("m", tl_dt),
                                    ("codes", "tl.int32" if packed else "tl.uint8"),
                                    ("rescale", tl_dt), ("gidx", "tl.int32"), ("gscale", tl_dt), ("out", tl_dt))):
        if bases and name in bases:
            src.raw(f"{name}_ptr = {bases[name]} + tl.load(row + {k})")
        else:
            src.raw(f"{name}_ptr = tl.load(row + {k}).to(tl.pointer_type({ty}))")
    src.raw("n = tl.load(row + 8)")
    src.raw("start = (pid - tl.load(row + 9)) * BLOCK")
    src.raw("offs = start + tl.arange(0, BLOCK)")
    if interleaved:
        src.raw("il = tl.load(row + 11)")
    if hyper:
        for k, name in enumerate(("lr", "mom", "damp", "wd")):
            src.raw(f"{name} = tl.load(meta + {k}).to(tl.float64, bitcast=True).to({tl_dt})")


def _tangent(src: Src, frame: Frame, math: Math, p, g, rescale: bool, wd: bool):
    """Step 1: ω = p/R, ξ = Π_ω(R·(g + wd·p)) (weight decay on euclidean components only)."""
    n = math.A * math.B
    if rescale:
        r = frame.load("r", "r", "1.0")[0]
        inv_r = src.let(f"1.0 / {r}")
        w = [src.let(f"{p[i]} * {inv_r}", "w") for i in range(n)]
    else:
        r, w = None, list(p)
    if wd:
        wde = src.let(f"tl.where({math.mask('euc')}, wd, 0.0)")
        g = [src.let(f"{g[i]} + {wde} * {p[i]}") for i in range(n)]
    xi = [src.let(f"{r} * {g[i]}") for i in range(n)] if rescale else list(g)
    return r, w, math.proj(w, xi)


CONTROL_ARGS = "found_ptr, lr_ptr, gs_ptr, every"


def _controls(src: Src, dtype: str, controls: str) -> None:
    """The step's run-time controls (fgsgd_cuda/controls.py), read by the kernel: ``controls`` holds "f"
    (found_inf: ``ok`` is false when the step is skipped), "l" (the lr tensor replaces the table's lr), "u"
    (``gu`` = 1 / GradScaler's scale, folded into s_g) and "s" (the tensor's step count decides
    ``first_rt`` and ``stab_rt``, csrc/fgsgd/step_control.h)."""
    tl_dt = TL_DTYPE[dtype]
    if "f" in controls:
        src.raw("ok = tl.load(found_ptr) == 0")
    if "l" in controls:
        src.raw(f"lr = tl.load(lr_ptr).to({tl_dt})")
    if "u" in controls:
        src.raw(f"gu = 1.0 / tl.load(gs_ptr).to({tl_dt})")
    if "s" in controls:
        src.raw("kcount = tl.load(tl.load(row + 10).to(tl.pointer_type(tl.float32))).to(tl.int32)")
        src.raw("first_rt = kcount == 0")
        src.raw("stab_rt = ((kcount + 1) % every) == 0  # every: 2^31 - 1 for never (launch._control_args)")


def load_packed_code(src: Src, index: str, mask: str | None = None) -> None:
    """``code`` of component(s) ``index`` from packed codes (fgsgd_cuda/codes.py): word 0 of ``codes_ptr`` the
    palette, component i in bits 2·(i mod 16) of word 1 + i // 16."""
    masked = f", mask={mask}, other=0" if mask else ""
    src.raw(f"cw = tl.load(codes_ptr + 1 + ({index} >> 4){masked})")
    src.raw(f"cv = (cw >> (({index} & 15) * 2).to(tl.int32)) & 3")
    src.raw("code = (tl.load(codes_ptr) >> (cv * 8)) & 255")


def _load_codes(src: Src, frame: Frame, packed: bool = False) -> None:
    if packed:
        load_packed_code(src, "offs", "mask")
    else:
        src.raw(f"code = tl.load({frame.ptrs['c'][0]}, mask=mask, other=0).to(tl.int32)")


def kernel_name(op: str, a: int, b: int, dtype: str, tag: str = "") -> str:
    return f"fgsgd_{op}_{a}x{b}_{dtype}{('_' + tag) if tag else ''}"


def step_kernel_name(op, a, b, dtype, momentum, first_step, nesterov, stabilize, rescale, group, weight_decay,
                     log_tensors, packed, controls, interleaved=False) -> str:
    """The name of a generated step kernel (components or rows): one letter per flag that is on."""
    flags = "".join(ch if on else "_" for ch, on in zip("mfnsrgw", (momentum, first_step, nesterov, stabilize,
                                                                     rescale, group, weight_decay)))
    return kernel_name(op, a, b, dtype, f"{flags}{'P' if packed else ''}{'I' if interleaved else ''}"
                                        f"{'_C' + controls if controls else ''}_L{log_tensors}")


def step_source(a, b, dtype, *, momentum, first_step, nesterov, stabilize, rescale, group, weight_decay,
                log_tensors, packed=False, controls="", interleaved=False):
    """The fused FG-SGD step (reference.step) over all tensors of a call: read p, g, m once, write p, m once.
    ``controls`` (see _controls): "s" decides stabilize per tensor at run time (the flag is then False), and the
    first step unless ``first_step`` forces it (buffers new at any count). ``interleaved``: the tensors are
    channels-last conv weights whose p and g are read and written
    where they are (Frame.interleaved; m and the per-component arrays are contiguous)."""
    name = step_kernel_name("step", a, b, dtype, momentum, first_step, nesterov, stabilize, rescale, group,
                            weight_decay, log_tensors, packed, controls, interleaved)
    n = a * b
    src = Src()
    _prologue_multi(src, dtype, log_tensors, hyper=True, packed=packed, bases={"gscale": "gsc_base"} if group else None,
                    interleaved=interleaved)
    _controls(src, dtype, controls)
    frame = Frame(src, n)
    weights = frame.interleaved if interleaved else frame.elements
    weights("p", "p_ptr")
    weights("g", "g_ptr")
    if momentum:
        frame.elements("m", "m_ptr")
    if not packed:
        frame.per_component("c", "codes_ptr")
    if rescale:
        frame.per_component("r", "rescale_ptr")
    if group:
        frame.per_component("gi", "gidx_ptr")
    frame.begin("start", "ok" if "f" in controls else None)
    _load_codes(src, frame, packed)
    math = Math(src, a, b, None, dtype)
    p = frame.load("p", "p")
    g = frame.load("g", "g")
    r, w, xi = _tangent(src, frame, math, p, g, rescale, weight_decay)
    if group:
        gi = frame.load("gi", "gi", "0")[0]
        sg = src.let(f"tl.load(gscale_ptr + {gi}, mask=mask, other=1.0)", "sg")
        xi = [src.let(f"{sg} * {x}") for x in xi]
    if "u" in controls:
        xi = [src.let(f"gu * {x}") for x in xi]
    if momentum:
        if first_step:
            buf = list(xi)
        elif "s" in controls:  # the first step writes the buffer without reading it
            m = frame.load("m", "m")
            omd = src.let("1.0 - damp")
            buf = [src.let(f"tl.where(first_rt, {xi[i]}, mom * {m[i]} + {omd} * {xi[i]})", "buf") for i in range(n)]
        else:
            m = frame.load("m", "m")
            omd = src.let("1.0 - damp")
            buf = [src.let(f"mom * {m[i]} + {omd} * {xi[i]}", "buf") for i in range(n)]
        d = [src.let(f"-lr * ({xi[i]} + mom * {buf[i]})" if nesterov else f"-lr * {buf[i]}", "d") for i in range(n)]
    else:
        buf = None
        d = [src.let(f"-lr * {x}", "d") for x in xi]
    y = math.retr(w, d)
    if stabilize:
        y = math.projx(y)
    elif "s" in controls:
        ys = math.projx(y)
        y = [src.let(f"tl.where(stab_rt, {a_}, {b_})") for a_, b_ in zip(ys, y)]
    if momentum:
        frame.store("m", math.proj(y, buf))
    frame.store("p", [src.let(f"{r} * {v}") for v in y] if rescale else y)
    frame.end()
    args = "meta, gsc_base" if group else "meta"
    return name, _function(name, f"{args}, {CONTROL_ARGS}, BLOCK: tl.constexpr" if controls else
                           f"{args}, BLOCK: tl.constexpr", src)


def sqnorm_source(a, b, dtype, *, rescale, weight_decay, log_tensors, packed=False, interleaved=False):
    """‖ξ‖_F² per component, written to the tensor's slice of the concatenated float64 output ``out_base`` (the
    table holds each tensor's element offset into it). The squares are summed in float64: in float32 they overflow
    from ‖ξ‖ = 1.8e19, where group_clip's s_g = c/‖ξ_g‖ is still finite. ``interleaved``: as in step_source."""
    name = kernel_name("sqnorm", a, b, dtype, f"{'r' if rescale else '_'}{'w' if weight_decay else '_'}"
                                              f"{'P' if packed else ''}{'I' if interleaved else ''}_L{log_tensors}")
    n = a * b
    src = Src()
    _prologue_multi(src, dtype, log_tensors, hyper=weight_decay, packed=packed, bases={"out": "out_base"},
                    interleaved=interleaved)
    frame = Frame(src, n)
    weights = frame.interleaved if interleaved else frame.elements
    weights("p", "p_ptr")
    weights("g", "g_ptr")
    if not packed:
        frame.per_component("c", "codes_ptr")
    frame.per_component("o", "out_ptr")
    if rescale:
        frame.per_component("r", "rescale_ptr")
    frame.begin("start")
    _load_codes(src, frame, packed)
    math = Math(src, a, b, None, dtype)
    p = frame.load("p", "p")
    g = frame.load("g", "g")
    _, _, xi = _tangent(src, frame, math, p, g, rescale, weight_decay)
    wide = [src.let(f"{x}.to(tl.float64)") for x in xi]
    frame.store("o", [src.let(_sum(f"{x} * {x}" for x in wide))])
    frame.end()
    return name, _function(name, "meta, out_base, BLOCK: tl.constexpr", src)


def projx_multi_source(a, b, dtype, *, rescale, log_tensors, packed=False):
    """p ← R·projx(p/R) in place."""
    name = kernel_name("projxm", a, b, dtype, f"{'r' if rescale else '_'}{'P' if packed else ''}_L{log_tensors}")
    n = a * b
    src = Src()
    _prologue_multi(src, dtype, log_tensors, hyper=False, packed=packed)
    frame = Frame(src, n)
    frame.elements("p", "p_ptr")
    if not packed:
        frame.per_component("c", "codes_ptr")
    if rescale:
        frame.per_component("r", "rescale_ptr")
    frame.begin("start")
    _load_codes(src, frame, packed)
    math = Math(src, a, b, None, dtype)
    p = frame.load("p", "p")
    if rescale:
        r = frame.load("r", "r", "1.0")[0]
        inv_r = src.let(f"1.0 / {r}")
        p = [src.let(f"{v} * {inv_r}") for v in p]
    y = math.projx(p)
    frame.store("p", [src.let(f"{v} * {r}") for v in y] if rescale else y)
    frame.end()
    return name, _function(name, "meta, BLOCK: tl.constexpr", src)


def rescale_multi_source(a, b, dtype, *, log_tensors):
    """p ← ratio·p per component in place (ratio in the table's rescale column)."""
    name = kernel_name("rescalem", a, b, dtype, f"L{log_tensors}")
    n = a * b
    src = Src()
    _prologue_multi(src, dtype, log_tensors, hyper=False)
    frame = Frame(src, n)
    frame.elements("p", "p_ptr")
    frame.per_component("r", "rescale_ptr")
    frame.begin("start")
    p = frame.load("p", "p")
    r = frame.load("r", "r", "1.0")[0]
    frame.store("p", [src.let(f"{r} * {v}") for v in p])
    frame.end()
    return name, _function(name, "meta, BLOCK: tl.constexpr", src)


def unary_source(op, a, b, dtype, code=None):
    """Single-tensor ops with the code fixed in the source: proj(x, u), retr(x, v), projx(x), norms(x)."""
    name = kernel_name(op, a, b, dtype, "" if code is None else f"c{int(code)}")
    n = a * b
    src = Src()
    src.raw("start = tl.program_id(0).to(tl.int64) * BLOCK")
    src.raw("offs = start + tl.arange(0, BLOCK)")
    frame = Frame(src, n)
    frame.elements("x", "x_ptr")
    if op in ("proj", "retr"):
        frame.elements("u", "u_ptr")
    if op == "norms":
        frame.per_component("o", "out_ptr", stride=3, count=3)
    else:
        frame.elements("o", "out_ptr")
    frame.begin("start")
    # norms do not depend on a code: a static one keeps the kernel free of per-component masks
    math = Math(src, a, b, C.EUCLIDEAN if code is None else int(code), dtype)
    x = frame.load("x", "x")
    if op == "norms":
        frame.store("o", math.norms(x))
    elif op == "projx":
        frame.store("o", math.projx(x))
    else:
        u = frame.load("u", "u")
        frame.store("o", math.proj(x, u) if op == "proj" else math.retr(x, u))
    frame.end()
    args = "x_ptr, out_ptr, n, BLOCK: tl.constexpr" if op in ("norms", "projx") else \
        "x_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr"
    return name, _function(name, args, src)
