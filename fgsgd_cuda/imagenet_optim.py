"""Optimizers and learning-rate schedule of :mod:`fgsgd_cuda.train_imagenet`.

- :func:`build_optimizer`: ``fgsgd`` = :class:`fgsgd_cuda.FGSGD` over :func:`fgsgd_cuda.param_groups` (k×k conv
  weights, and 1×1 convs / linear weights with the row view, on manifolds; weight decay on the Euclidean rest
  only, as FG-SGD rejects it on manifold groups); ``sgd`` = ``torch.optim.SGD``. With ``no_wd_bn_bias`` both
  take biases and batch-norm parameters (every parameter of at most one dimension) out of the weight decay.
- :func:`lr_factor`: the multiplier of the base learning rates at an optimizer step (a ``LambdaLR`` stepped
  once per iteration): linear warm-up, then cosine decay to zero or steps of ``gamma`` at epoch milestones.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .optimizer import FGSGD
from .param_groups import param_groups


def split_decay(params: list[torch.Tensor], weight_decay: float, no_wd_bn_bias: bool, **options) -> list[dict]:
    """One group with ``weight_decay``, or (``no_wd_bn_bias``) two: weights with it, 1-D parameters without."""
    if not no_wd_bn_bias:
        return [dict(params=params, weight_decay=weight_decay, **options)]
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    return [dict(params=ps, weight_decay=wd, **options) for ps, wd in ((decay, weight_decay), (rest, 0.0)) if ps]


def build_optimizer(args, model: nn.Module, lr: float, manifold_lr: float) -> torch.optim.Optimizer:
    """The optimizer of the command line: FGSGD (``manifold_lr`` on the manifold groups, ``lr`` elsewhere) or
    SGD (``lr``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(split_decay(params, args.weight_decay, args.no_wd_bn_bias), lr=lr,
                               momentum=args.momentum, nesterov=args.nesterov)
    options = dict(manifolds=args.manifolds, collection=args.collection, group_size=args.group_size,
                   group_clip=args.group_clip, retraction=args.retraction, stabilize=args.stabilize, seed=args.seed,
                   lr=manifold_lr)
    groups = []
    for group in param_groups(model, row_view=args.row_view, **options):
        if group["manifolds"]:
            groups.append(group)
        else:  # the Euclidean rest: SGD with weight decay
            groups += split_decay(group["params"], args.weight_decay, args.no_wd_bn_bias, manifolds=None)
    # GradScaler checks the gradients itself (fp16): FGSGD's own check would only add a host sync
    check_finite = args.check_finite and args.amp != "fp16"
    return FGSGD(groups, lr=lr, momentum=args.momentum, nesterov=args.nesterov, backend=args.backend,
                 capturable=args.capturable, check_finite=check_finite)


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str,
              milestones=(), gamma: float = 0.1) -> float:
    """Multiplier of the base learning rates at optimizer step ``step`` (0-based, counted over all epochs):
    (step + 1) / W during the W = warmup_epochs · steps_per_epoch warm-up steps; then ``cosine``:
    (1 + cos(π t)) / 2 with t going from 0 to 1 over the remaining steps, or ``step``: gamma^k after k of the
    epoch ``milestones``."""
    warm = round(warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if schedule == "cosine":
        t = (step - warm) / max(1, epochs * steps_per_epoch - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        return gamma ** sum(step >= m * steps_per_epoch for m in milestones)
    raise ValueError(f"schedule: expected 'cosine' or 'step', got {schedule!r}")


def build_scheduler(args, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A ``LambdaLR`` of :func:`lr_factor`, to be stepped after every optimizer step."""
    factor = functools.partial(lr_factor, steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                               warmup_epochs=args.warmup_epochs, schedule=args.schedule,
                               milestones=tuple(args.lr_steps), gamma=args.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
