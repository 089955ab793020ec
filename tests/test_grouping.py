"""Products of manifolds: which components form a group and which manifold each group gets (DESIGN.md §1).

Checked on ``make_grouping`` directly and on the grouping the optimizer stores for each weight:
balanced sizes, coverage, seeded reproducibility, the PI / PO / PIO axes, the kinds' assignment, and
the paper's Example 1.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fgsgd_cuda import FGSGD, codes as C, make_grouping
from fgsgd_cuda.grouping import balanced_sizes

KINDS = ["sphere", "oblique", "stiefel"]


def groups_of(g) -> list[list[int]]:
    """The members of every group, as sorted lists, checked to be a partition of all components."""
    n = g.group_index.numel()
    assert g.group_index.dtype == torch.int32 and g.group_codes.dtype == torch.uint8
    assert int(g.group_index.min()) >= 0 and int(g.group_index.max()) < g.num_groups
    members = [sorted(m.tolist()) for m in g.members()]
    assert len(members) == g.num_groups
    assert all(members), "an empty group"
    flat = sorted(i for m in members for i in m)
    assert flat == list(range(n)), "not every component is in exactly one group"
    for gid, m in enumerate(members):
        assert all(int(g.group_index[i]) == gid for i in m)
    return members


def runs_of(out_ch, in_ch, collection) -> list[set[int]]:
    grid = [[o * in_ch + c for c in range(in_ch)] for o in range(out_ch)]
    if collection == "PI":
        return [set(row) for row in grid]
    if collection == "PO":
        return [set(grid[o][c] for o in range(out_ch)) for c in range(in_ch)]
    return [set(range(out_ch * in_ch))]


GRIDS = [(6, 4), (7, 5), (1, 9), (16, 3), (64, 32)]
COLLECTIONS = ["PI", "PO", "PIO"]
SIZE_OPTIONS = [dict(group_size=1), dict(group_size=3), dict(group_size=16), dict(group_size=1000),
                dict(num_groups=1), dict(num_groups=2), dict(num_groups=5), dict(num_groups=10_000)]


@pytest.mark.parametrize("selection", ["random", "deterministic"])
@pytest.mark.parametrize("collection", COLLECTIONS)
def test_sizes_coverage_and_axes(collection, selection):
    for (o, i), size_opt in itertools.product(GRIDS, SIZE_OPTIONS):
        g = make_grouping(o, i, manifolds=KINDS, collection=collection, selection=selection, seed=3, **size_opt)
        members = groups_of(g)
        runs = runs_of(o, i, collection)
        # every group lies inside one run: PI never spans two output channels, PO never two input channels
        for m in members:
            assert sum(set(m) <= run for run in runs) == 1, (collection, o, i, size_opt, m)
            if collection == "PI":
                assert len({x // i for x in m}) == 1
            if collection == "PO":
                assert len({x % i for x in m}) == 1
        # per run: balanced sizes (differ by at most one) and the requested count / size
        for run in runs:
            sizes = [len(m) for m in members if set(m) <= run]
            assert sum(sizes) == len(run)
            assert max(sizes) - min(sizes) <= 1
            if "num_groups" in size_opt:
                assert len(sizes) == min(size_opt["num_groups"], len(run))
            else:
                assert max(sizes) <= size_opt["group_size"]
                assert len(sizes) == -(-len(run) // size_opt["group_size"])
        if selection == "deterministic":
            for m in members:  # contiguous runs in grid order
                order = sorted(runs[[set(m) <= r for r in runs].index(True)])
                pos = [order.index(x) for x in m]
                assert pos == list(range(pos[0], pos[0] + len(pos)))


def test_balanced_sizes():
    assert balanced_sizes(24, None, 10) == [3, 3, 3, 3, 2, 2, 2, 2, 2, 2]
    assert balanced_sizes(10, 4, None) == [4, 3, 3]
    assert balanced_sizes(9, 3, None) == [3, 3, 3]
    assert balanced_sizes(3, None, 7) == [1, 1, 1]
    assert balanced_sizes(5, 100, None) == [5]


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_random_selection_is_reproducible_from_the_seed(collection):
    opts = dict(manifolds=KINDS, collection=collection, group_size=3, selection="random", assign="random")
    a = make_grouping(16, 12, seed=7, **opts)
    b = make_grouping(16, 12, seed=7, **opts)
    c = make_grouping(16, 12, seed=8, **opts)
    assert torch.equal(a.group_index, b.group_index) and torch.equal(a.group_codes, b.group_codes)
    assert not torch.equal(a.group_index, c.group_index)
    assert not torch.equal(a.group_codes, c.group_codes)
    det = make_grouping(16, 12, seed=7, **{**opts, "selection": "deterministic"})
    assert not torch.equal(a.group_index, det.group_index)  # random membership is not the contiguous one
    # the grouping does not touch the global RNG
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    make_grouping(16, 12, seed=7, **opts)
    assert torch.equal(torch.rand(3), before)


def test_random_membership_is_a_uniform_permutation():
    """Membership sampled without replacement: over seeds, a component joins each slot of its run about evenly."""
    counts = torch.zeros(12, 3)
    for seed in range(300):
        g = make_grouping(1, 12, manifolds=["sphere"], collection="PI", num_groups=3, selection="random", seed=seed)
        counts[torch.arange(12), g.group_index.long()] += 1
    # each of the 12 components lands in each of the 3 groups (4 slots each) with probability 1/3
    assert float(counts.min()) > 60 and float(counts.max()) < 140


@pytest.mark.parametrize("assign", ["round_robin", "random"])
def test_assignment_of_kinds(assign):
    kinds = ["sphere", "oblique", "stiefel", "euclidean"]
    retraction = {"sphere": "exp", "stiefel": "cayley"}
    g = make_grouping(32, 16, manifolds=kinds, group_size=4, assign=assign, seed=1, retraction=retraction)
    expected = [C.SPHERE_EXP, C.OBLIQUE_NORMALIZE, C.STIEFEL_CAYLEY, C.EUCLIDEAN]
    got = g.group_codes.tolist()
    if assign == "round_robin":
        assert got == [expected[j % 4] for j in range(g.num_groups)]
    else:
        assert set(got) == set(expected)
        counts = torch.bincount(g.group_codes.long(), minlength=7)[expected]
        assert int(counts.min()) > 0.15 * g.num_groups  # 128 groups, uniform over 4 kinds
        assert got != [expected[j % 4] for j in range(g.num_groups)]
    assert torch.equal(g.codes, g.group_codes[g.group_index.long()])


def test_paper_example_1():
    """A 3×3×4×6 weight (6 output, 4 input channels: 24 components), sphere + stiefel, 10 groups, PIO,
    round robin: 10 groups, 5 sphere and 5 stiefel, of sizes 3, 3, 2, 2, 2 each."""
    for selection in ("deterministic", "random"):
        g = make_grouping(6, 4, manifolds=["sphere", "stiefel"], num_groups=10, collection="PIO",
                          assign="round_robin", selection=selection, seed=0)
        members = groups_of(g)
        assert g.num_groups == 10
        by_kind = {}
        for m, code in zip(members, g.group_codes.tolist()):
            by_kind.setdefault(C.manifold_of(code), []).append(len(m))
        assert sorted(by_kind) == ["sphere", "stiefel"]
        assert by_kind["sphere"] == [3, 3, 2, 2, 2]
        assert by_kind["stiefel"] == [3, 3, 2, 2, 2]

    # the same through the optimizer, on an nn.Conv2d(4, 6, 3)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    assert tuple(conv.weight.shape) == (6, 4, 3, 3)
    opt = FGSGD([conv.weight], lr=0.1, manifolds=["sphere", "stiefel"], num_groups=10, collection="PIO",
                assign="round_robin")
    st = opt.state[conv.weight]
    assert st["num_groups"] == 10 and opt.num_components(conv.weight) == 24
    sizes = torch.bincount(opt.grouping(conv.weight).group_index.long(), minlength=10)
    for code in (C.SPHERE_NORMALIZE, C.STIEFEL_QR):
        assert sorted(sizes[st["group_codes"] == code].tolist(), reverse=True) == [3, 3, 2, 2, 2]
    w = conv.weight.detach().double()
    sphere = (opt.codes(conv.weight) == C.SPHERE_NORMALIZE).reshape(6, 4)
    assert float((w[sphere].norm(dim=(-2, -1)) - 1).abs().max()) < 1e-5
    stiefel = w[~sphere]
    assert float((stiefel.transpose(-2, -1) @ stiefel - torch.eye(3, dtype=w.dtype)).abs().max()) < 1e-5


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_optimizer_stores_the_grouping_of_each_weight(collection):
    """Through FGSGD: every weight gets a grouping with the same properties; reproducible from ``seed``."""
    def build(seed):
        torch.manual_seed(0)
        convs = [nn.Conv2d(5, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3, bias=False)]
        opt = FGSGD([c.weight for c in convs], lr=0.1, manifolds=KINDS, collection=collection, group_size=3,
                    seed=seed)
        return convs, opt

    convs, opt = build(5)
    convs2, opt2 = build(5)
    _, opt3 = build(6)
    for c, c2 in zip(convs, convs2):
        st, st2 = opt.state[c.weight], opt2.state[c2.weight]
        gi, gi2 = opt.grouping(c.weight).group_index, opt2.grouping(c2.weight).group_index
        o, i = c.weight.shape[:2]
        g = make_grouping(o, i, manifolds=KINDS, collection=collection, group_size=3)  # any seed: same sizes
        assert st["num_groups"] == g.num_groups
        members = [sorted(m.tolist()) for m in
                   torch.split(torch.argsort(gi, stable=True),
                               torch.bincount(gi.long(), minlength=st["num_groups"]).tolist())]
        assert sorted(x for m in members for x in m) == list(range(o * i))
        for m in members:
            assert 2 <= len(m) <= 3
            if collection == "PI":
                assert len({x // i for x in m}) == 1
            if collection == "PO":
                assert len({x % i for x in m}) == 1
        assert torch.equal(gi, gi2) and torch.equal(st["codes"], st2["codes"])  # packed or not, the same
        assert torch.equal(c.weight, c2.weight)
    # another seed, another membership
    assert any(not torch.equal(opt.grouping(c.weight).group_index, opt3.grouping(p).group_index)
               for c, p in zip(convs, opt3.param_groups[0]["params"]))
