"""FG-SGD against Euclidean SGD on real data: ``python -m fgsgd_cuda.demo``.

Trains a small CNN with 3×3 convolutions on scikit-learn's ``load_digits`` (1,797 8×8 handwritten
digits, a fixed stratified 70/30 train/test split) with

- Euclidean SGD (``torch.optim.SGD``),
- FG-SGD PIO(sphere+oblique+stiefel),
- FG-SGD PIO(sphere+oblique+stiefel+euclidean),

for several seeds each, and prints test accuracy (mean ± std over seeds) and the time spent in
``optimizer.step()`` relative to SGD's. Runs on the GPU when there is one.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from .cli_checks import check_numbers
from .optimizer import FGSGD
from .param_groups import param_groups


def load_data(device):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise SystemExit("the demo needs scikit-learn: pip install 'fgsgd_cuda[demo]'") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.3, random_state=0,
                                           stratify=y.numpy())
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return (x[idx_train].to(device), y[idx_train].to(device)), (x[idx_test].to(device), y[idx_test].to(device))


class SmallCNN(nn.Module):
    """Three 3×3 conv blocks with batch norm, global pooling and a linear classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


OPTIMIZERS = {
    "SGD": None,
    "FG-SGD PIO(sphere+oblique+stiefel)": ["sphere", "oblique", "stiefel"],
    "FG-SGD PIO(sphere+oblique+stiefel+euclidean)": ["sphere", "oblique", "stiefel", "euclidean"],
}


def make_optimizer(name, model, lr, momentum, manifold_lr):
    """SGD, or FGSGD with ``manifold_lr`` on the manifold groups (unit-norm filters take steps on a
    different scale than free weights) and ``lr`` on the Euclidean rest."""
    kinds = OPTIMIZERS[name]
    if kinds is None:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return FGSGD(param_groups(model, manifolds=kinds, collection="PIO", group_size=8, seed=0, lr=manifold_lr),
                 lr=lr, momentum=momentum, check_finite=False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(name, seed, data, device, epochs, batch_size, lr, momentum, manifold_lr, progress):
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = data
    model = SmallCNN().to(device)
    opt = make_optimizer(name, model, lr, momentum, manifold_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)
    step_time, steps = 0.0, 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen).to(device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            step_time += time.perf_counter() - t0
            steps += 1
        sched.step()
        progress()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return acc, step_time / steps


class _Progress:
    """A tqdm bar when tqdm is installed, else a one-line text bar."""

    def __init__(self, total):
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="training", unit="epoch")
        except ImportError:
            self.bar = None

    def __call__(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"\rtraining {self.done}/{self.total} epochs", end="", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--manifold-lr", type=float, default=5.0, help="lr of FG-SGD's manifold groups")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_numbers(parser, args, at_least_one=("seeds", "epochs", "batch_size"),
                  finite=(("lr", 0, False), ("manifold_lr", 0, False), ("momentum", 0, True)))
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)  # the device exists here (cuda without a GPU, a bad index)
    except (RuntimeError, AssertionError) as e:
        parser.error(f"--device: cannot use {args.device!r}: {str(e).splitlines()[0]}")
    data = load_data(device)
    print(f"load_digits: {len(data[0][1])} train / {len(data[1][1])} test images, device {device}, "
          f"{args.seeds} seeds x {args.epochs} epochs")
    progress = _Progress(len(OPTIMIZERS) * args.seeds * args.epochs)
    results = {}
    for name in OPTIMIZERS:
        results[name] = [run_one(name, seed, data, device, args.epochs, args.batch_size, args.lr, args.momentum,
                                 args.manifold_lr, progress) for seed in range(args.seeds)]
    progress.close()
    sgd_time = statistics.mean(t for _, t in results["SGD"])
    width = max(len(n) for n in OPTIMIZERS)
    print(f"\n{'optimizer':<{width}}  test accuracy (%)   step time vs SGD")
    for name, runs in results.items():
        accs = [100 * a for a, _ in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = statistics.mean(t for _, t in runs) / sgd_time
        print(f"{name:<{width}}  {statistics.mean(accs):6.2f} ± {std:4.2f}      {ratio:5.2f}x")
    return results


if __name__ == "__main__":
    main()
