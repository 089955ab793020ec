"""Options changed in ``param_groups`` after the optimizer was built, and options of the optimizer itself
(``init_projx``) across load_state_dict, deepcopy and pickle.

torch's optimizers read a group's options at every step, so a changed lr, momentum, group_clip or stabilize takes
effect. Options that the step cannot honour are refused by name at the next step, before anything changes: they
were silently ignored (maximize=True on a manifold group descended) or failed with an unnamed error.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from conftest import make_gen, requires_cpu_kernels
from fgsgd_cuda import FGSGD, param_groups
from test_optimizer_contract import assert_same, batch, loss_of, small_cnn, snapshot


def stepped(backend="cpu", momentum=0.9, **kw):
    model = small_cnn(7)
    opt = FGSGD(param_groups(model, group_size=4, backend=backend), lr=0.05, momentum=momentum, **kw)
    loss_of(model, *batch(0)).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, *batch(1)).backward()
    return model, opt


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_cpu_kernels), "torch"])
@pytest.mark.parametrize("change,match", [
    (dict(maximize=True), r"param_groups\[0\] \(changed after the optimizer was built\): maximize: manifold groups "
                          r"minimize"),
    (dict(capturable=True), r"param_groups\[0\] \(changed after the optimizer was built\): capturable: must be the "
                            r"same bool for every param group"),
    # these had given an unnamed kernel error (cpu) or stepped silently (torch)
    (dict(nesterov=True, dampening=0.5), r"param_groups\[0\] \(changed after the optimizer was built\): nesterov: "
                                         r"needs momentum > 0 and dampening = 0"),
    (dict(weight_decay=1e-4), r"param_groups\[0\] \(changed after the optimizer was built\): weight_decay: "),
    (dict(group_clip=-1.0), r"param_groups\[0\] \(changed after the optimizer was built\): group_clip: must be a "
                            r"positive number"),
    (dict(stabilize=-2), r"stabilize: must be a non-negative integer"),
    (dict(backend="cuda9"), r"backend: unknown backend 'cuda9'"),
], ids=["maximize", "capturable", "nesterov-dampening", "weight-decay", "group-clip", "stabilize", "backend"])
def test_a_changed_option_the_step_cannot_honour_is_refused(backend, change, match):
    model, opt = stepped(backend)
    old = {k: opt.param_groups[0][k] for k in change}
    opt.param_groups[0].update(change)
    before = snapshot(list(model.parameters()), opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_same(snapshot(list(model.parameters()), opt), before)
    opt.param_groups[0].update(old)
    opt.step()


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_manifolds_given_to_a_euclidean_group_after_construction_are_refused(momentum):
    """(momentum 0: the Euclidean parameters have no state entry, and the refused step adds none)"""
    model, opt = stepped("torch", momentum=momentum)
    opt.param_groups[1]["manifolds"] = ["sphere"]
    before = snapshot(list(model.parameters()), opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]: has no manifold state \(codes\), but "
                                         r"its group now has manifolds=\['sphere'\]"):
        opt.step()
    assert_same(snapshot(list(model.parameters()), opt), before)


def test_changed_lr_momentum_and_group_clip_take_effect():
    """The options a step reads: the same step as an optimizer built with the new values."""
    m1, o1 = stepped("torch")
    m2, o2 = stepped("torch")
    o1.param_groups[0].update(lr=0.2, group_clip=0.3)
    m3 = small_cnn(7)
    o3 = FGSGD(param_groups(m3, group_size=4, backend="torch"), lr=0.05, momentum=0.9)
    o3.load_state_dict(o2.state_dict())
    m3.load_state_dict(m2.state_dict())
    o3.param_groups[0].update(lr=0.2, group_clip=0.3)
    for p, q in zip(m1.parameters(), m3.parameters()):
        q.grad = p.grad.clone()
    o1.step()
    o3.step()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    o2.step()
    assert not torch.equal(m1[0].weight, m2[0].weight)


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy", "pickle"])
def test_init_projx_false_survives(how):
    """FGSGD(..., init_projx=False) leaves the weights of groups added later where they are; loading a state_dict,
    deepcopy and pickle kept it False (load_state_dict turned it back on: bounds.py relies on it)."""
    gen = make_gen(11)
    a, b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
    opt = FGSGD([{"params": [a.weight], "manifolds": ["sphere"]}], lr=0.1, init_projx=False)
    if how == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
        target = b.weight
    else:
        holder = nn.ModuleList([a, b])
        holder_copy, opt = (copy.deepcopy((holder, opt)) if how == "deepcopy"
                            else pickle.loads(pickle.dumps((holder, opt))))
        target = holder_copy[1].weight
    with torch.no_grad():
        target.copy_(torch.randn(target.shape, generator=gen) * 3)
    before = target.detach().clone()
    opt.add_param_group({"params": [target], "manifolds": ["sphere"]})
    assert torch.equal(target, before)
