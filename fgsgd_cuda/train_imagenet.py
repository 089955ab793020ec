"""Train ResNets and SE-ResNets on ImageNet with FG-SGD or Euclidean SGD, on one or many GPUs (DDP).

    # FG-SGD, 8 GPUs (batch 64 per GPU, lr 0.1 per 256 images scaled to 0.2, cosine, 5 warm-up epochs)
    torchrun --nproc_per_node=8 -m fgsgd_cuda.train_imagenet --data /path/to/imagenet --arch resnet101 \\
        --optimizer fgsgd --amp bf16 --output runs/r101-fgsgd --log-file runs/r101-fgsgd.jsonl
    # the Euclidean SGD baseline, same recipe
    torchrun --nproc_per_node=8 -m fgsgd_cuda.train_imagenet --data /path/to/imagenet --arch resnet101 \\
        --optimizer sgd --amp bf16 --output runs/r101-sgd --log-file runs/r101-sgd.jsonl
    # one process without torchrun (GPU if there is one, else CPU), synthetic data, a few steps
    python -m fgsgd_cuda.train_imagenet --synthetic --arch tiny --image-size 16 --num-classes 10 --epochs 2 \\
        --max-steps-per-epoch 20 --workers 2

``--data DIR`` holds ``train/`` and ``val/`` in ImageFolder layout. Under torchrun (RANK, LOCAL_RANK,
WORLD_SIZE) every process drives one GPU (nccl) or CPU (gloo) in DistributedDataParallel; without it the
script runs as a world of one. ``--batch-size`` is per process; ``--lr`` (and ``--manifold-lr``, FG-SGD's
manifold groups, default: ``--lr``) is per 256 images and scaled linearly to the global batch. Every epoch
ends with top-1/top-5 and loss on the whole validation set (summed over ranks), one JSON line in
``--log-file`` (rank 0; spelt out in full: torchrun takes ``--log`` for its own ``--log-dir``) and
``--output DIR/checkpoint.pt``; ``--resume`` continues a run exactly where it stopped (``--stop-after N``
leaves after N epochs, for jobs with a time limit).

FG-SGD keeps every component of a manifold weight at a fixed norm (a unit 3×3 filter, say), while a ResNet's
default initialisation gives them norms of about √(2/I) for I input channels: behind batch norm the same
lr then moves the manifold weights less, so FG-SGD usually wants a larger ``--manifold-lr`` (the digits demo,
``fgsgd_cuda.demo``, uses 100× the SGD lr); tune it. ``--channels-last`` makes the model and its inputs
channels-last, for either optimizer (FGSGD's CPU, CUDA and Triton kernels step a channels-last filter bank where
it is).
``--compile MODE`` compiles the training forward and backward (``torch.compile`` of the DDP model; the optimizer
step runs eagerly, evaluation and checkpoints use the plain model).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

from . import codes as _codes
from .channel_directed import channel_directed_, check_options, conv_weights
from .bounds import TRAINING_FORMAT
from .cli_checks import check_numbers
from .dispatch import BACKENDS
from .grouping import COLLECTIONS
from .imagenet_data import ShardSampler, datasets_for
from .imagenet_dist import Dist, all_reduce, broadcast_buffers, init_distributed, shutdown, sync
from .imagenet_models import ARCHS, build_model
from .imagenet_optim import build_optimizer, build_scheduler
from .renorm import Renormalizer

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
FGSGD_ONLY = ("manifold_lr", "manifolds", "collection", "group_size", "group_clip", "retraction", "stabilize",
              "row_view", "backend", "capturable", "check_finite", "renorm", "renorm_batches")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fgsgd_cuda.train_imagenet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="ImageNet root with train/ and val/ (ImageFolder layout)")
    a("--arch", default="resnet101", choices=ARCHS)
    a("--optimizer", default="fgsgd", choices=("fgsgd", "sgd"))
    a("--epochs", type=int, default=90)
    a("--batch-size", type=int, default=64, help="images per process and step (default 64)")
    a("--lr", type=float, default=0.1, help="learning rate per 256 images, scaled linearly to the global batch")
    a("--manifold-lr", type=float, default=None, help="FG-SGD's manifold groups, per 256 images (default: --lr)")
    a("--momentum", type=float, default=0.9)
    a("--nesterov", action="store_true")
    a("--weight-decay", type=float, default=1e-4, help="SGD: all parameters; FG-SGD: the Euclidean group only")
    a("--no-wd-bn-bias", action="store_true", help="no weight decay on biases and batch-norm parameters")
    a("--schedule", default="cosine", choices=("cosine", "step"))
    a("--lr-steps", type=int, nargs="+", default=[30, 60, 80], help="epochs where --schedule step multiplies "
      "the lr by --lr-gamma")
    a("--lr-gamma", type=float, default=0.1)
    a("--warmup-epochs", type=float, default=5.0, help="linear warm-up, per step (default 5; 0: none)")
    a("--label-smoothing", type=float, default=0.0)
    a("--channel-directed", default="none", choices=("none", "sobolev", "reweighted"),
      help="precondition the conv weights' gradients along the output channels, with either optimizer "
           "(fgsgd_cuda.channel_directed_)")
    a("--channel-directed-lam", type=float, default=1.0, help="λ of --channel-directed")
    a("--amp", default="none", choices=tuple(AMP_DTYPES), help="autocast dtype; fp16 adds a GradScaler")
    a("--channels-last", action="store_true")
    a("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
      help="torch.compile the training forward/backward in this mode (the optimizer step runs eagerly)")
    a("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager (no code generation)
    a("--workers", type=int, default=8, help="data-loading processes per training process")
    a("--print-freq", type=int, default=100, help="steps between progress lines (rank 0)")
    a("--seed", type=int, default=0, help="model init, data order and augmentation, FG-SGD's grouping")
    a("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: CUDA (nccl) if present, else CPU")
    g = p.add_argument_group("FG-SGD (--optimizer fgsgd)")
    g.add_argument("--manifolds", default="sphere,oblique,stiefel", help="comma-separated kinds for the groups")
    g.add_argument("--collection", default="PIO", choices=COLLECTIONS)
    g.add_argument("--group-size", type=int, default=16)
    g.add_argument("--group-clip", type=float, default=None, help="c of the group step size (default: off)")
    g.add_argument("--retraction", default=None, help="e.g. stiefel=cayley,sphere=exp (default normalize/qr)")
    g.add_argument("--stabilize", type=int, default=50, help="re-project onto the manifolds every k steps (0: never)")
    g.add_argument("--row-view", action="store_true", help="1×1 convs and linear weights on sphere/oblique rows")
    g.add_argument("--backend", default="auto", choices=BACKENDS)
    g.add_argument("--capturable", action="store_true", help="a step without host sync (GradScaler on device)")
    g.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse a step with inf/nan gradients (a host sync per step; off under --amp fp16)")
    g.add_argument("--renorm", default="none", choices=("none", "running"), help="running: R = γ/λ once per "
                   "epoch from the first --renorm-batches training batches (fgsgd_cuda.Renormalizer)")
    g.add_argument("--renorm-batches", type=int, default=50)
    s = p.add_argument_group("synthetic data, runs and checkpoints")
    s.add_argument("--synthetic", action="store_true", help="random images made on the fly instead of --data")
    s.add_argument("--synthetic-size", type=int, default=12_800, help="synthetic training images")
    s.add_argument("--synthetic-val-size", type=int, default=1_000)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--num-classes", type=int, default=1000, help="synthetic data (ImageFolder: its classes)")
    s.add_argument("--max-steps-per-epoch", type=int, default=None)
    s.add_argument("--max-val-steps", type=int, default=None, help="cap the validation batches per process")
    s.add_argument("--stop-after", type=int, default=None, help="leave after this many epochs of this run (the "
                   "schedule still spans --epochs); continue with --resume")
    s.add_argument("--time-step", action="store_true", help="synchronise the device around optimizer.step() "
                   "so that step_ms is its device time (costs throughput)")
    s.add_argument("--log-file", dest="log", default=None, help="JSON-lines file, one line per epoch (rank 0 "
                   "appends)")
    s.add_argument("--output", default=None, help="directory of checkpoint.pt (rank 0, every epoch)")
    s.add_argument("--resume", default=None, help="a checkpoint.pt, or 'auto': --output's if it exists")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.synthetic and not args.data:
        parser.error("--data DIR (with train/ and val/) is required unless --synthetic is given")
    for split in ("train", "val"):
        if args.data and not args.synthetic and not os.path.isdir(os.path.join(args.data, split)):
            parser.error(f"--data {args.data}: no {split}/ folder there (ImageFolder layout expected)")
    check_numbers(parser, args, at_least_one=(
        "epochs", "batch_size", "print_freq", "group_size", "image_size", "num_classes", "synthetic_size",
        "synthetic_val_size", "renorm_batches", "max_steps_per_epoch", "max_val_steps", "stop_after"))
    if args.workers < 0:
        parser.error(f"--workers: must be >= 0, got {args.workers}")
    # (option, smallest value, whether that value itself is allowed); every one finite
    check_numbers(parser, args, finite=(
        ("lr", 0, False), ("manifold_lr", 0, False), ("momentum", 0, True), ("weight_decay", 0, True),
        ("warmup_epochs", 0, True), ("lr_gamma", 0, False), ("label_smoothing", 0, True), ("group_clip", 0, False),
        ("channel_directed_lam", -math.inf, True), ("stabilize", 0, True)))
    if args.label_smoothing > 1:
        parser.error(f"--label-smoothing: must be at most 1, got {args.label_smoothing}")
    if any(m < 1 for m in args.lr_steps):
        parser.error(f"--lr-steps: epochs must be at least 1, got {args.lr_steps}")
    # an option whose feature is off would change nothing: say so (as for FG-SGD options with SGD below)
    for key, needs, on in (("lr_steps", "--schedule step", args.schedule == "step"),
                           ("lr_gamma", "--schedule step", args.schedule == "step"),
                           ("renorm_batches", "--renorm running", args.renorm == "running"),
                           ("channel_directed_lam", "--channel-directed", args.channel_directed != "none")):
        if not on and getattr(args, key) != parser.get_default(key):
            parser.error(f"--{key.replace('_', '-')}: changes nothing without {needs}")
    if args.compile != "none" and args.renorm == "running":
        parser.error("--renorm running measures with forward hooks that hold Python state, which a compiled model "
                     "does not run; leave out --compile or --renorm")
    if args.optimizer == "sgd":  # an FG-SGD option with SGD would change nothing: say so
        given = [f"--{k.replace('_', '-')}" for k in FGSGD_ONLY if getattr(args, k) != parser.get_default(k)]
        if given:
            parser.error(f"{', '.join(given)}: FG-SGD options, but --optimizer sgd")
    args.manifolds = [m.strip() for m in args.manifolds.split(",") if m.strip()]
    bad = [m for m in args.manifolds if m not in _codes.MANIFOLDS]
    if not args.manifolds or bad:
        parser.error(f"--manifolds: unknown {bad or 'empty list'}; choose from {_codes.MANIFOLDS}")
    if args.retraction is not None:
        try:
            args.retraction = dict(kv.split("=") for kv in args.retraction.split(","))
        except ValueError:
            parser.error(f"--retraction: expected KIND=NAME[,KIND=NAME], got {args.retraction!r}")
        for kind, name in args.retraction.items():
            if name not in _codes.RETRACTIONS.get(kind, ()):
                parser.error(f"--retraction: {kind}={name} is not a retraction of {_codes.RETRACTIONS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.channel_directed != "none":
        try:
            check_options(args.channel_directed, args.channel_directed_lam, 0)
        except (TypeError, ValueError) as exc:
            parser.error(f"--channel-directed-lam: {exc}")
    if args.resume == "auto" and not args.output:
        parser.error("--resume auto needs --output")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file")
    return args


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch) * 65_537 + rank


def train_one_epoch(run, epoch: int) -> dict:
    """One epoch of at most ``run.steps_per_epoch`` steps; train loss, step time and images/s over all ranks."""
    args, device, model = run.args, run.dist.device, run.ddp
    model.train()
    run.train_loader.sampler.set_epoch(epoch)
    seed = _epoch_seed(args.seed, epoch, run.dist.rank)
    run.train_loader.generator.manual_seed(seed)  # the workers' augmentation
    torch.manual_seed(seed)                        # in this process (workers=0)
    loss_sum, images, steps, step_s = torch.zeros((), dtype=torch.float64, device=device), 0, 0, 0.0
    start = time.perf_counter()
    for x, y in run.train_loader:
        if steps == run.steps_per_epoch:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=AMP_DTYPES[args.amp], enabled=args.amp != "none"):
            loss = run.criterion(model(x), y)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if args.channel_directed != "none":  # linear: the scaled, all-reduced gradients are as good as any
            channel_directed_(run.cd_params, args.channel_directed, args.channel_directed_lam)
        if args.time_step:
            sync(device)
        t0 = time.perf_counter()
        run.scaler.step(run.optimizer)
        if args.time_step:
            sync(device)
        step_s += time.perf_counter() - t0
        run.scaler.update()
        lr = run.optimizer.param_groups[-1]["lr"]  # the Euclidean group's (FG-SGD: its manifold groups' below)
        manifold_lr = next((g["lr"] for g in run.optimizer.param_groups if g.get("manifolds")), None)
        run.scheduler.step()
        loss_sum += loss.detach().double() * y.numel()
        images += y.numel()
        steps += 1
        if run.dist.rank == 0 and steps % args.print_freq == 0:
            print(f"epoch {epoch + 1} step {steps}/{run.steps_per_epoch} loss {loss.item():.4f} "
                  f"lr {lr:.4g} "
                  f"{images * run.dist.world / (time.perf_counter() - start):.1f} img/s", flush=True)
    sync(device)
    elapsed = time.perf_counter() - start
    loss_total, images_total, step_total, steps_total = all_reduce(
        [loss_sum.item(), images, step_s, steps], device)
    elapsed = all_reduce([elapsed], device, dist.ReduceOp.MAX)[0]
    return dict(train_loss=loss_total / images_total, train_images=int(images_total), epoch_s=elapsed,
                images_per_s=images_total / elapsed, step_ms=1000 * step_total / steps_total,
                step_synced=args.time_step or device.type == "cpu", lr=lr,
                **(dict(manifold_lr=manifold_lr) if args.optimizer == "fgsgd" else {}))


@torch.no_grad()
def evaluate(run) -> dict:
    """Loss, top-1 and top-5 (%) on the validation set: sums over every rank's unpadded shard."""
    args, device, model = run.args, run.dist.device, run.model
    broadcast_buffers(model)  # DDP leaves each rank with the batch-norm statistics of its own last batch
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for i, (x, y) in enumerate(run.val_loader):
        if args.max_val_steps is not None and i >= args.max_val_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=AMP_DTYPES[args.amp], enabled=args.amp != "none"):
            out = model(x)
        out = out.float()
        hits = out.topk(min(5, out.shape[1]), dim=1).indices == y[:, None]
        sums[0] += F.cross_entropy(out, y, reduction="sum")
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(1).sum()
        sums[3] += y.numel()
    dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    d = max(n, 1.0)
    return dict(val_loss=loss / d, val_top1=100 * top1 / d, val_top5=100 * top5 / d, val_images=int(n))


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    dist: Dist
    model: nn.Module  # unwrapped
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    renorm: Renormalizer | None
    criterion: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    cd_params: list  # the conv weights of --channel-directed
    num_classes: int = 1000


def save_checkpoint(run, epoch: int, path: str) -> None:
    """checkpoint.pt, atomically: a temporary file, then os.replace. ``python -m fgsgd_cuda.bounds`` reads it
    (bounds.TRAINING_FORMAT: the model and optimizer rebuilt from ``args``; n_samples: the training set's size)."""
    state = dict(format=TRAINING_FORMAT, num_classes=run.num_classes, n_samples=len(run.train_loader.dataset),
                 model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                 scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(), epoch=epoch,
                 steps_per_epoch=run.steps_per_epoch, args=vars(run.args),
                 renorm=run.renorm.state_dict() if run.renorm is not None else None)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(run, path: str) -> int:
    """Restores everything from ``path`` (after the optimizer was built, as FGSGD needs); the next epoch."""
    ckpt = torch.load(path, map_location=run.dist.device, weights_only=True)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler.is_enabled() and ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.renorm is not None and ckpt.get("renorm"):
        run.renorm.load_state_dict(ckpt["renorm"])
    if ckpt["steps_per_epoch"] != run.steps_per_epoch and run.dist.rank == 0:
        print(f"warning: {path} was written with {ckpt['steps_per_epoch']} steps per epoch, this run has "
              f"{run.steps_per_epoch}: the lr schedule will not line up", flush=True)
    return int(ckpt["epoch"])


def setup(args, d: Dist) -> Run:
    torch.manual_seed(args.seed)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_set, val_set = datasets_for(args)
    num_classes = len(train_set.classes) if hasattr(train_set, "classes") else args.num_classes
    model = build_model(args.arch, num_classes).to(d.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scale = args.batch_size * d.world / 256
    manifold_lr = args.lr if args.manifold_lr is None else args.manifold_lr
    optimizer = build_optimizer(args, model, args.lr * scale, manifold_lr * scale)
    cuda = d.device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=args.batch_size, num_workers=args.workers, pin_memory=cuda,
                              drop_last=True, generator=torch.Generator(),
                              sampler=DistributedSampler(train_set, d.world, d.rank, shuffle=True, seed=args.seed))
    val_loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers, pin_memory=cuda,
                            sampler=ShardSampler(len(val_set), d.rank, d.world))
    steps = min(len(train_loader), args.max_steps_per_epoch or len(train_loader))
    if steps == 0:
        raise ValueError(f"the training set ({len(train_set)} images) holds less than one batch per process "
                         f"({args.batch_size} x {d.world} processes)")
    renorm = (Renormalizer(model, optimizer, mode="running", max_batches=args.renorm_batches)
              if args.renorm == "running" and args.optimizer == "fgsgd" else None)
    return Run(args, d, model, model, optimizer, build_scheduler(args, optimizer, steps),
               torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16"), renorm,
               nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), train_loader, val_loader, steps,
               conv_weights(model), num_classes)


def train(args, d: Dist) -> dict:
    run = setup(args, d)
    path = os.path.join(args.output, "checkpoint.pt") if args.output else None
    resume = args.resume
    if resume == "auto":
        resume = path if os.path.exists(path) else None
    start = load_checkpoint(run, resume) if resume else 0
    run.ddp = nn.parallel.DistributedDataParallel(run.model, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                  else None)
    if args.compile != "none":  # the training forward/backward; evaluation and checkpoints use the plain model
        run.ddp = torch.compile(run.ddp, mode=None if args.compile == "default" else args.compile,
                                backend=args.compile_backend)
    if d.rank == 0:
        n = sum(p.numel() for p in run.model.parameters())
        print(f"{args.arch} ({n:,} parameters), {args.optimizer}, world {d.world} on {d.device.type}, global batch "
              f"{args.batch_size * d.world}, {run.steps_per_epoch} steps/epoch, epochs {start + 1}..{args.epochs}"
              + (f", resumed from {resume}" if resume else ""), flush=True)
        for folder in (args.output, os.path.dirname(args.log or "")):
            if folder:
                os.makedirs(folder, exist_ok=True)
    end = args.epochs if args.stop_after is None else min(args.epochs, start + args.stop_after)
    history = []
    for epoch in range(start, end):
        record = dict(epoch=epoch + 1, **train_one_epoch(run, epoch), **evaluate(run))
        if run.renorm is not None:
            run.renorm.step_epoch()  # after the evaluation: batch norm's running statistics predate the new R
        record.update(world_size=d.world, arch=args.arch, optimizer=args.optimizer, amp=args.amp,
                      global_batch=args.batch_size * d.world, channel_directed=args.channel_directed)
        history.append(record)
        if d.rank == 0:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if path:
                save_checkpoint(run, epoch + 1, path)
    return dict(model=run.model, optimizer=run.optimizer, history=history, args=args, dist=d)


def main(argv=None) -> dict:
    """Parses ``argv`` (default: sys.argv), trains, returns {model, optimizer, history, args, dist}."""
    args = parse_args(argv)
    d = init_distributed(args.device)
    try:
        return train(args, d)
    finally:
        shutdown(d)


if __name__ == "__main__":
    main()
