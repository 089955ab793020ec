"""Triton kernels of row components: n×1 components of any length (the row view of 1×1 convs and linear
weights), the math of csrc/fgsgd/row_step.h.

One program per row, over the same int64 pointer table as the other multi-tensor kernels (one "block" per
row: ``codegen._prologue_multi`` finds the row's tensor). A program streams its row in chunks of ``BLOCK``
elements, four passes with a sum between them: (1) a = ⟨ω, R·g⟩; (2) the momentum buffer into m and
‖ω + d‖² (normalize) or ‖d‖² (exp); (3) ω' into p, ⟨ω', buf⟩ and ‖ω'‖²; (4) stabilize, transport, p = R·ω''.
The row's code picks the retraction by ``tl.where`` on scalars: euclidean (ω' = ω + d, no projection),
sphere / oblique / stiefel-qr with normalize (one column: all three are the sphere), sphere / oblique with
exp. Cayley and unknown codes leave the row as it is (callers refuse them). Flags (momentum, first step,
nesterov, stabilize, rescale, groups, weight decay) are fixed in the source, as for the other kernels.
"""
from __future__ import annotations

from . import codegen as _cg


def _chunk_loop(src: _cg.Src, body) -> None:
    """for s0 in range(0, n_row, BLOCK): body() with offs, mk (the chunk's element offsets and load mask) and
    mks (its store mask)."""
    src.raw("for s0 in range(0, n_row, BLOCK):")
    src.depth += 1
    src.raw("offs = base + s0 + tl.arange(0, BLOCK)")
    src.raw("mk = (s0 + tl.arange(0, BLOCK)) < n_row")
    src.raw("mks = (s0 + tl.arange(0, BLOCK)) < n_ok  # stores: none for a code the rows do not run")
    body()
    src.depth -= 1


def _row_prologue(src: _cg.Src, dtype: str, log_tensors: int, *, rescale: bool, group: bool, hyper: bool,
                  packed: bool = False, bases: dict | None = None) -> None:
    _cg._prologue_multi(src, dtype, log_tensors, hyper=hyper, packed=packed, bases=bases)
    tl_dt = _cg.TL_DTYPE[dtype]
    src.raw("rowi = pid - tl.load(row + 9)")
    src.raw("base = rowi * n_row")
    if packed:
        _cg.load_packed_code(src, "rowi")
    else:
        src.raw("code = tl.load(codes_ptr + rowi).to(tl.int32)")
    src.raw("curved = (code >= 1) & (code <= 5)")
    src.raw("n_ok = tl.where(code <= 5, n_row, 0)")
    src.raw(f"r = tl.load(rescale_ptr + rowi).to({tl_dt})" if rescale else f"r = tl.full((), 1.0, {tl_dt})")
    src.raw("inv_r = 1.0 / r")
    if group:
        src.raw(f"sg = tl.load(gscale_ptr + tl.load(gidx_ptr + rowi)).to({tl_dt})")
    else:
        src.raw(f"sg = tl.full((), 1.0, {tl_dt})")


def _tangent_dot(src: _cg.Src, dtype: str, with_ww: bool = False) -> None:
    """a = ⟨ω, R·g⟩ on curved rows, 0 on euclidean ones; ``with_ww``: also ww = ‖ω‖² (the exp rows' step along
    d⊥ = d − ⟨ω,d⟩ω has ‖d⊥‖² = ‖d‖² − ⟨ω,d⟩²(2 − ww); csrc/fgsgd/row_step.h)."""
    tl_dt = _cg.TL_DTYPE[dtype]
    src.raw(f"acc = tl.zeros([BLOCK], {tl_dt})")
    if with_ww:
        src.raw(f"acc_ww = tl.zeros([BLOCK], {tl_dt})")

    def body():
        src.raw("pv = tl.load(p_ptr + offs, mask=mk, other=0.0)")
        src.raw("gv = tl.load(g_ptr + offs, mask=mk, other=0.0)")
        src.raw("acc += (pv * inv_r) * (r * gv)")
        if with_ww:
            src.raw("acc_ww += (pv * inv_r) * (pv * inv_r)")
    _chunk_loop(src, body)
    src.raw("a = tl.where(curved, tl.sum(acc, axis=0), 0.0)")
    if with_ww:
        src.raw("ww = tl.sum(acc_ww, axis=0)")


def _xi(src: _cg.Src, weight_decay: bool) -> None:
    """w, xi (s_g·Π_ω(R·(g + wd·p))) of the chunk from pv, gv."""
    src.raw("w = pv * inv_r")
    if weight_decay:
        src.raw("xi = sg * (r * (gv + wdr * pv) - a * w)")
    else:
        src.raw("xi = sg * (r * gv - a * w)")


def _formed_terms(src: _cg.Src, dtype: str, load_pg, weight_decay: bool, d_again) -> None:
    """An exp row far along ω (‖d⊥‖² < ‖d‖²/4: ‖d‖² − ⟨ω,d⟩² cancelled; a row near a coordinate axis landed 1e-2 off
    its sphere in fp32): ``formed`` and ω' = cos_d·ω + k_d·(rs_d·d − s_d·ω), d⊥ formed per element in float64 with
    s = ⟨ω,d⟩ (over ‖ω‖² where ω is on its sphere to rounding) and the ω part that its sum leaves removed again, as
    csrc/fgsgd/row_step.h does: one more pass over such a row."""
    big = repr(_cg.BIG_SQ[dtype])
    src.raw("formed = expm & (q - rad * rad * (2.0 - ww) < 0.25 * q)")
    src.raw("rs_d = rs.to(tl.float64)")
    src.raw("s_d = tl.full((), 0.0, tl.float64)")
    src.raw("cos_d = tl.full((), 1.0, tl.float64)")
    src.raw("k_d = tl.full((), 0.0, tl.float64)")
    src.raw("if formed:")
    src.depth += 1
    src.raw("wwd = ww.to(tl.float64)")
    src.raw(f"on_sph = tl.abs(wwd - 1.0) <= {_cg.ON_SPHERE_TOL[dtype]!r}")
    src.raw("s_d = rad.to(tl.float64) / tl.where(on_sph, wwd, 1.0)")
    src.raw("acc_e = tl.zeros([BLOCK], tl.float64)")
    src.raw("acc_f = tl.zeros([BLOCK], tl.float64)")

    def body():
        load_pg()
        _xi(src, weight_decay)
        d_again()
        src.raw("w64 = w.to(tl.float64)")
        src.raw("di = rs_d * d.to(tl.float64) - s_d * w64")
        src.raw("acc_e += di * di")
        src.raw("acc_f += di * w64")
    _chunk_loop(src, body)
    src.raw("b = tl.where(on_sph, tl.sum(acc_f, axis=0) / wwd, 0.0)  # ‖d⊥ − bω‖² = Σd⊥² − b²‖ω‖²")
    src.raw("s_d = s_d + b")
    src.raw("nu_d = tl.sqrt(tl.maximum(tl.sum(acc_e, axis=0) - b * b * wwd, 0.0))  # rs·‖d⊥‖")
    src.raw(f"t_d = tl.minimum(nu_d / rs_d, {big})")
    src.raw("cos_d = tl.cos(t_d)")
    src.raw("k_d = tl.where(t_d > 1e-4, tl.sin(t_d) / tl.where(t_d > 1e-4, nu_d, 1.0), (1.0 - t_d * t_d / 6.0) / rs_d)")
    src.depth -= 1


def row_step_source(dtype, *, momentum, first_step, nesterov, stabilize, rescale, group, weight_decay, log_tensors,
                    packed=False, controls=""):
    name = _cg.step_kernel_name("rowstep", 0, 1, dtype, momentum, first_step, nesterov, stabilize, rescale, group,
                                weight_decay, log_tensors, packed, controls)
    tl_dt = _cg.TL_DTYPE[dtype]
    src = _cg.Src()
    _row_prologue(src, dtype, log_tensors, rescale=rescale, group=group, hyper=True, packed=packed,
                  bases={"gscale": "gsc_base"} if group else None)
    _cg._controls(src, dtype, controls)  # codegen._controls: ok, lr, gu, first_rt, stab_rt
    if "f" in controls:
        src.raw("n_ok = tl.where(ok, n_ok, 0)  # a skipped step stores nothing")
    if "u" in controls:
        src.raw("sg = sg * gu")
    src.raw("expm = (code == 2) | (code == 4)")
    if weight_decay:
        src.raw("wdr = tl.where(curved, 0.0, wd)")  # weight decay on euclidean rows only
    _tangent_dot(src, dtype, with_ww=True)

    def load_pg():
        src.raw("pv = tl.load(p_ptr + offs, mask=mk, other=0.0)")
        src.raw("gv = tl.load(g_ptr + offs, mask=mk, other=0.0)")

    def buf_d():
        if momentum:
            if first_step:
                src.raw("buf = xi")
            elif "s" in controls:  # the first step writes the buffer without reading it
                src.raw("mv = tl.load(m_ptr + offs, mask=mk, other=0.0)")
                src.raw("buf = tl.where(first_rt, xi, mom * mv + (1.0 - damp) * xi)")
            else:
                src.raw("mv = tl.load(m_ptr + offs, mask=mk, other=0.0)")
                src.raw("buf = mom * mv + (1.0 - damp) * xi")
            src.raw("d = -lr * (xi + mom * buf)" if nesterov else "d = -lr * buf")
        else:
            src.raw("d = -lr * xi")

    # pass 2: the buffer into m; ‖ω + d‖² or ‖d‖², and ⟨ω, d⟩ (exp steps along d⊥; codegen.Math.exp_terms)
    src.raw(f"acc = tl.zeros([BLOCK], {tl_dt})")
    src.raw(f"acc_rad = tl.zeros([BLOCK], {tl_dt})")

    def pass2():
        load_pg()
        _xi(src, weight_decay)
        buf_d()
        if momentum:
            src.raw("tl.store(m_ptr + offs, buf, mask=mks)")
        src.raw("v = tl.where(expm, d, w + d)")
        src.raw("acc += v * v")
        src.raw("acc_rad += w * d")
    _chunk_loop(src, pass2)
    src.raw("q = tl.sum(acc, axis=0)")
    src.raw("rad = tl.sum(acc_rad, axis=0)")

    def d_again():  # d after pass 2, which wrote the buffer into m
        if momentum:
            src.raw("buf = tl.load(m_ptr + offs, mask=mk, other=0.0)")
            src.raw("d = -lr * (xi + mom * buf)" if nesterov else "d = -lr * buf")
        else:
            src.raw("d = -lr * xi")

    # a huge step (‖v‖² above BIG_SQ, or overflowed): the same sums of rs·v (csrc row_step.h, row_rescale_of)
    big = repr(_cg.BIG_SQ[dtype])
    src.raw(f"rs = tl.full((), 1.0, {tl_dt})")
    src.raw(f"if q > {big}:")
    src.depth += 1
    src.raw(f"rs = tl.full((), {_cg.ROW_RESCALE[dtype]!r}, {tl_dt})")
    src.raw(f"acc = tl.zeros([BLOCK], {tl_dt})")
    src.raw(f"acc_rad = tl.zeros([BLOCK], {tl_dt})")

    def rescue():
        load_pg()
        _xi(src, weight_decay)
        d_again()
        src.raw("d = d * rs")
        src.raw("v = tl.where(expm, d, w * rs + d)")
        src.raw("acc += v * v")
        src.raw("acc_rad += w * d")
    _chunk_loop(src, rescue)
    src.raw("q = tl.sum(acc, axis=0)")
    src.raw("rad = tl.sum(acc_rad, axis=0)")
    src.depth -= 1
    # exp: t = ‖d⊥‖ (d⊥ = d − ⟨ω,d⟩ω; q, rad are sums of rs·v), capped at BIG_SQ; ω' = cos t·ω + sin t·d⊥/t
    src.raw("nu = tl.sqrt(tl.maximum(q - rad * rad * (2.0 - ww), 0.0))  # rs·‖d⊥‖")
    src.raw(f"tq = tl.minimum(nu / rs, {big})")
    src.raw("sc_exp = tl.where(tq > 1e-4, tl.sin(tq) * rs / tl.where(tq > 1e-4, nu, 1.0), 1.0 - tq * tq / 6.0)")
    src.raw("c_exp = tl.cos(tq) - (sc_exp / rs) * rad")
    src.raw("inv = tl.where(curved, rs / tl.sqrt(tl.where(curved, q, 1.0)), 1.0)")
    _formed_terms(src, dtype, load_pg, weight_decay, d_again)
    # pass 3: ω' into p; ⟨ω', buf⟩, ‖ω'‖²
    src.raw(f"acc_b = tl.zeros([BLOCK], {tl_dt})")
    src.raw(f"acc_w = tl.zeros([BLOCK], {tl_dt})")

    def pass3(wn):
        def body():
            load_pg()
            _xi(src, weight_decay)
            d_again()
            src.raw(f"wn = {wn}")
            src.raw("tl.store(p_ptr + offs, wn, mask=mks)")
            if momentum:
                src.raw("acc_b += wn * buf")
            src.raw("acc_w += wn * wn")
        _chunk_loop(src, body)
    src.raw("if formed:")
    src.depth += 1
    pass3(f"(cos_d * w.to(tl.float64) + k_d * (rs_d * d.to(tl.float64) - s_d * w.to(tl.float64))).to({tl_dt})")
    src.depth -= 1
    src.raw("else:")
    src.depth += 1
    pass3("tl.where(expm, c_exp * w + sc_exp * d, (w + d) * inv)")
    src.depth -= 1
    if stabilize or "s" in controls:
        on = "curved & stab_rt" if not stabilize else "curved"
        src.raw(f"ns = tl.where({on}, 1.0 / tl.sqrt(tl.where(curved, tl.sum(acc_w, axis=0), 1.0)), 1.0)")
    else:
        src.raw(f"ns = tl.full((), 1.0, {tl_dt})")
    src.raw("cb = tl.where(curved, tl.sum(acc_b, axis=0) * ns, 0.0)")

    # pass 4: stabilize, transport, p = R·ω''
    def pass4():
        src.raw("wn = tl.load(p_ptr + offs, mask=mk, other=0.0) * ns")
        if momentum:
            src.raw("mv = tl.load(m_ptr + offs, mask=mk, other=0.0)")
            src.raw("tl.store(m_ptr + offs, mv - cb * wn, mask=mks)")
        src.raw("tl.store(p_ptr + offs, r * wn, mask=mks)")
    _chunk_loop(src, pass4)
    args = "meta, n_row, gsc_base" if group else "meta, n_row"
    return name, _cg._function(name, f"{args}, {_cg.CONTROL_ARGS}, BLOCK: tl.constexpr" if controls else
                               f"{args}, BLOCK: tl.constexpr", src)


def row_sqnorm_source(dtype, *, rescale, weight_decay, log_tensors, packed=False):
    name = _cg.kernel_name("rowsqnorm", 0, 1, dtype, f"{'r' if rescale else '_'}{'w' if weight_decay else '_'}"
                                                     f"{'P' if packed else ''}_L{log_tensors}")
    src = _cg.Src()
    _row_prologue(src, dtype, log_tensors, rescale=rescale, group=False, hyper=weight_decay, packed=packed,
                  bases={"out": "out_base"})
    if weight_decay:
        src.raw("wdr = tl.where(code == 0, wd, 0.0)")
    _tangent_dot(src, dtype)
    src.raw("acc = tl.zeros([BLOCK], tl.float64)")  # float64 sums (codegen.sqnorm_source)

    def body():
        src.raw("pv = tl.load(p_ptr + offs, mask=mk, other=0.0)")
        src.raw("gv = tl.load(g_ptr + offs, mask=mk, other=0.0)")
        _xi(src, weight_decay)
        src.raw("xw = xi.to(tl.float64)")
        src.raw("acc += xw * xw")
    _chunk_loop(src, body)
    src.raw("tl.store(out_ptr + rowi, tl.sum(acc, axis=0))")
    return name, _cg._function(name, "meta, n_row, out_base, BLOCK: tl.constexpr", src)
