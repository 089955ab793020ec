"""FGSGD under DistributedDataParallel: two gloo processes on CPU, different data per rank, random selection.

After several steps the weights are bitwise identical on both ranks and on the manifolds (the grouping is
seeded, the all-reduced gradients are identical, the step is deterministic). The same with FGSGD inside
torch's ZeroRedundancyOptimizer, whose consolidated checkpoint resumes bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from torch import nn

from conftest import run_ranks
from fgsgd_cuda import FGSGD, codes as C, manifolds as M, param_groups, sync_zero_weights

WORLD = 2
STEPS = 6


def worker(rank: int, world: int, store_path: str, out: str) -> None:
    """One rank: a small CNN in DDP, FGSGD with random selection, its own data; saves its final weights."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        torch.manual_seed(1234 + rank)   # different initial weights per rank: DDP broadcasts rank 0's
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(8, 6, (3, 2)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = FGSGD(param_groups(model, row_view=True, group_size=3, selection="random", seed=7, group_clip=1.0,
                                 stabilize=4, weight_decay=1e-3),
                    lr=0.1, momentum=0.9, nesterov=True)
        gen = torch.Generator().manual_seed(100 + rank)   # different data per rank
        losses = []
        for _ in range(STEPS):
            x = torch.randn(8, 3, 8, 8, generator=gen)
            y = torch.randint(0, 4, (8,), generator=gen)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        codes = {n: opt.codes(p).clone() for n, p in model.named_parameters() if "codes" in opt.state[p]}
        torch.save({"params": params, "codes": codes, "losses": losses}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _entry(rank, world, store_path, out_dir):
    worker(rank, world, store_path, os.path.join(out_dir, f"r{rank}.pt"))


def gloo_missing() -> str | None:
    if not dist.is_available():
        return "torch.distributed is not available in this build"
    if not dist.is_gloo_available():
        return "the gloo backend of torch.distributed is not available"
    return None


@pytest.mark.skipif(gloo_missing() is not None, reason=str(gloo_missing()))
def test_ddp_two_ranks_identical_weights_on_the_manifolds(tmp_path):
    store = str(tmp_path / "store")
    run_ranks(_entry, WORLD, lambda r: (r, WORLD, store, str(tmp_path)), tmp_path)
    res = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    # each rank saw different data
    assert res[0]["losses"] != res[1]["losses"]
    # identical weights and grouping on both ranks
    for name, p0 in res[0]["params"].items():
        assert torch.equal(p0, res[1]["params"][name]), f"{name} differs between the ranks"
    for name, c0 in res[0]["codes"].items():
        assert torch.equal(c0, res[1]["codes"][name])
    # on the manifolds (Table 1), and the manifold weights are a mix of kinds
    params, codes = res[0]["params"], res[0]["codes"]
    assert set(codes) == {"0.weight", "2.weight", "4.weight", "7.weight"}
    for name, c in codes.items():
        p = params[name]
        shape = (p.shape[2], p.shape[3]) if p.dim() == 4 and p.shape[2] * p.shape[3] > 1 else (p[0].numel(), 1)
        w = p.reshape(-1, *shape).double()
        assert len(torch.unique(c)) >= 2, name
        for code in torch.unique(c).tolist():
            x = w[c == code]
            kind = C.manifold_of(code)
            fro, spectral, _ = M.norms(x).unbind(-1)
            table = M.table1_norms(kind, shape[1])
            assert float((fro - table["frobenius"]).abs().max()) < 1e-5, (name, kind)
            if kind == "stiefel":
                assert float((spectral - 1).abs().max()) < 1e-5, name
            if kind == "oblique":
                assert float((x.norm(dim=-2) - 1).abs().max()) < 1e-5, name


def zero_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    """One rank of DDP + ZeroRedundancyOptimizer(optimizer_class=FGSGD): every rank steps the parameters it owns
    and broadcasts them. Three steps, the state consolidated on rank 0 and saved, two more steps; then a fresh
    model and optimizer load the checkpoint and take the same two steps."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    ckpt = os.path.join(out_dir, "zero.pt")

    def build():
        torch.manual_seed(1234 + rank)   # DDP broadcasts rank 0's weights
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                              nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        filters, *rest = param_groups(model, group_size=3, group_clip=1.0, stabilize=2)
        opt = ZeroRedundancyOptimizer(filters["params"], optimizer_class=FGSGD, lr=0.1, momentum=0.9,
                                      **{k: v for k, v in filters.items() if k != "params"})
        for group in rest:
            opt.add_param_group(group)
        sync_zero_weights(opt)
        return model, ddp, opt

    def train(ddp, opt, steps):
        for s in steps:
            gen = torch.Generator().manual_seed(100 * s + rank)   # different data per rank
            x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

    try:
        model, ddp, opt = build()
        train(ddp, opt, range(3))
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
        dist.barrier()
        train(ddp, opt, range(3, 5))
        model2, ddp2, opt2 = build()
        saved = torch.load(ckpt, weights_only=True)
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["optimizer"])
        train(ddp2, opt2, range(3, 5))
        torch.save({"continued": {n: p.detach() for n, p in model.named_parameters()},
                    "resumed": {n: p.detach() for n, p in model2.named_parameters()},
                    "owned": sum(len(g["params"]) for g in opt.optim.param_groups)},
                   os.path.join(out_dir, f"zero{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(gloo_missing() is not None, reason=str(gloo_missing()))
def test_zero_redundancy_optimizer_over_fgsgd(tmp_path):
    """ZeroRedundancyOptimizer(optimizer_class=FGSGD) with group_clip and re-projections: the ranks split the
    parameters, end with the same weights, and a consolidated checkpoint resumes bit for bit."""
    store = str(tmp_path / "store")
    run_ranks(zero_worker, WORLD, lambda r: (r, WORLD, store, str(tmp_path)), tmp_path)
    res = [torch.load(tmp_path / f"zero{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(0 < r["owned"] < 8 for r in res) and sum(r["owned"] for r in res) == 8  # 4 weights + 4 biases
    for name, p in res[0]["continued"].items():
        for r in res:
            assert torch.equal(r["continued"][name], p), name
            assert torch.equal(r["resumed"][name], p), name


def zero_matches_plain_worker(rank: int, world: int, store_path: str, out_dir: str, mode: str) -> None:
    """One rank of DDP + FGSGD (``mode`` "plain") or DDP + ZeroRedundancyOptimizer(FGSGD) + sync_zero_weights
    ("zero"), with a grouping that does not depend on a weight's position in its group (sphere only, deterministic
    selection): the model before the first forward pass and after three steps."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        torch.manual_seed(1234 + rank)   # DDP broadcasts rank 0's weights
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                              nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        filters, *rest = param_groups(model, manifolds=["sphere"], selection="deterministic", group_size=3)
        if mode == "zero":
            opt = ZeroRedundancyOptimizer(filters["params"], optimizer_class=FGSGD, lr=0.1, momentum=0.9,
                                          **{k: v for k, v in filters.items() if k != "params"})
            for group in rest:
                opt.add_param_group(group)
            sync_zero_weights(opt)
        else:
            opt = FGSGD([filters, *rest], lr=0.1, momentum=0.9)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for s in range(3):
            gen = torch.Generator().manual_seed(100 * s + rank)   # different data per rank
            x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        torch.save({"before": before, "after": {n: p.detach() for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"{mode}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(gloo_missing() is not None, reason=str(gloo_missing()))
def test_zero_with_synced_weights_trains_as_plain_fgsgd(tmp_path):
    """Each rank's FGSGD inside ZeRO projects only the weights it owns when it is built: without
    sync_zero_weights the ranks entered the first forward pass with different models and ended 1.4 away from
    DDP + FGSGD after three steps. With it, every rank holds the same model before the first step, and the run
    follows the unsharded one (to rounding: DDP's reductions over other buckets)."""
    for mode in ("plain", "zero"):
        run_ranks(zero_matches_plain_worker, WORLD, lambda r: (r, WORLD, str(tmp_path / f"store-{mode}"),
                                                                str(tmp_path), mode), tmp_path)
    plain = [torch.load(tmp_path / f"plain{r}.pt", weights_only=True) for r in range(WORLD)]
    zero = [torch.load(tmp_path / f"zero{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, p in plain[0]["before"].items():
        for r in range(WORLD):
            assert torch.equal(zero[r]["before"][name], p), f"{name}: rank {r} starts from another model"
            assert torch.equal(zero[r]["after"][name], zero[0]["after"][name]), name
        assert float((zero[0]["after"][name] - plain[0]["after"][name]).abs().max()) <= 1e-5, name
