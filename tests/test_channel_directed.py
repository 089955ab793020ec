"""Channel-directed gradients (fgsgd_cuda.channel_directed, csrc/fgsgd/channel_directed.h) against the float64
reference (fgsgd_cuda.reference.channel_directed: a dense solve of (I − λΔ) f_new = f) on every backend but Triton
(tests/test_triton.py runs it there), and the reference itself against the definition."""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from conftest import CPU_TORCH_CUDA, make_gen, rel_err, requires_cpu_kernels
from fgsgd_cuda import channel_directed_, conv_weights, reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

# (gradient shapes of one call, dim): conv weights; one output channel (L = 1) and two (L = 2: both neighbours
# of a channel are the same one); a long fiber (L = 300) with few columns; C = 360 (the CPU's blocks of 1 KiB of a
# row: one full block and a partial one in float32, two and a partial in float64), 33 and 75; linear and 1×1
# weights; fibers along the input channels (dim = 1); several tensors in one call
SHAPE_CASES = {
    "conv": ([(64, 8, 3, 3)], 0),
    "wide": ([(24, 40, 3, 3)], 0),
    "one-channel": ([(1, 5, 3, 3)], 0),
    "two-channels": ([(2, 3, 3, 3)], 0),
    "long-fiber": ([(300, 2, 3, 1)], 0),
    "odd-columns": ([(12, 11, 3, 1), (7, 3, 5, 5)], 0),
    "linear-1x1": ([(17, 40), (9, 13, 1, 1)], 0),
    "input-dim": ([(4, 9, 3, 3), (3, 5, 2)], 1),
    "many": ([(16, 3, 3, 3), (32, 16, 3, 3), (32, 16, 1, 1), (10, 32)], 0),
}
LAMS = {"sobolev": [0.0, 0.01, 1.0, 1e4], "reweighted": [0.5, 1.0, 3.0]}
CASES = [pytest.param(metric, lam, key, id=f"{metric}-{lam:g}-{key}")
         for metric, lams in LAMS.items() for lam in lams for key in SHAPE_CASES]


def tolerance(dtype, lam):
    """Relative error a backend in ``dtype`` must meet: the recursions' rounding grows as 1/(1 − r) ≈ √λ."""
    eps = 1e-6 if dtype == torch.float32 else 1e-14
    return eps * max(1.0, math.sqrt(lam))


def make_grads(shapes, dtype, seed, device="cpu"):
    gen = make_gen(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def params_with(grads):
    out = []
    for g in grads:
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = g
        out.append(p)
    return out


def periodic_laplacian(f, dim):
    return f.roll(1, dim) + f.roll(-1, dim) - 2 * f


# ------------------------------------------------------------------------ the reference itself

@pytest.mark.parametrize("L", [1, 2, 3, 8, 31])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 50.0])
def test_reference_solves_the_sobolev_system(L, lam):
    """(I − λΔ) f_new = f by the stencil, the fiber mean kept, and a cosine of frequency k damped by
    1/(1 + 4λ sin²(πk/L)) (the circulant's eigenvalue)."""
    g = torch.randn(L, 4, 3, generator=make_gen(L), dtype=torch.float64)
    f = R.channel_directed(g, "sobolev", lam)
    torch.testing.assert_close(f - lam * periodic_laplacian(f, 0), g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f.mean(0), g.mean(0), rtol=1e-12, atol=1e-12)
    j = torch.arange(L, dtype=torch.float64)
    for k in range(L):
        wave = torch.cos(2 * math.pi * k * j / L + 0.3)
        out = R.channel_directed(wave.reshape(L, 1), "sobolev", lam).reshape(L)
        torch.testing.assert_close(out, wave / (1 + 4 * lam * math.sin(math.pi * k / L) ** 2), rtol=1e-12,
                                   atol=1e-12)


def test_reference_reweighted_by_definition():
    g = torch.randn(6, 5, 3, 3, generator=make_gen(3), dtype=torch.float64)
    for dim in (0, 1):
        f = R.channel_directed(g, "reweighted", 4.0, dim)
        mean = g.mean(dim, keepdim=True)
        torch.testing.assert_close(f, mean + (g - mean) / 4.0)


# ------------------------------------------------------------------------ backends against the reference

@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("metric,lam,key", CASES)
def test_against_reference(backend, device, dtype, metric, lam, key):
    shapes, dim = SHAPE_CASES[key]
    grads = make_grads(shapes, dtype, zlib.crc32(repr((metric, lam, key, str(dtype))).encode()), device)
    refs = [R.channel_directed(g.double().cpu(), metric, lam, dim) for g in grads]
    params = params_with(grads)
    channel_directed_(params, metric, lam, dim=dim, backend=backend)
    for p, g, ref in zip(params, grads, refs):
        assert p.grad is g  # in place
        err = rel_err(g.cpu(), ref)
        assert err <= tolerance(dtype, lam), (tuple(g.shape), err)


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
@pytest.mark.parametrize("metric,lam", [("sobolev", 0.0), ("sobolev", 2.0), ("reweighted", 3.0)])
def test_huge_fp32_gradients_stay_finite(backend, device, metric, lam):
    """fp32 gradients of 3e37 along 64 output channels: their sums overflow float32 (the torch backend's FFT turned
    a fiber of 2e38 into NaN, even at λ = 0, the identity); the result is finite and matches the float64
    reference."""
    g = make_grads([(64, 5, 3, 3)], torch.float64, 21, device)[0]
    g = (g / g.abs().max() * 3e37).float()
    ref = R.channel_directed(g.double().cpu(), metric, lam, 0)
    channel_directed_(params_with([g]), metric, lam, backend=backend)
    assert bool(torch.isfinite(g).all())
    assert rel_err(g.cpu(), ref) <= tolerance(torch.float32, lam)


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_linear_in_the_gradient(backend, device):
    """cd(a·g1 + b·g2) = a·cd(g1) + b·cd(g2): hence it commutes with DDP's averaging and GradScaler's scale."""
    g1, g2 = make_grads([(24, 6, 3, 3)] * 2, torch.float64, 11, device)
    mix = 0.7 * g1 - 2.5 * g2
    for g in (g1, g2, mix):
        channel_directed_(params_with([g]), "sobolev", 2.0, backend=backend)
    torch.testing.assert_close(mix, 0.7 * g1 - 2.5 * g2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_channels_last_and_strided_gradients(backend, device):
    """A channels-last gradient is worked on in its own storage (a permuted contiguous view); a gradient no
    permutation makes contiguous goes through a copy. Both equal the contiguous result."""
    base = make_grads([(32, 8, 3, 3), (16, 12, 3, 3)], torch.float32, 5, device)
    refs = [R.channel_directed(g.double().cpu(), "sobolev", 1.5) for g in base]
    cl = base[0].clone().contiguous(memory_format=torch.channels_last)
    strided = torch.empty(16, 24, 3, 3, device=device)[:, ::2].copy_(base[1])  # every other input channel
    ptrs = (cl.data_ptr(), strided.data_ptr())
    channel_directed_(params_with([cl, strided]), "sobolev", 1.5, backend=backend)
    assert (cl.data_ptr(), strided.data_ptr()) == ptrs
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(cl.cpu(), refs[0]) <= tolerance(torch.float32, 1.5)
    assert rel_err(strided.cpu(), refs[1]) <= tolerance(torch.float32, 1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_gradients_on_torch_ops(dtype):
    """float16/bfloat16 gradients run the torch backend in float32 (backend 'auto'); a kernel backend refuses them."""
    g = make_grads([(20, 4, 3, 3)], dtype, 9)[0]
    ref = R.channel_directed(g.double(), "sobolev", 1.0)
    channel_directed_(params_with([g]), "sobolev", 1.0)
    assert g.dtype == dtype and rel_err(g, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
    h = make_grads([(20, 4, 3, 3)], dtype, 9)[0]
    before = h.clone()
    with pytest.raises(TypeError, match=r"parameters\[0\]\.grad: backend 'cpu' takes float32 and float64"):
        channel_directed_(params_with([h]), "sobolev", 1.0, backend="cpu")
    assert torch.equal(h, before)


# ------------------------------------------------------------------------ use with any optimizer

def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                         nn.Conv2d(8, 12, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


def test_conv_weights_picks_every_conv_once():
    net = small_net()
    net.append(net[0])  # a shared module
    assert [tuple(w.shape) for w in conv_weights(net)] == [(8, 3, 3, 3), (8, 8, 1, 1), (12, 8, 3, 3)]
    net[2].weight.requires_grad_(False)
    assert len(conv_weights(net)) == 2


def test_sgd_step_on_channel_directed_gradients():
    """torch.optim.SGD after channel_directed_ moves the conv weights by −lr·(I − λΔ)⁻¹ g and the rest by −lr·g."""
    net = small_net()
    x, y = torch.randn(6, 3, 7, 7, generator=make_gen(1)), torch.tensor([0, 1, 2, 3, 4, 0])
    nn.functional.cross_entropy(net(x), y).backward()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    convs = {id(w) for w in conv_weights(net)}
    channel_directed_(conv_weights(net), "sobolev", 3.0)
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    for n, p in net.named_parameters():
        g = grads[n].double()
        want = R.channel_directed(g, "sobolev", 3.0) if id(p) in convs else g
        torch.testing.assert_close(p.detach().double(), before[n].double() - 0.1 * want, rtol=1e-5, atol=1e-6)


def test_fgsgd_step_on_channel_directed_gradients():
    """FGSGD takes the preconditioned gradients like any other: its 3×3 weights move and stay on their manifolds."""
    from fgsgd_cuda import FGSGD, codes as C, manifolds as M, param_groups
    net = small_net()
    opt = FGSGD(param_groups(net), lr=0.05, momentum=0.9)
    x, y = torch.randn(6, 3, 7, 7, generator=make_gen(2)), torch.tensor([0, 1, 2, 3, 4, 0])
    start = net[4].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        channel_directed_(conv_weights(net), "reweighted", 2.0)
        opt.step()
    w, codes = net[4].weight.detach(), opt.codes(net[4].weight)
    assert rel_err(w, start) > 1e-3
    comps = w.reshape(-1, 3, 3).double()
    for code in torch.unique(codes).tolist():
        fro = M.norms(comps[codes == code])[:, 0]
        want = M.table1_norms(C.manifold_of(code), 3)["frobenius"]
        assert float((fro - want).abs().max()) < 1e-5, C.manifold_of(code)


# ------------------------------------------------------------------------ bad input

def test_parameters_without_grad_are_skipped():
    a, b = nn.Parameter(torch.randn(4, 2, 3, 3)), nn.Parameter(torch.randn(4, 2))
    b.grad = torch.randn(4, 2)
    ref = R.channel_directed(b.grad.double(), "sobolev", 1.0)
    channel_directed_([a, b])
    assert a.grad is None and rel_err(b.grad, ref) <= tolerance(torch.float32, 1.0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(metric="h2"), ValueError, r"metric: expected one of \('sobolev', 'reweighted'\), got 'h2'"),
    (dict(lam=-0.1), ValueError, r"lam: must be finite and >= 0 for the sobolev metric, got -0.1"),
    (dict(lam=float("nan")), ValueError, r"lam: must be finite"),
    (dict(lam=float("inf"), metric="reweighted"), ValueError, r"lam: must be finite and > 0"),
    (dict(lam=0.0, metric="reweighted"), ValueError, r"> 0 for the reweighted metric, got 0.0"),
    (dict(lam=True), TypeError, r"lam: expected a number, got bool"),
    (dict(dim=-1), ValueError, r"dim: expected an int >= 0"),
    (dict(dim=2), ValueError, r"parameters\[1\]\.grad: has shape \(4, 2\), which has no axis dim=2"),
    (dict(backend="metal"), ValueError, r"backend: unknown backend 'metal'"),
])
def test_bad_options_change_nothing(kwargs, error, match):
    params = params_with(make_grads([(4, 2, 3, 3), (4, 2)], torch.float32, 4))
    before = [p.grad.clone() for p in params]
    with pytest.raises(error, match=match):
        channel_directed_(params, **kwargs)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_bad_gradient_changes_no_other_gradient():
    good = params_with(make_grads([(6, 2, 3, 3)], torch.float32, 6))[0]
    before = good.grad.clone()
    sparse = nn.Parameter(torch.zeros(5, 3))
    sparse.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(ValueError, match=r"parameters\[1\]\.grad: sparse gradients are not supported"):
        channel_directed_([good, sparse])
    assert torch.equal(good.grad, before)
    with pytest.raises(TypeError, match=r"parameters\[1\]: expected a tensor, got str"):
        channel_directed_([good, "weight"])
    assert torch.equal(good.grad, before)


def test_a_parameter_listed_twice_is_refused():
    """One launch maps every gradient in parallel: a gradient listed twice would be mapped in a race."""
    a, b = params_with(make_grads([(6, 2, 3, 3), (4, 2)], torch.float32, 7))
    before = [a.grad.clone(), b.grad.clone()]
    with pytest.raises(ValueError, match=r"parameters\[2\]\.grad: the same gradient as parameters\[0\]\.grad"):
        channel_directed_([a, b, a])
    assert torch.equal(a.grad, before[0]) and torch.equal(b.grad, before[1])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_an_expanded_gradient_is_refused_before_any_changes(backend):
    """A gradient whose entries share memory (an expanded tensor, stride 0) cannot be written in place: it is refused
    by name before any gradient is mapped (the kernels used to map the others, then the write-back raised)."""
    a, b = params_with(make_grads([(6, 4, 3, 3), (6, 4, 3, 3)], torch.float32, 8))
    b.grad = torch.randn(1, 4, 3, 3, generator=make_gen(9)).expand(6, 4, 3, 3)
    before = [a.grad.clone(), b.grad.clone()]
    with pytest.raises(ValueError, match=r"parameters\[1\]\.grad: is expanded \(stride 0 along axis 0"):
        channel_directed_([a, b], backend=backend)
    assert torch.equal(a.grad, before[0]) and torch.equal(b.grad, before[1])
    b.grad = torch.randn(6, 4, 3, 3, generator=make_gen(10))  # a gradient of its own: mapped as usual (a clone of
    before[1] = b.grad.clone()  # the expanded one is constant along the channels, which the map leaves as it is)
    channel_directed_([a, b], backend=backend)
    assert not torch.equal(a.grad, before[0]) and not torch.equal(b.grad, before[1])


@requires_cpu_kernels
@pytest.mark.parametrize("args,match", [
    (([torch.randn(3, 3)], 0, "sobolev", -1.0), "lam must be finite and >= 0"),
    (([torch.randn(3, 3)], 0, "l1", 1.0), "metric must be 'sobolev' or 'reweighted', got 'l1'"),
    (([torch.randn(3, 3), torch.randn(3, 3, dtype=torch.float64)], 0, "sobolev", 1.0),
     r"grads\[1\] differs in dtype or device from grads\[0\]"),
    (([torch.randn(3, 3), torch.randn(4, 3).t()], 0, "sobolev", 1.0), r"grads\[1\] must be contiguous"),
    (([torch.randn(3, 3), torch.randn(3)], 1, "sobolev", 1.0), r"dim 1 is out of range for grads\[1\] of shape \(3,\)"),
    (([torch.ones(3, 3, dtype=torch.int32)], 0, "sobolev", 1.0), "grads must be float32 or float64, got Int"),
    (([torch.randn(3, 3).to_sparse()], 0, "sobolev", 1.0), r"grads\[0\] must be dense, got a sparse tensor"),
])
def test_compiled_op_checks(args, match):
    before = [t.to_dense().clone() for t in args[0]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fgsgd.channel_directed_(*args)
    assert all(torch.equal(t.to_dense(), b) for t, b in zip(args[0], before))
