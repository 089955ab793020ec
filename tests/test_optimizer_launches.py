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


def count_calls(monkeypatch, depth, **options):
    impl = dispatch.get("auto", torch.device("cpu"))
    counts = {"step_": 0, "tangent_sqnorm": 0}
    for name in counts:
        original = getattr(impl, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(impl, name, counted)
    model = cnn(depth)
    opt = FGSGD(param_groups(model, **options), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 6, 6)
    per_step = []
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        before = dict(counts)
        opt.step()
        per_step.append({k: counts[k] - before[k] for k in counts})
    monkeypatch.undo()
    assert sum(1 for p in opt.param_groups[0]["params"]) == depth
    return per_step


@requires_cpu_kernels
@pytest.mark.parametrize("options", [dict(group_size=4), dict(group_size=4, group_clip=1.0, stabilize=2)],
                         ids=["plain", "clip-stabilize"])
def test_step_calls_do_not_grow_with_depth(monkeypatch, options):
    shallow = count_calls(monkeypatch, 4, **options)
    deep = count_calls(monkeypatch, 16, **options)
    assert shallow == deep, f"4 layers: {shallow}, 16 layers: {deep}"
    # one component shape (3×3), so one fused call per step
    assert all(s["step_"] == 1 for s in deep)
    expected_norms = 1 if options.get("group_clip") else 0
    assert all(s["tangent_sqnorm"] == expected_norms for s in deep)
