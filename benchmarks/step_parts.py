#!/usr/bin/env python
"""Where the GPU time of one FGSGD step goes (CUDA only): the whole step against its parts, each captured
in a CUDA graph and replayed in interleaved rounds (bench_step.py's timer), on a ResNet parameter set.

Cases (fp32, momentum 0.9, the main mix sphere+oblique+stiefel normalize/qr, as bench_step.py):

- ``sgd-fused all``: torch.optim.SGD(fused=True) on every parameter (the baseline);
- ``fgsgd all``: the whole FGSGD step (k×k filters on the manifolds, the rest on fused SGD), with the
  small launches on a side stream (fgsgd_cuda/streams.py), and ``fgsgd all, one stream``
  (FGSGD_CUDA_OVERLAP=0);
- ``fgsgd 3x3``, ``fgsgd stem``, ``sgd-fused rest``: FGSGD on the 3×3 filters alone, on the other k×k
  filters alone (ResNet's 7×7 stem), and fused SGD on the non-filter parameters alone;
- ``..., Dyn kernel``: the stem and the whole step with FGSGD_CUDA_DYN=1, the run-time-shape kernel the stem ran
  before its Fixed<7, 7> kernels (csrc/cuda/kernels.cu: its arrays in local memory, 3 KB per thread), and
  ``..., Dyn kernel, 32-thread blocks`` with FGSGD_CUDA_SMALL_BLOCKS=1 too (a small launch of Dyn components
  in blocks of 32 threads).

Writes JSON (``--out``) and prints a table: the parts show what the whole step costs beyond the sum of
its bandwidth-bound parts.
"""
from __future__ import annotations

import torch

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_step as B  # noqa: E402
from fgsgd_cuda import FGSGD  # noqa: E402

KINDS = B.MIXES[B.MAIN_MIX]
RETRACTION = B.RETRACTION_SETS["default"]
BACKEND = "cuda"


def fgsgd_on(params, rest, backend=BACKEND, euclid=None):
    """FGSGD with ``params`` on the main mix and ``rest`` on fused SGD (``euclid``: the Euclidean group's
    options instead), bench_step.py's settings."""
    groups = [dict(params=params, manifolds=list(KINDS), collection="PIO", group_size=16,
                   retraction=dict(RETRACTION), backend=backend, check_finite=False, stabilize=50)] if params else []
    if rest:
        groups.append(dict(params=rest, manifolds=None, check_finite=False, **(euclid or dict(fused=True))))
    return FGSGD(groups, lr=B.LR, momentum=B.MOMENTUM)


def run_model(name: str, repeats: int, inner: int, device="cuda") -> dict:
    ps = B.make_param_set(name, B.model_shapes(name), device)

    def fresh(select):
        return [p for p, s in zip(B.fresh_params(ps), ps.shapes) if select(tuple(s))]

    def whole():
        params = B.fresh_params(ps)
        return fgsgd_on([p for p in params if B.is_filter(p.shape)], [p for p in params if not B.is_filter(p.shape)])

    is3 = (lambda s: B.is_filter(s) and s[2:] == (3, 3))
    stem = (lambda s: B.is_filter(s) and s[2:] != (3, 3))
    rest = (lambda s: not B.is_filter(s))
    steps = {"sgd-fused all": torch.optim.SGD(fresh(lambda s: True), lr=B.LR, momentum=B.MOMENTUM, fused=True).step,
             "fgsgd all": whole().step,
             "fgsgd all, one stream": B.with_env(whole().step, "FGSGD_CUDA_OVERLAP", "0"),
             "fgsgd 3x3": fgsgd_on(fresh(is3), []).step}
    if any(stem(tuple(s)) for s in ps.shapes):
        steps["fgsgd stem"] = fgsgd_on(fresh(stem), []).step
        dyn = (lambda step: B.with_env(step, "FGSGD_CUDA_DYN", "1"))
        small = (lambda step: B.with_env(step, "FGSGD_CUDA_SMALL_BLOCKS", "1"))
        steps["fgsgd stem, Dyn kernel"] = dyn(fgsgd_on(fresh(stem), []).step)
        steps["fgsgd stem, Dyn kernel, 32-thread blocks"] = dyn(small(fgsgd_on(fresh(stem), []).step))
        steps["fgsgd all, Dyn kernel"] = dyn(whole().step)
        steps["fgsgd all, Dyn kernel, 32-thread blocks"] = dyn(small(whole().step))
    steps["sgd-fused rest"] = torch.optim.SGD(fresh(rest), lr=B.LR, momentum=B.MOMENTUM, fused=True).step
    for step in steps.values():  # first steps (buffers) outside the graphs
        step()
    torch.cuda.synchronize()
    graphs = {n: B.capture_step(s) for n, s in steps.items()}
    times = B.replay_rounds(graphs, repeats, inner)
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med["sgd-fused all"]
    return dict(params=ps.numel, filter_params=ps.filter_numel,
                cases={n: dict(median_s=t, ratio_to_sgd_fused=t / base) for n, t in med.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet101,resnet50")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_parts.py needs a CUDA GPU")
    # bench_step.environment: device, versions, date, command, and which fgsgd_cuda (path, commit, changed files)
    report = {"environment": B.environment(torch.device("cuda"), args),
              "settings": dict(repeats=args.repeats, inner=args.inner, mix=B.MAIN_MIX, retraction="normalize/qr",
                               timer="CUDA graph replays between CUDA events, interleaved rounds, median"),
              "models": {}}
    out = Path(args.out) if args.out else HERE / "results" / (
        f"{B.slug(torch.cuda.get_device_name())}-{datetime.date.today().isoformat()}-parts.json")
    for model in args.models.split(","):
        r = report["models"][model] = run_model(model, args.repeats, args.inner)
        out.write_text(json.dumps(report, indent=1))
        print(f"\n== {model}: {r['params']:,} params, {r['filter_params']:,} in k×k filters")
        for n, c in r["cases"].items():
            print(f"{n:28s} {c['median_s'] * 1e6:9.1f} us  x{c['ratio_to_sgd_fused']:.3f}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
