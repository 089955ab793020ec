"""The CUDA step beyond the per-op checks of test_ops_compiled.py: the three step kernels (shared-memory
staged, staged and sorted by code, one thread per component) on unaligned views and block tails, the
optimizer on CUDA against the CPU backend, CUDA-graph capture, and launches per step independent of
depth. Needs a GPU."""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from conftest import FP32_RTOL, make_gen, make_step_tensors, random_codes, random_points, rel_err, requires_cuda
from fgsgd_cuda import FGSGD, ops, param_groups
from fgsgd_cuda import reference as R

pytestmark = requires_cuda
TOL = {torch.float32: FP32_RTOL, torch.float64: 1e-12}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


def _offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous view of a copy of t whose data starts `offset` components into a larger buffer (so its
    address is not 16-byte aligned for odd offsets)."""
    n = t.shape[0]
    buf = torch.full((n + offset, *t.shape[1:]), float("nan"), dtype=t.dtype, device="cuda")
    view = buf[offset:]
    view.copy_(t)
    assert view.is_contiguous()
    return view


CONFIGS = ["momentum", "first", "none", "nesterov-stabilize"]


def _hparams(config: str) -> dict:
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.02, first_step=False,
              stabilize=False)
    hp.update({"momentum": {}, "first": dict(first_step=True), "none": dict(momentum=0.0),
               "nesterov-stabilize": dict(nesterov=True, stabilize=True)}[config])
    return hp


def _check_step(sizes, shape, dtype, hp, offsets, gen):
    """One multi-tensor CUDA step of tensors of `sizes` components (every code), p, g, m at separate offsets,
    against the float64 reference; nothing outside the views written."""
    params, grads, momenta, codes, rescale, refs = [], [], [], [], [], []
    for t in make_step_tensors(sizes, shape, dtype, gen, groups=False):
        refs.append(R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None, t["codes"],
                           t["r"].double(), None, **hp))
        params.append(_offset_copy(t["p"], offsets[0]))
        grads.append(_offset_copy(t["g"], offsets[1]))
        momenta.append(_offset_copy(t["m"], offsets[2]))
        codes.append(t["codes"].cuda())
        rescale.append(t["r"].cuda())
    m_before = [m.clone() for m in momenta]
    ops.step_(params, grads, momenta if hp["momentum"] else [], codes, rescale=rescale, backend="cuda", **hp)
    torch.cuda.synchronize()
    for k, (p_ref, m_ref) in enumerate(refs):
        assert rel_err(params[k].cpu(), p_ref) <= TOL[dtype], f"params[{k}] (N={sizes[k]})"
        if hp["momentum"]:
            assert rel_err(momenta[k].cpu(), m_ref) <= TOL[dtype], f"momentum_buffers[{k}] (N={sizes[k]})"
        else:
            assert torch.equal(momenta[k], m_before[k])
    # nothing outside the views was written (the padding in front of each view stays NaN)
    for t, off in zip((params[-1], grads[-1], momenta[-1]), offsets):
        if off:
            assert bool(torch.isnan(t._base[:off]).all())


@pytest.mark.parametrize("variant", ["staged", "sorted", "thread"])
@pytest.mark.parametrize("offsets", [(0, 0, 0), (1, 0, 3)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_kernels_3x3(monkeypatch, variant, offsets, config, dtype):
    """Sizes around the block size (128) and a large one; every code; p, g, m at separate offsets."""
    monkeypatch.setenv("FGSGD_CUDA_STEP", variant)
    gen = make_gen(zlib.crc32(repr((variant, offsets, config, dtype)).encode()))
    _check_step([1, 127, 128, 129, 5000 + 3], (3, 3), dtype, _hparams(config), offsets, gen)


@pytest.mark.parametrize("dyn", [pytest.param("0", id="fixed7x7"), pytest.param("1", id="dyn")])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_kernels_7x7(monkeypatch, dyn, config, dtype):
    """ResNet's stem shape: the Fixed<7, 7> kernels (in registers) and, with FGSGD_CUDA_DYN=1, the run-time-shape
    ones; block tails and a launch of more blocks than a few."""
    monkeypatch.setenv("FGSGD_CUDA_DYN", dyn)
    gen = make_gen(zlib.crc32(repr(("7x7", dyn, config, dtype)).encode()))
    _check_step([1, 127, 129, 1003], (7, 7), dtype, _hparams(config), (1, 0, 3), gen)


# (O, I) of channels-last filter banks: blocks of 128 filters across output channels (I = 37, 3, 129), I = 64, 300
CHANNELS_LAST = [(3, 37), (43, 3), (2, 64), (2, 129), (1, 300)]


@pytest.mark.parametrize("kernel", [pytest.param(("staged", "0", 3), id="staged-3x3"),
                                    pytest.param(("sorted", "0", 3), id="sorted-3x3"),
                                    pytest.param(("thread", "0", 3), id="thread-3x3"),
                                    pytest.param(("staged", "0", 7), id="fixed-7x7"),
                                    pytest.param(("staged", "1", 5), id="dyn-5x5")])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_filters(monkeypatch, kernel, config, dtype):
    """Channels-last (O, I, k, k) weights stepped where they are (csrc/cuda/staged.cuh gather_in, batched.h
    entries_of), beside a contiguous one in the same call: the float64 reference's step, a few units in the last
    place from the same step on contiguous copies, the layout kept; tangent_sqnorm likewise."""
    variant, dyn, k = kernel
    monkeypatch.setenv("FGSGD_CUDA_STEP", variant)
    monkeypatch.setenv("FGSGD_CUDA_DYN", dyn)
    hp = _hparams(config)
    gen = make_gen(zlib.crc32(repr(("channels-last", kernel, config, dtype)).encode()))
    shapes = CHANNELS_LAST + [(5, 11)]
    ts = make_step_tensors([o * i for o, i in shapes], (k, k), dtype, gen, groups=False)

    def weights(key, channels_last):  # fresh copies on the GPU (the step works in place)
        fmt = [torch.channels_last if channels_last and j < len(CHANNELS_LAST) else torch.contiguous_format
               for j in range(len(ts))]
        return [torch.empty((o, i, k, k), dtype=dtype, device="cuda", memory_format=f).copy_(t[key].reshape(o, i, k, k))
                for t, (o, i), f in zip(ts, shapes, fmt)]

    got, flat = {}, {}
    for out, cl in ((got, True), (flat, False)):
        p, g, m = weights("p", cl), weights("g", cl), weights("m", False)
        codes, rescale = [t["codes"].cuda() for t in ts], [t["r"].cuda() for t in ts]
        out["sq"] = ops.tangent_sqnorm(p, g, codes, rescale=rescale, weight_decay=0.02, backend="cuda")
        ops.step_(p, g, m if hp["momentum"] else [], codes, rescale=rescale, backend="cuda", **hp)
        out["p"], out["m"] = p, m
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in got["p"][:-1])
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got["sq"], flat["sq"], rtol=8 * ulp, atol=0)
    start = 0
    for j, t in enumerate(ts):
        n = t["codes"].numel()
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None,
                              t["codes"], t["r"].double(), None, **hp)
        sq_ref = R.tangent_sqnorm(t["p"].double(), t["g"].double(), t["codes"], t["r"].double(), 0.02)
        assert rel_err(got["sq"][start:start + n].cpu(), sq_ref) <= TOL[dtype], f"tangent_sqnorm of tensor {j}"
        start += n
        assert rel_err(got["p"][j].reshape(n, k, k).cpu(), p_ref) <= TOL[dtype], f"params[{j}]"
        torch.testing.assert_close(got["p"][j], flat["p"][j], rtol=8 * ulp, atol=8 * ulp)
        if hp["momentum"]:
            assert rel_err(got["m"][j].reshape(n, k, k).cpu(), m_ref) <= TOL[dtype], f"momentum_buffers[{j}]"
            torch.testing.assert_close(got["m"][j], flat["m"][j], rtol=8 * ulp, atol=8 * ulp)


def test_step_kernels_agree(monkeypatch):
    """Same inputs, every kernel: the same math (csrc/fgsgd) in the same order per component, so the same bits."""
    gen = make_gen(7)
    n = 3000
    c = random_codes(n, 3, 3, gen).cuda()
    p0 = random_points(n, 3, 3, c.cpu(), gen).float().cuda()
    g = torch.randn(n, 3, 3, generator=gen).cuda()
    m0 = torch.randn(n, 3, 3, generator=gen).cuda() * 0.1
    out = {}
    for variant in ("staged", "sorted", "thread"):
        monkeypatch.setenv("FGSGD_CUDA_STEP", variant)
        p, m = p0.clone(), m0.clone()
        ops.step_([p], [g], [m], [c], lr=0.05, momentum=0.9, backend="cuda")
        out[variant] = (p, m)
    for variant in ("sorted", "thread"):
        assert torch.equal(out["staged"][0], out[variant][0]), variant
        assert torch.equal(out["staged"][1], out[variant][1]), variant


def _model(depth: int, dtype=torch.float32, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    layers += [nn.Conv2d(16, 8, 5, padding=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers).to(dtype)


def _train(device, backend, dtype, steps=6, **options):
    """A small CNN's parameters stepped `steps` times with the same random gradients on any device (the
    gradients come from a CPU generator, so the optimizers see identical inputs: no convolution numerics
    such as TF32 in between)."""
    model = _model(4, dtype).to(device)
    opt = FGSGD(param_groups(model, group_size=4, **options), lr=0.05, momentum=0.9, nesterov=True,
                backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype).to(device)
        opt.step()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(), dict(group_clip=0.5, stabilize=2,
                                                  retraction={"stiefel": "cayley", "sphere": "exp"})],
                         ids=["default", "clip-stabilize-alt"])
def test_optimizer_on_cuda_follows_cpu(dtype, options):
    """A small CNN's parameters (3×3 and 5×5 filters, BN, conv biases, linear) stepped 6 times with
    backend="cuda" and with backend="cpu" from the same start and gradients: the same weights up to rounding."""
    got = _train("cuda", "cuda", dtype, **options)
    ref = _train("cpu", "cpu", dtype, **options)
    tol = 10 * TOL[dtype]  # six steps of rounding differences
    for k, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) <= tol, f"parameter {k}: {rel_err(a, b):.3g}"


SMALL_BLOCKS = [pytest.param("0", id="128-thread-blocks"), pytest.param("1", id="32-thread-blocks")]


@pytest.mark.parametrize("small_blocks", SMALL_BLOCKS)
def test_side_stream_and_small_blocks(monkeypatch, small_blocks):
    """The 5×5 filters' launch on the side stream (fgsgd_cuda/streams.py), with 128- or 32-thread blocks
    (FGSGD_CUDA_SMALL_BLOCKS): the same bits as on one stream, the side stream was used, and the weights follow
    the CPU backend."""
    monkeypatch.setenv("FGSGD_CUDA_SMALL_BLOCKS", small_blocks)
    monkeypatch.setenv("FGSGD_CUDA_OVERLAP", "0")
    one = _train("cuda", "cuda", torch.float32, group_clip=0.5, stabilize=2)
    monkeypatch.setenv("FGSGD_CUDA_OVERLAP", "1")
    two = _train("cuda", "cuda", torch.float32, group_clip=0.5, stabilize=2)
    ref = _train("cpu", "cpu", torch.float32, group_clip=0.5, stabilize=2)
    for k, (a, b, c) in enumerate(zip(one, two, ref)):
        assert torch.equal(a, b), f"parameter {k}"
        assert rel_err(b, c) <= 10 * FP32_RTOL, f"parameter {k}: {rel_err(b, c):.3g}"
    model = _model(3).cuda()
    opt = FGSGD(param_groups(model, group_size=4), lr=0.05, momentum=0.9, backend="cuda")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt._overlap._streams, "the 5×5 launch did not run on a side stream"


def _rows_model(dtype=torch.float32, seed=0) -> nn.Sequential:
    """3×3 filters, then 1×1 convs and a linear weight whose row-view rows are 80 or 96 entries long."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 80, 3, padding=1), nn.ReLU(), nn.Conv2d(80, 96, 1), nn.ReLU(),
                         nn.Conv2d(96, 80, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(80, 4)).to(dtype)


def _train_rows(device, backend, dtype, steps=5, **options):
    model = _rows_model(dtype).to(device)
    opt = FGSGD(param_groups(model, row_view=True, row_manifolds=["sphere", "oblique", "euclidean"], group_size=4,
                             **options), lr=0.05, momentum=0.9, nesterov=True, backend=backend)
    assert {opt.state[p]["shape"] for p in opt.param_groups[1]["params"]} == {(80, 1), (96, 1)}
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen, dtype=dtype) / p[0].numel() ** 0.5).to(device)
        opt.step()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(), dict(group_clip=0.5, stabilize=2, retraction={"sphere": "exp"})],
                         ids=["default", "clip-stabilize-exp"])
def test_row_view_on_cuda_follows_cpu(dtype, options):
    """The row kernels (csrc/cuda/rows.cuh against csrc/cpu/serial_row.h) inside the optimizer: 5 steps of a
    model whose 1×1 convs and linear weight are rows of 80 and 96 entries, CUDA against CPU."""
    got = _train_rows("cuda", "cuda", dtype, **options)
    ref = _train_rows("cpu", "cpu", dtype, **options)
    tol = 10 * TOL[dtype]
    for k, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) <= tol, f"parameter {k}: {rel_err(a, b):.3g}"


def _captured_setup(seed=0):
    model = _model(3).cuda()
    opt = FGSGD(param_groups(model, group_size=4, group_clip=1.0), lr=0.05, momentum=0.9, check_finite=False,
                backend="cuda")
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).cuda()
    return model, opt


@pytest.mark.parametrize("small_blocks", SMALL_BLOCKS)
def test_step_captured_in_cuda_graph(monkeypatch, small_blocks):
    """After a warm-up step, the step (group step sizes included; the 5×5 launch on the side stream, in 128- or
    32-thread blocks) captures into a CUDA graph, and replays give the same bits as eager steps."""
    monkeypatch.setenv("FGSGD_CUDA_SMALL_BLOCKS", small_blocks)
    eager_model, eager_opt = _captured_setup()
    graph_model, graph_opt = _captured_setup()
    for opt in (eager_opt, graph_opt):
        opt.step()                        # momentum buffers and group caches made outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for _ in range(3):
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(graph_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
        assert bool(torch.isfinite(a).all())


def test_capture_with_check_finite_is_refused():
    model, opt = _captured_setup()
    opt.param_groups[0]["check_finite"] = True
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="check_finite"):
        with torch.cuda.graph(graph):
            opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def _capturable_setup(lr):
    model = _model(3).cuda()
    opt = FGSGD(param_groups(model, group_size=4, group_clip=1.0, stabilize=3), lr=lr, momentum=0.9,
                backend="cuda", capturable=True, fused=True)
    return model, opt


def _set_grads(model, k):
    gen = torch.Generator().manual_seed(1000 + k)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen).cuda()
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)  # a captured graph reads the gradients where they were at capture


def test_capturable_step_replays_follow_eager_steps():
    """FGSGD(capturable=True) captured once and replayed 7 times, with new gradients and a tensor lr changed in
    place between replays: the counts advance on the device (re-projection every 3 steps, check_finite's flag
    made on the device) and the bits equal eager capturable steps."""
    eager_model, eager_opt = _capturable_setup(torch.tensor(0.05, device="cuda"))
    graph_model, graph_opt = _capturable_setup(torch.tensor(0.05, device="cuda"))
    for k in range(2):                                      # warm-up outside the graph (buffers, caches)
        for m, o in ((eager_model, eager_opt), (graph_model, graph_opt)):
            _set_grads(m, k)
            o.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _set_grads(graph_model, 2)
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    _set_grads(eager_model, 2)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for k in range(3, 10):
        lr = 0.05 * 0.8 ** k
        for o in (eager_opt, graph_opt):
            for g in o.param_groups:
                g["lr"].fill_(lr)
        _set_grads(graph_model, k)
        graph.replay()
        _set_grads(eager_model, k)
        eager_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(graph_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(graph_opt.param_groups[0]["params"], eager_opt.param_groups[0]["params"]):
        assert float(graph_opt.state[p]["step"]) == float(eager_opt.state[q]["step"]) == 10.0


def test_capturable_grad_scaler_skips_without_a_sync():
    """GradScaler with a capturable FGSGD on CUDA: an inf step changes nothing (the flag is read by the kernels),
    and the finite steps after it equal those of a run that never had it: the manifold parameters bit for bit;
    the Euclidean ones to rounding, because torch's CUDA fused SGD kernel rounds p - lr·buf differently with and
    without a grad_scale (last-bit differences, seen on an H100 with identical momentum buffers)."""
    m1, o1 = _capturable_setup(0.05)
    m2, o2 = _capturable_setup(0.05)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    scaler.scale(torch.ones((), device="cuda"))
    for k in range(4):
        _set_grads(m1, k)
        for p in m1.parameters():
            p.grad.mul_(scaler.get_scale())
        if k == 0:
            next(m1.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(o1)
        scaler.update()
        if k:
            _set_grads(m2, k)
            o2.step()
    torch.cuda.synchronize()
    manifold = {id(p) for g in o1.param_groups if g["manifolds"] for p in g["params"]}
    for a, b in zip(m1.parameters(), m2.parameters()):
        if id(a) in manifold:
            assert torch.equal(a, b)
        else:  # a step that was not skipped moves these by lr·g ~ 0.05
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _ops_per_step(depth: int) -> tuple[int, int]:
    """(ops dispatched, fgsgd ops among them) by one steady-state step (a TorchDispatchMode count: each fgsgd
    op is one kernel launch per 36 tensors; torch.profiler was too slow to start on the lent GPU machine)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.fgsgd = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not getattr(func, "is_view", False):
                self.ops += 1
                self.fgsgd += str(func).startswith("fgsgd.")
            return func(*args, **(kwargs or {}))

    model = _model(depth).cuda()
    opt = FGSGD(param_groups(model, group_size=4), lr=0.05, momentum=0.9, check_finite=False, backend="cuda",
                foreach=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    with Count() as c:
        opt.step()
    return c.ops, c.fgsgd


def test_launches_per_step_do_not_grow_with_depth():
    shallow, deep = _ops_per_step(4), _ops_per_step(24)
    assert shallow == deep, f"4 layers: {shallow}, 24 layers: {deep}"
    assert deep[1] == 2, deep  # one fgsgd.step_ per component shape (3×3 and 5×5)
