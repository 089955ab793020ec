"""Products of manifolds (POMs): which components form a group, and which manifold each group gets.

The components of one weight form an O×I grid (component i = o·I + c is the filter of output
channel o and input channel c). DESIGN.md §1 "Products of manifolds":

- ``PI``  — groups run along the input-channel axis: the I components of each output channel are
  split into groups (no group spans two output channels);
- ``PO``  — groups run along the output-channel axis: the O components of each input channel are split;
- ``PIO`` — groups cut across both axes: the whole grid is split.

Each run of components is cut into groups of balanced sizes (they differ by at most one, larger
first): ``num_groups`` per run when given, else ``ceil(run / group_size)``. ``selection`` decides the
membership: ``deterministic`` takes contiguous runs in grid order, ``random`` samples without
replacement (a random permutation of the run, i.e. hypergeometric membership) from a generator
seeded with ``seed``. Manifold kinds are given to the groups from a list, ``round_robin`` (group j
gets kinds[j mod K]) or ``random`` (uniform, same generator). The grouping is made once. The optimizer
stores the code of every component (uint8, what the kernels read) and of every group, plus the options
that fix the membership; component → group (int32) is recomputed from those when needed (group_clip,
the bounds report), so it costs no state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import codes as _codes

COLLECTIONS = ("PI", "PO", "PIO")
SELECTIONS = ("random", "deterministic")
ASSIGNMENTS = ("round_robin", "random")


@dataclass
class Grouping:
    group_index: torch.Tensor  # (N,) int32: the group of every component
    group_codes: torch.Tensor  # (G,) uint8: the code (manifold + retraction) of every group

    @property
    def num_groups(self) -> int:
        return int(self.group_codes.numel())

    @property
    def codes(self) -> torch.Tensor:
        """(N,) uint8: the code of every component."""
        return self.group_codes[self.group_index.long()]

    def members(self) -> list[torch.Tensor]:
        """The component indices of every group."""
        order = torch.argsort(self.group_index, stable=True)
        counts = torch.bincount(self.group_index.long(), minlength=self.num_groups).tolist()
        return list(torch.split(order, counts))


def balanced_sizes(n: int, group_size: int | None, num_groups: int | None) -> list[int]:
    """Sizes of the groups a run of n components is cut into (larger first, differing by at most 1)."""
    g = num_groups if num_groups is not None else -(-n // group_size)
    g = max(1, min(g, n))
    base, extra = divmod(n, g)
    return [base + 1] * extra + [base] * (g - extra)


def _runs(out_ch: int, in_ch: int, collection: str) -> list[torch.Tensor]:
    """The component indices that groups are cut from, in grid order."""
    grid = torch.arange(out_ch * in_ch).reshape(out_ch, in_ch)
    if collection == "PI":
        return list(grid)              # one run per output channel, along the input channels
    if collection == "PO":
        return list(grid.t())          # one run per input channel, along the output channels
    return [grid.reshape(-1)]          # PIO: the whole grid


def check_options(manifolds, assign, collection, group_size, num_groups, selection, retraction) -> None:
    """Raises a clear error for any bad grouping option."""
    if not manifolds:
        raise ValueError("manifolds: needs at least one manifold kind")
    for name in manifolds:
        _codes.code_of(name, (retraction or {}).get(name))
    if retraction:
        for name, retr in retraction.items():
            if name not in _codes.RETRACTIONS:
                raise ValueError(f"retraction: unknown manifold {name!r} in {retraction}")
            _codes.code_of(name, retr)
    if assign not in ASSIGNMENTS:
        raise ValueError(f"assign: expected one of {ASSIGNMENTS}, got {assign!r}")
    if collection not in COLLECTIONS:
        raise ValueError(f"collection: expected one of {COLLECTIONS}, got {collection!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection: expected one of {SELECTIONS}, got {selection!r}")
    if num_groups is None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size: must be an integer >= 1, got {group_size!r}")
    elif not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups: must be an integer >= 1 or None, got {num_groups!r}")


MEMBERSHIP_OPTIONS = ("collection", "group_size", "num_groups", "selection", "seed")


def membership(out_ch: int, in_ch: int, *, collection="PIO", group_size=16, num_groups=None, selection="random",
               seed=0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """(group_index, num_groups): the group (int32) of every component of an O×I grid (module docstring).

    Depends on the options of ``MEMBERSHIP_OPTIONS`` only, so the optimizer keeps those (a few bytes per
    weight) instead of this tensor and recomputes it when it is needed. ``generator`` (seeded with ``seed``
    when not given) is left where the permutations leave it, for the kind assignment that follows.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    group_index = torch.empty(out_ch * in_ch, dtype=torch.int32)
    next_group = 0
    for run in _runs(out_ch, in_ch, collection):
        if selection == "random":
            run = run[torch.randperm(run.numel(), generator=gen)]
        for members in torch.split(run, balanced_sizes(run.numel(), group_size, num_groups)):
            group_index[members] = next_group
            next_group += 1
    return group_index, next_group


def make_grouping(out_ch: int, in_ch: int, *, manifolds, assign="round_robin", collection="PIO", group_size=16,
                  num_groups=None, selection="random", seed=0, retraction=None) -> Grouping:
    """The grouping of an O×I grid of components (see the module docstring)."""
    check_options(manifolds, assign, collection, group_size, num_groups, selection, retraction)
    gen = torch.Generator().manual_seed(int(seed))
    kind_codes = [_codes.code_of(name, (retraction or {}).get(name)) for name in manifolds]
    group_index, count = membership(out_ch, in_ch, collection=collection, group_size=group_size, num_groups=num_groups,
                             selection=selection, seed=seed, generator=gen)
    if assign == "round_robin":
        which = torch.arange(count) % len(kind_codes)
    else:
        which = torch.randint(len(kind_codes), (count,), generator=gen)
    group_codes = torch.tensor(kind_codes, dtype=torch.uint8)[which]
    return Grouping(group_index, group_codes)
