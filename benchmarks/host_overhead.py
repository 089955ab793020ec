#!/usr/bin/env python
"""Host time of one eager optimizer step, FGSGD against torch.optim.SGD, and where FGSGD's goes.

An eager step is host-bound when its Python, argument conversion and kernel launches outlast its kernels
(ResNet-101 on an H100: fused SGD spent 1.41 ms of host time per step for 0.37 ms of GPU time). This times
the host side alone: ``--inner`` steps back to back with no synchronisation inside the timed loop (on a GPU
the launches queue), then a synchronisation outside it; ``--rounds`` rounds, the cases interleaved, medians.

Cases (a ResNet parameter set, fp32, momentum 0.9, the main mix sphere+oblique+stiefel normalize/qr, every
k×k filter on the manifolds and the rest on fused SGD, as bench_step.py):

- ``sgd-fused all``, ``sgd-foreach all``: the baselines;
- ``fgsgd all``: the whole FGSGD step; ``fgsgd all, one stream``: with FGSGD_CUDA_OVERLAP=0 (no side stream);
  ``fgsgd all, torch's sgd()``: its Euclidean group through torch's functional step, which regroups the tensors
  by device and dtype at every step, instead of the direct call of the fused kernel (fgsgd_cuda/euclidean.py);
- ``fgsgd filters``: FGSGD on the k×k filters alone; ``fgsgd filters, no kernels``: the same with the
  backend's ``step_`` a no-op, i.e. FGSGD's Python alone;
- ``fgsgd ops``: the backend's ``step_`` called with the lists that step passes (argument conversion,
  checks, slot tables, launches), without the optimizer around it;
- ``sgd-fused rest``: fused SGD on the non-filter parameters alone (what FGSGD hands to torch);
- ``fork/join``: the side stream's fork and join with nothing between (CUDA only).

    python benchmarks/host_overhead.py                       # GPU if present, ResNet-101 and ResNet-50
    python benchmarks/host_overhead.py --device cpu --width-div 64 --profile

On the CPU the kernels run inside the host time; ``--width-div`` divides the channels (the same tensors,
smaller) so that they cost little. ``--profile`` prints cProfile's top functions of ``fgsgd all`` and of
``sgd-fused all``. Writes JSON (``--out``).
"""
from __future__ import annotations

import torch  # before fgsgd_cuda (see bench_step.py)

import argparse
import contextlib
import cProfile
import datetime
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_step as B  # noqa: E402
from fgsgd_cuda import dispatch, euclidean, streams  # noqa: E402
from step_parts import fgsgd_on  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def patched(obj, name: str, value):
    """obj.name replaced by value while inside, then restored (an instance attribute set over a method is
    removed again). Cheap enough for the timed loop, unlike unittest.mock."""
    own = vars(obj)
    had, old = name in own, own.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def with_patch(step, obj, name: str, value):
    """step run with obj.name replaced by value (as bench_step.with_env does for an environment variable)."""
    def run():
        with patched(obj, name, value):
            step()
    return run


def recorded_calls(opt, impl) -> list:
    """The (args, kwargs) of every backend step_ call of one step of ``opt`` (the step is taken)."""
    calls = []
    real = type(impl).step_

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return real(impl, *args, **kwargs)
    with patched(impl, "step_", record):
        opt.step()
    return calls


def host_rounds(steps: dict, device, rounds: int, inner: int) -> dict[str, list[float]]:
    """Seconds of host time per step of every case: ``inner`` calls back to back, timed without a
    synchronisation (one after, untimed), in ``rounds`` interleaved rounds."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            times[name].append((time.perf_counter() - t0) / inner)
            sync(device)
    return times


def profile(step, n: int, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        step()
    pr.disable()
    out = __import__("io").StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def run_model(name: str, device, width_div: int, args) -> dict:
    shapes = B.param_shapes(B.resnet_layers(name, width_div)) if width_div > 1 else B.model_shapes(name)
    ps = B.make_param_set(name, shapes, device)
    backend = dispatch.resolve("auto", device)
    euclid = B.euclid_kwargs(B.sgd_support(device))  # fused SGD where it runs, else foreach
    sgd_name = "sgd-fused" if euclid.get("fused") else "sgd-foreach"

    def fresh(select):
        return [p for p, s in zip(B.fresh_params(ps), ps.shapes) if select(tuple(s))]

    def whole():
        params = B.fresh_params(ps)
        return fgsgd_on([p for p in params if B.is_filter(p.shape)], [p for p in params if not B.is_filter(p.shape)],
                        backend=backend, euclid=euclid)

    filters = fgsgd_on(fresh(B.is_filter), [], backend=backend)
    impl = dispatch.get(backend, device)
    filters.step()                                    # momentum buffers made
    calls = recorded_calls(filters, impl)             # the steady-state calls of step_

    def ops():
        for a, k in calls:
            impl.step_(*a, **k)

    def torch_sgd(step):
        """step with the Euclidean shortcut off (its device-and-dtype test made to fail)."""
        return with_patch(step, euclidean, "_one_device_and_dtype", lambda params: False)

    def no_kernels(step):
        return with_patch(step, impl, "step_", lambda *a, **k: None)

    steps = {f"{sgd_name} all": torch.optim.SGD(fresh(lambda s: True), lr=B.LR, momentum=B.MOMENTUM, **euclid).step,
             "sgd-foreach all": torch.optim.SGD(fresh(lambda s: True), lr=B.LR, momentum=B.MOMENTUM,
                                                foreach=True).step,
             "fgsgd all": whole().step,
             "fgsgd all, one stream": B.with_env(whole().step, "FGSGD_CUDA_OVERLAP", "0"),
             "fgsgd all, torch's sgd()": torch_sgd(whole().step),
             "fgsgd filters": filters.step,
             "fgsgd filters, no kernels": no_kernels(fgsgd_on(fresh(B.is_filter), [], backend=backend).step),
             "fgsgd ops": ops,
             f"{sgd_name} rest": torch.optim.SGD(fresh(lambda s: not B.is_filter(s)), lr=B.LR, momentum=B.MOMENTUM,
                                                 **euclid).step}
    if device.type == "cuda":
        overlap = streams.Overlap()

        def fork_join():
            with overlap.side(device):
                pass
            overlap.join()
        steps["fork/join"] = fork_join
    for step in steps.values():  # first steps (buffers) and warm-up outside the timing
        for _ in range(3):
            step()
    sync(device)
    times = host_rounds(steps, device, args.rounds, args.inner)
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med[f"{sgd_name} all"]
    out = dict(params=ps.numel, tensors=len(ps.shapes), filter_tensors=sum(B.is_filter(s) for s in ps.shapes),
               width_div=width_div, backend=backend, baseline=f"{sgd_name} all",
               cases={n: dict(median_host_s=t, ratio=t / base) for n, t in med.items()})
    if args.profile:
        out["profile"] = {n: profile(steps[n], 100, args.profile_top) for n in ("fgsgd all", f"{sgd_name} all")}
    return out


def table(name: str, r: dict) -> str:
    lines = [f"== {name}: {r['tensors']} tensors ({r['filter_tensors']} k×k filters), {r['params']:,} parameters, "
             f"channels / {r['width_div']}, backend {r['backend']}",
             f"{'case':32s} {'host µs/step':>13s} {'× ' + r['baseline']:>16s}"]
    for n, c in r["cases"].items():
        lines.append(f"{n:32s} {c['median_host_s'] * 1e6:13.1f} {c['ratio']:16.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="resnet101,resnet50")
    ap.add_argument("--width-div", type=int, default=None,
                    help="divide the channels by this (default: 1 on a GPU, 64 on the CPU)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="cProfile of fgsgd all and of the SGD baseline")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    width_div = args.width_div or (1 if device.type == "cuda" else 64)
    report = {"environment": B.environment(device, args),
              "settings": dict(rounds=args.rounds, inner=args.inner, width_div=width_div, mix=B.MAIN_MIX,
                               retraction="normalize/qr",
                               timer="host time of `inner` steps back to back (no synchronisation inside), "
                                     "interleaved rounds, median"),
              "models": {}}
    out = Path(args.out) if args.out else HERE / "results" / (
        f"{B.device_slug(device)}-{datetime.date.today().isoformat()}-host.json")
    for model in args.models.split(","):
        r = report["models"][model] = run_model(model, device, width_div, args)
        print(table(model, r), flush=True)
        for n, text in r.get("profile", {}).items():
            print(f"-- cProfile, {n}:\n{text}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
