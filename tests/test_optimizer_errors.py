"""Bad configurations: a clear error naming the option, and nothing changed.

Every case is tried three ways: as the only group of a new optimizer, as the last group after a good
one (the good group's weights must not have been projected either), and through add_param_group on a
working optimizer (which must keep its groups and state exactly).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fgsgd_cuda import FGSGD, param_groups


def model(seed=0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict(dict(
        a=nn.Conv2d(3, 6, 3), b=nn.Conv2d(6, 4, 3), wide=nn.Conv2d(3, 4, (1, 3)), fc=nn.Linear(8, 5),
        c=nn.Conv2d(4, 4, 3),
    ))


def weights(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def assert_weights_unchanged(m, before):
    for n, p in m.named_parameters():
        assert torch.allclose(p, before[n], rtol=0, atol=0, equal_nan=True), f"{n} changed"  # bitwise, nan == nan


def state_copy(opt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for p, st in opt.state.items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for key in a[k]:
            x, y = a[k][key], b[k][key]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


# (name, group builder from the model, exception type, message regex)
CASES = [
    ("unknown-manifold", lambda m: {"params": [m.b.weight], "manifolds": ["sphere", "hyperbolic"]},
     ValueError, r"manifold.*'hyperbolic'"),
    ("unknown-retraction", lambda m: {"params": [m.b.weight], "manifolds": ["stiefel"],
                                      "retraction": {"stiefel": "svd"}},
     ValueError, r"retraction.*'svd'"),
    ("retraction-of-unused-manifold", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"],
                                                 "retraction": {"oblique": "polar"}},
     ValueError, r"retraction.*'polar'"),
    ("retraction-unknown-manifold", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"],
                                               "retraction": {"torus": "exp"}},
     ValueError, r"retraction.*'torus'"),
    ("group_size-0", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "group_size": 0},
     ValueError, r"group_size"),
    ("group_size-negative", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "group_size": -3},
     ValueError, r"group_size"),
    ("group_size-float", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "group_size": 2.5},
     ValueError, r"group_size"),
    ("num_groups-0", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "num_groups": 0},
     ValueError, r"num_groups"),
    ("weight-decay-on-manifold", lambda m: {"params": [m.b.weight], "manifolds": ["sphere", "euclidean"],
                                            "weight_decay": 1e-4},
     ValueError, r"weight_decay.*manifold"),
    ("stiefel-A<B", lambda m: {"params": [m.b.weight, m.wide.weight], "manifolds": ["stiefel"]},
     ValueError, r"\['params'\]\[1\].*stiefel.*A >= B"),
    ("stiefel-row-view", lambda m: {"params": [m.b.weight, m.fc.weight], "manifolds": ["sphere", "stiefel"]},
     ValueError, r"\['params'\]\[1\].*row view.*stiefel"),
    ("unknown-collection", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "collection": "PX"},
     ValueError, r"collection.*'PX'"),
    ("unknown-selection", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "selection": "greedy"},
     ValueError, r"selection.*'greedy'"),
    ("unknown-assign", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "assign": "alternate"},
     ValueError, r"assign.*'alternate'"),
    ("unknown-backend", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "backend": "opencl"},
     ValueError, r"backend.*'opencl'"),
    ("unavailable-backend", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "backend": "cuda"},
     RuntimeError, r"backend.*'cuda'"),
    ("unknown-backend-euclidean", lambda m: {"params": [m.b.bias], "backend": "opencl"},
     ValueError, r"backend.*'opencl'"),
    ("int-param", lambda m: {"params": [nn.Parameter(torch.ones(4, 4, 3, 3, dtype=torch.int32), requires_grad=False)],
                             "manifolds": ["sphere"]},
     TypeError, r"float32 or float64.*int32"),
    ("bfloat16-param", lambda m: {"params": [nn.Parameter(torch.randn(4, 4, 3, 3).bfloat16())],
                                  "manifolds": ["sphere"]},
     TypeError, r"float32 or float64.*bfloat16"),
    ("non-finite-weight", lambda m: {"params": [m.b.weight, m.c.weight], "manifolds": ["sphere"]},
     ValueError, r"\['params'\]\[1\].*non-finite"),
    ("bias-as-manifold", lambda m: {"params": [m.b.bias], "manifolds": ["sphere"]},
     ValueError, r"at least 2 dimensions"),
    ("negative-lr", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "lr": -0.1},
     ValueError, r"lr"),
    ("nesterov-without-momentum", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "nesterov": True,
                                                   "momentum": 0.0},
     ValueError, r"nesterov"),
    ("group_clip-0", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "group_clip": 0.0},
     ValueError, r"group_clip"),
    ("stabilize-negative", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "stabilize": -1},
     ValueError, r"stabilize"),
    ("unknown-option", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "grouping": "PI"},
     TypeError, r"unknown options.*grouping"),
]


def prepare(name, m):
    if name == "non-finite-weight":
        with torch.no_grad():
            m.c.weight.view(-1)[3] = float("nan")


@pytest.mark.parametrize("name,build,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_configuration_changes_nothing(name, build, exc, match):
    # 1. the only group of a new optimizer
    m = model()
    prepare(name, m)
    before = weights(m)
    with pytest.raises(exc, match=match):
        FGSGD([build(m)], lr=0.1)
    assert_weights_unchanged(m, before)

    # 2. after a good manifold group: the good group's weights are not projected either
    with pytest.raises(exc, match=match):
        FGSGD([{"params": [m.a.weight], "manifolds": ["sphere", "stiefel"]}, build(m)], lr=0.1)
    assert_weights_unchanged(m, before)

    # 3. add_param_group on a working optimizer that has stepped
    opt = FGSGD([{"params": [m.a.weight], "manifolds": ["sphere", "oblique"], "group_clip": 1.0},
                 {"params": [m.a.bias]}], lr=0.1, momentum=0.9)
    m.a.weight.grad = torch.randn_like(m.a.weight)
    m.a.bias.grad = torch.randn_like(m.a.bias)
    opt.step()
    before = weights(m)
    groups_before = [dict(g) for g in opt.param_groups]
    state_before = state_copy(opt)
    with pytest.raises(exc, match=match):
        opt.add_param_group(build(m))
    assert_weights_unchanged(m, before)
    assert len(opt.param_groups) == 2
    assert all(g == gb for g, gb in zip(opt.param_groups, groups_before))
    assert_state_equal(state_copy(opt), state_before)
    # the optimizer still works
    opt.step()
    assert opt.state[m.a.weight]["step"] == 2


def test_good_configuration_after_the_checks():
    """The counterpart of the cases above: the same groups, fixed, are accepted."""
    m = model()
    opt = FGSGD([{"params": [m.a.weight], "manifolds": ["sphere", "stiefel"], "retraction": {"stiefel": "cayley"}},
                 {"params": [m.b.weight, m.c.weight], "manifolds": ["stiefel", "euclidean"], "collection": "PO",
                  "selection": "deterministic", "assign": "random", "num_groups": 2, "backend": "cpu"},
                 {"params": [m.wide.weight, m.fc.weight], "manifolds": ["sphere", "oblique"], "backend": "torch"},
                 {"params": [m.a.bias, m.b.bias, m.c.bias, m.wide.bias, m.fc.bias], "weight_decay": 1e-4}],
                lr=0.1, momentum=0.9)
    assert len(opt.param_groups) == 4
    assert opt.state[m.wide.weight]["shape"] == (1, 3) and opt.state[m.fc.weight]["shape"] == (8, 1)


@pytest.mark.parametrize("option", [dict(group_clip=1.0), dict(collection="PI"), dict(stabilize=0),
                                    dict(retraction={"stiefel": "cayley"})], ids=lambda o: next(iter(o)))
def test_manifold_options_without_a_manifold_group_are_an_error(option):
    """FGSGD(params) without manifolds= is plain SGD: an option only manifold groups read is refused there rather
    than ignored; as a default of an optimizer with a manifold group it is fine (the Euclidean group ignores it),
    and so are full param-group dicts copied from such an optimizer (every group carries every default)."""
    m = model()
    before = weights(m)
    key = next(iter(option))
    with pytest.raises(ValueError, match=rf"{key}: only manifold groups use it, but this optimizer has no manifold"):
        FGSGD(m.parameters(), lr=0.1, **option)
    assert_weights_unchanged(m, before)
    FGSGD(m.parameters(), lr=0.1, stabilize=50, group_clip=None)  # the defaults, spelled out
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    opt = FGSGD(param_groups(net), lr=0.1, **option)
    assert len(opt.param_groups) == 2 and all(g[key] == option[key] for g in opt.param_groups)
    copied = [dict(g) for g in opt.param_groups]  # as ZeroRedundancyOptimizer passes them on
    FGSGD(copied[1:], lr=0.1)
    FGSGD(copied, lr=0.1, init_projx=False)


def test_all_zero_filters_are_rejected_and_nothing_changes():
    conv = torch.nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight[1, 0].zero_()          # one all-zero 3×3 filter among random ones
    before = conv.weight.detach().clone()
    with pytest.raises(ValueError, match=r"params'\]\[0\].*1 components have an all-zero column"):
        FGSGD(param_groups(conv, manifolds=["sphere"]), lr=0.1)
    assert torch.equal(conv.weight, before)
