"""CPU step benchmark: FG-SGD fused step vs torch.optim.SGD(foreach=True, momentum) on the same sizes.

    PYTHONPATH=. python benchmarks/cpu_step.py [--n 2000000] [--reps 20] [--codes mix,runs,1,3,5,2,4,6,0]
                                               [--dtype float32] [--isa avx512,avx2,base,scalar] [--out F.json]

Both steps run with torch's default threads, called alternately --reps times after a warm-up; the
minimum wall-clock time of each is printed with their ratio, and the minimum process CPU time
(summed over threads: about twice the wall-clock time when both cores of a 2-core machine worked).
Several instruction sets (--isa a,b) are timed in the same rounds, one FG-SGD line each; --out writes
every line as JSON.
"mix": codes random among {1,3,5} per component (random group membership); "runs": {1,3,5} in
runs of 64 (random code per run), "randL" the same with runs of L; "runsL" (e.g. runs8, runs2048): runs of L cycling 1, 3, 5; "sorted":
three runs, one per code. With --row-len L the components are L×1 rows (the row kernels; codes 5 is
stiefel-qr, the same as sphere on a row). Every FG-SGD call is one full momentum step (p, g, m read; p, m written).
"""
import argparse
import time

import torch

import fgsgd_cuda
from fgsgd_cuda import ops
from fgsgd_cuda.codes import pack


def timed(fn):
    c, t = time.process_time(), time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3, (time.process_time() - c) * 1e3


def compare(fns, reps, warm=2):
    """[(min wall-clock ms, min process-CPU ms)] of every function, called in turn reps times (so that all
    see the same machine: the minimum is robust to load from other processes)."""
    for _ in range(warm):
        for fn in fns:
            fn()
    best = [[float("inf")] * 2 for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            w, c = timed(fn)
            best[k] = [min(best[k][0], w), min(best[k][1], c)]
    return best


def with_isa(isa, fn):
    """fn run with the CPU fast path's instruction set switched to isa (None: as it is)."""
    from fgsgd_cuda import _C
    if isa is None:
        return fn

    def run():
        before = _C._cpu_isa()
        _C._set_cpu_isa(isa)
        try:
            fn()
        finally:
            _C._set_cpu_isa(before)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--codes", default="mix,runs,1,3,5,2,4,6,0")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--isa", default="", help="CPU fast path: avx512, avx2, base or scalar, or a comma list of them "
                    "timed side by side (default: the library's choice)")
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--row-len", type=int, default=0,
                    help="components are n×1 rows of this length (> 8: the CPU row kernels), --n of them, instead of 3×3")
    ap.add_argument("--shape", default="3x3", help="component shape AxB (A*B <= 64), e.g. 7x7 (ResNet's stem)")
    ap.add_argument("--packed", action="store_true",
                    help="codes packed 2 bits per component (fgsgd_cuda.codes.pack), as FGSGD keeps them")
    a = ap.parse_args(argv)
    dt = getattr(torch, a.dtype)
    from fgsgd_cuda import _C
    default_isa = _C._cpu_isa() if hasattr(_C, "_cpu_isa") else "scalar"
    isas = a.isa.split(",") if a.isa else [None]
    for name in isas:
        if name is not None and not _C._set_cpu_isa(name):
            raise SystemExit(f"--isa {name}: not available here")
        _C._set_cpu_isa(default_isa)
    isa = ",".join(i or default_isa for i in isas)
    n = a.n
    shape = (a.row_len, 1) if a.row_len else tuple(int(v) for v in a.shape.split("x"))
    print(f"fgsgd_cuda from {fgsgd_cuda.__file__}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"N={n} {shape[0]}x{shape[1]} {a.dtype}, cpu isa {isa}")
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(n, *shape, generator=gen, dtype=dt)
    g = torch.randn(n, *shape, generator=gen, dtype=dt) * 1e-2
    m = torch.zeros_like(p)
    P = torch.nn.Parameter(p.clone())
    P.grad = g.clone()
    sgd = torch.optim.SGD([P], lr=0.1, momentum=0.9, foreach=True)
    sgd.step()
    results = []
    for spec in a.codes.split(","):
        if spec == "mix":
            codes = torch.tensor([1, 3, 5], dtype=torch.uint8)[torch.randint(3, (n,), generator=gen)]
        elif spec == "runs" or spec.startswith("rand"):
            length = 64 if spec == "runs" else int(spec[4:])
            runs = torch.tensor([1, 3, 5], dtype=torch.uint8)[torch.randint(3, ((n + length - 1) // length,),
                                                                             generator=gen)]
            codes = runs.repeat_interleave(length)[:n].contiguous()
        elif spec.startswith("runs"):
            codes = torch.tensor([1, 3, 5], dtype=torch.uint8)[(torch.arange(n) // int(spec[4:])) % 3].contiguous()
        elif spec == "sorted":
            codes = torch.tensor([1, 3, 5], dtype=torch.uint8)[torch.arange(n) * 3 // n].contiguous()
        else:
            codes = torch.full((n,), int(spec), dtype=torch.uint8)
        if a.packed:
            codes = pack(codes)
        pp = p.clone()
        if a.row_len:  # rows: every row code is on the unit sphere (projx_ takes small components only)
            pp = torch.nn.functional.normalize(pp, dim=1)
        else:
            ops.projx_([pp], [codes])
        mm = m.clone()
        ops.step_([pp], [g], [mm], [codes], lr=0.1, momentum=0.9, first_step=True)
        # interleave the timings so that all see the same machine state
        step = lambda: ops.step_([pp], [g], [mm], [codes], lr=0.1, momentum=0.9)  # noqa: E731
        *fg, (ts, cs) = compare([with_isa(i, step) for i in isas] + [sgd.step], a.reps)
        for name, (tf, cf) in zip(isas, fg):
            label = f"fgsgd[{name}]" if len(isas) > 1 else "fgsgd"
            print(f"codes={spec:9s} {label:14s} {tf:7.2f} ms   sgd(foreach) {ts:6.2f} ms   ratio {tf / ts:5.2f}   "
                  f"(cpu time: {cf:6.1f} / {cs:6.1f} ms, ratio {cf / cs:4.2f})", flush=True)
            results.append(dict(codes=spec, packed=a.packed, isa=name or default_isa, fgsgd_ms=tf, fgsgd_cpu_ms=cf, sgd_foreach_ms=ts,
                                sgd_foreach_cpu_ms=cs, ratio=tf / ts))
    if a.out:
        import json
        import platform
        from bench_step import cpu_family, cpu_model_name, environment
        # bench_step.environment: versions, date, command, and which fgsgd_cuda (path, commit, changed files)
        env = dict(environment(torch.device("cpu"), a), threads=torch.get_num_threads(), platform=platform.platform(),
                   cpu=cpu_model_name(), cpu_family=cpu_family(), default_isa=default_isa)
        settings = dict(n=n, shape=list(shape), dtype=a.dtype, reps=a.reps,
                        timer="min over reps of interleaved calls, wall clock (perf_counter) and process CPU time")
        with open(a.out, "w") as fh:
            json.dump(dict(environment=env, settings=settings, results=results), fh, indent=1)
        print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
