"""FGSGD(capturable=True): step counts on the device, a tensor lr, GradScaler's scale and inf flag read by the
step (no host synchronisation), against the eager optimizer bit for bit. CPU here; tests/test_cuda_step.py
captures the same step in a CUDA graph on a GPU."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_gen, requires_cpu_kernels
from fgsgd_cuda import FGSGD, param_groups

pytestmark = requires_cpu_kernels


def model_of(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 80, 1),
                         nn.Flatten(), nn.Linear(80, 5))


def make(capturable, seed=0, lr=0.05, row_view=True, **kw):
    """A model and its FGSGD; the Euclidean group runs torch's fused SGD in both modes (a capturable step
    always does, and fused and foreach SGD differ in the last bit)."""
    model = model_of(seed)
    kw.setdefault("fused", True)
    opts = dict(group_size=4, stabilize=3, group_clip=kw.pop("group_clip", 0.5))
    opt = FGSGD(param_groups(model, row_view=row_view, **opts), lr=lr, momentum=0.9, capturable=capturable, **kw)
    return model, opt


def grads_for(model, k, scale=1.0):
    gen = make_gen(100 + k)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def manifold_params(opt):
    return [p for g in opt.param_groups if g["manifolds"] for p in g["params"]]


def assert_same(m1, o1, m2, o2):
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(manifold_params(o1), manifold_params(o2)):
        s1, s2 = o1.state[a], o2.state[b]
        assert torch.equal(s1["momentum_buffer"], s2["momentum_buffer"])
        assert float(s1["step"]) == float(s2["step"])


def follow_eager(nesterov, **kw):
    """8 steps of a capturable and an eager FGSGD (``kw``: more options of both) from the same gradients."""
    m1, o1 = make(False, nesterov=nesterov, **kw)
    m2, o2 = make(True, nesterov=nesterov, **kw)
    for k in range(8):
        for m in (m1, m2):
            grads_for(m, k)
            if k == 4:
                m[2].weight.grad = None
        o1.step()
        o2.step()
    return m1, o1, m2, o2


@pytest.mark.parametrize("nesterov", [False, True])
def test_capturable_steps_follow_the_eager_steps(nesterov):
    """8 steps over stabilize=3 boundaries, group_clip, the row view, a parameter without a gradient in one step:
    the same bits as the eager optimizer; the counts are float32 tensors on the parameters' device."""
    m1, o1, m2, o2 = follow_eager(nesterov)
    assert_same(m1, o1, m2, o2)
    counts = [o2.state[p]["step"] for p in manifold_params(o2)]
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.float32 for c in counts)
    assert [float(c) for c in counts] == [8.0, 7.0, 8.0, 8.0]
    assert [o1.state[p]["step"] for p in manifold_params(o1)] == [8, 7, 8, 8]


def test_tensor_lr_changed_in_place():
    """A tensor lr that an LR scheduler changes in place (as a replayed CUDA graph would see it) against float lrs."""
    m1, o1 = make(False, lr=0.1)
    m2, o2 = make(True, lr=torch.tensor(0.1))
    sched = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    lrs = []
    for k in range(6):
        lrs.append(float(o2.param_groups[0]["lr"]))
        for g in o1.param_groups:
            g["lr"] = lrs[-1]
        for m in (m1, m2):
            grads_for(m, k)
        o1.step()
        o2.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-6)
    assert isinstance(o2.param_groups[0]["lr"], torch.Tensor)
    assert_same(m1, o1, m2, o2)


def _scaled_step(opt, model, scaler, k, inf=False, monkeypatch=None):
    """Gradients of step k times the scale (inf in one entry), then GradScaler's step and update; with
    ``monkeypatch`` those two must not call Tensor.item (a host synchronisation)."""
    grads_for(model, k, scale=float(scaler.get_scale()))
    if inf:
        model[2].weight.grad[0, 0, 0, 0] = float("inf")
    if monkeypatch is not None:
        def no_item(t):
            raise AssertionError("the step synchronised with the host (Tensor.item)")
        monkeypatch.setattr(torch.Tensor, "item", no_item)
    scaler.step(opt)
    scaler.update()
    if monkeypatch is not None:
        monkeypatch.undo()


@pytest.mark.parametrize("group_clip", [None, 0.5], ids=["unscaled-in-kernel", "group-clip-unscaled-first"])
def test_grad_scaler_unscales_and_skips_on_the_device(monkeypatch, group_clip):
    """Under torch.amp.GradScaler a capturable FGSGD unscales the gradients itself and skips an inf step without a
    host synchronisation (GradScaler.step and update never call Tensor.item); a run whose very first step
    overflows then matches a run without that step, bit for bit; a later inf step changes nothing. Without
    group_clip the kernels read the scaled gradients (they stay scaled), with it they are unscaled first."""
    m1, o1 = make(True, group_clip=group_clip)
    m2, o2 = make(True, group_clip=group_clip)
    s1 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    s1.scale(torch.ones(()))  # makes the scale tensor
    _scaled_step(o1, m1, s1, 0, inf=True, monkeypatch=monkeypatch)
    assert float(s1.get_scale()) == 2.0 ** 11
    for p in manifold_params(o1):
        assert float(o1.state[p]["step"]) == 0.0
    for k in range(1, 5):
        _scaled_step(o1, m1, s1, k, monkeypatch=monkeypatch)
        grads_for(m2, k)
        o2.step()
        w1, w2 = m1[0].weight, m2[0].weight
        assert torch.equal(w1.grad, w2.grad * (2.0 ** 11 if group_clip is None else 1.0))
    assert_same(m1, o1, m2, o2)
    before = [p.detach().clone() for p in m1.parameters()]
    states = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in o1.state[p].items()}
              for p in m1.parameters()}
    _scaled_step(o1, m1, s1, 9, inf=True, monkeypatch=monkeypatch)
    for p, b in zip(m1.parameters(), before):
        assert torch.equal(p, b)
        for key, v in states[id(p)].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(o1.state[p][key], v), key


def test_check_finite_skips_on_the_device():
    """capturable with check_finite: an inf gradient skips the step (nothing changes, counts stay) instead of
    raising (which would need the host); the next finite step goes on as if the bad one never came."""
    m1, o1 = make(True, check_finite=True)
    m2, o2 = make(True, check_finite=False)
    grads_for(m1, 0)
    m1[0].weight.grad[1, 1, 1, 1] = float("nan")
    o1.step()
    for k in range(1, 4):
        for m in (m1, m2):
            grads_for(m, k)
        o1.step()
        o2.step()
    assert_same(m1, o1, m2, o2)


def test_state_dict_between_capturable_and_eager():
    """A checkpoint of an eager optimizer resumes in a capturable one (counts become tensors) and back, exactly."""
    m1, o1 = make(False)
    for k in range(4):
        grads_for(m1, k)
        o1.step()
    m2, o2 = make(True)
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # a state_dict holds the optimizer's own tensors
    assert all(isinstance(o2.state[p]["step"], torch.Tensor) for p in manifold_params(o2))
    m3, o3 = make(False)
    m3.load_state_dict(m1.state_dict())
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))
    assert all(o3.state[p]["step"] == 4 for p in manifold_params(o3))
    for k in range(4, 7):
        for m in (m1, m2, m3):
            grads_for(m, k)
        for o in (o1, o2, o3):
            o.step()
    assert_same(m1, o1, m2, o2)
    assert_same(m1, o1, m3, o3)


def test_skipped_first_step_resumes_in_an_eager_optimizer():
    """A capturable optimizer whose first step was skipped (an inf gradient: GradScaler's usual start) has made
    momentum buffers it never wrote: they are zeros (a checkpoint holds no stale memory), and an eager optimizer
    that loads the checkpoint takes its first step as one (dampening τ: m = g, not (1−τ)·g), as a run that never
    saw the bad step."""
    m1, o1 = make(True, dampening=0.25)
    grads_for(m1, 0)
    m1[0].weight.grad[0, 0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in m1.parameters()]
    o1.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m1.parameters()))
    for p in manifold_params(o1):
        assert float(o1.state[p]["step"]) == 0 and torch.count_nonzero(o1.state[p]["momentum_buffer"]) == 0
    m2, o2 = make(False, dampening=0.25)
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    m3, o3 = make(False, dampening=0.25)  # never saw the bad step
    for k in range(1, 4):
        for m in (m2, m3):
            grads_for(m, k)
        o2.step()
        o3.step()
    for p in manifold_params(o2):
        assert o2.state[p]["step"] == 3
    # the manifold weights (filters and rows); the Euclidean group's buffers start at zero in a capturable step
    for a, b in zip(manifold_params(o2), manifold_params(o3)):
        assert torch.equal(a, b) and torch.equal(o2.state[a]["momentum_buffer"], o3.state[b]["momentum_buffer"])


def test_capturable_errors_name_the_problem():
    model = model_of()
    with pytest.raises(ValueError, match=r"capturable=True needs kernels that read the step's controls"):
        FGSGD(param_groups(model, backend="torch"), lr=0.1, capturable=True)
    with pytest.raises(ValueError, match=r"lr: a tensor learning rate needs capturable=True"):
        FGSGD(param_groups(model), lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"lr: a tensor learning rate must be a one-element"):
        FGSGD(param_groups(model), lr=torch.tensor([0.1, 0.2]), capturable=True)
    with pytest.raises(ValueError, match=r"capturable: must be the same bool for every param group"):
        FGSGD(param_groups(model, capturable=True), lr=0.1)
    groups = param_groups(model)
    groups[-1]["foreach"] = True
    with pytest.raises(ValueError, match=r"capturable: Euclidean groups run torch's fused SGD"):
        FGSGD(groups, lr=0.1, capturable=True)
    before = [p.detach().clone() for p in model.parameters()]
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_grad_scale_set_by_hand_on_an_eager_optimizer():
    """grad_scale / found_inf set as attributes on a non-capturable FGSGD (GradScaler does not, but a user may):
    the gradients are unscaled in place first and found_inf is read on the host."""
    m1, o1 = make(False, group_clip=None)
    m2, o2 = make(False, group_clip=None)
    grads_for(m1, 0, scale=64.0)
    grads_for(m2, 0)
    o1.grad_scale, o1.found_inf = torch.tensor(64.0), torch.zeros(())
    o1.step()
    o2.step()
    assert_same(m1, o1, m2, o2)
    before = [p.detach().clone() for p in m1.parameters()]
    o1.found_inf = torch.ones(())
    o1.step()
    assert all(torch.equal(p, b) for p, b in zip(m1.parameters(), before))


def test_capturable_euclidean_group_maximizes_like_the_eager_one():
    """maximize=True on the Euclidean group (torch's fused SGD reads it in both modes): the capturable and the eager
    optimizer give the same bits over 4 steps, and the first step moves a Euclidean parameter up its gradient."""
    runs = []
    for capturable in (False, True):
        model = model_of(0)
        groups = param_groups(model, row_view=True, group_size=4, stabilize=3)
        groups[-1]["maximize"] = True
        opt = FGSGD(groups, lr=0.05, momentum=0.9, capturable=capturable, fused=True)
        bias = model[-1].bias
        before = bias.detach().clone()
        for k in range(4):
            grads_for(model, k)
            if k == 0:
                g = bias.grad.clone()
            opt.step()
            if k == 0:
                torch.testing.assert_close(bias.detach() - before, 0.05 * g)
        runs.append(model)
    for (n, a), b in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert torch.equal(a, b), n


def test_momentum_switched_on_later_starts_its_buffer_as_a_first_step():
    """Momentum (with dampening) set in param_groups after some steps: the manifold weights' new buffers start as
    m = s_g·ξ, a first step, as the eager optimizer and torch.optim.SGD start a missing buffer. The capturable step
    told a first step by the count alone, so it took μ·0 + (1 − τ)·s_g·ξ (0.2 off after two more steps with
    τ = 0.5); the host's flag of new buffers now forces the first step at any count (csrc step_control.h)."""
    runs = []
    for capturable in (False, True):
        model = model_of()
        opt = FGSGD(param_groups(model, group_size=4, stabilize=3), lr=0.05, momentum=0.0, capturable=capturable,
                    fused=True)
        for k in range(4):
            if k == 2:
                for g in opt.param_groups:
                    g.update(momentum=0.9, dampening=0.5)
            grads_for(model, k)
            opt.step()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    for a, b in zip(manifold_params(o1), manifold_params(o2)):
        assert torch.equal(o1.state[a]["momentum_buffer"], o2.state[b]["momentum_buffer"])
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        if any(a is p for p in manifold_params(o1)):
            assert torch.equal(a, b), n
