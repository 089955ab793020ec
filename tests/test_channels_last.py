"""Channels-last (and other non-contiguous) manifold weights. The ``cpu``, ``cuda`` and ``triton`` backends step a
channels-last conv weight where it is (csrc/cpu/interleaved.h: its filters go through tiles in cache;
csrc/cuda/staged.cuh and triton_kernels/codegen.py Frame.interleaved: a block's threads read their filters coalesced
as they lie); everywhere else (the torch backend, long kh×1 filters, which step as rows), and for projections and
rescales, FGSGD works through a contiguous copy written back in the weight's own layout (functional.staged /
unstage). Either way a
step gives what the same weight gets when contiguous, the weight keeps its layout, and a refused step changes
nothing.

The contiguous path is checked against the float64 reference elsewhere (test_optimizer_reference.py; the CPU
kernels' channels-last tiles in test_cpu_channels_last.py, the CUDA block code's in test_cuda_emulated.py); here the
two layouts are compared on every backend, with real gradients from a backward pass (autograd gives a channels-last
weight channels-last gradients): bit for bit through a copy, and to a few units in the last place where the kernels
read the weight in place: on the ``cpu`` backend the SIMD blocks group components differently in the tiles (the math
has branches uniform over a block's lanes: csrc/fgsgd/small_linalg.h); on ``cuda`` and ``triton`` the same math is
compiled into another kernel (the layout is a compile-time choice), where the compiler may contract other products
into FMAs (the CUDA block code on the emulator of test_cuda_emulated.py, and the Triton kernels under the
interpreter, give equal bits)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import CPU_TORCH_CUDA, compiled_backends, requires_cpu_kernels
from fgsgd_cuda import FGSGD, param_groups

CL = torch.channels_last


class Net(nn.Module):
    """3×3, 5×5 and 3×1 filters (kh×kw components), 65×1 filters (n×1 rows: channels-last, they go through a copy on
    every backend), a 1×1 conv and a transposed (non-contiguous) matrix (rows)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(5, 12, 3, padding=1), nn.Tanh(), nn.Conv2d(12, 8, 5, padding=2), nn.Tanh(),
                                   nn.Conv2d(8, 16, (3, 1), padding=(1, 0)), nn.Tanh(),
                                   nn.Conv2d(16, 2, (65, 1), padding=(32, 0)), nn.Tanh(), nn.Conv2d(2, 6, 1))
        self.head_t = nn.Parameter(torch.randn(10, 6 * 7 * 7).t())  # (294, 10) stored transposed: not contiguous

    def forward(self, x):
        return self.convs(x).flatten(1) @ self.head_t


def make(dtype, device, channels_last):
    torch.manual_seed(0)
    net = Net().to(device=device, dtype=dtype)
    if channels_last:
        net.convs.to(memory_format=CL)
    return net


def backward(net, seed):
    gen = torch.Generator().manual_seed(seed)
    p0 = next(net.parameters())
    x = torch.randn(3, 5, 7, 7, generator=gen, dtype=torch.float64).to(device=p0.device, dtype=p0.dtype)
    if net.convs[0].weight.is_contiguous(memory_format=CL):
        x = x.contiguous(memory_format=CL)
    net.zero_grad(set_to_none=True)
    w = torch.randn(3, 10, generator=gen, dtype=torch.float64).to(x)
    (net(x) * w).sum().backward()


def same_grads(src, dst):
    """dst's gradients: src's values in the layout of dst's weights (convolutions in the two layouts round
    differently, so the steps are compared on the same gradients)."""
    for a, b in zip(src.parameters(), dst.parameters()):
        b.grad = torch.empty_like(b).copy_(a.grad)


def optimizer(net, backend, capturable=False, **options):
    groups = param_groups(net, row_view=True, group_size=4, backend=backend, **options)
    groups[1]["params"].append(net.head_t)  # a transposed matrix's rows (param_groups left it Euclidean)
    groups[2]["params"] = [p for p in groups[2]["params"] if p is not net.head_t]
    return FGSGD(groups, lr=0.05, momentum=0.9, nesterov=True, stabilize=2, capturable=capturable)


def filters(net):
    """The weights of the convolutions with kernels larger than 1×1 (kh×kw components, or 65×1 rows)."""
    return [m.weight for m in net.convs if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


def without_long_rows(net):
    """net without its 65×1 convolution (a 1×1 one takes its place), whose projection at construction runs on the
    torch backend (long rows: ops.projx_ takes A·B <= 64), which copies its results in, and which a step also
    copies when channels-last (the kernels stream rows contiguous)."""
    w = net.convs[6].weight
    net.convs[6] = nn.Conv2d(16, 2, 1).to(device=w.device, dtype=w.dtype)
    return net


def assert_same(a, b, backend):
    """Equal bits, or on the backends that read channels-last filters in place equal to a few units in the last
    place."""
    if backend not in ("cpu", "cuda", "triton"):
        assert torch.equal(a, b)
        return
    ulp = torch.finfo(a.dtype).eps
    torch.testing.assert_close(a, b, rtol=8 * ulp, atol=8 * ulp)


OPTIONS = [pytest.param({}, id="plain"), pytest.param({"group_clip": 0.3}, id="group_clip"),
           pytest.param({"capturable": True}, id="capturable")]


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("options", OPTIONS)
def test_channels_last_steps_like_contiguous(backend, device, dtype, options):
    if options.get("capturable") and backend == "torch":
        pytest.skip("capturable needs the compiled or Triton kernels")
    nets = [make(dtype, device, cl) for cl in (False, True)]
    assert all(w.is_contiguous() for w in filters(nets[0]))
    assert not any(w.is_contiguous() for w in filters(nets[1])) and not nets[1].head_t.is_contiguous()
    opts = [optimizer(n, backend, **options) for n in nets]
    for w0, w1 in zip(nets[0].parameters(), nets[1].parameters()):  # the projection at construction
        assert torch.equal(w0, w1)
    backward(nets[1], 0)  # autograd gives a channels-last weight channels-last gradients
    assert all(w.grad.is_contiguous(memory_format=CL) for w in filters(nets[1]))
    for s in range(5):
        backward(nets[0], s)
        same_grads(nets[0], nets[1])
        assert all(w.grad.is_contiguous(memory_format=CL) for w in filters(nets[1]))
        for o in opts:
            o.step()
        if s == 2:  # a rescale R between steps (renormalisation), on both
            for o, n in zip(opts, nets):
                gen = torch.Generator().manual_seed(9)
                o.set_rescale({w: 0.5 + torch.rand(o.num_components(w), generator=gen, dtype=torch.float64)
                               for w in filters(n)})
    for w0, w1 in zip(nets[0].parameters(), nets[1].parameters()):
        assert_same(w0, w1, backend)
        assert_same(opts[0].state[w0]["momentum_buffer"], opts[1].state[w1]["momentum_buffer"], backend)
    for w0, w in zip(filters(nets[0]), filters(nets[1])):  # w keeps its layout; its buffer is contiguous
        assert w.is_contiguous(memory_format=CL)
        assert opts[1].state[w]["momentum_buffer"].is_contiguous()
        assert_same(opts[1].components(w), opts[0].components(w0), backend)
    assert not nets[1].head_t.is_contiguous()


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_refused_step_leaves_channels_last_weights_alone(backend, device):
    """A gradient with a nan is refused (check_finite): weights keep their bits and layout, buffers their values."""
    net = make(torch.float32, device, True)
    opt = optimizer(net, backend)
    backward(net, 0)
    opt.step()
    before = [w.detach().clone(memory_format=torch.preserve_format) for w in net.parameters()]
    bufs = [opt.state[w]["momentum_buffer"].clone() for w in filters(net)]
    backward(net, 1)
    net.convs[2].weight.grad[1, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        opt.step()
    for w, b in zip(net.parameters(), before):
        assert torch.equal(w, b) and w.stride() == b.stride()
    for w, b in zip(filters(net), bufs):
        assert torch.equal(opt.state[w]["momentum_buffer"], b)


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_resume_into_channels_last_weights(backend, device):
    """A checkpoint of a contiguous run, loaded into a channels-last model and its optimizer, goes on with the
    same bits as the contiguous run."""
    a = make(torch.float32, device, False)
    oa = optimizer(a, backend)
    for s in range(2):
        backward(a, s)
        oa.step()
    b = make(torch.float32, device, True)
    ob = optimizer(b, backend)
    with torch.no_grad():
        for wa, wb in zip(a.parameters(), b.parameters()):
            wb.copy_(wa)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as from a file: no tensor shared with oa
    for s in range(2, 4):
        backward(a, s)
        same_grads(a, b)
        oa.step()
        ob.step()
    for wa, wb in zip(a.parameters(), b.parameters()):
        assert_same(wa, wb, backend)
    assert all(w.is_contiguous(memory_format=CL) for w in filters(b))


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
def test_cpu_copies_are_kept_across_steps(backend, device):
    """On the CPU the contiguous copies of a non-contiguous weight and its gradient are made once and reused (a
    fresh large tensor costs its page faults every step); on CUDA they are temporaries (nothing held). The cpu
    backend makes none for the channels-last filters, which it steps where they are."""
    net = make(torch.float32, device, True)
    opt = optimizer(net, backend)
    ptrs = []
    for s in range(2):
        backward(net, s)
        opt.step()
        ptrs.append({k: v.data_ptr() for k, v in opt._staging.items()})
    if device == "cpu":
        # a weight and a gradient copy of the transposed matrix, and of the four filter banks, of which the cpu
        # backend steps the kh×kw ones where they are (not the 65×1 rows)
        staged = 1 + (1 if backend == "cpu" else len(filters(net)))
        assert len(ptrs[0]) == 2 * staged and ptrs[0] == ptrs[1]
    else:
        assert not ptrs[0] and not ptrs[1]


@requires_cpu_kernels
def test_contiguous_weights_are_worked_on_in_place(monkeypatch):
    """No copy of a contiguous weight or gradient at construction or in a step (staged returns the tensor itself;
    the compiled kernels work in place, where the torch backend copies its results in)."""
    net = without_long_rows(make(torch.float32, "cpu", False))
    net.head_t = nn.Parameter(net.head_t.detach().contiguous())
    copies = []
    copy_ = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: (copies.append(self.shape),
                                                                         copy_(self, src, *a, **k))[1])
    opt = optimizer(net, "cpu")
    for s in range(2):
        backward(net, s)
        opt.step()
    assert copies == [] and opt._staging == {}


@pytest.mark.parametrize("backend,device", compiled_backends())
def test_compiled_backends_step_channels_last_filters_in_place(monkeypatch, backend, device):
    """The cpu and cuda backends (and triton: tests/test_triton.py) copy no channels-last filter bank or its gradient
    in a step, plain, with group_clip (tangent_sqnorm reads them too) and capturable."""
    for options in ({}, {"group_clip": 0.3}, {"capturable": True}):
        net = without_long_rows(make(torch.float32, device, True))
        net.head_t = nn.Parameter(net.head_t.detach().contiguous())
        opt = optimizer(net, backend, **options)
        copies = []
        copy_ = torch.Tensor.copy_
        monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: (copies.append(self.shape),
                                                                             copy_(self, src, *a, **k))[1])
        for s in range(2):
            backward(net, s)
            opt.step()
        monkeypatch.undo()
        assert copies == [] and opt._staging == {}
        assert all(w.is_contiguous(memory_format=CL) for w in filters(net))
