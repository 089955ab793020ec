#!/usr/bin/env python
"""The fused manifold step kernel alone, on the 3×3 conv filters of ResNet-18/50/101, against the
memory-bound ceilings measured in the same run (CUDA only).

DESIGN.md §4: per fp32 parameter the step reads p, g, m and writes p, m (20 bytes), as
``torch._fused_sgd_`` with momentum does on the same tensors. Every case is captured in a CUDA graph
and replayed (no host overhead), interleaved with the others, median over rounds:

- ``copy``: ``dst.copy_(src)`` of one flat tensor as large as the filters (8 bytes/param moved);
- ``sgd-fused``: ``torch._fused_sgd_`` with momentum on the filter tensors (20 bytes/param);
- ``fgsgd staged`` / ``fgsgd sorted`` / ``fgsgd thread``: ``torch.ops.fgsgd.step_`` (momentum 0.9) over the
  same tensors with a sphere/oblique/stiefel (normalize/qr) mix, or one code; the shared-memory staged
  kernel (the default), the same with each block's components sorted by code (``FGSGD_CUDA_STEP=sorted``),
  and the one-thread-per-component kernel (``FGSGD_CUDA_STEP=thread``).

Writes JSON (``--out``) with GB/s and fractions of the copy bandwidth, and prints a table.
"""
from __future__ import annotations

import torch

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import fgsgd_cuda  # noqa: F401  (loads torch.ops.fgsgd)
from fgsgd_cuda import codes as C

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_step as B  # noqa: E402  (the parameter sets)

MIXES = {
    "mix": [C.SPHERE_NORMALIZE, C.OBLIQUE_NORMALIZE, C.STIEFEL_QR],
    "sphere": [C.SPHERE_NORMALIZE],
    "stiefel-qr": [C.STIEFEL_QR],
    "stiefel-cayley": [C.STIEFEL_CAYLEY],
    "sphere-exp": [C.SPHERE_EXP],
}


def filters(model: str, device, gen):
    """p, g, m (random, never zero) of every 3×3 filter tensor of ``model``, as (N, 3, 3) tensors."""
    shapes = [s for s in B.model_shapes(model) if len(s) == 4 and s[2:] == (3, 3)]
    out = []
    for s in shapes:
        n = s[0] * s[1]
        p = torch.randn(n, 3, 3, generator=gen)
        out.append(dict(p=p.to(device), g=(1e-2 * torch.randn(n, 3, 3, generator=gen)).to(device),
                        m=(1e-2 * torch.randn(n, 3, 3, generator=gen)).to(device)))
    return out


def timed_graphs(fns: dict, repeats: int, inner: int) -> dict:
    """Median seconds per call of every fn, from CUDA-graph replays in interleaved rounds."""
    graphs = {name: B.capture_step(fn, warmup=1) for name, fn in fns.items()}
    return {n: statistics.median(t) for n, t in B.replay_rounds(graphs, repeats, inner).items()}


def run_model(model: str, mixes, repeats: int, inner: int, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    ts = filters(model, device, gen)
    n = sum(t["p"].numel() for t in ts)
    fns = {}
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    sp = [t["p"].clone().view(-1) for t in ts]
    sg = [t["g"].view(-1) for t in ts]
    sm = [t["m"].clone().view(-1) for t in ts]
    fns["sgd-fused"] = lambda: torch._fused_sgd_(sp, sg, sm, weight_decay=0.0, momentum=0.9, lr=0.01, dampening=0.0,
                                                 nesterov=False, maximize=False, is_first_step=False)
    stepped = [sp]
    for mix in mixes:
        kinds = torch.tensor(MIXES[mix], dtype=torch.uint8)
        codes = [kinds[torch.randint(len(kinds), (t["p"].shape[0],), generator=gen)].to(device) for t in ts]
        ps = [t["p"].clone() for t in ts]
        torch.ops.fgsgd.projx_(ps, codes, [])
        ms = [t["m"].clone() for t in ts]
        gs = [t["g"] for t in ts]
        stepped.append(ps)
        for variant in ("staged", "sorted", "thread"):
            step = (lambda ps=ps, gs=gs, ms=ms, codes=codes: torch.ops.fgsgd.step_(
                ps, gs, ms, codes, [], [], [], 0.01, 0.9, 0.0, False, 0.0, False, False))
            fns[f"fgsgd {variant} {mix}"] = B.with_env(step, "FGSGD_CUDA_STEP", variant)
        if mix == "mix":  # group_clip's first pass, ‖ξ_i‖² (reads p and g: 8 B per parameter), staged or not
            for variant in ("staged", "thread"):
                fns[f"fgsgd sqnorm {variant} mix"] = B.with_env(
                    lambda ps=ps, gs=gs, codes=codes: torch.ops.fgsgd.tangent_sqnorm(ps, gs, codes, [], 0.0),
                    "FGSGD_CUDA_STEP", variant)
        if mix == "mix":  # the codes as FGSGD keeps them: 2 bits per component (fgsgd_cuda.codes.pack)
            packed = [C.pack(c) for c in codes]
            fns["fgsgd staged mix packed"] = B.with_env(
                lambda ps=ps, gs=gs, ms=ms, codes=packed: torch.ops.fgsgd.step_(
                    ps, gs, ms, codes, [], [], [], 0.01, 0.9, 0.0, False, 0.0, False, False), "FGSGD_CUDA_STEP", "staged")
    med = timed_graphs(fns, repeats, inner)
    copy_gbps = 8 * n / med["copy"] / 1e9
    rows = {}
    for name, t in med.items():
        moved = 8 if name == "copy" or " sqnorm " in name else 20  # bytes per parameter (sqnorm: read p, g)
        gbps = moved * n / t / 1e9
        rows[name] = dict(median_s=t, GBps=gbps, fraction_of_copy_bw=gbps / copy_gbps,
                          ratio_to_sgd_fused=t / med["sgd-fused"])
    finite = all(bool(torch.isfinite(p).all()) for ps in stepped for p in ps)  # a broken kernel shows here
    return dict(filter_params=n, filter_tensors=len(ts), copy_GBps=copy_gbps, cases=rows, finite=finite)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet50,resnet101")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not fgsgd_cuda._ext.HAS_CUDA_KERNELS:
        raise SystemExit("bench_kernels.py needs a CUDA GPU and fgsgd_cuda._C built with CUDA")
    device = torch.device("cuda")
    # bench_step.environment: device, versions, date, command, and which fgsgd_cuda (path, commit, changed files)
    report = {"environment": B.environment(device, args),
              "settings": dict(repeats=args.repeats, inner=args.inner, dtype="float32", lr=0.01, momentum=0.9,
                               timer="CUDA graph replays between CUDA events, interleaved rounds, median"),
              "models": {}}
    out = Path(args.out) if args.out else HERE / "results" / (
        f"{B.slug(torch.cuda.get_device_name())}-{datetime.date.today().isoformat()}-kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        r = run_model(model, args.mixes.split(","), args.repeats, args.inner, device)
        report["models"][model] = r
        out.write_text(json.dumps(report, indent=1))  # after every model: a run cut short keeps what it measured
        print(f"\n== {model}: {r['filter_params']:,} params in {r['filter_tensors']} 3x3 filter tensors; "
              f"copy {r['copy_GBps']:.0f} GB/s; finite={r['finite']}")
        print(f"{'case':32s} {'us':>9s} {'GB/s':>8s} {'% copy':>7s} {'x sgd-fused':>11s}")
        for name, c in r["cases"].items():
            print(f"{name:32s} {c['median_s'] * 1e6:9.1f} {c['GBps']:8.0f} {100 * c['fraction_of_copy_bw']:7.1f} "
                  f"{c['ratio_to_sgd_fused']:11.3f}")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
