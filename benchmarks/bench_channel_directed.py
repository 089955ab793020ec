"""Benchmark of the channel-directed gradients (fgsgd_cuda.channel_directed_) on the conv weights of ResNets.

Times ``channel_directed_`` on the gradients of every conv weight of ResNet-50/101 (shapes from bench_step.py) for
every backend available on the device and both metrics, side by side in one run with one
``torch.optim.SGD(momentum=0.9)`` step (foreach, and fused where torch has it) on the same tensors as the unit:
the preconditioner is one more pass over the gradients before the step. Reports medians, the ratio to each SGD
step, and GB/s against the least traffic (read and write the gradient once: 8 bytes per fp32 entry) next to a copy
measured in the same run. Writes JSON.

    python benchmarks/bench_channel_directed.py                              # CPU: cpu and torch backends
    python benchmarks/bench_channel_directed.py --device cuda --repeats 50   # GPU: cuda, triton, torch
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch  # before fgsgd_cuda (see bench_step.py)

import bench_step as B
import fgsgd_cuda
from fgsgd_cuda import dispatch

HERE = Path(__file__).resolve().parent


def conv_shapes(model: str, quick: bool = False) -> list[tuple[int, ...]]:
    """The conv weights (4-D) of a bench_step model, in layer order (``quick``: channels / 8)."""
    return [s for s in B.model_shapes(model, quick=quick) if len(s) == 4]


def median_time(timer: B.Timer, fn, repeats: int, before=None) -> float:
    """Median seconds of fn over ``repeats`` calls after two warm-up calls; ``before`` runs untimed before each."""
    for _ in range(2):
        if before:
            before()
        fn()
    times = []
    for _ in range(repeats):
        if before:
            before()
        times.append(timer.time(fn))
    return statistics.median(times)


def run_model(model: str, device, backends: list[str], lam: float, timer: B.Timer, repeats: int, log,
              quick: bool = False) -> dict:
    shapes = conv_shapes(model, quick)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    saved = [torch.randn(s, generator=gen).to(device) for s in shapes]
    for p, g in zip(params, saved):
        p.grad = g.clone()
    entries = sum(p.numel() for p in params)
    out = {"model": model, "tensors": len(params), "entries": entries, "lam": lam, "cases": {}}
    support = B.sgd_support(device)
    for name, kw in (("SGD(foreach)", {"foreach": True}), ("SGD(fused)", {"fused": True})):
        why = support.get("fused") if "fused" in kw else support.get("foreach")
        if why:
            log(f"  {name}: skipped ({why})")
            continue
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, **kw)
        out["cases"][name] = {"median_s": median_time(timer, opt.step, repeats)}

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    for backend in backends:
        for metric in ("sobolev", "reweighted"):
            fn = (lambda b=backend, m=metric: fgsgd_cuda.channel_directed_(params, m, lam, backend=b))
            t = median_time(timer, fn, repeats, before=restore)
            out["cases"][f"{metric}[{backend}]"] = {"median_s": t, "GBps_min_traffic": 8 * entries / t / 1e9}
    for case in out["cases"].values():
        for base in ("SGD(foreach)", "SGD(fused)"):
            if base in out["cases"]:
                case[f"x_{base}"] = case["median_s"] / out["cases"][base]["median_s"]
    return out


def table(result: dict) -> str:
    lines = [f"{result['model']}: {result['tensors']} conv weights, {result['entries'] / 1e6:.1f} M entries, "
             f"lam = {result['lam']}",
             f"  {'case':28s} {'ms':>9s} {'x SGD(foreach)':>15s} {'x SGD(fused)':>13s} {'GB/s (8 B/entry)':>17s}"]
    for name, c in result["cases"].items():
        fe, fu, gb = c.get("x_SGD(foreach)"), c.get("x_SGD(fused)"), c.get("GBps_min_traffic")
        lines.append(f"  {name:28s} {c['median_s'] * 1e3:9.3f} {B.fmt(fe, '15.2f')} {B.fmt(fu, '13.2f')} "
                     f"{B.fmt(gb, '17.1f')}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="resnet50,resnet101")
    ap.add_argument("--backends", default=None, help="comma-separated; default: every one available on the device")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="channels / 8: a smoke run")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/<device>-<date>-channel-directed.json)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else \
        ["cpu", "cuda", "triton", "torch"]
    for b in names:
        if b not in dispatch.BACKENDS:
            raise SystemExit(f"--backends: unknown backend {b!r}; expected {', '.join(dispatch.BACKENDS)}")
    backends = [b for b in names if dispatch.available(b, device)]
    if args.backends and len(backends) < len(names):  # asked for by name: say which cannot run here
        print(f"skipped (not available on {device}): {', '.join(b for b in names if b not in backends)}")
    timer = B.Timer(device)
    report = {"environment": B.environment(device, args), "backends": backends,
              "copy": B.copy_bandwidth(device, timer, args.repeats, (4 if args.quick else 256) << 20), "models": []}
    print(f"copy: {report['copy']['copy_GBps']:.1f} GB/s; backends: {', '.join(backends)}")
    for model in args.models.split(","):
        result = run_model(model, device, backends, args.lam, timer, args.repeats, print, quick=args.quick)
        report["models"].append(result)
        print(table(result))
    path = args.out or HERE / "results" / (f"{B.device_slug(device)}-{datetime.date.today().isoformat()}"
                                           "-channel-directed.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
