"""FGSGD under torch's ZeroRedundancyOptimizer: the weights of every rank made equal before the first step.

``ZeroRedundancyOptimizer(params, optimizer_class=FGSGD, ...)`` builds on each rank an FGSGD over that rank's
shard of the parameters, and FGSGD moves its weights onto their manifolds when it is built. So each rank has
projected only the weights it owns: until ZeRO's first step broadcasts every shard from its owner, the ranks hold
different models, and DDP averages gradients taken at different points (the first step then differed from an
unsharded FGSGD by O(1)). :func:`sync_zero_weights` broadcasts every parameter from the rank that owns it, as
ZeRO does after each step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def sync_zero_weights(zero) -> None:
    """Broadcasts every parameter of ``zero`` (a ``torch.distributed.optim.ZeroRedundancyOptimizer``) from the
    rank whose local optimizer owns it: call it on every rank once the optimizer is built (and after
    ``add_param_group``), before the first forward pass. Owners are found from the ranks' local optimizers (one
    all_gather of a flag per parameter), not from ZeRO's private partition."""
    local = getattr(zero, "optim", None)
    group = getattr(zero, "process_group", None)
    if local is None or not hasattr(zero, "param_groups"):
        raise TypeError(f"zero: expected a torch.distributed.optim.ZeroRedundancyOptimizer, got {type(zero).__name__}")
    params = [p for g in zero.param_groups for p in g["params"]]
    if not params:
        return
    owned = {id(p) for g in local.param_groups for p in g["params"]}
    world = dist.get_world_size(group)
    mine = torch.tensor([id(p) in owned for p in params], dtype=torch.int32, device=params[0].device)
    flags = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(flags, mine, group=group)
    owners = torch.stack(flags).cpu()  # (world, P)
    counts = owners.sum(0)
    if bool((counts != 1).any()):
        k = int((counts != 1).nonzero()[0])
        raise RuntimeError(f"zero: parameter {k} of its param_groups is owned by {int(counts[k])} ranks (expected "
                           "one); build the optimizer with the same parameters on every rank")
    with torch.no_grad():
        for p, r in zip(params, owners.argmax(0).tolist()):
            dist.broadcast(p.data, src=dist.get_global_rank(group, r) if group is not None else r, group=group)
