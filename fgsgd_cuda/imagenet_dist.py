"""torch.distributed for :mod:`fgsgd_cuda.train_imagenet`: torchrun's environment or a world of one.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) every process takes the GPU of its
local rank with nccl, or the CPU with gloo; without it the process group is a world of one on an in-memory
store, so that one code path (DistributedDataParallel, all-reduced metrics) serves both.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this process group was made here (and is destroyed by :func:`shutdown`)


def init_distributed(device: str = "auto") -> Dist:
    """Joins torchrun's process group, or makes a world of one; ``device``: auto (CUDA if present), cuda, cpu.
    An existing process group (made by the caller) is used as it is."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)  # env://
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank,
                torch.device("cuda", local_rank) if cuda else torch.device("cpu"), owns)


def shutdown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every buffer of ``module`` (batch-norm statistics) as rank ``src`` has it."""
    if dist.get_world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src)
