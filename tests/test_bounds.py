"""fgsgd_cuda.bounds: group norms, the Table 1 check, the three bounds in log space, checkpoints and the CLI.

References are direct float64 computations written out here (explicit concatenation of the group
weights, torch.linalg norms, the bound formulas in linear space).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fgsgd_cuda as F
from fgsgd_cuda import bounds
from fgsgd_cuda import codes as C
from fgsgd_cuda import manifolds as M

from conftest import make_gen, random_points, requires_cpu_kernels


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is much faster on a shared CPU


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.conv3 = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def small_setup(seed=0, rescale=True):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SmallNet()
    groups = F.param_groups(net, manifolds=("sphere", "oblique", "stiefel", "euclidean"), group_size=5, seed=seed)
    opt = F.FGSGD(groups, lr=0.1, momentum=0.9)
    if rescale:
        gen = make_gen(seed + 100)
        opt.set_rescale({p: torch.rand(opt.num_components(p), generator=gen) * 2 + 0.3
                         for _, p, _ in opt.manifold_params()})
    return net, opt


# ---------------------------------------------------------------- direct float64 references
def direct_group_matrices(x: torch.Tensor, group_index: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """W_g = [ω_i1 ω_i2 ⋯] ∈ R^{A×mB} by explicit concatenation (float64)."""
    out = []
    for g in range(num_groups):
        members = [x[i].double() for i in range(x.shape[0]) if int(group_index[i]) == g]
        out.append(torch.cat(members, dim=1))
    return out


def direct_norms(w: torch.Tensor) -> tuple[float, float, float]:
    return (float(torch.linalg.matrix_norm(w, "fro")), float(torch.linalg.matrix_norm(w, 2)),
            float(w.norm(dim=1).sum()))


def direct_layers(net, opt, which: str):
    """Per weight layer: [(δ_F, δ_2, δ_2→1) per group] of p or ω, from first principles."""
    out = []
    for mod in (net.conv1, net.conv2, net.conv3, net.fc):
        p = mod.weight.detach().double()
        if "codes" in opt.state.get(mod.weight, {}):
            st = opt.state[mod.weight]
            a, b = st["shape"]
            x = p.reshape(-1, a, b)
            if which == "omega":
                x = x / opt.rescale(mod.weight).double().view(-1, 1, 1)
            gi, g = opt.grouping(mod.weight).group_index, st["num_groups"]
        else:
            a, b = (p.shape[2], p.shape[3]) if p.dim() == 4 and p.shape[2] > 1 else (p[0].numel(), 1)
            x = p.reshape(-1, a, b)
            gi, g = torch.zeros(x.shape[0], dtype=torch.int32), 1
        out.append([direct_norms(w) for w in direct_group_matrices(x, gi, g)])
    return out


def direct_bounds(layer_norms, n, margin, bx, compose=True):
    """The three bounds in linear space (float64), from per-layer lists of group norms."""
    d = len(layer_norms)
    fs, ss, ts = [], [], []
    for groups in layer_norms:
        fs.append(math.sqrt(sum(f * f for f, _, _ in groups)))
        ss.append(math.sqrt(sum(s * s for _, s, _ in groups)))
        ts.append(sum(t for _, _, t in groups))
    c = bx / (margin * math.sqrt(n))
    nts = c * 2 ** d * math.prod(fs)
    bft = c * math.prod(ss) * sum((t / s) ** (2 / 3) for t, s in zip(ts, ss)) ** 1.5
    grs = c * (math.sqrt(2 * d * math.log(2)) + 1) * math.prod(fs)
    return {"nts": nts, "bft": bft, "grs": grs}


# ---------------------------------------------------------------- norms
@pytest.mark.parametrize("a,b,sizes", [(3, 3, [4, 1, 3, 5]), (5, 2, [2, 2, 7]), (40, 1, [5, 4, 5, 1]),
                                       (1, 1, [3, 3])])
def test_group_norms_equal_explicit_concatenation(a, b, sizes):
    gen = make_gen(a * 100 + b)
    n = sum(sizes)
    x = torch.randn(n, a, b, generator=gen, dtype=torch.float64) + 0.3
    gi = torch.cat([torch.full((s,), g, dtype=torch.int32) for g, s in enumerate(sizes)])
    gi = gi[torch.randperm(n, generator=gen)]       # members scattered, not contiguous
    got = bounds.group_norms(x, gi, len(sizes))
    ref = torch.tensor([direct_norms(w) for w in direct_group_matrices(x, gi, len(sizes))], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    # float32 input is measured in float64
    got32 = bounds.group_norms(x.float(), gi, len(sizes))
    ref32 = torch.tensor([direct_norms(w) for w in direct_group_matrices(x.float().double(), gi, len(sizes))],
                         dtype=torch.float64)
    torch.testing.assert_close(got32, ref32, rtol=1e-12, atol=0)


def test_table1_per_manifold():
    gen = make_gen(5)
    for code in (C.SPHERE_NORMALIZE, C.OBLIQUE_EXP, C.STIEFEL_QR, C.STIEFEL_CAYLEY):
        name = C.manifold_of(code)
        for a, b in ((3, 3), (5, 2), (7, 7)):
            x = random_points(50, a, b, code, gen, dtype=torch.float32)
            codes = torch.full((50,), code, dtype=torch.uint8)
            res = bounds.table1_check(x.double(), codes)
            assert set(res) == {name} and res[name]["count"] == 50
            target = M.table1_norms(name, b)
            assert set(k for k in res[name] if k != "count") == set(target)
            assert max(v for k, v in res[name].items() if k != "count") < 1e-6
            # the norms the check compares with Table 1
            nrm = M.norms(x.double())
            torch.testing.assert_close(nrm[:, 0], torch.full((50,), target["frobenius"], dtype=torch.float64),
                                       rtol=1e-6, atol=0)
            if "spectral" in target:
                torch.testing.assert_close(nrm[:, 1], torch.ones(50, dtype=torch.float64), rtol=1e-6, atol=0)
            # one component off its manifold is caught, with its deviation
            bad = x.double().clone()
            bad[7] *= 1 + 3e-4
            res = bounds.table1_check(bad, codes)
            assert abs(res[name]["frobenius"] - 3e-4) < 1e-6
    # euclidean components are not checked
    assert bounds.table1_check(torch.randn(4, 3, 3, dtype=torch.float64) * 7, torch.zeros(4, dtype=torch.uint8)) == {}


def test_report_table1_on_a_network_passes_and_fails():
    net, opt = small_setup(1)
    res = bounds.report(net, opt, 1000, print_table=False)
    assert res["table1"]["passed"] and res["table1"]["max_deviation"] < 1e-5
    assert set(res["table1"]["per_manifold"]) == {"sphere", "oblique", "stiefel"}
    # move one stiefel component off its manifold (p only, R unchanged): the check fails
    p = net.conv2.weight
    codes = opt.codes(p)
    i = int(torch.nonzero(codes == C.STIEFEL_QR)[0])
    with torch.no_grad():
        opt.components(p)[i] *= 1.001
    res = bounds.report(net, opt, 1000, print_table=False)
    assert not res["table1"]["passed"]
    assert abs(res["table1"]["per_manifold"]["stiefel"]["spectral"] - 1e-3) < 1e-5


# ---------------------------------------------------------------- bounds
@pytest.mark.parametrize("margin,bx,n", [(1.0, 1.0, 1000), (0.25, 3.0, 50000)])
def test_bounds_equal_direct_float64(margin, bx, n):
    net, opt = small_setup(2)
    res = bounds.report(net, opt, n, margin=margin, input_norm=bx, print_table=False)
    assert res["depth"] == 4
    for which in ("p", "omega"):
        layers = direct_layers(net, opt, which)
        for lay, groups in zip(res["layers"], layers):
            torch.testing.assert_close(lay["groups"][which], torch.tensor(groups, dtype=torch.float64),
                                       rtol=1e-12, atol=0)
        ref = direct_bounds(layers, n, margin, bx)
        for name in bounds.BOUNDS:
            got = res["bounds"][which][name]
            assert math.isclose(math.exp(got["log"]), ref[name], rel_tol=1e-10), (which, name)
            assert math.isclose(got["log10"], math.log10(ref[name]), rel_tol=1e-10, abs_tol=1e-12)
            # the group-composed bound is an upper bound of the exact-layer bound
            assert got["log"] >= res["bounds_exact"][which][name]["log"] - 1e-12
    # p = R·ω: the rescale changes the norms the bounds see
    assert res["bounds"]["p"]["nts"]["log"] != pytest.approx(res["bounds"]["omega"]["nts"]["log"])


def test_exact_layer_bounds_equal_direct_float64():
    net, opt = small_setup(3)
    res = bounds.report(net, opt, 777, print_table=False)
    layers = []
    for mod in (net.conv1, net.conv2, net.conv3, net.fc):
        p = mod.weight.detach().double()
        if p.dim() == 4 and p.shape[2] > 1:
            comps = p.reshape(-1, p.shape[2], p.shape[3])
            whole = torch.cat(list(comps), dim=1)          # L_l = [ω_1 ⋯ ω_N]
        else:
            whole = p.reshape(p.shape[0], -1).T            # the row view: the transpose of the (O, n) weight
        layers.append([direct_norms(whole)])
        lay = next(entry for entry in res["layers"] if entry["weight_shape"] == tuple(mod.weight.shape))
        torch.testing.assert_close(torch.tensor(list(lay["exact"]["p"].values()), dtype=torch.float64),
                                   torch.tensor(direct_norms(whole), dtype=torch.float64), rtol=1e-12, atol=0)
    ref = direct_bounds(layers, 777, 1.0, 1.0)
    for name in bounds.BOUNDS:
        assert math.isclose(math.exp(res["bounds_exact"]["p"][name]["log"]), ref[name], rel_tol=1e-10)


def resnet101_convs() -> nn.Module:
    """The weight shapes of ResNet-101 (stem, 33 bottlenecks, 4 downsamples, fc) as plain layers."""
    layers = [nn.Conv2d(3, 64, 7, bias=False)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 23), (512, 3)):
        for j in range(blocks):
            layers += [nn.Conv2d(in_ch, width, 1, bias=False), nn.Conv2d(width, width, 3, bias=False),
                       nn.Conv2d(width, 4 * width, 1, bias=False)]
            if j == 0:
                layers.append(nn.Conv2d(in_ch, 4 * width, 1, bias=False))
            in_ch = 4 * width
    layers.append(nn.Linear(2048, 1000))
    return nn.ModuleList(layers)


def test_bounds_finite_for_resnet101_depth():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = resnet101_convs()
    n_params = sum(p.numel() for p in model.parameters())
    assert len(model) == 105 and 44_000_000 < n_params < 45_000_000
    opt = F.FGSGD(F.param_groups(model, row_view=True, group_size=64), lr=0.1, momentum=0.9)
    # R = 40 everywhere: the products of the layer norms overflow float64 in linear space
    opt.set_rescale({p: torch.full((opt.num_components(p),), 40.0) for _, p, _ in opt.manifold_params()})
    # exact=False: no Gram matrix of whole 1×1 layers (the exact layer norms are tested on the small network)
    res = bounds.report(model, opt, 1_281_167, print_table=False, exact=False)
    assert res["depth"] == 105 and res["bounds_exact"] is None
    for which in ("p", "omega"):
        for name in bounds.BOUNDS:
            assert math.isfinite(res["bounds"][which][name]["log"]), (which, name)
    assert res["bounds"]["p"]["nts"]["log10"] > 310          # beyond float64: log space was needed
    assert math.isinf(math.prod(lay["norms"]["p"]["frobenius"] for lay in res["layers"]) * 2.0 ** 105)
    # p = 40·ω on every manifold layer: log of each per-layer F norm differs by ln 40
    lay = res["layers"][1]
    assert math.isclose(lay["norms"]["p"]["frobenius"] / lay["norms"]["omega"]["frobenius"], 40.0, rel_tol=1e-6)
    assert res["table1"]["passed"]


def test_report_prints_and_validates(capsys):
    net, opt = small_setup(4)
    res = bounds.report(net, opt, 5000, per_group=True)
    out = capsys.readouterr().out
    for name in bounds.BOUNDS:
        assert bounds.BOUND_NAMES[name] in out
    assert "conv1" in out and "group 0" in out and "PASS" in out
    assert res["layers"][0]["groups"]["p"].shape == (res["layers"][0]["num_groups"], 3)
    with pytest.raises(ValueError, match="n_samples"):
        bounds.report(net, opt, 0)
    with pytest.raises(ValueError, match="margin"):
        bounds.report(net, opt, 10, margin=-1.0)
    # without an optimizer every layer is one Euclidean group
    res = bounds.report(net, None, 5000, print_table=False)
    assert all(lay["num_groups"] == 1 and not lay["on_manifold"] for lay in res["layers"])


# ---------------------------------------------------------------- checkpoints and the command line
BUILDER_MODULE = '''
import torch
from torch import nn
from fgsgd_cuda.bounds import model_builder


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@model_builder
def build(width=5):
    return Net(width)


def unmarked(width=5):
    return Net(width)
'''


@pytest.fixture()
def builder_module(tmp_path, monkeypatch):
    (tmp_path / "fgsgd_test_builder.py").write_text(textwrap.dedent(BUILDER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fgsgd_test_builder", None)
    import fgsgd_test_builder
    yield fgsgd_test_builder
    sys.modules.pop("fgsgd_test_builder", None)


def trained_checkpoint(mod, path, capturable=False, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(11)
        net = mod.build(width=6)
    opt = F.FGSGD(F.param_groups(net, group_size=4, row_view=True), lr=0.05, momentum=0.9, capturable=capturable)
    renorm = F.Renormalizer(net, opt)
    gen = make_gen(12)
    for epoch in range(2):
        renorm.calibrate([torch.randn(4, 3, 6, 6, generator=gen) + 1 for _ in range(2)])
        renorm.step_epoch()
        for _ in range(2):
            opt.zero_grad()
            x = torch.randn(4, 3, 6, 6, generator=gen) + 1
            nn.functional.cross_entropy(net(x), torch.randint(0, 3, (4,), generator=gen)).backward()
            opt.step()
    bounds.save_checkpoint(path, net, opt, builder="fgsgd_test_builder:build", builder_kwargs={"width": 6},
                           n_samples=4321, renormalizer=renorm, **kw)
    return net, opt


def test_checkpoint_round_trip_and_cli(builder_module, tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    net, opt = trained_checkpoint(builder_module, path, epoch=2)
    ckpt = torch.load(path, weights_only=True)            # plain data: loads without running code
    assert ckpt["format"] == bounds.CHECKPOINT_FORMAT and ckpt["epoch"] == 2 and "renormalizer" in ckpt
    net2, opt2, _ = bounds.load_checkpoint(path)
    for (n1, a), (n2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    for (_, p, st), (_, q, st2) in zip(opt.manifold_params(), opt2.manifold_params()):
        for key in ("rescale", "codes", "group_codes", "momentum_buffer"):
            assert torch.equal(st[key], st2[key]) and st[key].dtype == st2[key].dtype, key
        assert st["membership"] == st2["membership"]
        assert torch.equal(opt.grouping(p).group_index, opt2.grouping(q).group_index)
    ref = bounds.report(net, opt, 4321, print_table=False)
    capsys.readouterr()
    out_json = tmp_path / "report.json"
    assert bounds.main([str(path), "--json", str(out_json), "--strict"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    for which in ("p", "omega"):
        for name in bounds.BOUNDS:
            assert data["bounds"][which][name]["log"] == ref["bounds"][which][name]["log"]
            assert name + " " in out
    assert data["n_samples"] == 4321 and data["table1"]["passed"]
    # the module entry point in a fresh interpreter
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fgsgd_cuda.bounds", str(path), "--n-samples", "100"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'fgsgd_cuda.bounds' found in sys.modules" not in proc.stderr
    for name in bounds.BOUNDS:
        line = next(s for s in proc.stdout.splitlines() if s.startswith(name + " "))
        assert math.isfinite(float(line.split()[1]))
    assert "n = 100" in proc.stdout and "PASS" in proc.stdout


def test_checkpoint_builder_must_be_marked_and_pickles_need_trust(builder_module, tmp_path):
    path = tmp_path / "ckpt.pt"
    net, opt = trained_checkpoint(builder_module, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["builder"] = "fgsgd_test_builder:unmarked"
    bad = tmp_path / "unmarked.pt"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="not marked"):
        bounds.load_checkpoint(bad)
    net2, _, _ = bounds.load_checkpoint(bad, builder="fgsgd_test_builder:unmarked")   # explicit: trusted
    assert torch.equal(net2.conv1.weight, net.conv1.weight)
    ckpt["builder"] = "os:system"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="not marked"):
        bounds.load_checkpoint(bad)
    # a pickled module loads only with weights_only=False (--trust-pickle)
    ckpt["model"] = net
    pickled = tmp_path / "pickled.pt"
    torch.save(ckpt, pickled)
    with pytest.raises(Exception):
        bounds.load_checkpoint(pickled)
    net3, opt3, _ = bounds.load_checkpoint(pickled, weights_only=False)
    assert torch.equal(net3.conv2.weight, net.conv2.weight)
    assert bounds.main([str(pickled), "--trust-pickle"]) == 0


@requires_cpu_kernels
def test_checkpoint_of_a_capturable_gpu_run_loads(builder_module, tmp_path):
    """A checkpoint of a capturable optimizer (whose groups say capturable=True) loads into the report's optimizer,
    which had been built non-capturable and refused every such group; a GPU run's backend="cuda" does not reach
    the CPU optimizer the report builds."""
    path = tmp_path / "ckpt.pt"
    net, opt = trained_checkpoint(builder_module, path, capturable=True)
    ckpt = torch.load(path, weights_only=True)
    for g in ckpt["optimizer"]["param_groups"]:
        g["backend"] = "cuda"  # as a GPU run saves it
    torch.save(ckpt, path)
    net2, opt2, _ = bounds.load_checkpoint(path)
    assert opt2.defaults["capturable"] and all(g["backend"] == "auto" for g in opt2.param_groups)
    ref = bounds.report(net, opt, 4321, print_table=False)
    got = bounds.report(net2, opt2, 4321, print_table=False)
    for which in ("p", "omega"):
        for name in bounds.BOUNDS:
            assert got["bounds"][which][name]["log"] == ref["bounds"][which][name]["log"], (which, name)
