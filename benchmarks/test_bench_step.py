"""pytest-benchmark suite of one optimizer step on a small ResNet-ish parameter set (CPU).

The cases of bench_step.py at small sizes: SGD (foreach, fused), FGSGD on the cpu backend for every
manifold mix × retraction, the torch backend once, geoopt once (when installed). ResNet-18 with
channels / 16 and 10 classes: ~46k parameters, 21 tensors of which 17 are k×k filters.

    python -m pytest benchmarks -q --benchmark-disable     # smoke test: every case runs once (< 60 s)
    python -m pytest benchmarks -q                         # real numbers (pytest-benchmark's table)
    python -m pytest benchmarks -q --benchmark-group-by=group --benchmark-sort=mean
"""
from __future__ import annotations

import torch  # before fgsgd_cuda (see bench_step.py)

import pytest

import bench_step as B
from fgsgd_cuda import dispatch

DEVICE = torch.device("cpu")
SMALL = B.param_shapes(B.resnet_layers("resnet18", width_div=16, num_classes=10))
SUPPORT = B.sgd_support(DEVICE)
EUCLID = B.euclid_kwargs(SUPPORT)
HAS_CPU = dispatch.available("cpu", DEVICE)
needs_cpu_backend = pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels (fgsgd_cuda._C) are not loaded")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

FGSGD_CASES = [(mix, rlabel) for mix in B.MIXES for rlabel in B.RETRACTION_SETS]


@pytest.fixture(scope="module")
def small():
    return B.make_param_set("resnet18/16", SMALL, DEVICE, seed=0)


def _run(benchmark, small, build, group):
    step, opt, tensors = build(small)
    step()                          # the first step writes the momentum buffers
    before = [g.clone() for g in small.grads]
    benchmark.group = group
    benchmark.extra_info["params"] = small.numel
    benchmark(step)
    assert all(torch.isfinite(t).all() for t in tensors)
    assert all(torch.equal(a, b) for a, b in zip(before, small.grads)), "the step modified the gradients"
    return opt


@pytest.mark.parametrize("variant", ["foreach", "fused", "forloop"])
def test_sgd(benchmark, small, variant):
    if SUPPORT[variant]:
        pytest.skip(SUPPORT[variant])
    kw = {"foreach": dict(foreach=True), "fused": dict(fused=True), "forloop": dict(foreach=False, fused=False)}
    opt = _run(benchmark, small, B.build_sgd(kw[variant]), "sgd")
    assert B.state_bytes(opt)["total_bytes"] == 4 * small.numel


@needs_cpu_backend
@pytest.mark.parametrize("mix,rlabel", FGSGD_CASES, ids=[f"{m}-{r}" for m, r in FGSGD_CASES])
def test_fgsgd_cpu(benchmark, small, mix, rlabel):
    build = B.build_fgsgd(B.MIXES[mix], B.RETRACTION_SETS[rlabel], "cpu", EUCLID, stabilize=50)
    opt = _run(benchmark, small, build, f"fgsgd-cpu {mix}")
    sb = B.state_bytes(opt)
    assert sb["momentum_bytes"] == 4 * small.numel
    # besides momentum: the codes (2 bits per component when a weight has at most 4, else a byte) and a code per
    # group, nothing else (no group index)
    other = sum(st["codes"].numel() * st["codes"].element_size() + st["num_groups"] for _, _, st in opt.manifold_params())
    assert sb["other_bytes"] == other and other < small.numel / 8
    assert all(st["codes"].dtype == torch.int32 for _, _, st in opt.manifold_params())  # every mix has <= 4 codes


def test_fgsgd_torch_backend(benchmark, small):
    build = B.build_fgsgd(B.MIXES[B.MAIN_MIX], B.RETRACTION_SETS["default"], "torch", EUCLID, stabilize=50)
    _run(benchmark, small, build, "fgsgd-torch")


def test_geoopt(benchmark, small):
    reason = B.geoopt_available()
    if reason:
        pytest.skip(reason)
    _run(benchmark, small, B.build_geoopt(B.MIXES[B.MAIN_MIX], B.RETRACTION_SETS["default"]), "geoopt")


@needs_cpu_backend
def test_launches_independent_of_depth():
    """The fused step costs the same number of ops for ResNet-18 and ResNet-101 (tiny widths)."""
    build = B.build_fgsgd(B.MIXES[B.MAIN_MIX], B.RETRACTION_SETS["default"], "cpu", EUCLID, stabilize=50)
    counts = {}
    for name in ("resnet18", "resnet101"):
        ps = B.make_param_set(name, B.param_shapes(B.resnet_layers(name, width_div=16, num_classes=10)), DEVICE)
        step, _, _ = build(ps)
        step()
        counts[name] = B.count_launches(step, DEVICE)
        assert counts[name]["fgsgd_ops"] >= 1
    assert len({c["ops"] for c in counts.values()}) == 1, counts


def test_param_counts():
    """torchvision's counts for ResNet-18/50/101; SE-ResNet-50/101 add their SE modules (model_shapes asserts it too)."""
    for name, n in B.PARAM_COUNTS.items():
        assert sum(B.math.prod(s) for s in B.model_shapes(name)) == n


def test_se_module_shapes():
    """("se", C, r) has the parameters of an SE module built from torch.nn (1×1 convs with bias, C → C/r → C), and
    SE-ResNet-101's row view gets rows of 16, 32, 64 and 128 entries from the expanding convs."""
    se = torch.nn.Sequential(torch.nn.Conv2d(256, 16, 1), torch.nn.Conv2d(16, 256, 1))
    assert B.param_shapes([("se", 256, 16)]) == [tuple(p.shape) for p in se.parameters()]
    r = B.RESNETS["seresnet101"][2]
    expanding = [s for s in B.model_shapes("seresnet101") if B.is_row_weight(s) and s[0] == r * s[1]]
    assert sorted({s[1] for s in expanding}) == [16, 32, 64, 128] and len(expanding) == 33
    assert not [s for s in B.model_shapes("resnet101") if B.is_row_weight(s) and s[0] == r * s[1]]


def test_script_smoke(tmp_path):
    """bench_step.py end to end at the tiny size: JSON (and the plot when matplotlib is there)."""
    out = tmp_path / "r.json"
    backends = "cpu" if HAS_CPU else "torch"
    report = B.main(["--quick", "--models", "resnet18", "--backends", backends, "--no-geoopt", "--repeats", "1",
                     "--warmup", "1", "--mixes", B.MAIN_MIX, "--retractions", "default", "--copy-mib", "4",
                     "--out", str(out)])
    assert out.exists()
    cases = {c["name"]: c for c in report["models"]["resnet18"]["cases"]}
    assert cases["sgd-foreach"]["median_s"] > 0
    fg = cases[f"fgsgd[{backends}] {B.MAIN_MIX} normalize/qr"]
    assert fg["ratio_to_baseline"] > 0 and fg["GBps"] > 0


@pytest.fixture(scope="module")
def half():
    """ResNet-18 at half width: its 1×1 convs and linear weight give rows of 64 to 256 entries."""
    return B.make_param_set("resnet18/2", B.param_shapes(B.resnet_layers("resnet18", width_div=2, num_classes=10)),
                            DEVICE, seed=0)


@needs_cpu_backend
@pytest.mark.parametrize("rows_backend", ["cpu", "torch"])
def test_fgsgd_cpu_row_view(benchmark, half, rows_backend):
    """The row view (bench_step.py --row-view): rows on the compiled backend, or on the per-tensor torch one."""
    build = B.build_fgsgd(B.MIXES[B.MAIN_MIX], B.RETRACTION_SETS["default"], "cpu", EUCLID, stabilize=50,
                          rows_backend=rows_backend)
    opt = _run(benchmark, half, build, "fgsgd-cpu row view")
    rows = opt.param_groups[1]["params"]
    assert opt.param_groups[1]["backend"] == rows_backend and len(rows) == 4  # 3 downsample convs + the linear
    assert max(opt.state[p]["shape"][0] for p in rows) == 256


@needs_cpu_backend
def test_fgsgd_cpu_group_clip(benchmark, small):
    """bench_step.py --group-clip: the group step size on (tangent_sqnorm + group_scale + the step)."""
    build = B.build_fgsgd(B.MIXES[B.MAIN_MIX], B.RETRACTION_SETS["default"], "cpu", EUCLID, stabilize=50,
                          group_clip=0.05)
    opt = _run(benchmark, small, build, "fgsgd-cpu group clip")
    assert opt.param_groups[0]["group_clip"] == 0.05


@needs_cpu_backend
def test_fgsgd_cpu_capturable(benchmark, small):
    """bench_step.py --capturable: step counts and a tensor lr read by the kernels (no host sync)."""
    build = B.build_fgsgd(B.MIXES[B.MAIN_MIX], B.RETRACTION_SETS["default"], "cpu", EUCLID, stabilize=50,
                          capturable=True)
    opt = _run(benchmark, small, build, "fgsgd-cpu capturable")
    counts = {float(st["step"]) for _, _, st in opt.manifold_params()}
    assert len(counts) == 1 and counts.pop() > 1 and isinstance(opt.param_groups[0]["lr"], torch.Tensor)


@needs_cpu_backend
@pytest.mark.parametrize("optimizer", ["sgd-foreach", "fgsgd-cpu"])
def test_channels_last(benchmark, optimizer):
    """bench_step.py --channels-last: 4-D weights and gradients channels-last; FGSGD steps its filter banks
    through contiguous copies (they keep their layout), SGD in place."""
    cl = B.make_param_set("resnet18/16", SMALL, DEVICE, seed=0, channels_last=True)
    build = (B.build_sgd(dict(foreach=True)) if optimizer == "sgd-foreach" else
             B.build_fgsgd(B.MIXES[B.MAIN_MIX], B.RETRACTION_SETS["default"], "cpu", EUCLID, stabilize=50))
    opt = _run(benchmark, cl, build, "channels-last")
    filters = [p for g in opt.param_groups for p in g["params"] if B.is_filter(p.shape)]
    assert filters and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                           for p in filters)
