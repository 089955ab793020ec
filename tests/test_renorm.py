"""Renormalization (fgsgd_cuda.Renormalizer): λ from the hooks, R = γ/λ, p = R·ω, the step with R, resuming.

Every check compares against a float64 computation made here, on inputs that are never zeros.
"""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

import fgsgd_cuda as F
from fgsgd_cuda import bounds, dispatch, reference
from fgsgd_cuda import codes as C
from fgsgd_cuda.renorm import _Stats

from conftest import make_gen

MANIFOLDS = ("sphere", "oblique", "stiefel", "euclidean")


class Net(nn.Module):
    """3×3 conv (+BN), grouped 3×3 conv, 1×1 conv (row view), linear (row view)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        x = torch.tanh(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_net(seed: int = 0) -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Net()


def make_opt(net, backend="auto", **kw):
    opts = dict(manifolds=MANIFOLDS, row_view=True, group_size=4, backend=backend, seed=3)
    opts.update(kw.pop("groups", {}))
    return F.FGSGD(F.param_groups(net, **opts), lr=kw.pop("lr", 0.05), momentum=kw.pop("momentum", 0.9), **kw)


def batch(gen, n=4):
    """Inputs with a different mean and scale per channel (λ differs per channel)."""
    scale = torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)
    offset = torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1)
    return torch.randn(n, 3, 6, 6, generator=gen) * scale + offset


def targets(gen, n=4):
    return torch.randint(0, 5, (n,), generator=gen)


def capture_inputs(net):
    """Independent capture of every weight layer's input (list per layer name)."""
    seen, handles = {}, []
    for name, mod in net.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            seen[name] = []
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: seen[name].append(a[0].detach().clone())))
    return seen, handles


def direct_std(inputs: list[torch.Tensor], conv: bool) -> torch.Tensor:
    """Population std per channel in float64 of the concatenated inputs."""
    x = torch.cat([t.double() for t in inputs])
    if conv:
        return x.transpose(0, 1).reshape(x.shape[1], -1).std(dim=1, correction=0)
    return x.reshape(-1, x.shape[-1]).std(dim=0, correction=0)


def in_channel(module: nn.Conv2d) -> torch.Tensor:
    """Input channel of every component of a k×k conv weight, written out with loops (the reference)."""
    o_ch, i_per = module.weight.shape[:2]
    per_block = o_ch // module.groups
    return torch.tensor([(o // per_block) * i_per + c for o in range(o_ch) for c in range(i_per)])


def expected_rescale(net, opt, lam: dict, eps=F.renorm.DEFAULT_EPS) -> dict:
    """R = γ/λ_in(i) per component in float64, from first principles (on the CPU)."""
    out = {}
    for name, mod in net.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod.weight not in opt.state:
            continue
        st = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in opt.state[mod.weight].items()}
        st["codes"] = opt.codes(mod.weight).cpu()
        a, b = st["shape"]
        lam_l = lam[name].double().clamp_min(eps)
        if isinstance(mod, nn.Conv2d) and mod.weight.shape[2] > 1:
            lam_c = lam_l[in_channel(mod)]
        else:   # row view: rms over the channels of the conv group (groups = 1 here)
            lam_c = torch.full((st["codes"].numel(),), float(lam_l.pow(2).mean().sqrt()), dtype=torch.float64)
        r = torch.ones_like(lam_c)
        for i, code in enumerate(st["codes"].tolist()):
            man = C.manifold_of(code)
            if man == "sphere":
                r[i] = 1.0 / lam_c[i]
            elif man in ("oblique", "stiefel"):
                r[i] = b ** -0.5 / lam_c[i]
        out[name] = r
    return out


def backends():
    """(backend, device) pairs: cpu and torch here; cuda and triton where a GPU (or TRITON_INTERPRET) has them."""
    out = []
    for name in ("cpu", "torch", "triton", "cuda"):
        dev = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        ok = (dev == "cpu" or torch.cuda.is_available()) and dispatch.available(name, torch.device(dev))
        out.append(pytest.param(name, dev, id=name,
                                marks=pytest.mark.skipif(not ok, reason=f"backend {name} is not available here")))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is much faster on a shared CPU


# ---------------------------------------------------------------- λ
def test_lambda_calibrate_equals_direct_std():
    net = make_net()
    net.train()
    opt = make_opt(net)
    renorm = F.Renormalizer(net, opt)
    assert renorm.hooks_active == 0
    gen = make_gen(1)
    batches = [batch(gen) for _ in range(3)]
    seen, handles = capture_inputs(net)
    bn_before = net.bn1.running_mean.clone(), net.bn1.running_var.clone(), int(net.bn1.num_batches_tracked)
    lam = renorm.calibrate([(x, targets(gen)) for x in batches])
    for h in handles:
        h.remove()
    assert set(lam) == {"conv1", "conv2", "conv3", "fc"}
    for name, got in lam.items():
        ref = direct_std(seen[name], conv=name != "fc")
        assert got.dtype == torch.float64 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=0)
    # the channels differ, so a wrong axis or a pooled std would fail
    assert float(lam["conv1"].max() / lam["conv1"].min()) > 3
    # no hook left behind; batch-norm statistics restored
    assert renorm.hooks_active == 0
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert torch.equal(net.bn1.running_mean, bn_before[0]) and torch.equal(net.bn1.running_var, bn_before[1])
    assert int(net.bn1.num_batches_tracked) == bn_before[2]
    # a second call adds to the statistics (Chan merge across calls)
    more = [batch(gen) for _ in range(2)]
    seen, handles = capture_inputs(net)
    lam2 = renorm.calibrate(more, forward=lambda m, x: m(x))
    for h in handles:
        h.remove()
    torch.testing.assert_close(lam2["conv1"], direct_std([*batches, *more], conv=True), rtol=2e-6, atol=0)


def test_lambda_running_equals_direct_std_and_hooks_stop():
    net = make_net()
    opt = make_opt(net)
    renorm = F.Renormalizer(net, opt, mode="running", max_batches=2)
    assert renorm.hooks_active == 4
    gen = make_gen(2)
    seen, handles = capture_inputs(net)
    xs = [batch(gen) for _ in range(3)]
    net.train()
    net(xs[0])
    net.eval()
    net(batch(gen) * 10)          # eval passes are not measured
    net.train()
    net(xs[1])
    assert renorm.hooks_active == 0      # each hook removed itself after max_batches calls
    renorm.start()
    assert renorm.hooks_active == 0      # ... and stays off until the next epoch
    net(xs[2])                           # not measured
    for h in handles:
        h.remove()
    lam = renorm.lambdas()
    for name in ("conv1", "conv2", "conv3", "fc"):
        train_inputs = [seen[name][0], seen[name][2]]      # the 1st and 3rd captured calls: train mode
        ref = direct_std(train_inputs, conv=name != "fc")
        torch.testing.assert_close(lam[name], ref, rtol=2e-6, atol=0)
    renorm.step_epoch()
    assert renorm.hooks_active == 4 and renorm.lambdas() == {}


@pytest.mark.parametrize("offset,spread", [(2.0, 1.0), (1e4, 1e-3)], ids=["plain", "large-mean"])
def test_stats_merged_over_ranks_match_single_pass(offset, spread):
    """The torch.distributed path (count and Σx summed over ranks, then Σ(x − mean)² about the mean of all) gives the
    single pass's λ, also when the mean is 1e7 times the spread (summing Σx² instead lost 1e-2 of λ there)."""
    gen = make_gen(3)
    xs = [torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64) * (k + 1) * spread + offset for k in range(4)]
    a, b, whole = _Stats(), _Stats(), _Stats()
    for k, x in enumerate(xs):
        (a if k % 2 else b).add(x, 1)
        whole.add(x, 1)
    moments = a.moments(4, "cpu") + b.moments(4, "cpu")
    mean = moments[1] / moments[0]
    merged = _Stats.summed(moments, a.deviations(mean) + b.deviations(mean), 4)
    ref = direct_std(xs, conv=True)
    torch.testing.assert_close(merged.std(), ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(whole.std(), ref, rtol=1e-9, atol=0)


def _renorm_rank(rank: int, world: int, store_path: str, out: str) -> None:
    """One gloo rank: calibrates on its own batches (large means, small spread, different sizes per rank)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        net = make_net(0).double()
        opt = make_opt(net)
        renorm = F.Renormalizer(net, opt)
        renorm.calibrate(_rank_batches(rank))
        renorm._sync()  # what step_epoch does first
        torch.save(renorm.lambdas(), out)
    finally:
        dist.destroy_process_group()


def _rank_batches(rank: int) -> list:
    gen = make_gen(10 + rank)
    return [torch.randn(2 + rank, 3, 6, 6, generator=gen, dtype=torch.float64) * 1e-3 + 1e4]


def test_calibration_over_two_ranks_matches_one_process(tmp_path):
    """Renormalizer under torch.distributed (two gloo ranks, different data): both ranks get the λ of one process
    that saw all the data."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from conftest import run_ranks
    store = str(tmp_path / "store")
    run_ranks(_renorm_rank, 2, lambda r: (r, 2, store, str(tmp_path / f"lam{r}.pt")), tmp_path)
    ranks = [torch.load(tmp_path / f"lam{r}.pt", weights_only=True) for r in range(2)]
    net = make_net(0).double()
    renorm = F.Renormalizer(net, make_opt(net))
    renorm.calibrate(_rank_batches(0) + _rank_batches(1))
    single = renorm.lambdas()
    assert set(single) == {"conv1", "conv2", "conv3", "fc"}
    for name, lam in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], lam, rtol=1e-9, atol=0)


def test_row_lambda_none_keeps_rows_of_one_input_channel():
    """row_lambda="none" leaves every row-view weight alone, also a 1×1 conv with one input channel per group (its
    components are 1×1 rows, as the optimizer splits it: the layout rule is checks.component_shape)."""
    gen = make_gen(5)
    for net in (nn.Sequential(nn.Conv2d(1, 4, 1)), nn.Sequential(nn.Conv2d(4, 4, 1, groups=4)),
                nn.Sequential(nn.Conv2d(2, 4, 1))):
        opt = F.FGSGD(F.param_groups(net, row_view=True), lr=0.1)
        renorm = F.Renormalizer(net, opt, row_lambda="none")
        assert renorm.layers[0].row_view
        renorm.calibrate([torch.randn(8, net[0].in_channels, 4, 4, generator=gen) * 5 + 1])
        renorm.step_epoch()
        assert torch.equal(opt.rescale(net[0].weight), torch.ones(4))


# ---------------------------------------------------------------- R = γ/λ, p = R·ω
@pytest.mark.parametrize("backend,device", backends())
def test_step_epoch_sets_gamma_over_lambda_and_keeps_omega(backend, device):
    net = make_net(1).to(device)
    opt = make_opt(net, backend=backend)
    gen = make_gen(4)
    # start from R ≠ 1 so that the ratio R_new/R_old is exercised
    opt.set_rescale({p: torch.rand(opt.num_components(p), generator=gen) + 0.5 for _, p, _ in opt.manifold_params()})
    omega_before = {p: opt.components(p).detach().cpu().double() / opt.rescale(p).cpu().double().view(-1, 1, 1)
                    for _, p, _ in opt.manifold_params()}
    renorm = F.Renormalizer(net, opt)
    lam = {k: v.cpu() for k, v in renorm.calibrate([batch(gen).to(device) for _ in range(2)]).items()}
    new = renorm.step_epoch()
    expect = expected_rescale(net, opt, lam)
    names = {mod.weight: name for name, mod in net.named_modules() if hasattr(mod, "weight")}
    assert set(new) == {p for _, p, _ in opt.manifold_params()}
    seen_codes = set()
    for _, p, st in opt.manifold_params():
        assert opt.rescale(p) is st["rescale"] and torch.equal(st["rescale"], new[p])
        r, codes = st["rescale"].cpu(), opt.codes(p).cpu()
        torch.testing.assert_close(r.double(), expect[names[p]], rtol=1e-6, atol=0)
        seen_codes |= set(codes.tolist())
        # p = R·ω with the ω from before, to fp32 rounding
        comp = opt.components(p).detach().cpu().double()
        ref = r.double().view(-1, 1, 1) * omega_before[p]
        err = ((comp - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max()
        assert float(err) < 1e-6
        # ω = p/R is still on its manifold (Table 1)
        omega = comp / r.double().view(-1, 1, 1)
        for name, dev in bounds.table1_check(omega, codes).items():
            assert max(v for k, v in dev.items() if k != "count") < 1e-5, (name, dev)
        # ‖R·ω‖_F = 1/λ on every non-euclidean component of a k×k layer
        if st["shape"][1] > 1:
            lam_c = lam[names[p]][in_channel(dict(net.named_modules())[names[p]])]
            curved = codes != C.EUCLIDEAN
            torch.testing.assert_close((comp.norm(dim=(1, 2)) * lam_c)[curved], torch.ones(int(curved.sum()),
                                       dtype=torch.float64), rtol=1e-5, atol=0)
            assert torch.all(r[~curved] == 1)
    assert {C.SPHERE_NORMALIZE, C.OBLIQUE_NORMALIZE, C.STIEFEL_QR, C.EUCLIDEAN} <= seen_codes


def test_gamma_override_and_validation():
    net = make_net(2)
    opt = make_opt(net, groups=dict(manifolds=("sphere", "stiefel"), row_view=False))
    renorm = F.Renormalizer(net, opt, gamma={"sphere": 2.0, "stiefel": lambda a, b: 0.25 * a / b})
    lam = renorm.calibrate([batch(make_gen(5))])
    renorm.step_epoch()
    p = net.conv1.weight
    codes = opt.codes(p)
    lam_c = lam["conv1"][in_channel(net.conv1)]
    ref = torch.where(codes == C.SPHERE_NORMALIZE, 2.0 / lam_c, 0.25 / lam_c)
    torch.testing.assert_close(opt.rescale(p).double(), ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="mode"):
        F.Renormalizer(net, opt, mode="sometimes")
    with pytest.raises(ValueError, match="row_lambda"):
        F.Renormalizer(net, opt, row_lambda="max")
    with pytest.raises(ValueError, match="gamma"):
        F.Renormalizer(net, opt, gamma={"torus": 1.0})
    with pytest.raises(ValueError, match="eps"):
        F.Renormalizer(net, opt, eps=0.0)


def test_row_lambda_modes():
    net = make_net(3)
    opt = make_opt(net)
    gen = make_gen(6)
    xs = [batch(gen) for _ in range(2)]
    for mode in ("mean", "none"):
        before = opt.rescale(net.conv3.weight).clone()
        renorm = F.Renormalizer(net, opt, row_lambda=mode)
        lam = renorm.calibrate(xs)
        renorm.step_epoch()
        r = opt.rescale(net.conv3.weight)
        if mode == "none":
            assert torch.equal(r, before)
        else:
            codes = opt.codes(net.conv3.weight)
            gamma = torch.ones(codes.numel(), dtype=torch.float64)    # row view: B = 1, γ = 1
            gamma[codes == C.EUCLIDEAN] = float("nan")
            ref = torch.where(gamma.isnan(), torch.ones_like(gamma), gamma / lam["conv3"].mean())
            torch.testing.assert_close(r.double(), ref, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- bad statistics
def test_zero_variance_and_nan_inputs_keep_R():
    net = make_net(4)
    opt = make_opt(net)
    gen = make_gen(7)
    start = {p: torch.rand(opt.num_components(p), generator=gen) + 0.5 for _, p, _ in opt.manifold_params()}
    opt.set_rescale(start)
    renorm = F.Renormalizer(net, opt)
    xs = [batch(gen) for _ in range(2)]
    xs[0][:, 1] = 2.5          # channel 1: constant, std 0 ...
    xs[1][:, 1] = 2.5
    xs[1][0, 2, 1, 1] = float("nan")   # channel 2: a NaN activation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        renorm.calibrate(xs)
        new = renorm.step_epoch()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("'conv1': 2 of 3 input channels have a zero or non-finite" in m for m in messages), messages
    for name in ("conv2", "conv3", "fc"):
        assert any(f"'{name}'" in m and "keep their R" in m for m in messages), (name, messages)
    p = net.conv1.weight
    r = opt.rescale(p)
    chan = in_channel(net.conv1)
    bad = (chan == 1) | (chan == 2)
    assert torch.isfinite(r).all() and (r > 0).all()
    assert torch.equal(r[bad], start[p][bad])                       # kept
    lam0 = direct_std([x[:, :1] for x in xs], conv=True)[0]
    codes = opt.codes(p)
    gamma = torch.where(codes == C.SPHERE_NORMALIZE, 1.0, 1 / 3 ** 0.5).double()
    good = ~bad & (codes != C.EUCLIDEAN)
    torch.testing.assert_close(r[good].double(), gamma[good] / lam0, rtol=1e-6, atol=0)
    assert torch.isfinite(p).all()
    # layers downstream saw NaN everywhere: every component keeps R, nothing is NaN
    for name in ("conv2", "conv3", "fc"):
        q = getattr(net, name).weight
        assert torch.equal(opt.rescale(q), start[q]) and torch.isfinite(q).all()
    assert set(new) == {p for _, p, _ in opt.manifold_params()}


def test_unreached_layer_and_tiny_std_clamped():
    net = make_net(5)
    opt = make_opt(net)
    renorm = F.Renormalizer(net, opt, eps=1e-3)
    gen = make_gen(8)
    x = batch(gen)
    x[:, 0] = 1.0 + 1e-6 * torch.randn(x[:, 0].shape, generator=gen)      # std ~1e-6 < eps
    renorm.calibrate([x], forward=lambda m, b: m.conv1(b))                # only conv1 is reached
    before = {n: opt.rescale(getattr(net, n).weight).clone() for n in ("conv2", "conv3", "fc")}
    with pytest.warns(RuntimeWarning, match="not reached"):
        renorm.step_epoch()
    for n, r in before.items():
        assert torch.equal(opt.rescale(getattr(net, n).weight), r)
    r = opt.rescale(net.conv1.weight).double()
    codes = opt.codes(net.conv1.weight)
    sel = (in_channel(net.conv1) == 0) & (codes == C.SPHERE_NORMALIZE)
    torch.testing.assert_close(r[sel], torch.full((int(sel.sum()),), 1e3, dtype=torch.float64), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- the step with R
def _loss(net, gen):
    x = batch(gen)
    return nn.functional.cross_entropy(net(x), targets(gen))


@pytest.mark.parametrize("backend,device", backends())
def test_trajectory_with_rescaling_equals_float64_reference(backend, device):
    net = make_net(6).to(device)
    clip, lr, mu, stab = 0.3, 0.05, 0.9, 3
    opt = make_opt(net, backend=backend, lr=lr, momentum=mu, nesterov=True,
                   groups=dict(group_clip=clip, stabilize=stab))
    renorm = F.Renormalizer(net, opt)
    gen = make_gen(9)
    renorm.calibrate([batch(gen).to(device) for _ in range(2)])
    renorm.step_epoch()
    params = [p for _, p, _ in opt.manifold_params()]
    cpu = {p: {"codes": opt.codes(p).cpu(), "group_index": opt.grouping(p).group_index.cpu()} for p in params}
    ref = {p: [p.detach().cpu().double().view(-1, *opt.state[p]["shape"]).clone(), None] for p in params}
    clipped = 0
    for t in range(7):
        if t == 4:   # a new epoch: new R mid-trajectory
            r_old = {p: opt.rescale(p).cpu().double().clone() for p in params}
            renorm.calibrate([batch(gen).to(device)])
            renorm.step_epoch()
            for p in params:
                ratio = opt.rescale(p).cpu().double() / r_old[p]
                assert float((ratio - 1).abs().max()) > 1e-3
                ref[p][0] = ratio.view(-1, 1, 1) * ref[p][0]
        opt.zero_grad()
        x, y = batch(gen).to(device), targets(gen).to(device)
        nn.functional.cross_entropy(net(x), y).backward()
        grads = {p: p.grad.detach().cpu().double().view(-1, *opt.state[p]["shape"]).clone() for p in params}
        opt.step()
        for p in params:
            st = opt.state[p]
            codes, gidx = cpu[p]["codes"], cpu[p]["group_index"]
            p64, m64 = ref[p]
            r64 = st["rescale"].cpu().double()
            sq = reference.tangent_sqnorm(p64, grads[p], codes, r64)
            s = reference.group_step_size(sq, gidx, st["num_groups"], clip)
            clipped += int((s < 1).sum())
            p64, m64 = reference.step(p64, grads[p], m64, codes, r64, s[gidx.long()], lr=lr,
                                      momentum=mu, nesterov=True, first_step=t == 0, stabilize=(t + 1) % stab == 0)
            ref[p] = [p64, m64]
            got = p.detach().cpu().double().view_as(p64)
            err = float((got - p64).norm() / p64.norm())
            assert err < 2e-6, (t, tuple(p.shape), err)
            merr = float((st["momentum_buffer"].cpu().double().view_as(m64) - m64).norm() / m64.norm())
            assert merr < 2e-5, (t, tuple(p.shape), merr)
    assert clipped > 0       # the group step size was active


def test_rescale_is_saved_and_restored_by_state_dict():
    net = make_net(7)
    opt = make_opt(net)
    renorm = F.Renormalizer(net, opt)
    renorm.calibrate([batch(make_gen(10))])
    renorm.step_epoch()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    net2 = make_net(7)
    net2.load_state_dict(net.state_dict())
    opt2 = make_opt(net2)
    assert all(opt2.state[p]["rescale"] is None for _, p, _ in opt2.manifold_params())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for (_, p, st), (_, q, st2) in zip(opt.manifold_params(), opt2.manifold_params()):
        assert st2["rescale"] is not None and torch.equal(st["rescale"], st2["rescale"])
        assert st2["rescale"].dtype == q.dtype


# ---------------------------------------------------------------- training, resuming, the report
def _train(net, opt, renorm, gen_of_step, steps):
    for t in steps:
        gen = gen_of_step(t)
        opt.zero_grad()
        _loss(net, gen).backward()
        opt.step()
        if t % 3 == 2:
            renorm.step_epoch()


def test_training_with_renormalization_resumes_exactly(capsys):
    def gen_of_step(t):
        return make_gen(1000 + t)

    net = make_net(8)
    net.train()
    opt = make_opt(net, groups=dict(group_clip=1.0, stabilize=4))
    renorm = F.Renormalizer(net, opt, mode="running")
    _train(net, opt, renorm, gen_of_step, range(0, 4))       # stops mid-epoch: statistics pending
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "renorm": renorm.state_dict()}, buf)
    _train(net, opt, renorm, gen_of_step, range(4, 9))

    net2 = make_net(99)        # other initial weights: everything must come from the checkpoint
    net2.train()
    opt2 = make_opt(net2, groups=dict(group_clip=1.0, stabilize=4))
    renorm2 = F.Renormalizer(net2, opt2, mode="running")
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    renorm2.load_state_dict(ckpt["renorm"])
    _train(net2, opt2, renorm2, gen_of_step, range(4, 9))

    for (n1, a), (n2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    for (_, p, st), (_, q, st2) in zip(opt.manifold_params(), opt2.manifold_params()):
        assert torch.equal(st["rescale"], st2["rescale"]) and torch.equal(st["momentum_buffer"], st2["momentum_buffer"])
        # on the manifolds, with p = R·ω and R ≠ 1
        assert float((st["rescale"] - 1).abs().max()) > 1e-2
    res = bounds.report(net, opt, 60000)
    assert res["table1"]["passed"] and res["table1"]["max_deviation"] < 1e-5
    assert set(res["table1"]["per_manifold"]) == {"sphere", "oblique", "stiefel"}
    out = capsys.readouterr().out
    for name in ("nts", "bft", "grs"):
        assert math.isfinite(res["bounds"]["p"][name]["log"])
        line = next(s for s in out.splitlines() if s.startswith(name + " "))
        assert f"{res['bounds']['p'][name]['log10']:.4f}" in line
    assert "PASS" in out


def test_a_failed_calibration_keeps_the_statistics():
    """calibrate on batches whose last one is bad (another channel count: the conv raises): the statistics are those
    from before the call, which then continues as if it had not been made; the hooks are gone and the batch-norm
    buffers restored."""
    gen = make_gen(12)
    net = make_net(2)
    renorm = F.Renormalizer(net, make_opt(net))
    first = [batch(gen), batch(gen)]
    renorm.calibrate(first)
    before = renorm.lambdas()
    buffers = [b.clone() for b in net.buffers()]
    with pytest.raises(RuntimeError):
        renorm.calibrate([batch(gen), torch.randn(2, 4, 6, 6, generator=gen)])
    assert renorm.hooks_active == 0
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    after = renorm.lambdas()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    more = [batch(gen)]
    renorm.calibrate(more)
    ref = F.Renormalizer(net, renorm.optimizer)  # one call on all the good batches
    ref.calibrate(first + more)
    for k, lam in renorm.lambdas().items():
        torch.testing.assert_close(lam, ref.lambdas()[k], rtol=1e-12, atol=0)


def test_a_weight_shared_by_two_layers_is_named_in_a_warning():
    """Two layers holding one weight (tied weights): R is measured from the first layer's inputs, and a warning names
    both (the second layer was ignored without a word)."""
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1))
    net[2].weight = net[0].weight
    opt = F.FGSGD(F.param_groups(net), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"layer '2' shares its weight with layer '0'; R is measured from the "
                                            r"inputs of '0' only"):
        renorm = F.Renormalizer(net, opt)
    assert [layer.name for layer in renorm.layers] == ["0"]


def test_a_dropped_running_renormalizer_removes_its_hooks():
    """The model's hooks hold the Renormalizer weakly: once dropped (del, out of scope) it is collected and its hooks
    are removed; they had kept it alive and measuring every training forward pass until stop()."""
    import gc
    import weakref

    net = make_net(3)
    opt = make_opt(net)
    renorm = F.Renormalizer(net, opt, mode="running")
    assert renorm.hooks_active > 0
    modules = [layer.module for layer in renorm.layers]
    assert all(len(m._forward_pre_hooks) == 1 for m in modules)
    ref = weakref.ref(renorm)
    del renorm
    gc.collect()
    assert ref() is None
    assert all(len(m._forward_pre_hooks) == 0 for m in modules)
    net(batch(make_gen(4)))  # the forward pass runs without them
