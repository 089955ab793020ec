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
    ("same-weight-twice", lambda m: {"params": [m.b.weight, m.c.weight, m.b.weight], "manifolds": ["sphere"]},
     ValueError, r"\['params'\]\[2\]: is the same tensor as param_groups\[\d\]\['params'\]\[0\]"),
    ("view-of-a-weight", lambda m: {"params": [m.b.weight, nn.Parameter(m.b.weight.data[2:])],
                                    "manifolds": ["sphere"]},
     ValueError, r"\['params'\]\[1\]: shares memory with param_groups\[\d\]\['params'\]\[0\]"),
    # a set's order (the kinds go to the groups in order) changes with PYTHONHASHSEED
    ("manifolds-set", lambda m: {"params": [m.b.weight], "manifolds": {"sphere", "oblique"}},
     TypeError, r"manifolds: must be a list or tuple"),
    ("retraction-string", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "retraction": "exp"},
     TypeError, r"retraction: must be a dict"),
    ("seed-too-large", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "seed": 2 ** 64},
     ValueError, r"seed: must be an integer in \[0, 2\*\*62\)"),
    ("seed-float", lambda m: {"params": [m.b.weight], "manifolds": ["sphere"], "seed": 1.5},
     ValueError, r"seed: must be an integer"),
    ("meta-weight", lambda m: {"params": [m.b.weight, nn.Parameter(torch.empty(4, 4, 3, 3, device="meta"))],
                               "manifolds": ["sphere"]},
     ValueError, r"\['params'\]\[1\]: is on the meta device"),
    ("rows-of-no-entries", lambda m: {"params": [m.b.weight, nn.Parameter(torch.empty(4, 0))],
                                      "manifolds": ["sphere"]},
     ValueError, r"\['params'\]\[1\]: its components have no entries"),
]


def prepare(name, m):
    if name == "non-finite-weight":
        with torch.no_grad():
            m.c.weight.view(-1)[3] = float("nan")


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")  # torch's
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


@pytest.mark.parametrize("euclidean_first", [False, True], ids=["manifold-group-first", "euclidean-group-first"])
def test_euclidean_view_of_a_manifold_weight_is_refused(euclidean_first):
    """A Euclidean parameter that is a view of a manifold weight would move it off its manifold: refused, naming
    both, and nothing changed, whichever group comes first (and through add_param_group)."""
    m = model()
    before = weights(m)
    view = nn.Parameter(m.b.weight.data[1:2])
    groups = [{"params": [m.a.weight, m.b.weight], "manifolds": ["sphere"]}, {"params": [m.a.bias, view]}]
    if euclidean_first:
        groups.reverse()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[\d\]: shares memory with "
                                         r"param_groups\[0\]\['params'\]\[\d\]; a manifold parameter must own"):
        FGSGD(groups, lr=0.1)
    assert_weights_unchanged(m, before)
    opt = FGSGD([groups[0]], lr=0.1)
    with pytest.raises(ValueError, match="shares memory"):
        opt.add_param_group(groups[1])
    assert len(opt.param_groups) == 1


def test_euclidean_parameters_may_share_memory_as_in_torch_sgd():
    """Only manifold parameters must own their memory: a Euclidean group keeps torch.optim.SGD's behaviour (a
    duplicate is warned about and stepped twice)."""
    p = nn.Parameter(torch.randn(5))
    start = p.detach().clone()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = FGSGD([p, p], lr=0.1)
    p.grad = torch.ones(5)
    opt.step()
    assert torch.equal(p.detach(), start - 0.1 - 0.1)


def test_overlapping_finds_every_kind_of_overlap():
    """checks.overlapping on memory extents: the same tensor, views, interleaved strided views (their extents
    overlap), only pairs with a wanted tensor, and no false alarm for adjacent or empty tensors."""
    from fgsgd_cuda.checks import overlapping
    base = torch.randn(10, 6)
    a, b = base[:5], base[5:]  # adjacent halves
    assert overlapping([a, b], {0, 1}) is None
    assert overlapping([a, base[4:6]], {1}) == (0, 1)
    assert overlapping([base[:, 0::2], base[:, 1::2]], {0}) == (0, 1)  # interleaved columns: extents overlap
    other = torch.randn(3)
    assert overlapping([other, a, a], {0}) is None  # the duplicate pair has no wanted tensor
    assert overlapping([other, a, a], {2}) == (1, 2)
    assert overlapping([torch.empty(0), base, base[:0]], {0, 1, 2}) is None
    big, small = base, base[3:4]  # a span inside an earlier, longer one that is not wanted
    assert overlapping([big, other, small], {2}) == (0, 2)
    assert overlapping([big, base[9:], small], {1, 2}) in ((0, 1), (0, 2))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # torch's
def test_zero_size_weights_take_no_step_and_need_no_check():
    """Weights without components (a Linear(100, 0) in the row view, a Conv2d with no output channels) are accepted
    and stepped as nothing; the row view had divided by zero finding their component shape."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 0))
    empty = nn.Parameter(torch.empty(0, 3, 3, 3))
    groups = param_groups(net, row_view=True) + [{"params": [empty], "manifolds": ["sphere", "stiefel"]}]
    opt = FGSGD(groups, lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    empty.grad = torch.zeros_like(empty)
    before = net[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, net[0].weight) and net[2].weight.shape == (0, 64)
    assert opt.state[net[2].weight]["shape"] == (64, 1)
