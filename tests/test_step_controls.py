"""The step's run-time controls (fgsgd_cuda/controls.py, csrc/fgsgd/step_control.h) on every backend: found_inf
skips the whole step, a tensor lr replaces lr, per-tensor step counts decide first_step (which the launch's
first_step=True forces) and stabilize and are incremented. A controlled step must give the same bits as the plain step with the flags the counts imply (to
rounding for Triton on a GPU: _same)."""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import SHORT_ROW, backends_on, FP32_RTOL, make_gen, make_row_tensors, make_step_tensors, rel_err
from fgsgd_cuda import dispatch, ops
from fgsgd_cuda import reference as R


BACKENDS = backends_on((("cpu", "cpu"), ("torch", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
SHAPES = [pytest.param((3, 3), id="3x3"), pytest.param((2, 3), id="2x3"), pytest.param((100, 1), id="row100"),
          pytest.param(SHORT_ROW, id="row16")]
STEPS = [0, 4, 9, 2]          # with stabilize_every 5: tensor 0 takes its first step, tensors 1 and 2 re-project
EVERY = 5
HP = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)


def _tensors(shape, dtype, device, seed):
    gen = make_gen(seed)
    sizes = [7, 130, 1, 40]
    ts = (make_row_tensors(sizes, shape[0], dtype, gen) if shape[1] == 1 and shape[0] > 64
          else make_step_tensors(sizes, shape, dtype, gen))
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in ts]


def _call(ts, backend, **kw):
    hp = {**HP, **{k: kw.pop(k) for k in list(kw) if k in HP}}
    ops.step_([t["p"] for t in ts], [t["g"] for t in ts], [t["m"] for t in ts], [t["codes"] for t in ts],
              rescale=[t["r"] for t in ts], backend=backend, **hp, **kw)


def _clone(ts):
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in ts]


def _same(a, b, backend, device) -> bool:
    """The controlled and the plain step agree: bit for bit, except the Triton backend on a GPU, where the two
    are different generated kernels and Triton's compiler contracts a·b + c into FMAs per kernel (the lr from
    memory or a constant, s_g with or without 1/scale), so they agree to rounding: ‖a − b‖ ≤ 16·eps·‖b‖
    (ignoring a count or the scale moves them by O(1))."""
    if not (backend == "triton" and torch.device(device).type == "cuda"):
        return torch.equal(a, b)
    return rel_err(a, b) <= 16 * torch.finfo(b.dtype).eps


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_counts_and_lr_tensor_follow_the_plain_step(backend, device, dtype, shape):
    """Counts [0, 4, 9, 2] with stabilize_every 5 and an lr tensor against the plain step of each tensor with the
    flags and lr they imply (the launch's own flags say the opposite): the same bits; every count + 1; and the
    float64 reference."""
    ts = _tensors(shape, dtype, device, zlib.crc32(repr((backend, dtype, shape)).encode()))
    lr_t = torch.tensor(0.07, dtype=torch.float32, device=device)
    plain = _clone(ts)
    for k, t in enumerate(plain):
        _call([t], backend, lr=float(lr_t), first_step=STEPS[k] == 0, stabilize=(STEPS[k] + 1) % EVERY == 0)
    steps = [torch.tensor(float(s), device=device) for s in STEPS]
    got = _clone(ts)
    _call(got, backend, lr=5.0, first_step=False, stabilize=True, steps=steps, lr_tensor=lr_t, stabilize_every=EVERY)
    assert [float(s) for s in steps] == [s + 1 for s in STEPS]
    tol = FP32_RTOL if dtype == torch.float32 else 1e-12
    for k, (a, b, t) in enumerate(zip(got, plain, ts)):
        assert _same(a["p"], b["p"], backend, device) and _same(a["m"], b["m"], backend, device), f"tensor {k}"
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double(), t["codes"], t["r"].double(), None,
                              lr=float(lr_t), first_step=STEPS[k] == 0, stabilize=(STEPS[k] + 1) % EVERY == 0, **HP)
        assert rel_err(a["p"], p_ref) <= tol and rel_err(a["m"], m_ref) <= tol, f"tensor {k}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_first_step_forces_a_first_step_at_any_count(backend, device, dtype, shape):
    """first_step=True with counts [0, 4, 9, 2]: new buffers whatever the count (FGSGD's momentum switched on after
    some steps, whose capturable step had read a zeroed buffer as m and started it as (1 − τ)·s_g·ξ): every tensor
    takes a first step (m = s_g·ξ), and the counts still decide stabilize."""
    ts = _tensors(shape, dtype, device, zlib.crc32(repr(("first", backend, dtype, shape)).encode()))
    hp = dict(lr=0.07, dampening=0.5)
    plain = _clone(ts)
    for k, t in enumerate(plain):
        _call([t], backend, first_step=True, stabilize=(STEPS[k] + 1) % EVERY == 0, **hp)
    steps = [torch.tensor(float(s), device=device) for s in STEPS]
    got = _clone(ts)
    _call(got, backend, first_step=True, stabilize=False, steps=steps, stabilize_every=EVERY, **hp)
    for k, (a, b) in enumerate(zip(got, plain)):
        assert _same(a["p"], b["p"], backend, device) and _same(a["m"], b["m"], backend, device), f"tensor {k}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_found_inf_skips_everything(backend, device, shape):
    """found_inf = 1: parameters, buffers and counts keep their bits; found_inf = 0: the same step as none."""
    ts = _tensors(shape, torch.float32, device, zlib.crc32(repr(("inf", backend, shape)).encode()))
    for t in ts:
        t["g"][0].view(-1)[0] = float("inf")
    steps = [torch.tensor(float(s), device=device) for s in STEPS]
    got = _clone(ts)
    _call(got, backend, lr=0.1, steps=steps, stabilize_every=EVERY,
          found_inf=torch.ones((), device=device), lr_tensor=torch.tensor(0.1, device=device))
    assert [float(s) for s in steps] == [float(s) for s in STEPS]
    for a, t in zip(got, ts):
        assert torch.equal(a["p"], t["p"]) and torch.equal(a["m"], t["m"])
    for t in ts:
        t["g"][0].view(-1)[0] = 0.5
    zero, none = _clone(ts), _clone(ts)
    _call(zero, backend, lr=0.1, found_inf=torch.zeros(1, device=device))
    _call(none, backend, lr=0.1)
    for a, b, t in zip(zero, none, ts):
        assert torch.equal(a["p"], b["p"]) and torch.equal(a["m"], b["m"])
        assert not torch.equal(a["p"], t["p"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scale_reads_unscaled_gradients(backend, device, dtype, shape):
    """Gradients times 2^13 with grad_scale = 2^13: the same bits as the plain step on the gradients (the
    unscale is exact for a power of two, as GradScaler's scales are); with a scale of 3, the float64 reference
    on g / 3. The gradients themselves are not written."""
    ts = _tensors(shape, dtype, device, zlib.crc32(repr(("scale", backend, dtype, shape)).encode()))
    plain = _clone(ts)
    _call(plain, backend, lr=0.1, first_step=False, stabilize=True)
    scaled = _clone(ts)
    for t in scaled:
        t["g"] = t["g"] * 2.0 ** 13
    g_before = [t["g"].clone() for t in scaled]
    _call(scaled, backend, lr=0.1, stabilize=True, grad_scale=torch.tensor(2.0 ** 13, device=device))
    for k, (a, b, g) in enumerate(zip(scaled, plain, g_before)):
        assert _same(a["p"], b["p"], backend, device) and _same(a["m"], b["m"], backend, device), f"tensor {k}"
        assert torch.equal(a["g"], g)
    three = _clone(ts)
    for t in three:
        t["g"] = t["g"] * 3
    _call(three, backend, lr=0.1, grad_scale=torch.tensor(3.0, device=device))
    tol = FP32_RTOL if dtype == torch.float32 else 1e-12
    for k, (a, t) in enumerate(zip(three, ts)):
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double(), t["codes"], t["r"].double(), None,
                              lr=0.1, first_step=False, stabilize=False, **HP)
        assert rel_err(a["p"], p_ref) <= tol and rel_err(a["m"], m_ref) <= tol, f"tensor {k}"


BAD = {
    "steps dtype": (dict(steps="int"), r"steps\[1\]: expected a one-element torch.float32"),
    "steps count": (dict(steps="short"), r"steps: expected one tensor per parameter \(4\)"),
    "found_inf dtype": (dict(found_inf=torch.ones((), dtype=torch.float64)), r"found_inf: expected a one-element"),
    "found_inf shape": (dict(found_inf=torch.zeros(2)), r"found_inf: expected a one-element"),
    "lr_tensor dtype": (dict(lr_tensor=torch.tensor(1, dtype=torch.int32)), r"lr_tensor: expected a one-element"),
    "stabilize_every": (dict(stabilize_every=-1), r"stabilize_every: must be a non-negative integer"),
    "grad_scale dtype": (dict(grad_scale=torch.tensor(2.0, dtype=torch.float64)),
                         r"grad_scale: expected a one-element"),
    "grad_scale with weight decay": (dict(grad_scale=torch.tensor(2.0), weight_decay=0.1),
                                     r"grad_scale: needs weight_decay = 0"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_bad_controls_are_refused_by_name(backend, case):
    if not dispatch.available(backend, torch.device("cpu")):
        pytest.skip(f"{backend} is not available")
    ts = _tensors((3, 3), torch.float32, "cpu", 3)
    kw, msg = BAD[case]
    if kw.get("steps") == "int":
        kw = dict(steps=[torch.zeros(()), torch.zeros((), dtype=torch.int64), torch.zeros(()), torch.zeros(())])
    elif kw.get("steps") == "short":
        kw = dict(steps=[torch.zeros(())])
    got = _clone(ts)
    with pytest.raises(ValueError, match=msg):
        _call(got, backend, lr=0.1, **kw)
    for a, t in zip(got, ts):
        assert torch.equal(a["p"], t["p"]) and torch.equal(a["m"], t["m"])


@pytest.mark.skipif(not dispatch.available("cpu", torch.device("cpu")), reason="needs the compiled extension")
def test_compiled_op_checks_the_controls():
    """torch.ops.fgsgd.step_ itself (no Python checks) refuses a float64 count and a found_inf of two values."""
    ts = _tensors((3, 3), torch.float32, "cpu", 4)
    args = ([t["p"] for t in ts], [t["g"] for t in ts], [t["m"] for t in ts], [t["codes"] for t in ts],
            [t["r"] for t in ts], [], [], 0.1, 0.9, 0.0, False, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"steps\[2\] must be a one-element float32 tensor"):
        torch.ops.fgsgd.step_(*args, [torch.zeros(()), torch.zeros(()), torch.zeros((), dtype=torch.float64),
                                      torch.zeros(())])
    with pytest.raises(RuntimeError, match=r"found_inf must be a one-element float32 tensor"):
        torch.ops.fgsgd.step_(*args, [], torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"stabilize_every must be >= 0 and < 2\^31"):
        torch.ops.fgsgd.step_(*args, [], None, None, -3)
    wd = args[:11] + (0.1,) + args[12:]
    with pytest.raises(RuntimeError, match=r"grad_scale needs weight_decay = 0"):
        torch.ops.fgsgd.step_(*wd, [], None, None, 0, torch.tensor(4.0))
    for a, t in zip(args[0], ts):
        assert torch.equal(a, t["p"])


@pytest.mark.parametrize("shape", [pytest.param((3, 3), id="3x3"), pytest.param((100, 1), id="row100")])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_counts_of_empty_tensors_advance(backend, device, shape):
    """An empty tensor's step count advances with the others', also when every tensor of a launch is empty (the
    CUDA launches skipped a table without blocks, its count launch too: an empty parameter's count stayed 0 on
    CUDA and became 1 on the CPU); found_inf skips them all."""
    empty = [torch.zeros(0, *shape, device=device) for _ in range(3)]
    codes = [torch.zeros(0, dtype=torch.uint8, device=device) for _ in empty]
    for flag, want in ((0.0, 1.0), (1.0, 1.0)):
        if flag == 0.0:
            steps = [torch.zeros((), device=device) for _ in empty]
        ops.step_(empty, [e.clone() for e in empty], [e.clone() for e in empty], codes, lr=0.1, momentum=0.9,
                  steps=steps, stabilize_every=5, found_inf=torch.tensor([flag], device=device), backend=backend)
        assert [float(s) for s in steps] == [want] * 3, (flag, steps)
