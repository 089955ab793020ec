"""The benchmark scripts that have no suite of their own run end to end (CPU, tiny sizes: a smoke test that
they still work with the library; no timing is checked)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fgsgd_cuda import dispatch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.skipif(not dispatch.available("cpu", "cpu"), reason="needs the compiled CPU kernels")
def test_host_overhead_runs(tmp_path):
    import host_overhead
    out = tmp_path / "host.json"
    report = host_overhead.main(["--device", "cpu", "--models", "resnet18", "--width-div", "16", "--rounds", "2",
                                 "--inner", "2", "--out", str(out)])
    model = report["models"]["resnet18"]
    assert model["tensors"] == 62 and model["filter_tensors"] == 17  # ResNet-18: 20 convs (17 k×k) + 21 BN + fc
    assert {"fgsgd all", "fgsgd all, one stream", "fgsgd all, torch's sgd()", "fgsgd filters", "fgsgd filters, no kernels", "fgsgd ops",
            model["baseline"]} <= set(model["cases"])
    assert all(c["median_host_s"] > 0 for c in model["cases"].values())
    assert json.loads(out.read_text())["models"]["resnet18"]["cases"].keys() == model["cases"].keys()


@pytest.mark.skipif(not dispatch.available("cpu", "cpu"), reason="needs the compiled CPU kernels")
def test_cpu_step_runs_instruction_sets_side_by_side(tmp_path):
    import cpu_step
    from fgsgd_cuda import _C
    default = _C._cpu_isa()
    out = tmp_path / "cpu_step.json"
    results = cpu_step.main(["--n", "101", "--reps", "1", "--codes", "mix,5", "--isa", f"{default},scalar",
                             "--out", str(out)])
    assert [(r["codes"], r["isa"]) for r in results] == [("mix", default), ("mix", "scalar"), ("5", default),
                                                         ("5", "scalar")]
    assert all(r["fgsgd_ms"] > 0 and r["sgd_foreach_ms"] > 0 for r in results)
    assert json.loads(out.read_text())["results"] == results
    assert _C._cpu_isa() == default  # the switch is restored
    packed = cpu_step.main(["--n", "101", "--reps", "1", "--codes", "mix", "--packed"])
    assert [(r["codes"], r["packed"]) for r in packed] == [("mix", True)] and packed[0]["fgsgd_ms"] > 0


@pytest.mark.skipif(not dispatch.available("cpu", "cpu"), reason="needs the compiled CPU kernels")
def test_bench_channel_directed_runs(tmp_path):
    import bench_channel_directed
    out = tmp_path / "cd.json"
    report = bench_channel_directed.main(["--device", "cpu", "--models", "resnet50", "--quick", "--repeats", "1",
                                          "--backends", "cpu,torch", "--out", str(out)])
    (model,) = report["models"]
    assert model["tensors"] == 53  # ResNet-50's convs
    assert {"SGD(foreach)", "sobolev[cpu]", "reweighted[cpu]", "sobolev[torch]", "reweighted[torch]"} <= set(
        model["cases"])
    assert all(c["median_s"] > 0 for c in model["cases"].values())
    assert json.loads(out.read_text())["models"][0]["cases"].keys() == model["cases"].keys()
