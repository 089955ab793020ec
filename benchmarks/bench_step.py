#!/usr/bin/env python
"""One optimizer step of FG-SGD against torch.optim.SGD (and geoopt), on the parameters of ResNet-18/50/101
(and SE-ResNet-50/101 with ``--models``).

Every case gets the same parameters (a fresh copy of one random set) and the same random
gradients (never zeros), lr 0.01, momentum 0.9, fp32. Cases:

- ``sgd-forloop`` / ``sgd-foreach`` / ``sgd-fused``: ``torch.optim.SGD`` (a variant the device does
  not support is listed as skipped, with the reason);
- ``fgsgd[<backend>] <mix> <retraction>``: :class:`fgsgd_cuda.FGSGD` with every k×k conv weight
  (k > 1) in a PIO manifold group (group_size 16) and everything else (BN, 1×1 convs, fc) in a
  Euclidean group run by the same SGD implementation as the baseline (fused where the device
  supports it, else foreach); ``check_finite=False`` (it adds a host sync);
- ``geoopt <mix> <retraction>``: ``geoopt.optim.RiemannianSGD`` with the same manifold per component
  (same grouping), one ``ManifoldParameter`` per (manifold, component shape) holding those components
  as a batch, and plain tensors for the Euclidean rest (only when geoopt is installed).

Timing: warm-up steps, then the median over repetitions; CUDA events on GPU (synchronised around
every step, so host overhead counts), ``time.perf_counter`` on CPU. The fast cases are interleaved
(one step of every case per round) so that drift on a shared machine hits them all alike; the slow
ones (torch backend, geoopt) run after them with fewer repetitions.

Reported per case: median step time, ratio to ``sgd-fused`` (and to ``sgd-foreach``), achieved GB/s =
20 bytes × params / time (the bytes fused SGD with momentum moves: read p, g, m; write p, m), that
as a fraction of a device copy measured in the same run (``dst.copy_(src)``, counted as read +
write), optimizer-state bytes per parameter, and ops / kernel launches per step. See README.md.

Usage::

    python benchmarks/bench_step.py                       # ResNet-18/50/101, every available backend
    python benchmarks/bench_step.py --quick               # tiny sizes, a smoke run
    python benchmarks/bench_step.py --models resnet50 --backends cuda,triton --repeats 50
"""
from __future__ import annotations

# torch first: older fgsgd_cuda builds could not load fgsgd_cuda._C (libc10.so) when imported before torch.
import torch

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fgsgd_cuda
from fgsgd_cuda import FGSGD, dispatch, make_grouping
from fgsgd_cuda import codes as C

HERE = Path(__file__).resolve().parent
BYTES_PER_PARAM = 20          # fp32 momentum step: read p, g, m (12) + write p, m (8)
LR = 0.01
MOMENTUM = 0.9

# --------------------------------------------------------------------------------------------------
# Parameter sets. The layer lists follow torchvision's resnet18 / resnet50 / resnet101 (ResNet v1.5:
# the stride sits on the 3×3 conv of a bottleneck); only the shapes matter. ("conv", O, I, k) is a
# bias-free conv weight, ("bn", C) a BatchNorm's weight and bias, ("linear", O, I) a weight and bias,
# ("se", C, r) a squeeze-and-excitation module on C channels (Hu et al. 2018): 1×1 convs with bias
# C → C/r → C, as in Cadene's pretrainedmodels se_resnet50/101 (timm's legacy_seresnet*), whose other
# parameter shapes are torchvision's. In the row view (--row-view) the second conv's rows are C/r long:
# 16, 32, 64 and 128 entries on SE-ResNet-50/101.
# --------------------------------------------------------------------------------------------------
RESNETS = {
    # name: (block, blocks per stage, SE reduction r or 0 for none)
    "resnet18": ("basic", (2, 2, 2, 2), 0),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 0),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 0),
    "seresnet50": ("bottleneck", (3, 4, 6, 3), 16),
    "seresnet101": ("bottleneck", (3, 4, 23, 3), 16),
}
TORCHVISION_PARAM_COUNTS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet101": 44_549_160}
# torchvision's ResNet-50/101 plus 2·C·C/16 + C/16 + C per bottleneck with C output channels
PARAM_COUNTS = {**TORCHVISION_PARAM_COUNTS, "seresnet50": 28_088_024, "seresnet101": 49_326_872}


def resnet_layers(name: str, width_div: int = 1, num_classes: int = 1000) -> list[tuple]:
    """The conv / bn / se / linear layers of a torchvision ResNet (or SE-ResNet), channels divided by
    ``width_div``."""
    block, stages, se = RESNETS[name]
    expansion = 1 if block == "basic" else 4
    w = lambda c: max(1, c // width_div)  # noqa: E731
    layers = [("conv", w(64), 3, 7), ("bn", w(64))]
    inplanes = w(64)
    for stage, nblocks in enumerate(stages):
        planes = w(64 * 2 ** stage)
        for b in range(nblocks):
            stride = 2 if stage > 0 and b == 0 else 1
            if block == "basic":
                layers += [("conv", planes, inplanes, 3), ("bn", planes), ("conv", planes, planes, 3), ("bn", planes)]
            else:
                layers += [("conv", planes, inplanes, 1), ("bn", planes), ("conv", planes, planes, 3), ("bn", planes),
                           ("conv", planes * expansion, planes, 1), ("bn", planes * expansion)]
            if se:
                layers.append(("se", planes * expansion, se))
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                layers += [("conv", planes * expansion, inplanes, 1), ("bn", planes * expansion)]
            inplanes = planes * expansion
    layers.append(("linear", num_classes, inplanes))
    return layers


def param_shapes(layers: list[tuple]) -> list[tuple[int, ...]]:
    """The parameter shapes of a layer list, in model order."""
    shapes = []
    for kind, *dims in layers:
        if kind == "conv":
            o, i, k = dims
            shapes.append((o, i, k, k))
        elif kind == "bn":
            shapes += [(dims[0],), (dims[0],)]
        elif kind == "linear":
            o, i = dims
            shapes += [(o, i), (o,)]
        elif kind == "se":
            c, r = dims
            h = max(1, c // r)  # the squeezed width
            shapes += [(h, c, 1, 1), (h,), (c, h, 1, 1), (c,)]
        else:
            raise ValueError(kind)
    return shapes


def model_shapes(name: str, quick: bool = False) -> list[tuple[int, ...]]:
    """Parameter shapes of ``name``; ``quick``: channels / 8 and 100 classes (a smoke-test size)."""
    shapes = param_shapes(resnet_layers(name, *((8, 100) if quick else (1, 1000))))
    if not quick:
        n = sum(math.prod(s) for s in shapes)
        assert n == PARAM_COUNTS[name], (name, n)
    return shapes


def is_filter(shape) -> bool:
    """A k×k conv weight with k > 1: FGSGD's manifold group (as fgsgd_cuda.param_groups does)."""
    return len(shape) == 4 and (shape[2] > 1 or shape[3] > 1)


@dataclass
class ParamSet:
    name: str
    shapes: list
    params: list            # master copies (every case clones them)
    grads: list             # shared, fixed random gradients (never modified by the optimizers)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def filter_numel(self) -> int:
        return sum(p.numel() for p in self.params if is_filter(p.shape))


def make_param_set(name: str, shapes, device, seed: int = 0, channels_last: bool = False) -> ParamSet:
    """Random weights and fixed gradients of the given shapes; ``channels_last``: 4-D ones (and their gradients,
    as autograd makes them) in that layout, which every case keeps (clones preserve it)."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for s in shapes:
        fan_in = math.prod(s[1:]) if len(s) > 1 else 1
        p = (torch.randn(s, generator=gen) / math.sqrt(fan_in)).to(device)
        g = (torch.randn(s, generator=gen) * 1e-2).to(device)
        if channels_last and len(s) == 4:
            p, g = p.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
        params.append(p)
        grads.append(g)
    return ParamSet(name, list(shapes), params, grads)


def fresh_params(ps: ParamSet) -> list[torch.Tensor]:
    out = []
    for p, g in zip(ps.params, ps.grads):
        q = p.clone().requires_grad_(True)
        q.grad = g
        out.append(q)
    return out


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------
MIXES = {
    "sphere+oblique+stiefel": ["sphere", "oblique", "stiefel"],
    "sphere": ["sphere"],
    "oblique": ["oblique"],
    "stiefel": ["stiefel"],
    "sphere+oblique+stiefel+euclidean": ["sphere", "oblique", "stiefel", "euclidean"],
}
MAIN_MIX = "sphere+oblique+stiefel"
RETRACTION_SETS = {  # label -> the retraction of every kind
    "default": {"sphere": "normalize", "oblique": "normalize", "stiefel": "qr"},
    "alt": {"sphere": "exp", "oblique": "exp", "stiefel": "cayley"},
}


def retraction_label(kinds, retraction: dict) -> str:
    seen = []
    for k in kinds:
        if k != "euclidean" and retraction[k] not in seen:
            seen.append(retraction[k])
    return "/".join(seen)


@dataclass
class Case:
    name: str
    family: str                       # "sgd" | "fgsgd" | "geoopt"
    backend: str = ""                 # fgsgd backend, or the SGD variant
    mix: str = ""
    retraction: dict = field(default_factory=dict)
    slow: bool = False
    skip: str | None = None           # reason when the case cannot run here
    build: Callable | None = None     # ParamSet -> (step callable, optimizer, own tensors)
    result: dict = field(default_factory=dict)


def sgd_support(device) -> dict[str, str | None]:
    """None when the SGD variant runs on ``device``, else why not (found by trying it)."""
    out = {}
    for variant, kw in (("forloop", dict(foreach=False, fused=False)), ("foreach", dict(foreach=True)),
                        ("fused", dict(fused=True))):
        p = torch.zeros(4, device=device, requires_grad=True)
        p.grad = torch.ones(4, device=device)
        try:
            torch.optim.SGD([p], lr=LR, momentum=MOMENTUM, **kw).step()
            out[variant] = None
        except Exception as exc:  # noqa: BLE001
            out[variant] = f"torch.optim.SGD({', '.join(f'{k}={v}' for k, v in kw.items())}) fails on " \
                           f"{torch.device(device).type}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return out


def euclid_kwargs(support) -> dict:
    """How FGSGD's Euclidean group runs: like the baseline (fused where supported, else foreach)."""
    return {"fused": True} if support["fused"] is None else {"foreach": True}


def build_sgd(kw):
    def build(ps: ParamSet):
        params = fresh_params(ps)
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **kw)
        return opt.step, opt, params
    return build


def is_row_weight(shape) -> bool:
    """A 1×1 conv or linear weight: the row view's manifold group (fgsgd_cuda.param_groups(row_view=True))."""
    return len(shape) == 2 or (len(shape) == 4 and shape[2] == shape[3] == 1)


def build_fgsgd(kinds, retraction, backend, ekw, stabilize, rows_backend=None, group_clip=None, capturable=False):
    """FGSGD: the k×k filters on ``kinds``; with ``rows_backend`` the row view too (1×1 convs and the linear
    weight, one row per output channel, on sphere+oblique) on that backend; ``group_clip``: the group step
    size s_g on (DESIGN.md §1 step 2); ``capturable``: FGSGD(capturable=True) with a tensor lr (step counts
    and lr read by the kernels, Euclidean parameters on torch's fused SGD)."""
    def build(ps: ParamSet):
        params = fresh_params(ps)
        filters = [p for p in params if is_filter(p.shape)]
        rows = [p for p in params if rows_backend and is_row_weight(p.shape)]
        rest = [p for p in params if not is_filter(p.shape) and not (rows_backend and is_row_weight(p.shape))]
        groups = [dict(params=filters, manifolds=list(kinds), collection="PIO", group_size=16,
                       retraction=dict(retraction), backend=backend, check_finite=False, stabilize=stabilize,
                       group_clip=group_clip)]
        if rows:
            groups.append(dict(params=rows, manifolds=["sphere", "oblique"], collection="PIO", group_size=16,
                               retraction=dict(retraction), backend=rows_backend, check_finite=False,
                               stabilize=stabilize))
        if rest:
            groups.append(dict(params=rest, manifolds=None, check_finite=False,
                               **(dict(fused=True) if capturable else ekw)))
        lr = torch.tensor(LR, device=params[0].device) if capturable else LR
        opt = FGSGD(groups, lr=lr, momentum=MOMENTUM, capturable=capturable)
        return opt.step, opt, params
    return build


def geoopt_available() -> str | None:
    """None when geoopt imports, else why not."""
    try:
        import geoopt  # noqa: F401
        return None
    except Exception as exc:  # noqa: BLE001
        return f"geoopt is not importable ({type(exc).__name__}: {exc}); `pip install geoopt` to compare"


def build_geoopt(kinds, retraction):
    """geoopt.optim.RiemannianSGD with the same manifold per component as FGSGD's grouping."""
    def build(ps: ParamSet):
        import geoopt
        dev = ps.params[0].device
        manifold_of_code = {
            C.SPHERE_NORMALIZE: geoopt.Sphere, C.SPHERE_EXP: geoopt.SphereExact,
            C.OBLIQUE_NORMALIZE: geoopt.Sphere, C.OBLIQUE_EXP: geoopt.SphereExact,   # per column (see below)
            C.STIEFEL_QR: geoopt.EuclideanStiefel, C.STIEFEL_CAYLEY: geoopt.CanonicalStiefel,
        }
        buckets: dict = {}
        rest, rest_g = [], []
        j = 0
        for p, g in zip(ps.params, ps.grads):
            if not is_filter(p.shape):
                rest.append(p.clone())
                rest_g.append(g)
                continue
            o, i, a, b = p.shape
            grouping = make_grouping(o, i, manifolds=list(kinds), collection="PIO", group_size=16,
                                     selection="random", seed=7919 * j, retraction=dict(retraction))
            j += 1
            codes = grouping.codes.to(dev)
            pv, gv = p.reshape(-1, a, b), g.reshape(-1, a, b)  # channels-last: copies (geoopt's are copies anyway)
            for code in torch.unique(codes).tolist():
                sel = codes == code
                bp, bg = buckets.setdefault((code, a, b), ([], []))
                bp.append(pv[sel])
                bg.append(gv[sel])
        tensors = []
        for (code, a, b), (bp, bg) in buckets.items():
            x, g = torch.cat(bp), torch.cat(bg)
            # onto the manifold with FGSGD's projx (geoopt's Stiefel projx is a batched SVD: on a GPU it cost
            # more than the steps being timed); the same points as FGSGD starts from
            x = fgsgd_cuda.ops.projx(x, code)
            man = C.manifold_of(code)
            if man == "sphere":                       # ‖x‖_F = 1: a vector of A·B entries
                x, g = x.reshape(-1, a * b), g.reshape(-1, a * b)
            elif man == "oblique":                    # unit columns: the rows of xᵀ
                x, g = x.transpose(-1, -2).contiguous(), g.transpose(-1, -2).contiguous()
            if man == "euclidean":
                t = torch.nn.Parameter(x.clone())
            else:
                t = geoopt.ManifoldParameter(x.clone(), manifold=manifold_of_code[code]())
            t.grad = g.clone()
            tensors.append(t)
        for p, g in zip(rest, rest_g):
            t = torch.nn.Parameter(p)
            t.grad = g.clone()
            tensors.append(t)
        opt = geoopt.optim.RiemannianSGD(tensors, lr=LR, momentum=MOMENTUM, stabilize=None)
        return opt.step, opt, tensors
    return build


def make_cases(device, backends, *, geoopt_reason, support, stabilize, retractions=("default", "alt"),
               row_view=False, group_clip=None, capturable=False) -> list[Case]:
    cases = []
    for variant, kw in (("forloop", dict(foreach=False, fused=False)), ("foreach", dict(foreach=True)),
                        ("fused", dict(fused=True))):
        cases.append(Case(f"sgd-{variant}", "sgd", backend=variant, skip=support[variant], build=build_sgd(kw)))
    ekw = euclid_kwargs(support)
    variants = []
    for mix, kinds in MIXES.items():
        for rlabel in retractions:
            variants.append((mix, kinds, RETRACTION_SETS[rlabel]))
    for backend in backends:
        for mix, kinds, ret in variants:
            name = f"fgsgd[{backend}] {mix} {retraction_label(kinds, ret)}"
            skip = None
            if not dispatch.available(backend, device):
                skip = f"backend {backend!r} is not available on {torch.device(device).type} " \
                       f"(fgsgd_cuda.dispatch.available is False)"
            cases.append(Case(name, "fgsgd", backend=backend, mix=mix, retraction=ret, slow=backend == "torch",
                              skip=skip, build=build_fgsgd(kinds, ret, backend, ekw, stabilize)))
            if group_clip and mix == MAIN_MIX:
                cases.append(Case(f"{name} +clip", "fgsgd", backend=backend, mix=mix, retraction=ret,
                                  slow=backend == "torch", skip=skip,
                                  build=build_fgsgd(kinds, ret, backend, ekw, stabilize, group_clip=group_clip)))
            if capturable and mix == MAIN_MIX and backend in ("cpu", "cuda", "triton"):
                cases.append(Case(f"{name} capturable", "fgsgd", backend=backend, mix=mix, retraction=ret,
                                  skip=skip or support["fused"],
                                  build=build_fgsgd(kinds, ret, backend, ekw, stabilize, capturable=True)))
            if row_view and mix == MAIN_MIX and backend != "torch":
                # the row view on the same backend, and with its rows on the per-tensor torch backend (what
                # FGSGD did before the row kernels)
                for rb in (backend, "torch"):
                    cases.append(Case(f"{name} +rows[{rb}]", "fgsgd", backend=backend, mix=mix, retraction=ret,
                                      skip=skip, build=build_fgsgd(kinds, ret, backend, ekw, stabilize, rb)))
    for mix, kinds, ret in variants:
        cases.append(Case(f"geoopt {mix} {retraction_label(kinds, ret)}", "geoopt", backend="geoopt", mix=mix,
                          retraction=ret, slow=True, skip=geoopt_reason, build=build_geoopt(kinds, ret)))
    return cases


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
class Timer:
    """One call's time. GPU: CUDA events (synchronised before and after). CPU: ``time.perf_counter``
    (``clock="wall"``, the default) or ``time.process_time`` (``clock="cpu"``: the CPU time of this
    process, all its threads; with one thread it leaves out the time the OS gave to other processes,
    which makes it the steadier clock on a shared, oversubscribed machine). Both CPU clocks are kept."""

    def __init__(self, device, clock: str = "wall"):
        self.cuda = torch.device(device).type == "cuda"
        self.clock = "cuda-events" if self.cuda else clock
        self.cpu_times: list[float] = []          # process_time of every call (CPU devices)
        self.wall_times: list[float] = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        """Seconds for one call of fn, by the chosen clock."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        self.wall_times.append(t1 - t0)
        self.cpu_times.append(c1 - c0)
        return c1 - c0 if self.clock == "cpu" else t1 - t0

    def timed(self, fn) -> tuple[float, float | None, float | None]:
        """(seconds by the chosen clock, wall seconds, process CPU seconds); the last two None on GPU."""
        t = self.time(fn)
        return (t, None, None) if self.cuda else (t, self.wall_times[-1], self.cpu_times[-1])


def copy_bandwidth(device, timer: Timer, repeats: int, nbytes: int) -> dict:
    """GB/s of dst.copy_(src) (read + write counted) and of dst.add_(src) (2 reads + 1 write)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.randn(n, device=device)
    out = {"bytes": n * 4, "clock": timer.clock}
    for name, fn, moved in (("copy", lambda: dst.copy_(src), 2), ("add", lambda: dst.add_(src), 3)):
        for _ in range(3):
            fn()
        ts = [timer.timed(fn) for _ in range(max(repeats, 5))]
        t = statistics.median(x for x, _, _ in ts)
        out[f"{name}_median_s"] = t
        out[f"{name}_GBps"] = moved * n * 4 / t / 1e9
        if not timer.cuda:
            out[f"{name}_median_wall_s"] = statistics.median(w for _, w, _ in ts)
            out[f"{name}_median_cpu_s"] = statistics.median(p for _, _, p in ts)
    del src, dst
    return out


def state_bytes(opt) -> dict:
    """Bytes of the tensors in the optimizer's state (each storage once): momentum and the rest."""
    seen, momentum, other = set(), 0, 0

    def add(t, is_momentum):
        nonlocal momentum, other
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            return
        seen.add(key)
        nb = t.untyped_storage().nbytes()
        if is_momentum:
            momentum += nb
        else:
            other += nb

    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                add(v, k == "momentum_buffer")
    def walk(v):
        if isinstance(v, torch.Tensor):
            add(v, False)
        elif isinstance(v, (tuple, list)):
            for t in v:
                walk(t)

    for v in getattr(opt, "_group_cache", {}).values():  # group_clip: groups of every component and their sort
        walk(v)
    return {"momentum_bytes": momentum, "other_bytes": other, "total_bytes": momentum + other}


VIEWISH = ("profiler.",)


class OpCounter:
    """Counts the ops dispatched during a step (views and profiler markers left out)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                if not getattr(func, "is_view", False) and not name.startswith(VIEWISH):
                    counter[name] += 1
                return func(*args, **(kwargs or {}))

        self.counter = counter
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def count_launches(step, device, cuda_kernels: bool = False) -> dict:
    """One step's dispatched ops (and fgsgd ops among them); with ``cuda_kernels`` also the GPU kernels
    (torch.profiler: on the lent H200 machine one profiler session took long enough that 14 of them did
    not fit a 4-minute run, hence opt-in)."""
    with OpCounter() as oc:
        step()
    out = {"ops": sum(oc.counter.values()),
           "fgsgd_ops": sum(v for k, v in oc.counter.items() if k.startswith("fgsgd.")),
           "op_names": dict(oc.counter.most_common(12))}
    if cuda_kernels and torch.device(device).type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["cuda_kernels"] = len(kernels)
        out["cuda_kernel_names"] = dict(Counter(e.name[:80] for e in kernels).most_common(8))
    return out


def grads_checksum(ps: ParamSet) -> float:
    return float(sum(g.double().abs().sum() for g in ps.grads))


def run_model(ps: ParamSet, cases: list[Case], device, args, timer: Timer, log) -> None:
    """Times every runnable case on ``ps``; fills case.result."""
    t_model = time.perf_counter()
    fast = [c for c in cases if not c.skip and not c.slow]
    slow = [c for c in cases if not c.skip and c.slow]
    n = ps.numel
    check0 = grads_checksum(ps)

    def setup(c: Case):
        timer.sync()
        t0 = time.perf_counter()
        step, opt, tensors = c.build(ps)
        timer.sync()
        c.result["init_s"] = time.perf_counter() - t0
        return step, opt, tensors

    def finish(c: Case, step, opt, tensors, timed):
        times = [t for t, _, _ in timed]
        c.result["clock"] = timer.clock
        c.result["times_s"] = times
        c.result["median_s"] = statistics.median(times)
        c.result["min_s"] = min(times)
        if not timer.cuda:
            c.result["wall_times_s"] = [w for _, w, _ in timed]
            c.result["cpu_times_s"] = [p for _, _, p in timed]
            c.result["median_wall_s"] = statistics.median(c.result["wall_times_s"])
            c.result["median_cpu_s"] = statistics.median(c.result["cpu_times_s"])
        c.result["repeats"] = len(times)
        sb = state_bytes(opt)
        c.result.update(sb)
        c.result["state_bytes_per_param"] = sb["total_bytes"] / n
        c.result["finite"] = bool(all(torch.isfinite(t).all() for t in tensors))
        if not args.no_count:
            c.result["launches"] = count_launches(step, device, args.cuda_kernels)
        if timer.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            c.result["step_transient_bytes"] = torch.cuda.max_memory_allocated() - before
        log(f"  {c.name}: median {c.result['median_s'] * 1e3:.3f} ms ({time.perf_counter() - t_model:.0f} s)")

    # fast cases: all built, warmed up, then timed in interleaved rounds
    live = {}
    for c in fast:
        try:
            live[c.name] = setup(c)
            for _ in range(args.warmup):
                live[c.name][0]()
            timer.sync()
        except Exception as exc:  # noqa: BLE001
            c.skip = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            live.pop(c.name, None)
            log(f"  {c.name}: {c.skip}")
    runnable = [c for c in fast if c.name in live]
    times = {c.name: [] for c in runnable}
    for r in range(args.repeats):
        order = runnable[r % len(runnable):] + runnable[:r % len(runnable)] if runnable else []
        for c in order if args.interleave else []:
            times[c.name].append(timer.timed(live[c.name][0]))
    if not args.interleave:
        for c in runnable:
            times[c.name] = [timer.timed(live[c.name][0]) for _ in range(args.repeats)]
    for c in runnable:
        finish(c, *live[c.name], times[c.name])
    if timer.cuda and args.graph:
        graph_rounds(runnable, live, args.repeats, args.graph_inner, log)
    live.clear()
    gc.collect()

    # slow cases: one at a time, fewer repetitions
    for c in slow:
        try:
            step, opt, tensors = setup(c)
            for _ in range(args.slow_warmup):
                step()
            ts = [timer.timed(step) for _ in range(args.slow_repeats)]
            finish(c, step, opt, tensors, ts)
        except Exception as exc:  # noqa: BLE001
            c.skip = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            log(f"  {c.name}: {c.skip}")
        finally:
            step = opt = tensors = None
            gc.collect()
        log(f"  {c.name}: {c.result.get('median_s', float('nan')) * 1e3:.1f} ms")
    if grads_checksum(ps) != check0:
        log("  WARNING: an optimizer modified the shared gradients; later cases saw other gradients")


def with_env(step, name: str, value: str):
    """step run with the environment variable name=value, restored after: the launchers read their switches
    (FGSGD_CUDA_STEP, FGSGD_CUDA_OVERLAP, ...) at every launch, so a CUDA graph keeps what its capture saw."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            step()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return run


def capture_step(step, warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """One optimizer step captured in a CUDA graph (warmed up on a side stream first, as torch asks).

    The capture freezes the step's host-side decisions (no first step, no re-projection step): a replay
    is the steady-state step's kernels alone, without Python or launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_rounds(graphs: dict, repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per replay of every graph: ``repeats`` interleaved rounds (the order rotating), each ``inner``
    back-to-back replays between two CUDA events."""
    names = list(graphs)
    times = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)] if names else []:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                graphs[name].replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / inner)
    return times


def graph_rounds(runnable: list[Case], live: dict, repeats: int, inner: int, log) -> None:
    """GPU time of one step, from CUDA-graph replays: every case captured, then interleaved rounds of
    ``inner`` back-to-back replays between two events; the median over rounds (``graph_median_s``)."""
    graphs = {}
    for c in runnable:
        try:
            graphs[c.name] = capture_step(live[c.name][0])
        except Exception as exc:  # noqa: BLE001
            c.result["graph_skipped"] = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            log(f"  {c.name}: {c.result['graph_skipped']}")
            torch.cuda.synchronize()
    times = replay_rounds(graphs, repeats, inner)
    for c in runnable:
        if c.name in graphs:
            c.result["graph_times_s"] = times[c.name]
            c.result["graph_median_s"] = statistics.median(times[c.name])
            c.result["graph_inner"] = inner
    graphs.clear()
    torch.cuda.synchronize()


def add_ratios(cases: list[Case], n: int, copy_gbps: float) -> str:
    by = {c.name: c for c in cases}
    fused = by["sgd-fused"].result.get("median_s")
    foreach = by["sgd-foreach"].result.get("median_s")
    baseline = "sgd-fused" if fused else "sgd-foreach"
    base = fused or foreach
    for c in cases:
        r = c.result
        if "median_s" not in r:
            continue
        r["ratio_to_baseline"] = r["median_s"] / base if base else None
        r["ratio_to_sgd_fused"] = r["median_s"] / fused if fused else None
        r["ratio_to_sgd_foreach"] = r["median_s"] / foreach if foreach else None
        r["GBps"] = BYTES_PER_PARAM * n / r["median_s"] / 1e9
        r["fraction_of_copy_bw"] = r["GBps"] / copy_gbps
    gfused = by["sgd-fused"].result.get("graph_median_s")
    for c in cases:
        r = c.result
        if "graph_median_s" not in r:
            continue
        r["graph_ratio_to_sgd_fused"] = r["graph_median_s"] / gfused if gfused else None
        r["graph_GBps"] = BYTES_PER_PARAM * n / r["graph_median_s"] / 1e9
        r["graph_fraction_of_copy_bw"] = r["graph_GBps"] / copy_gbps
    return baseline


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def cpuinfo() -> dict:
    """The first processor's entries of /proc/cpuinfo ({} where there is none)."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}


def cpu_model_name() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_family() -> str:
    """Vendor, family and model of the CPU (e.g. "AuthenticAMD family 25 model 17": Zen 4), which "model name"
    does not tell on some VMs ("AMD EPYC")."""
    info = cpuinfo()
    if not info:
        return platform.machine()
    return f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')}"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def device_slug(device) -> str:
    device = torch.device(device)
    s = slug(device_name(device))
    return s if device.type == "cuda" else f"cpu-{s}"


def environment(device, args) -> dict:
    env = {
        "device": str(device), "device_name": device_name(device), "date": datetime.datetime.now().isoformat(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu_model_name(), "cpu_family": cpu_family(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fgsgd_cuda": fgsgd_cuda.__version__, "fgsgd_compiled_cpu": fgsgd_cuda._ext.HAS_CPU_KERNELS,
        "fgsgd_compiled_cuda": fgsgd_cuda._ext.HAS_CUDA_KERNELS, "command": " ".join([sys.executable] + sys.argv),
        "argv": sys.argv[1:],
    }
    for mod in ("triton", "geoopt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            env[mod] = None
    if torch.device(device).type == "cuda":
        env["cuda"] = torch.version.cuda
    C = getattr(fgsgd_cuda._ext, "_C", None)
    env["fgsgd_cpu_isa"] = C._cpu_isa() if C is not None and hasattr(C, "_cpu_isa") else None  # the CPU fast path
    try:
        root = Path(fgsgd_cuda.__file__).resolve().parent.parent  # the measured library's checkout (PYTHONPATH)
        env["fgsgd_cuda_path"] = str(root)
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                           timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.split("\n")
        env["git_modified_tracked_files"] = [line[3:] for line in dirty if line.strip() and not line.startswith("??")]
        # new files the commit does not have (an untracked module the run imported: its code is not in git_commit)
        env["git_untracked_files"] = [line[3:] for line in dirty if line.startswith("??")]
        so = next(Path(fgsgd_cuda.__file__).parent.glob("_C*.so"), None)
        if so is not None:
            env["fgsgd_C_so_mtime"] = datetime.datetime.fromtimestamp(so.stat().st_mtime).isoformat()
    except Exception:  # noqa: BLE001
        pass
    try:
        env["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return env


def fmt(x, spec, empty="-"):
    return empty if x is None else format(x, spec)


def table(model: dict, clock: str) -> str:
    """The per-case table; ratios and GB/s by ``clock``; on CPU both the wall and the CPU-time medians."""
    cpu = clock != "cuda-events"
    graph = not cpu and any("graph_median_s" in c for c in model["cases"])
    rows = [("case", *(("wall ms", "cpu ms") if cpu else ("median ms",)), "x base", "x fused", "x foreach", "GB/s",
             "% copy", *(("graph ms", "x fused", "% copy") if graph else ()), "state B/p", "ops/step")]
    for c in model["cases"]:
        if c.get("skipped"):
            rows.append((c["name"], "skipped", *[""] * (len(rows[0]) - 2)))
            continue
        la = c.get("launches", {})
        ops = la.get("cuda_kernels", la.get("ops"))
        times = (f"{c['median_wall_s'] * 1e3:.2f}", f"{c['median_cpu_s'] * 1e3:.2f}") if cpu else \
            (f"{c['median_s'] * 1e3:.2f}",)
        rows.append((c["name"], *times, fmt(c.get("ratio_to_baseline"), ".2f"),
                     fmt(c.get("ratio_to_sgd_fused"), ".2f"), fmt(c.get("ratio_to_sgd_foreach"), ".2f"),
                     f"{c['GBps']:.2f}", f"{100 * c['fraction_of_copy_bw']:.0f}",
                     *((fmt(c.get("graph_median_s") and c["graph_median_s"] * 1e3, ".3f"),
                        fmt(c.get("graph_ratio_to_sgd_fused"), ".2f"),
                        fmt(c.get("graph_fraction_of_copy_bw") and 100 * c["graph_fraction_of_copy_bw"], ".0f"))
                       if graph else ()),
                     f"{c['state_bytes_per_param']:.2f}", fmt(ops, "d")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def launches_table(report: dict) -> str:
    models = list(report["models"])
    key = "cuda_kernels" if any("cuda_kernels" in c.get("launches", {}) for m in models
                                for c in report["models"][m]["cases"]) else "ops"
    names = []
    for m in models:
        for c in report["models"][m]["cases"]:
            if "launches" in c and c["name"] not in names:
                names.append(c["name"])
    rows = [("case (" + ("CUDA kernels" if key == "cuda_kernels" else "dispatched ops; fgsgd ops") + " per step)",
             *models)]
    for name in names:
        cells = []
        for m in models:
            c = next((c for c in report["models"][m]["cases"] if c["name"] == name and "launches" in c), None)
            if c is None:
                cells.append("-")
            elif key == "ops":
                cells.append(f"{c['launches']['ops']}; {c['launches']['fgsgd_ops']}")
            else:
                cells.append(str(c["launches"].get(key, "-")))
        rows.append((name, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(report: dict, path: Path, log) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        log(f"no plot: matplotlib is not available ({exc}); `pip install matplotlib`")
        return None
    models = list(report["models"])
    names = []
    for m in models:
        for c in report["models"][m]["cases"]:
            if c.get("ratio_to_baseline") and c["name"] not in names:
                names.append(c["name"])
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(names) * max(1, len(models) / 2) + 2.5))
    h = 0.8 / len(models)
    for k, m in enumerate(models):
        vals = []
        for name in names:
            c = next((c for c in report["models"][m]["cases"] if c["name"] == name), None)
            vals.append(c.get("ratio_to_baseline") if c and c.get("ratio_to_baseline") else float("nan"))
        ax.barh([i + k * h for i in range(len(names))], vals, height=h, label=m)
    ax.set_yticks([i + h * (len(models) - 1) / 2 for i in range(len(names))])
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    baselines = sorted({report["models"][m]["baseline"] for m in models})
    ax.set_xlabel(f"step time / {', '.join(baselines)} (log scale; lower is better)")
    env = report["environment"]
    clock = report["settings"].get("timer", "")
    where = env["device_name"] if env["device"].startswith("cuda") else \
        f"{env['device_name']} (torch threads={env['torch_threads']})"
    ax.set_title(f"One optimizer step, fp32, momentum 0.9 — {where}, torch {env['torch']}, {env['date'][:10]}; "
                 f"timed by {clock}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50,resnet101",
                    help="comma list of " + ", ".join(RESNETS))
    ap.add_argument("--backends", default=None,
                    help="comma list of FGSGD backends (auto, cpu, cuda, triton, torch); default: every concrete "
                         "backend available on the device")
    ap.add_argument("--torch-backend-models", default="resnet18",
                    help="models on which the (slow, pure-torch) 'torch' backend runs: comma list or 'all'")
    ap.add_argument("--geoopt-models", default="all", help="models on which geoopt runs: comma list, 'all' or 'none'")
    ap.add_argument("--slow-cases", default=None,
                    help="regex: run only the slow cases (torch backend, geoopt) whose name matches (re.search)")
    ap.add_argument("--retractions", default="default,alt",
                    help="retraction sets: default (normalize/qr), alt (exp/cayley)")
    ap.add_argument("--mixes", default=",".join(MIXES), help="comma list of manifold mixes: " + ", ".join(MIXES))
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per fast case (default 50 GPU, 15 CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--slow-repeats", type=int, default=3, help="timed steps of the torch backend and geoopt")
    ap.add_argument("--slow-warmup", type=int, default=1)
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="time each fast case in one block instead of interleaved rounds")
    ap.add_argument("--no-count", action="store_true", help="skip the ops / kernels-per-step count")
    ap.add_argument("--cuda-kernels", action="store_true",
                    help="CUDA: also count the GPU kernels of one step with torch.profiler (slow to set up)")
    ap.add_argument("--no-graph", dest="graph", action="store_false",
                    help="CUDA: skip the CUDA-graph replay timing (the step's GPU time without host overhead)")
    ap.add_argument("--graph-inner", type=int, default=10, help="CUDA: back-to-back graph replays per timed round")
    ap.add_argument("--stabilize", type=int, default=50, help="FGSGD re-projection period (its default)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="CPU devices: time by time.perf_counter (wall, default) or time.process_time (cpu: the "
                         "process's CPU time; steadier on an oversubscribed machine, best with --threads 1). Both "
                         "are recorded in the JSON")
    ap.add_argument("--copy-mib", type=int, default=None, help="size of the copy-bandwidth tensor (default 1024 "
                                                               "GPU, 256 CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (channels / 8), few repeats: a smoke run")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-<date>.json); "
                                                "the plot goes next to it (.png)")
    ap.add_argument("--filters-only", action="store_true",
                    help="the parameter set is only the k×k conv filters (the manifold part, no Euclidean group)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only redraw the plot of an earlier run's JSON (next to it, .png) and exit")
    ap.add_argument("--no-geoopt", action="store_true")
    ap.add_argument("--group-clip", type=float, default=None,
                    help="also FGSGD (main mix) with group_clip=C, the group step size on: case name '+clip'")
    ap.add_argument("--capturable", action="store_true",
                    help="also FGSGD (main mix, cpu/cuda/triton) with capturable=True and a tensor lr: case name "
                         "'capturable'")
    ap.add_argument("--channels-last", action="store_true",
                    help="4-D weights and gradients channels-last (every case: SGD steps them in place, FGSGD through "
                         "a contiguous copy of each k×k filter bank)")
    ap.add_argument("--row-view", action="store_true",
                    help="also FGSGD with the row view (1×1 convs and the linear weight on sphere+oblique), its rows "
                         "on the same backend and on the torch backend")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        png = plot(json.loads(path.read_text()), path.with_suffix(".png"), print)
        print(f"wrote {png}")
        return {}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    for opt, v, low in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                        ("--slow-repeats", args.slow_repeats, 1), ("--slow-warmup", args.slow_warmup, 0)):
        if v is not None and v < low:
            raise SystemExit(f"{opt}: must be at least {low}, got {v}")
    if args.repeats is None:
        args.repeats = 5 if args.quick else (50 if cuda else 15)
    if args.quick:
        args.warmup = min(args.warmup, 1)
        args.slow_repeats = min(args.slow_repeats, 2)
    copy_mib = args.copy_mib or (16 if args.quick else (1024 if cuda else 256))
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = [b for b in ("cpu", "cuda", "triton", "torch") if dispatch.available(b, device)]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in RESNETS:
            raise SystemExit(f"--models: unknown model {m!r}; expected {', '.join(RESNETS)}")
    for b in backends:
        if b not in dispatch.BACKENDS:  # an unavailable one is skipped with its reason; an unknown one is a typo
            raise SystemExit(f"--backends: unknown backend {b!r}; expected {', '.join(dispatch.BACKENDS)}")
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    retractions = [r.strip() for r in args.retractions.split(",") if r.strip()]
    for opt, given, known in (("--mixes", mixes, MIXES), ("--retractions", retractions, RETRACTION_SETS)):
        for v in given:
            if v not in known:
                raise SystemExit(f"{opt}: unknown value {v!r}; expected {', '.join(known)}")
    torch_models = models if args.torch_backend_models == "all" else args.torch_backend_models.split(",")
    geoopt_models = {"all": models, "none": []}.get(args.geoopt_models, args.geoopt_models.split(","))

    env = environment(device, args)
    support = sgd_support(device)
    geoopt_reason = "--no-geoopt" if args.no_geoopt else geoopt_available()
    timer = Timer(device, args.clock)
    log(f"device: {env['device_name']} ({device}), torch {env['torch']}, {env['torch_threads']} threads, "
        f"python {env['python']}, triton {env['triton']}, geoopt {env['geoopt']}, CPU fast path {env['fgsgd_cpu_isa']}")
    for v, why in support.items():
        if why:
            log(f"sgd-{v} skipped: {why}")
    if geoopt_reason:
        log(f"geoopt skipped: {geoopt_reason}")
    bw = copy_bandwidth(device, timer, args.repeats, copy_mib * 2 ** 20)
    log(f"copy bandwidth: {bw['copy_GBps']:.2f} GB/s (dst.copy_(src), {copy_mib} MiB, read + write, "
        f"{timer.clock} clock); add_: {bw['add_GBps']:.2f} GB/s")

    report = {"environment": env, "settings": {
        "lr": LR, "momentum": MOMENTUM, "dtype": "float32", "bytes_per_param": BYTES_PER_PARAM,
        "repeats": args.repeats, "warmup": args.warmup, "slow_repeats": args.slow_repeats,
        "slow_warmup": args.slow_warmup, "interleaved": args.interleave, "quick": args.quick,
        "parameter_set": "k×k conv filters only" if args.filters_only else "every parameter of the model",
        "fgsgd": {"collection": "PIO", "group_size": 16, "selection": "random", "check_finite": False,
                  "stabilize": args.stabilize, "euclidean_group": euclid_kwargs(support),
                  "manifold_params": "every k×k conv weight with k > 1; the rest (BN, 1×1 convs, fc) in the "
                                     "Euclidean group"},
        "backends": backends, "sgd_support": support, "geoopt": geoopt_reason or "run",
        "graph_timer": (f"CUDA graph of one step, {args.graph_inner} replays between two CUDA events per round, "
                        "median over rounds" if cuda and args.graph else None),
        "timer": "CUDA events, synchronised around every step" if cuda else
                 {"wall": "time.perf_counter", "cpu": "time.process_time"}[args.clock],
    }, "bandwidth": bw, "models": {}}
    out = Path(args.out) if args.out else \
        HERE / "results" / f"{device_slug(device)}-{datetime.date.today().isoformat()}{'-quick' if args.quick else ''}{'-filters' if args.filters_only else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for m in models:
        shapes = model_shapes(m, args.quick)
        if args.filters_only:
            shapes = [s for s in shapes if is_filter(s)]
        ps = make_param_set(m, shapes, device, channels_last=args.channels_last)
        bk = [b for b in backends if b != "torch" or m in torch_models]
        cases = make_cases(device, bk, geoopt_reason=geoopt_reason if m in geoopt_models else
                           (geoopt_reason or f"geoopt runs only on {','.join(geoopt_models) or 'no model'} "
                                             "(--geoopt-models)"),
                           support=support, stabilize=args.stabilize, retractions=retractions,
                           row_view=args.row_view, group_clip=args.group_clip, capturable=args.capturable)
        cases = [c for c in cases if c.family == "sgd" or c.mix in mixes]
        if args.slow_cases:
            cases = [c for c in cases if not c.slow or re.search(args.slow_cases, c.name)]
        log(f"\n== {m}{' (quick)' if args.quick else ''}: {ps.numel:,} params ({ps.filter_numel:,} in k×k filters, "
            f"{sum(is_filter(s) for s in shapes)} of {len(shapes)} tensors), "
            f"{len([c for c in cases if not c.skip])} cases")
        t0 = time.perf_counter()
        run_model(ps, cases, device, args, timer, log)
        baseline = add_ratios(cases, ps.numel, bw["copy_GBps"])
        model = {"params": ps.numel, "filter_params": ps.filter_numel, "tensors": len(shapes),
                 "filter_tensors": sum(is_filter(s) for s in shapes), "baseline": baseline,
                 "seconds": time.perf_counter() - t0, "cases": []}
        for c in cases:
            entry = {"name": c.name, "family": c.family, "backend": c.backend, "mix": c.mix,
                     "retraction": c.retraction}
            if c.skip:
                entry["skipped"] = c.skip
            entry.update(c.result)
            model["cases"].append(entry)
        report["models"][m] = model
        log(f"baseline: {baseline}; {model['seconds']:.0f} s")
        log(f"ratios, GB/s and % copy by the {timer.clock} clock")
        log(table(model, timer.clock))
        out.write_text(json.dumps(report, indent=1, default=str))  # the models so far: a run cut short keeps them
        del ps, cases
        gc.collect()
    report["seconds"] = time.perf_counter() - t_start
    try:
        report["environment"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    if not args.no_count:
        log("\nops / launches per step (steady state, not a re-projection step):")
        log(launches_table(report))

    out.write_text(json.dumps(report, indent=1, default=str))
    log(f"\nwrote {out}")
    if not args.no_plot:
        png = plot(report, out.with_suffix(".png"), log)
        if png:
            log(f"wrote {png}")
    return report


if __name__ == "__main__":
    main()
