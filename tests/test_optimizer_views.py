"""The optimizer keeps the component views of weights and momentum buffers across steps
(functional.cached_view); a weight whose storage is replaced (``p.data = ...``) must get a new view. A k×k conv
weight needs none (the ops take it as (..., A, B)); the row view's n×1 rows of a 1×1 conv do."""
from __future__ import annotations

import torch
from torch import nn

from fgsgd_cuda import FGSGD, param_groups


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 1))


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def test_replaced_storage_is_stepped():
    model = _model()
    opt = FGSGD(param_groups(model, group_size=4, row_view=True), lr=0.1, momentum=0.9, backend="torch")
    for s in range(2):
        _grads(model, s)
        opt.step()
    for w in (model[0].weight, model[4].weight):  # a 3×3 conv (no view), the rows of a 1×1 conv (a cached view)
        _replace_and_step(model, opt, w)


def _replace_and_step(model, opt, w):
    old = w.data
    old_copy = old.clone()
    w.data = old.clone()                  # same values, new storage
    _grads(model, 5)
    opt.step()
    assert torch.equal(old, old_copy)     # the old storage was not written through a stale view
    assert not torch.equal(w.detach(), old_copy)


def test_cached_views_give_the_same_steps_as_fresh_views():
    """Two optimizers from the same start: one whose view cache is cleared before every step."""
    a, b = _model(), _model()
    oa = FGSGD(param_groups(a, group_size=4, row_view=True), lr=0.1, momentum=0.9, nesterov=True, backend="torch")
    ob = FGSGD(param_groups(b, group_size=4, row_view=True), lr=0.1, momentum=0.9, nesterov=True, backend="torch")
    for s in range(4):
        _grads(a, s)
        _grads(b, s)
        oa.step()
        ob._view_cache.clear()
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert oa._view_cache                 # the cache is in use (the rows of the 1×1 conv)
    assert not any(v._base is p for p in (a[0].weight, a[2].weight) for v in oa._view_cache.values())
