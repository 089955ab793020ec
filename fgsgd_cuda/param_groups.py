"""Splitting a model's parameters into manifold groups and a Euclidean group for :class:`FGSGD`."""
from __future__ import annotations

import torch
from torch import nn

DEFAULT_MANIFOLDS = ("sphere", "oblique", "stiefel")
DEFAULT_ROW_MANIFOLDS = ("sphere", "oblique")


def _is_filter_weight(module: nn.Module, p: torch.Tensor) -> bool:
    return isinstance(module, nn.Conv2d) and p is module.weight and (p.shape[2] > 1 or p.shape[3] > 1)


def _is_row_weight(module: nn.Module, p: torch.Tensor) -> bool:
    return ((isinstance(module, nn.Conv2d) and p is module.weight and p.shape[2] == p.shape[3] == 1)
            or (isinstance(module, nn.Linear) and p is module.weight))


def param_groups(model: nn.Module, *, manifolds=DEFAULT_MANIFOLDS, row_view: bool = False,
                 row_manifolds=DEFAULT_ROW_MANIFOLDS, weight_decay: float = 0.0, **options) -> list[dict]:
    """Param groups for ``FGSGD(param_groups(model), lr=..., momentum=...)``.

    - every kh×kw ``nn.Conv2d`` weight with kh or kw > 1 goes to a manifold group with ``manifolds``; those whose
      filters are wider than tall (kh < kw, e.g. Inception's 1×7), which cannot be on the stiefel manifold (it needs
      kh >= kw), go to a group of their own with ``manifolds`` less "stiefel" (when that leaves any);
    - with ``row_view=True``, 1×1 conv and ``nn.Linear`` weights go to a second manifold group with
      ``row_manifolds`` (each output channel's weight vector is one component);
    - everything else that requires grad (biases, norm layers, the rest) goes to a Euclidean group,
      which also gets ``weight_decay``.
    ``options`` (collection, group_size, selection, seed, retraction, group_clip, ...) apply to the
    manifold groups.
    """
    manifolds = [manifolds] if isinstance(manifolds, str) else manifolds  # one kind, as FGSGD takes it
    row_manifolds = [row_manifolds] if isinstance(row_manifolds, str) else row_manifolds
    filters, rows, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            if _is_filter_weight(module, p):
                filters.append(p)
                seen.add(id(p))
            elif row_view and _is_row_weight(module, p):
                rows.append(p)
                seen.add(id(p))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = []
    no_stiefel = [m for m in manifolds if m != "stiefel"]
    wide = [p for p in filters if p.shape[2] < p.shape[3]] if len(no_stiefel) < len(manifolds) and no_stiefel else []
    filters = [p for p in filters if all(p is not q for q in wide)]
    if filters:
        groups.append({"params": filters, "manifolds": list(manifolds), **options})
    if wide:
        groups.append({"params": wide, "manifolds": no_stiefel, **options})
    if rows:
        groups.append({"params": rows, "manifolds": list(row_manifolds), **options})
    if rest:
        groups.append({"params": rest, "manifolds": None, "weight_decay": weight_decay})
    return groups
