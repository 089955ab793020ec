"""A whole model's step is a constant number of backend calls, independent of the depth (DESIGN.md §2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import requires_cpu_kernels
from fgsgd_cuda import FGSGD, dispatch, param_groups


def cnn(depth: int, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def count_calls(monkeypatch, model, groups, x, steps):
    """Per step, the calls of step_ and tangent_sqnorm on the CPU's auto backend and on the torch backend,
    as {(backend, op): count} (calls that happened only)."""
    counts = {}
    for backend in ("auto", "torch"):
        impl = dispatch.get(backend, torch.device("cpu"))
        for name in ("step_", "tangent_sqnorm"):
            original = getattr(impl, name)

            def counted(*args, _key=(impl.name, name), _original=original, **kwargs):
                counts[_key] = counts.get(_key, 0) + 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(impl, name, counted)
    opt = FGSGD(groups, lr=0.1, momentum=0.9)
    per_step = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        before = dict(counts)
        opt.step()
        per_step.append({k: v - before.get(k, 0) for k, v in counts.items() if v - before.get(k, 0)})
    monkeypatch.undo()
    return opt, per_step


def filter_calls(monkeypatch, depth, **options):
    model = cnn(depth)
    opt, per_step = count_calls(monkeypatch, model, param_groups(model, **options), torch.randn(2, 3, 6, 6), 3)
    assert sum(1 for p in opt.param_groups[0]["params"]) == depth
    return per_step


@requires_cpu_kernels
@pytest.mark.parametrize("options", [dict(group_size=4), dict(group_size=4, group_clip=1.0, stabilize=2)],
                         ids=["plain", "clip-stabilize"])
def test_step_calls_do_not_grow_with_depth(monkeypatch, options):
    shallow = filter_calls(monkeypatch, 4, **options)
    deep = filter_calls(monkeypatch, 16, **options)
    assert shallow == deep, f"4 layers: {shallow}, 16 layers: {deep}"
    # one component shape (3×3), so one fused call per step (and tangent_sqnorm once with group_clip)
    expected = {("cpu", "step_"): 1}
    if options.get("group_clip"):
        expected[("cpu", "tangent_sqnorm")] = 1
    assert all(s == expected for s in deep), deep


def rows_cnn(depth: int, width: int = 80, seed=0) -> nn.Sequential:
    """A 3×3 stem, then 1×1 convs of `width` > 64 channels: with row_view, rows too long for the small path."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


@requires_cpu_kernels
@pytest.mark.parametrize("group_clip", [None, 1.0], ids=["plain", "clip"])
def test_row_view_calls_do_not_grow_with_depth(monkeypatch, group_clip):
    """row_view: the 1×1 convs and the linear weight (80×1 rows) run on the compiled backend in one call per
    step, whatever the depth; nothing goes to the per-tensor torch backend."""
    def calls(depth):
        model = rows_cnn(depth)
        groups = param_groups(model, row_view=True, group_size=4, group_clip=group_clip)
        opt, per_step = count_calls(monkeypatch, model, groups, torch.randn(2, 3, 5, 5), 2)
        assert len(opt.param_groups[1]["params"]) == depth + 1
        return per_step

    shallow, deep = calls(2), calls(8)
    assert shallow == deep, f"2 layers: {shallow}, 8 layers: {deep}"
    # the 3×3 group and the row group: one fused call each per step
    expected = {("cpu", "step_"): 2}
    if group_clip:
        expected[("cpu", "tangent_sqnorm")] = 2
    assert all(s == expected for s in deep), deep
