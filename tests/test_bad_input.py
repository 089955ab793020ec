"""Bad inputs fail with an error that names the argument, through fgsgd_cuda.ops (the Python checks) and
directly through torch.ops.fgsgd (the C++ TORCH_CHECKs; the fake kernels for meta tensors), and nothing
is written before the error."""
from __future__ import annotations

import pytest
import torch

from conftest import make_gen, random_codes, random_points, random_tangents, requires_cpu_kernels
from fgsgd_cuda import codes as C
from fgsgd_cuda import ops

pytestmark = requires_cpu_kernels
PY = (ValueError, TypeError)          # the Python checks of fgsgd_cuda.ops
CPP = RuntimeError                    # TORCH_CHECK


def _x(n=5, shape=(3, 3), code=C.SPHERE_NORMALIZE, dtype=torch.float32, seed=0):
    return random_points(n, *shape, code, make_gen(seed)).to(dtype)


def _u(x, seed=1):
    return torch.randn(x.shape, generator=make_gen(seed), dtype=torch.float64).to(x.dtype)


def _noncontig(t):
    """Same shape and values, not contiguous."""
    out = torch.empty(t.shape[:-2] + (t.shape[-1], t.shape[-2]), dtype=t.dtype).transpose(-2, -1)
    out.copy_(t)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


# ----------------------------------------------------------------------------------------------
# single-tensor ops: proj, retr, projx, norms
# ----------------------------------------------------------------------------------------------

def _unary_cases():
    """(id, op, x, second tensor or None, code, Python message, C++ message)."""
    x = _x()
    u = _u(x)
    cases = []
    for op, second in (("proj", "u"), ("retr", "v")):
        cases += [
            (f"{op}-x-2d", op, x.reshape(5, 9), u.reshape(5, 9), 1, r"^x: expected shape \(N, A, B\)",
             r"fgsgd: x must have shape \(N, A, B\)"),
            (f"{op}-x-4d", op, x.reshape(1, 5, 3, 3), u.reshape(1, 5, 3, 3), 1, r"^x: expected shape",
             r"fgsgd: x must have shape"),
            (f"{op}-{second}-trailing-shape", op, x, u[:, :, :2].contiguous(), 1, rf"^{second}: has shape \(5, 3, 2\)",
             rf"fgsgd: {second} has shape \(5, 3, 2\) but x has shape"),
            (f"{op}-{second}-batch-size", op, x, u[:4].contiguous(), 1, rf"^{second}: has shape \(4, 3, 3\)",
             rf"fgsgd: {second} has shape \(4, 3, 3\)"),
            (f"{op}-x-too-large", op, torch.ones(2, 9, 8), torch.ones(2, 9, 8), 1,
             r"^x: components must have 1 <= A\*B <= 64, got 9x8", r"fgsgd: x components must have 1 <= A\*B <= 64"),
            (f"{op}-x-int", op, torch.ones(5, 3, 3, dtype=torch.int32), torch.ones(5, 3, 3, dtype=torch.int32), 1,
             r"^x: expected dtype float32 or float64, got torch.int32", r"fgsgd: x must be float32 or float64"),
            (f"{op}-x-float16", op, x.half(), u.half(), 1, r"^x: expected dtype float32 or float64",
             r"fgsgd: x must be float32 or float64"),
            (f"{op}-{second}-dtype", op, x, u.double(), 1, rf"^{second}: has dtype torch.float64 but x has dtype",
             rf"fgsgd: {second} has dtype Double but x has dtype Float"),
            (f"{op}-x-noncontiguous", op, _noncontig(x), u, 1, r"^x: must be contiguous", r"fgsgd: x must be contiguous"),
            (f"{op}-{second}-noncontiguous", op, x, _noncontig(u), 1, rf"^{second}: must be contiguous",
             rf"fgsgd: {second} must be contiguous"),
            (f"{op}-{second}-sparse", op, x, u.to_sparse(), 1, rf"^{second}: sparse tensors are not supported",
             rf"fgsgd: {second} must be dense"),
            (f"{op}-x-sparse", op, x.to_sparse(), u, 1, r"^x: sparse tensors are not supported", r"fgsgd: x must be dense"),
            (f"{op}-code-7", op, x, u, 7, r"^code: must be in \[0, 6\], got 7", r"fgsgd: code must be in \[0, 6\], got 7"),
            (f"{op}-code-negative", op, x, u, -1, r"^code: must be in \[0, 6\]", r"fgsgd: code must be in \[0, 6\]"),
            (f"{op}-stiefel-wide", op, torch.ones(5, 2, 3), torch.ones(5, 2, 3), C.STIEFEL_QR,
             r"^code: the stiefel manifold needs components with A >= B, got 2x3",
             r"fgsgd: code 5 selects the stiefel manifold, which needs components with A >= B, got 2x3"),
            (f"{op}-cayley-tall", op, torch.ones(5, 9, 7), torch.ones(5, 9, 7), C.STIEFEL_CAYLEY,
             r"^code: the cayley retraction supports A <= 8, got A = 9",
             r"fgsgd: code 6 selects the cayley retraction, which supports A <= 8, got A = 9"),
        ]
    cases += [
        ("projx-x-2d", "projx", x.reshape(5, 9), None, 1, r"^x: expected shape", r"fgsgd: x must have shape"),
        ("projx-x-int", "projx", torch.ones(5, 3, 3, dtype=torch.int64), None, 1, r"^x: expected dtype",
         r"fgsgd: x must be float32 or float64"),
        ("projx-x-noncontiguous", "projx", _noncontig(x), None, 1, r"^x: must be contiguous",
         r"fgsgd: x must be contiguous"),
        ("projx-x-too-large", "projx", torch.ones(2, 5, 13), None, 1, r"^x: components must have",
         r"fgsgd: x components must have"),
        ("projx-code", "projx", x, None, 9, r"^code: must be in", r"fgsgd: code must be in"),
        ("projx-stiefel-wide", "projx", torch.ones(5, 1, 4), None, C.STIEFEL_CAYLEY, r"^code: the stiefel manifold",
         r"fgsgd: code 6 selects the stiefel manifold"),
        ("norms-x-2d", "norms", x.reshape(5, 9), None, None, r"^x: expected shape", r"fgsgd: x must have shape"),
        ("norms-x-int", "norms", torch.ones(5, 3, 3, dtype=torch.int16), None, None, r"^x: expected dtype",
         r"fgsgd: x must be float32 or float64"),
        ("norms-x-too-large", "norms", torch.ones(2, 65, 1), None, None, r"^x: components must have",
         r"fgsgd: x components must have"),
        ("norms-x-sparse", "norms", x.to_sparse(), None, None, r"^x: sparse", r"fgsgd: x must be dense"),
        ("norms-x-noncontiguous", "norms", _noncontig(x), None, None, r"^x: must be contiguous",
         r"fgsgd: x must be contiguous"),
    ]
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


def _call_unary(fn_ns, op, x, u, code):
    fn = getattr(fn_ns, op)
    if op == "norms":
        return fn(x)
    if u is None:
        return fn(x, code)
    return fn(x, u, code)


def _snapshot(*ts):
    return [t.clone() if t is not None else None for t in ts]


def _unchanged(before, after):
    for b, a in zip(before, after):
        if b is None:
            continue
        if b.is_sparse:
            assert torch.equal(b.to_dense(), a.to_dense())
        else:
            assert torch.equal(b, a)


@pytest.mark.parametrize("op,x,u,code,py_msg,cpp_msg", _unary_cases())
def test_unary_ops_python(op, x, u, code, py_msg, cpp_msg):
    before = _snapshot(x, u)
    with pytest.raises(PY, match=py_msg):
        _call_unary(ops, op, x, u, code)
    _unchanged(before, (x, u))


@pytest.mark.parametrize("op,x,u,code,py_msg,cpp_msg", _unary_cases())
def test_unary_ops_cpp(op, x, u, code, py_msg, cpp_msg):
    before = _snapshot(x, u)
    with pytest.raises(CPP, match=cpp_msg):
        _call_unary(torch.ops.fgsgd, op, x, u, code)
    _unchanged(before, (x, u))


@pytest.mark.parametrize("op", ["proj", "retr"])
@pytest.mark.parametrize("which", ["x", "second"])
def test_unary_ops_device_mismatch(op, which):
    """A meta tensor next to a CPU one: the dispatcher picks the Meta (fake) kernel, which must check too."""
    x = _x()
    u = _u(x)
    second = "u" if op == "proj" else "v"
    if which == "x":
        args, msg = (x.to("meta"), u), rf"^{second}: is on cpu but x is on meta"
    else:
        args, msg = (x, u.to("meta")), rf"^{second}: is on meta but x is on cpu"
    with pytest.raises(ValueError, match=msg):
        getattr(ops, op)(*args, C.SPHERE_NORMALIZE)
    with pytest.raises(ValueError, match=msg):
        getattr(torch.ops.fgsgd, op)(*args, C.SPHERE_NORMALIZE)


def test_unary_not_a_tensor_and_bad_backend():
    x = _x()
    with pytest.raises(TypeError, match=r"^x: expected a tensor, got list"):
        ops.projx(x.tolist(), 1)
    with pytest.raises(TypeError, match=r"^u: expected a tensor, got ndarray"):
        ops.proj(x, x.numpy(), 1)
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'gpu'"):
        ops.proj(x, x, 1, backend="gpu")
    with pytest.raises(RuntimeError, match=r"^backend: 'cuda' is not available for tensors on cpu"):
        ops.projx(x, 1, backend="cuda")
    with pytest.raises(ValueError, match=r"^backend: unknown backend"):
        ops.step_([x], [x], [], [torch.ones(5, dtype=torch.uint8)], lr=0.1, backend="nope")


# ----------------------------------------------------------------------------------------------
# multi-tensor ops: step_, tangent_sqnorm, projx_, rescale_
# ----------------------------------------------------------------------------------------------

SIZES = (4, 5, 6)


def _lists(dtype=torch.float32):
    gen = make_gen(7)
    out = dict(params=[], grads=[], momentum_buffers=[], codes=[], rescale=[], group_index=[], group_scale=[])
    for n in SIZES:
        c = random_codes(n, 3, 3, gen)
        w = random_points(n, 3, 3, c, gen)
        r = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
        out["params"].append((w * r.reshape(-1, 1, 1)).to(dtype))
        out["grads"].append(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64).to(dtype))
        out["momentum_buffers"].append(random_tangents(w, c, gen).to(dtype))
        out["codes"].append(c)
        out["rescale"].append(r.to(dtype))
        out["group_index"].append(torch.randint(2, (n,), generator=gen, dtype=torch.int32))
        out["group_scale"].append(torch.rand(2, generator=gen, dtype=torch.float64).to(dtype) + 0.1)
    return out


HP = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False, stabilize=False)


def _set(key, k, fn):
    """A mutation: replace entry k of list ``key`` by fn(old entry)."""
    def mutate(d):
        d[key][k] = fn(d[key][k])
    return mutate


def _set_from(key, k, src_key, fn, src=2):
    """A mutation: replace entry k of list ``key`` by fn(entry ``src`` of list ``src_key``)."""
    def mutate(d):
        d[key][k] = fn(d[src_key][src])
    return mutate


def _truncate(key, n):
    def mutate(d):
        d[key] = d[key][:n]
    return mutate


def _also(*mutations):
    def mutate(d):
        for m in mutations:
            m(d)
    return mutate


def _hp(**kw):
    def mutate(d):
        d["hp"] = dict(HP, **kw)
    return mutate


def _as_meta(t):
    return t.to("meta")


# (id, mutation, Python message, C++ message[, (Python error types, C++ error types)])
STEP_CASES = [
    ("grads-shape", _set("grads", 2, lambda g: g[:, :, :2].contiguous()), r"^grads\[2\]: has shape \(6, 3, 2\)",
     r"fgsgd: grads\[2\] has shape \(6, 3, 2\) but params\[2\] has shape \(6, 3, 3\)"),
    ("grads-batch", _set("grads", 1, lambda g: g[:4].contiguous()), r"^grads\[1\]: has shape",
     r"fgsgd: grads\[1\] has shape \(4, 3, 3\)"),
    ("grads-sparse", _set("grads", 2, lambda g: g.to_sparse()), r"^grads\[2\]: sparse tensors are not supported",
     r"fgsgd: grads\[2\] must be dense"),
    ("grads-dtype", _set("grads", 2, lambda g: g.double()), r"^grads\[2\]: has dtype torch.float64",
     r"fgsgd: grads\[2\] has dtype Double but params\[2\] has dtype Float"),
    ("grads-noncontiguous", _set("grads", 2, _noncontig), r"^grads\[2\]: must be contiguous",
     r"fgsgd: grads\[2\] must be contiguous"),
    ("grads-meta", _set("grads", 2, _as_meta), r"^grads\[2\]: is on meta but params\[2\] is on cpu",
     r"^grads\[2\]: is on meta but params\[2\] is on cpu", (ValueError, ValueError)),
    ("params-int", _set("params", 2, lambda p: p.to(torch.int32)), r"^params\[2\]: expected dtype float32 or float64",
     r"fgsgd: params\[2\] must be float32 or float64"),
    ("params-2d", _also(_set("params", 2, lambda p: p.reshape(6, 9)), _set("grads", 2, lambda g: g.reshape(6, 9))),
     r"^params\[2\]: expected shape \(N, A, B\)", r"fgsgd: params\[2\] must have shape \(N, A, B\)"),
    ("params-component-shape", _also(*[_set(key, 2, lambda t: t[:, :2, :2].contiguous())
                                       for key in ("params", "grads", "momentum_buffers")]),
     r"^params\[2\]: one call takes one component shape", r"fgsgd: params\[2\] has components of shape 2x2"),
    ("params-too-large", _also(*[_set(key, 1, lambda t: torch.ones(5, 9, 9, dtype=t.dtype))
                                 for key in ("params", "grads", "momentum_buffers")]),
     r"^params\[1\]: components must have 1 <= A\*B <= 64", r"fgsgd: params\[1\] components must have"),
    ("params-dtype", _also(*[_set(key, 2, lambda t: t.double()) for key in ("params", "grads", "momentum_buffers",
                                                                             "rescale", "group_scale")]),
     r"^params\[2\]: one call takes one component shape, dtype and device",
     r"fgsgd: params\[2\] differs in dtype or device from params\[0\]"),
    ("params-noncontiguous", _set("params", 2, _noncontig), r"^params\[2\]: must be contiguous",
     r"fgsgd: params\[2\] must be contiguous"),
    ("params-sparse", _set("params", 1, lambda p: p.to_sparse()), r"^params\[1\]: sparse tensors are not supported",
     r"fgsgd: params\[1\] must be dense"),
    ("momentum-dtype", _set("momentum_buffers", 2, lambda m: m.double()), r"^momentum_buffers\[2\]: has dtype",
     r"fgsgd: momentum_buffers\[2\] has dtype Double"),
    ("momentum-shape", _set("momentum_buffers", 2, lambda m: m[:5].contiguous()), r"^momentum_buffers\[2\]: has shape",
     r"fgsgd: momentum_buffers\[2\] has shape \(5, 3, 3\)"),
    ("momentum-noncontiguous", _set("momentum_buffers", 1, _noncontig), r"^momentum_buffers\[1\]: must be contiguous",
     r"fgsgd: momentum_buffers\[1\] must be contiguous"),
    ("codes-int64", _set("codes", 2, lambda c: c.long()), r"^codes\[2\]: expected a uint8 tensor of shape \(6,\)",
     r"fgsgd: codes\[2\] must have dtype Byte, got Long"),
    ("codes-length", _set("codes", 2, lambda c: torch.cat([c, c[:1]])), r"^codes\[2\]: expected a uint8 tensor",
     r"fgsgd: codes\[2\] must have shape \(6,\), got \(7,\)"),
    ("codes-2d", _set("codes", 2, lambda c: c.reshape(6, 1)), r"^codes\[2\]: expected a uint8",
     r"fgsgd: codes\[2\] must have shape \(6,\), got \(6, 1\)"),
    ("codes-sparse", _set("codes", 2, lambda c: c.to_sparse()), r"fgsgd: codes\[2\] must be dense",
     r"fgsgd: codes\[2\] must be dense", (RuntimeError, RuntimeError)),
    ("rescale-dtype", _set("rescale", 2, lambda r: r.double()), r"^rescale\[2\]: expected shape \(6,\) torch.float32",
     r"fgsgd: rescale\[2\] must have dtype Float, got Double"),
    ("rescale-shape", _set("rescale", 1, lambda r: r[:3].contiguous()), r"^rescale\[1\]: expected shape \(5,\)",
     r"fgsgd: rescale\[1\] must have shape \(5,\), got \(3,\)"),
    ("group-index-dtype", _set("group_index", 2, lambda g: g.long()), r"^group_index\[2\]: expected an int32 tensor",
     r"fgsgd: group_index\[2\] must have dtype Int, got Long"),
    ("group-index-shape", _set("group_index", 0, lambda g: g[:2].contiguous()), r"^group_index\[0\]: expected an int32",
     r"fgsgd: group_index\[0\] must have shape \(4,\)"),
    ("group-scale-dtype", _set("group_scale", 2, lambda g: g.double()), r"^group_scale\[2\]: expected a 1-D",
     r"fgsgd: group_scale\[2\] must be a contiguous 1-D tensor of the parameters' dtype"),
    ("group-scale-2d", _set("group_scale", 1, lambda g: g.reshape(1, 2)), r"^group_scale\[1\]: expected a 1-D",
     r"fgsgd: group_scale\[1\] must be a contiguous 1-D tensor"),
    ("grads-length", _truncate("grads", 2), r"^grads: expected one tensor per parameter \(3\), got 2",
     r"fgsgd: grads must hold one tensor per parameter \(3\), got 2"),
    ("grads-empty", _truncate("grads", 0), r"^grads: expected one tensor per parameter \(3\), got 0",
     r"fgsgd: grads must hold one tensor per parameter \(3\), got 0"),
    ("codes-length-list", _truncate("codes", 2), r"^codes: expected one tensor per parameter \(3\), got 2",
     r"fgsgd: codes must (be empty or )?hold one tensor per parameter"),
    ("momentum-length", _truncate("momentum_buffers", 1),
     r"^momentum_buffers: expected one tensor per parameter \(3\), got 1",
     r"fgsgd: momentum_buffers must hold one tensor per parameter \(3\) when momentum != 0, got 1"),
    ("momentum-missing", _truncate("momentum_buffers", 0),
     r"^momentum_buffers: momentum=0.9 needs one buffer per parameter \(3\), got 0",
     r"fgsgd: momentum_buffers must hold one tensor per parameter \(3\) when momentum != 0, got 0"),
    ("rescale-length", _truncate("rescale", 2), r"^rescale: expected one tensor per parameter \(3\), got 2",
     r"fgsgd: rescale must be empty or hold one tensor per parameter \(3\), got 2"),
    ("group-scale-missing", _truncate("group_scale", 0), r"^group_index and group_scale must both be given",
     r"fgsgd: group_index and group_scale must both be given or both be empty"),
    ("group-lists-length", _also(_truncate("group_scale", 2), _truncate("group_index", 2)),
     r"^group_index: expected one tensor per parameter \(3\), got 2",
     r"fgsgd: group_index must be empty or hold one tensor per parameter \(3\), got 2"),
    ("nesterov-dampening", _hp(nesterov=True, dampening=0.1), r"^nesterov: needs momentum > 0 and dampening = 0",
     r"fgsgd: nesterov needs momentum > 0 and dampening = 0"),
    ("nesterov-no-momentum", _hp(nesterov=True, momentum=0.0), r"^nesterov: needs momentum > 0",
     r"fgsgd: nesterov needs momentum > 0"),
]


def _step_case_params():
    out = []
    for case in STEP_CASES:
        name, mutate, py_msg, cpp_msg = case[:4]
        py_exc, cpp_exc = case[4] if len(case) > 4 else (PY, CPP)
        out.append(pytest.param(mutate, py_msg, cpp_msg, py_exc, cpp_exc, id=name))
    return out


def _prepared(mutate):
    d = _lists()
    d["hp"] = dict(HP)
    mutate(d)
    before = dict(params=[p.clone() for p in d["params"]], momentum_buffers=[m.clone() for m in d["momentum_buffers"]])
    return d, before


def _assert_nothing_written(d, before):
    for key in ("params", "momentum_buffers"):
        for a, b in zip(d[key], before[key]):
            if a.device.type == "meta":
                continue
            if a.is_sparse:
                assert torch.equal(a.to_dense(), b.to_dense())
            else:
                assert torch.equal(a, b), f"{key} was written before the error"


@pytest.mark.parametrize("mutate,py_msg,cpp_msg,py_exc,cpp_exc", _step_case_params())
def test_step_python(mutate, py_msg, cpp_msg, py_exc, cpp_exc):
    d, before = _prepared(mutate)
    with pytest.raises(py_exc, match=py_msg):
        ops.step_(d["params"], d["grads"], d["momentum_buffers"], d["codes"], rescale=d["rescale"],
                  group_index=d["group_index"], group_scale=d["group_scale"], **d["hp"])
    _assert_nothing_written(d, before)


@pytest.mark.parametrize("mutate,py_msg,cpp_msg,py_exc,cpp_exc", _step_case_params())
def test_step_cpp(mutate, py_msg, cpp_msg, py_exc, cpp_exc):
    d, before = _prepared(mutate)
    h = d["hp"]
    with pytest.raises(cpp_exc, match=cpp_msg):
        torch.ops.fgsgd.step_(d["params"], d["grads"], d["momentum_buffers"], d["codes"], d["rescale"],
                              d["group_index"], d["group_scale"], h["lr"], h["momentum"], h["dampening"], h["nesterov"],
                              h["weight_decay"], h["first_step"], h["stabilize"])
    _assert_nothing_written(d, before)


def test_valid_lists_do_step():
    """The unmutated inputs of the cases above are valid: both paths run and move the parameters."""
    for run in ("python", "cpp"):
        d, before = _prepared(lambda d: None)
        if run == "python":
            ops.step_(d["params"], d["grads"], d["momentum_buffers"], d["codes"], rescale=d["rescale"],
                      group_index=d["group_index"], group_scale=d["group_scale"], **HP)
        else:
            torch.ops.fgsgd.step_(d["params"], d["grads"], d["momentum_buffers"], d["codes"], d["rescale"],
                                  d["group_index"], d["group_scale"], *HP.values())
        for a, b in zip(d["params"], before["params"]):
            assert not torch.equal(a, b)


# (id, op, mutation, Python message, C++ message); error at entry 1 of 3, so entry 0 could have been written
OTHER_CASES = [
    ("sqnorm-grads-shape", "tangent_sqnorm", _set("grads", 1, lambda g: g[:, :2].contiguous()),
     r"^grads\[1\]: has shape", r"fgsgd: grads\[1\] has shape"),
    ("sqnorm-grads-length", "tangent_sqnorm", _truncate("grads", 1), r"^grads: expected one tensor per parameter",
     r"fgsgd: grads must hold one tensor per parameter \(3\), got 1"),
    ("sqnorm-codes-dtype", "tangent_sqnorm", _set("codes", 1, lambda c: c.long()), r"^codes\[1\]: expected a uint8",
     r"fgsgd: codes\[1\] must have dtype Byte"),
    ("sqnorm-packed-codes-shape", "tangent_sqnorm", _set("codes", 1, lambda c: c.int()),
     r"^codes\[1\]: expected a uint8 tensor of shape \(\d+,\) or its packed int32",
     r"fgsgd: codes\[1\] \(packed: int32\) must have shape"),
    ("sqnorm-rescale-dtype", "tangent_sqnorm", _set("rescale", 1, lambda r: r.double()), r"^rescale\[1\]",
     r"fgsgd: rescale\[1\] must have dtype Float"),
    # no cpp variant: with no tensor at all the dispatcher itself refuses ("There were no tensor arguments")
    ("sqnorm-params-empty", "tangent_sqnorm", _also(*[_truncate(k, 0) for k in ("params", "grads", "codes", "rescale")]),
     r"^params: needs at least one tensor", None),
    ("sqnorm-params-int", "tangent_sqnorm", _set("params", 1, lambda p: p.int()), r"^params\[1\]: expected dtype",
     r"fgsgd: params\[1\] must be float32 or float64"),
    ("projx-codes-dtype", "projx_", _set("codes", 1, lambda c: c.to(torch.int8)), r"^codes\[1\]: expected a uint8",
     r"fgsgd: codes\[1\] must have dtype Byte, got Char"),
    ("projx-codes-length", "projx_", _truncate("codes", 2), r"^codes: expected one tensor per parameter",
     r"fgsgd: codes must (be empty or )?hold one tensor per parameter"),
    ("projx-rescale-shape", "projx_", _set("rescale", 1, lambda r: r[:1].contiguous()), r"^rescale\[1\]: expected shape",
     r"fgsgd: rescale\[1\] must have shape \(5,\)"),
    ("projx-params-noncontiguous", "projx_", _set("params", 1, _noncontig), r"^params\[1\]: must be contiguous",
     r"fgsgd: params\[1\] must be contiguous"),
    ("projx-params-shape", "projx_", _set("params", 1, lambda p: p[:, :, :2].contiguous()),
     r"^params\[1\]: one call takes one component shape", r"fgsgd: params\[1\] has components of shape 3x2"),
    ("rescale-ratio-dtype", "rescale_", _set("rescale", 1, lambda r: r.double()), r"^ratio\[1\]: expected shape",
     r"fgsgd: ratio\[1\] must have dtype Float"),
    ("rescale-ratio-shape", "rescale_", _set("rescale", 1, lambda r: torch.cat([r, r])), r"^ratio\[1\]: expected shape",
     r"fgsgd: ratio\[1\] must have shape \(5,\), got \(10,\)"),
    ("rescale-ratio-length", "rescale_", _truncate("rescale", 2), r"^ratio: expected one tensor per parameter \(3\)",
     r"fgsgd: ratio must hold one tensor per parameter \(3\), got 2"),
    ("rescale-ratio-empty", "rescale_", _truncate("rescale", 0), r"^ratio: expected one tensor per parameter \(3\)",
     r"fgsgd: ratio must hold one tensor per parameter \(3\), got 0"),
    ("rescale-params-sparse", "rescale_", _set("params", 1, lambda p: p.to_sparse()), r"^params\[1\]: sparse",
     r"fgsgd: params\[1\] must be dense"),
    ("rescale-codes-2d", "rescale_", _set("codes", 1, lambda c: c.reshape(1, 5)), r"^codes\[1\]: expected a uint8",
     r"fgsgd: codes\[1\] must have shape \(5,\)"),
]


def _run_other(path, op, d):
    if path == "python":
        if op == "tangent_sqnorm":
            return ops.tangent_sqnorm(d["params"], d["grads"], d["codes"], rescale=d["rescale"])
        if op == "projx_":
            return ops.projx_(d["params"], d["codes"], rescale=d["rescale"])
        return ops.rescale_(d["params"], d["codes"], d["rescale"])
    if op == "tangent_sqnorm":
        return torch.ops.fgsgd.tangent_sqnorm(d["params"], d["grads"], d["codes"], d["rescale"], 0.0)
    if op == "projx_":
        return torch.ops.fgsgd.projx_(d["params"], d["codes"], d["rescale"])
    return torch.ops.fgsgd.rescale_(d["params"], d["codes"], d["rescale"])


@pytest.mark.parametrize("path,op,mutate,py_msg,cpp_msg",
                         [pytest.param(path, *c[1:], id=f"{c[0]}-{path}") for c in OTHER_CASES
                          for path in ("python", "cpp") if path == "python" or c[4] is not None])
def test_other_multi_tensor_ops(path, op, mutate, py_msg, cpp_msg):
    d, before = _prepared(mutate)
    if path == "python":
        with pytest.raises(PY, match=py_msg):
            _run_other(path, op, d)
    else:
        with pytest.raises(CPP, match=cpp_msg):
            _run_other(path, op, d)
    _assert_nothing_written(d, before)


@pytest.mark.parametrize("op", ["tangent_sqnorm", "projx_", "rescale_"])
def test_other_multi_tensor_ops_meta_device(op):
    d, before = _prepared(_set("rescale", 1, _as_meta))
    name = "ratio" if op == "rescale_" else "rescale"
    for path in ("python", "cpp"):
        with pytest.raises(ValueError, match=rf"^{name}\[1\]: expected shape \(5,\) torch.float32 on cpu, got "
                                             rf"\(5,\) torch.float32 on meta"):
            _run_other(path, op, d)
    _assert_nothing_written(d, before)


# (id, op, mutation, Python message): a tensor the op writes shares memory with another of its tensors (the Python
# ops refuse it; the C++ ops take such lists as given)
OVERLAP_CASES = [
    ("step-param-in-another", "step_", _set_from("params", 1, "params", lambda p: p[:5]),
     r"^params\[2\]: shares memory with params\[1\]"),
    ("step-grad-is-its-param", "step_", _set_from("grads", 1, "params", lambda p: p, src=1),
     r"^grads\[1\]: shares memory with params\[1\]"),
    ("step-momentum-is-a-param", "step_", _set_from("momentum_buffers", 2, "params", lambda p: p, src=2),
     r"^momentum_buffers\[2\]: shares memory with params\[2\]"),
    ("step-momentum-twice", "step_", _set_from("momentum_buffers", 1, "momentum_buffers", lambda m: m[1:]),
     r"^momentum_buffers\[2\]: shares memory with momentum_buffers\[1\]"),
    ("projx-param-in-another", "projx_", _set_from("params", 1, "params", lambda p: p[:5]),
     r"^params\[2\]: shares memory with params\[1\]"),
    ("rescale-param-in-another", "rescale_", _set_from("params", 1, "params", lambda p: p[1:]),
     r"^params\[2\]: shares memory with params\[1\]"),
]


@pytest.mark.parametrize("op,mutate,py_msg", [pytest.param(*c[1:], id=c[0]) for c in OVERLAP_CASES])
def test_python_ops_refuse_overlapping_tensors(op, mutate, py_msg):
    """One launch steps every tensor in parallel: a written tensor that overlaps another would be a race."""
    d, before = _prepared(mutate)
    with pytest.raises(PY, match=py_msg + r"; the op writes params.* in one parallel launch"):
        if op == "step_":
            ops.step_(d["params"], d["grads"], d["momentum_buffers"], d["codes"], rescale=d["rescale"],
                      group_index=d["group_index"], group_scale=d["group_scale"], **d["hp"])
        else:
            _run_other("python", op, d)
    _assert_nothing_written(d, before)


def test_python_step_takes_shared_gradients():
    """Gradients are only read: two that share memory are fine (both steps read the same values)."""
    d, before = _prepared(_set_from("grads", 1, "grads", lambda g: g[:5], src=2))
    ops.step_(d["params"], d["grads"], d["momentum_buffers"], d["codes"], rescale=d["rescale"],
              group_index=d["group_index"], group_scale=d["group_scale"], **d["hp"])
    assert all(not torch.equal(a, b) for a, b in zip(d["params"], before["params"]))


# ----------------------------------------------------------------------------------------------
# codes that do not fit the components' shape
# ----------------------------------------------------------------------------------------------
CODE_SHAPE_CASES = [
    ("stiefel-wide", (2, 3), C.STIEFEL_QR, r"codes\[1\]: the stiefel manifold needs components with A >= B, got 2x3"),
    ("cayley-9x1", (9, 1), C.STIEFEL_CAYLEY, r"codes\[1\]: the cayley retraction supports A <= 8, got A = 9"),
    ("cayley-10x2", (10, 2), C.STIEFEL_CAYLEY, r"codes\[1\]: the cayley retraction supports A <= 8, got A = 10"),
    ("unknown-code", (3, 3), 9, r"codes\[1\]: must be in \[0, 6\], got 9"),
]


@pytest.mark.parametrize("packed", [False, True], ids=["bytes", "packed"])
@pytest.mark.parametrize("op", ["step_", "tangent_sqnorm", "projx_"])
@pytest.mark.parametrize("shape,code,msg", [c[1:] for c in CODE_SHAPE_CASES], ids=[c[0] for c in CODE_SHAPE_CASES])
def test_codes_that_do_not_fit_the_shape_are_refused(shape, code, msg, op, packed):
    """The Python ops read the codes of CPU tensors (one max each): a code the components' shape cannot take is
    refused by name, and nothing is written. (ops.step_ wrote NaN for stiefel on 2×3, did nothing for cayley on
    9×1, and crashed the process for cayley on 10×2: its work matrix holds 8×8 entries.)"""
    gen = make_gen(21)
    ps = [_x(6, shape=shape, code=C.SPHERE_NORMALIZE), torch.randn(6, *shape, generator=gen)]
    gs = [_u(p) for p in ps]
    codes = [torch.full((6,), C.SPHERE_NORMALIZE, dtype=torch.uint8), torch.full((6,), code, dtype=torch.uint8)]
    codes[1][0] = C.EUCLIDEAN  # a mix: the bad code is not the first
    if packed:
        codes = [C.pack(c) for c in codes]
        assert all(C.is_packed(c) for c in codes)
    before = [p.clone() for p in ps]
    call = {"step_": lambda: ops.step_(ps, gs, [], codes, lr=0.1, backend="cpu"),
            "tangent_sqnorm": lambda: ops.tangent_sqnorm(ps, gs, codes, backend="cpu"),
            "projx_": lambda: ops.projx_(ps, codes, backend="cpu")}[op]
    with pytest.raises(ValueError, match=msg):
        call()
    assert all(torch.equal(a, b) for a, b in zip(ps, before))


def test_cayley_code_on_tall_components_leaves_them_in_the_kernel():
    """torch.ops.fgsgd.step_ does not read the codes: a cayley code on 10×2 components (more rows than the Cayley
    work matrix takes) leaves them as they are instead of writing past the work matrix."""
    p = torch.randn(4, 10, 2, generator=make_gen(22))
    before = p.clone()
    torch.ops.fgsgd.step_([p], [_u(p)], [], [torch.full((4,), C.STIEFEL_CAYLEY, dtype=torch.uint8)], [], [], [], 0.1,
                          0.0, 0.0, False, 0.0, False, False)
    assert torch.equal(p, before)


def test_rows_longer_than_an_int_are_refused():
    """The compiled backends take a row's length as an int: a row of 2^32 + 100 entries went down the row path as
    100 entries (and one of 2^31 + 5 as a negative length). Checked on meta tensors (no memory)."""
    from fgsgd_cuda import checks
    ok = torch.empty(1, 2 ** 31 - 1, 1, device="meta")
    checks.components(ok, "params[0]", rows=True, leading=True)
    for n in (2 ** 31 + 5, 2 ** 32 + 100):
        with pytest.raises(ValueError, match=rf"^params\[0\]: rows must have at most 2\^31 - 1 entries, got {n}"):
            checks.components(torch.empty(1, n, 1, device="meta"), "params[0]", rows=True, leading=True)


def test_group_values_out_of_range_are_refused():
    """The kernels read group_scale[group_index[i]] and members[offsets[g] .. offsets[g+1]) without bounds: on CPU
    tensors the Python ops read the values first and refuse those out of range by name, writing nothing."""
    gen = make_gen(41)
    p = _x(6)
    g, before = _u(p), p.clone()
    codes = torch.full((6,), C.SPHERE_NORMALIZE, dtype=torch.uint8)
    gs = torch.rand(3, generator=gen) + 0.5
    for bad in ([0, 1, 2, 3, 0, 1], [0, -1, 2, 0, 1, 2]):
        with pytest.raises(ValueError, match=r"^group_index\[0\]: values must lie in \[0, 3\) \(the length of "
                                             r"group_scale\[0\]\)"):
            ops.step_([p], [g], [], [codes], lr=0.1, group_index=[torch.tensor(bad, dtype=torch.int32)],
                      group_scale=[gs], backend="cpu")
        assert torch.equal(p, before)
    sq = torch.rand(6, generator=gen, dtype=torch.float64)
    members = torch.arange(6)
    with pytest.raises(ValueError, match=r"^offsets: must rise from >= 0 to at most 6"):
        ops.group_scale(sq, members, torch.tensor([0, 4, 2, 6]), 1.0, backend="cpu")
    with pytest.raises(ValueError, match=r"^offsets: must rise from >= 0 to at most 6"):
        ops.group_scale(sq, members, torch.tensor([0, 3, 9]), 1.0, backend="cpu")
    with pytest.raises(ValueError, match=r"^members: values must lie in \[0, 6\)"):
        ops.group_scale(sq, torch.tensor([0, 1, 2, 3, 4, 7]), torch.tensor([0, 3, 6]), 1.0, backend="cpu")
    good = ops.group_scale(sq, members, torch.tensor([0, 3, 6]), 1.0, backend="cpu")
    assert good.shape == (2,)
