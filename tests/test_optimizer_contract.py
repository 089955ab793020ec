"""FGSGD keeps the torch.optim contract: Euclidean groups are torch.optim.SGD bit for bit, zero_grad,
step(closure), parameters without gradients, GradScaler, sparse and non-finite gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_gen
from fgsgd_cuda import FGSGD, param_groups


def small_cnn(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def batch(seed=0, n=4):
    gen = make_gen(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def snapshot(params, opt):
    """A deep copy of the parameters and the optimizer's state (for 'nothing changed' checks)."""
    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(copy(x) for x in v)
        return v
    return [p.detach().clone() for p in params], {id(p): copy(dict(opt.state[p])) for p in params if p in opt.state}


def assert_same(a, b):
    def same(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)), "a parameter changed"
    assert sa.keys() == sb.keys(), "the optimizer's state gained or lost entries"
    assert all(same(sa[k], sb[k]) for k in sa), "the optimizer's state changed"


# ------------------------------------------------------------------------------------------------ SGD
SGD_HYPER = [dict(), dict(momentum=0.9), dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, nesterov=True),
             dict(momentum=0.8, dampening=0.5, weight_decay=5e-3), dict(weight_decay=0.1),
             dict(momentum=0.9, nesterov=True, weight_decay=1e-3)]


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("impl", [dict(), dict(foreach=True), dict(fused=True)], ids=["default", "foreach", "fused"])
@pytest.mark.parametrize("hyper", SGD_HYPER, ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()) or "plain")
def test_euclidean_groups_are_sgd_bitwise(hyper, impl, maximize):
    """A whole model in Euclidean groups, and the Euclidean group beside manifold groups, run side by side
    with torch.optim.SGD on a copy: bitwise equal weights and momentum buffers after every step, with torch's
    default, foreach and fused SGD (fused: FGSGD calls its kernel directly, fgsgd_cuda/euclidean.py), minimizing
    and (``maximize=True``: the optimizer's keyword, or the Euclidean group's beside manifold groups) maximizing."""
    hyper = {**hyper, **impl}
    m_fg, m_sgd = small_cnn(1), small_cnn(1)
    m_mix, m_mix_sgd = small_cnn(1), small_cnn(1)
    opt_fg = FGSGD(m_fg.parameters(), lr=0.05, maximize=maximize, **hyper)               # manifolds=None
    opt_sgd = torch.optim.SGD(m_sgd.parameters(), lr=0.05, maximize=maximize, **hyper)
    groups = param_groups(m_mix, weight_decay=hyper.get("weight_decay", 0.0), group_size=4)
    groups[-1]["maximize"] = maximize
    hyper_no_wd = {k: v for k, v in hyper.items() if k != "weight_decay"}
    opt_mix = FGSGD(groups, lr=0.05, **hyper_no_wd)
    euclid = groups[-1]["params"]
    assert groups[-1]["manifolds"] is None and len(euclid) > 4
    euclid_sgd = [dict(m_mix_sgd.named_parameters())[n] for n, p in m_mix.named_parameters()
                  if any(p is q for q in euclid)]
    opt_mix_sgd = torch.optim.SGD(euclid_sgd, lr=0.05, maximize=maximize, **hyper)
    for t in range(4):
        x, y = batch(t)
        for model, opt in ((m_fg, opt_fg), (m_sgd, opt_sgd), (m_mix, opt_mix), (m_mix_sgd, opt_mix_sgd)):
            opt.zero_grad()
            loss_of(model, x, y).backward()
        # the manifold weights of the mixed model differ, so feed its gradients to the SGD copy
        for p, q in zip(euclid, euclid_sgd):
            q.grad = p.grad.clone()
        for opt in (opt_fg, opt_sgd, opt_mix, opt_mix_sgd):
            opt.step()
        for (name, p), q in zip(m_fg.named_parameters(), m_sgd.parameters()):
            assert torch.equal(p, q), f"step {t}: {name} differs from torch.optim.SGD"
            if hyper.get("momentum"):
                assert torch.equal(opt_fg.state[p]["momentum_buffer"], opt_sgd.state[q]["momentum_buffer"])
        for p, q in zip(euclid, euclid_sgd):
            assert torch.equal(p, q), f"step {t}: a Euclidean parameter beside manifold groups differs from SGD"
    assert not torch.equal(m_fg[0].weight, small_cnn(1)[0].weight)


def test_maximize_on_a_manifold_group_is_refused():
    """FG-SGD descends: maximize=True on a manifold group is an error naming the option (it was ignored: the group
    minimized), at construction and through add_param_group, and nothing changes (no projection, no new group)."""
    m = small_cnn(2)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"maximize: manifold groups minimize .* maximize=True on a group with "
                                         r"manifolds=\['sphere'"):
        FGSGD(param_groups(m, manifolds=["sphere", "oblique"]), lr=0.1, maximize=True)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    groups = param_groups(m, manifolds=["sphere", "oblique"])
    opt = FGSGD(groups[-1:], lr=0.1, maximize=True)  # the Euclidean group alone: maximizes
    snap = snapshot(list(m.parameters()), opt)
    with pytest.raises(ValueError, match=r"maximize: manifold groups minimize"):
        opt.add_param_group(dict(groups[0], maximize=True))
    assert len(opt.param_groups) == 1
    assert_same(snapshot(list(m.parameters()), opt), snap)


@pytest.mark.parametrize("kw,error", [(dict(differentiable=True), r"differentiable: FGSGD's step is not differentiable"),
                                      (dict(maximize="yes"), r"maximize: must be a bool, got 'yes'")],
                         ids=["differentiable", "maximize-not-bool"])
def test_sgd_keywords(kw, error):
    """torch.optim.SGD's keywords work for a drop-in swap: maximize (Euclidean groups), differentiable=False; the
    rest is an error naming the keyword."""
    m = small_cnn(3)
    FGSGD(m.parameters(), lr=0.1, differentiable=False, maximize=False)
    with pytest.raises(ValueError, match=error):
        FGSGD(m.parameters(), lr=0.1, **kw)


def test_fused_euclidean_shortcut_and_its_fallback(monkeypatch):
    """A fused Euclidean group on one device and dtype calls torch._fused_sgd_ itself after the first step (which
    makes the momentum buffers through torch's step); a group of two dtypes goes through torch's functional step
    at every step. Both bitwise torch.optim.SGD(fused=True)."""
    import fgsgd_cuda.euclidean as E
    calls = []
    real = E.sgd
    monkeypatch.setattr(E, "sgd", lambda *a, **k: (calls.append(1), real(*a, **k)))
    gen = make_gen(3)
    for dtypes, expected in (((torch.float32, torch.float32), 1), ((torch.float32, torch.float64), 4)):
        calls.clear()
        ours = [torch.randn(5, 3, generator=gen).to(dt).requires_grad_() for dt in dtypes]
        theirs = [p.detach().clone().requires_grad_() for p in ours]
        opt = FGSGD(ours, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True)
        ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True)
        for _ in range(4):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                q.grad = p.grad.clone()
            opt.step()
            ref.step()
            for p, q in zip(ours, theirs):
                assert torch.equal(p, q)
                assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
        assert len(calls) == expected, dtypes


# ------------------------------------------------------------------------------------------------ contract
def test_zero_grad_and_closure():
    model = small_cnn(2)
    opt = FGSGD(param_groups(model, group_size=4), lr=0.1, momentum=0.9)
    x, y = batch(0)
    calls = []

    def closure():
        assert torch.is_grad_enabled()
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    before = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor)
    assert not torch.equal(before, model[0].weight)
    assert opt.step() is None
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_closure_loss_is_before_the_step():
    model = small_cnn(3)
    opt = FGSGD(param_groups(model, group_size=4), lr=0.1)
    x, y = batch(1)
    expected = loss_of(model, x, y).detach()  # after the initial projection, before the step

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    got = opt.step(closure)
    assert torch.equal(got.detach(), expected)
    assert not torch.equal(loss_of(model, x, y).detach(), expected)


def test_params_without_grad_are_skipped():
    model = small_cnn(4)
    opt = FGSGD(param_groups(model, group_size=4), lr=0.1, momentum=0.9)
    x, y = batch(2)
    loss_of(model, x, y).backward()
    frozen = [model[3].weight, model[3].bias]            # a manifold weight and a Euclidean bias
    for p in frozen:
        p.grad = None
    before = [p.detach().clone() for p in frozen]
    opt.step()
    for p, b in zip(frozen, before):
        assert torch.equal(p, b)
    st = opt.state[model[3].weight]
    assert st["step"] == 0 and st.get("momentum_buffer") is None
    assert model[3].bias not in opt.state
    assert opt.state[model[0].weight]["step"] == 1 and opt.state[model[0].bias]["momentum_buffer"] is not None
    # a later step with its gradient starts its momentum (first step) while the others continue
    loss_of(model, x, y).backward()
    opt.step()
    assert st["step"] == 1 and st["momentum_buffer"] is not None
    assert opt.state[model[0].weight]["step"] == 2


def make_scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except (TypeError, RuntimeError, AttributeError) as exc:  # pragma: no cover - older torch
        pytest.skip(f"torch.amp.GradScaler('cpu') is not supported here: {exc}")


def test_grad_scaler_skips_inf_and_matches_unscaled_step():
    model, ref = small_cnn(5), small_cnn(5)
    opt = FGSGD(param_groups(model, group_size=4, group_clip=1.0), lr=0.1, momentum=0.9)
    opt_ref = FGSGD(param_groups(ref, group_size=4, group_clip=1.0), lr=0.1, momentum=0.9)
    scaler = make_scaler()
    params = list(model.parameters())
    for t in range(3):
        x, y = batch(10 + t)
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        opt_ref.zero_grad()
        loss_of(ref, x, y).backward()
        if t == 1:  # an overflow: the scaler must skip the step
            params[3].grad.view(-1)[5] = float("inf")
            before = snapshot(params, opt)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            assert_same(snapshot(params, opt), before)
            assert scaler.get_scale() < scale
            continue
        scaler.step(opt)
        scaler.update()
        opt_ref.step()
        for p, q in zip(params, ref.parameters()):  # unscaling by a power of two is exact
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    assert opt.state[params[0]]["step"] == 2


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_gradients_in_euclidean_groups_step_as_in_sgd(momentum, foreach):
    """An nn.Embedding(sparse=True) in a Euclidean group steps as torch.optim.SGD steps it (FGSGD had refused every
    sparse gradient), bit for bit, beside a manifold group; inf in a sparse gradient is refused by name."""
    def build(cls):
        torch.manual_seed(0)
        emb, conv = nn.Embedding(10, 4, sparse=True), nn.Conv2d(2, 3, 3)
        groups = [{"params": [emb.weight, conv.bias]}]
        if cls is FGSGD:
            groups.insert(0, {"params": [conv.weight], "manifolds": ["sphere"]})
        return emb, conv, cls(groups, lr=0.1, momentum=momentum, foreach=foreach)
    (e1, c1, o1), (e2, c2, o2) = build(FGSGD), build(torch.optim.SGD)
    for k in range(3):
        for emb, conv in ((e1, c1), (e2, c2)):
            emb.zero_grad()
            emb(torch.tensor([1, 2, 3 + k, 3 + k])).sum().backward()
            conv.bias.grad = torch.randn(3, generator=make_gen(k))
        assert e1.weight.grad.is_sparse
        o1.step()
        o2.step()
    assert torch.equal(e1.weight, e2.weight) and torch.equal(c1.bias, c2.bias)
    e1.weight.grad = torch.sparse_coo_tensor([[1]], [[float("inf")] * 4], (10, 4), check_invariants=True)
    before = e1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]: the gradient holds inf"):
        o1.step()
    assert torch.equal(e1.weight, before)


def test_sparse_gradients_in_manifold_or_capturable_groups_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    conv = nn.Conv2d(2, 3, 3)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    conv.bias.grad = torch.randn_like(conv.bias)
    conv.weight.grad = emb.weight.grad.new_zeros(conv.weight.shape).to_sparse()
    opt = FGSGD([{"params": [conv.weight], "manifolds": ["sphere"]}, {"params": [emb.weight, conv.bias]}],
                lr=0.1, momentum=0.9)
    params = [conv.weight, emb.weight, conv.bias]
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\]: has a sparse gradient, which a "
                                           "manifold group's kernels cannot read"):
        opt.step()
    assert_same(snapshot(params, opt), before)
    opt = FGSGD([{"params": [emb.weight, conv.bias]}], lr=0.1, momentum=0.9, capturable=True)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\]: has a sparse gradient, which a "
                                           "capturable step cannot take"):
        opt.step()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradients(bad):
    model = small_cnn(6)
    opt = FGSGD(param_groups(model, group_size=4), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    x, y = batch(3)
    loss_of(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[3].weight.grad.view(-1)[7] = bad
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*inf or nan"):
        opt.step()
    assert_same(snapshot(params, opt), before)
    # a non-finite Euclidean gradient too
    model[3].weight.grad.view(-1)[7] = 0.5
    model[1].bias.grad[0] = bad
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[\d+\].*inf or nan"):
        opt.step()
    assert_same(snapshot(params, opt), before)
    # check_finite=False: the step is taken
    for g in opt.param_groups:
        g["check_finite"] = False
    model[3].weight.grad.view(-1)[7] = bad
    opt.step()
    assert opt.state[model[3].weight]["step"] == 2
    assert not torch.isfinite(model[1].bias).all()


@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
def test_finite_screen_false_alarm_and_negative_inf(bad):
    """check_finite screens with one sum per gradient: finite gradients whose sum overflows (a false alarm) still
    step, once the exact check has cleared them; a lone -inf among large positive entries is still caught."""
    model = small_cnn(7)
    opt = FGSGD(param_groups(model, group_size=4), lr=1e-40, momentum=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model[1].bias.grad[:2] = 3e38                                    # finite; their float32 sum is inf
    opt.step()
    assert all(opt.state[p]["step"] == 1 for _, p, _ in opt.manifold_params())
    model[1].bias.grad[2] = bad
    params = list(model.parameters())
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[\d+\].*inf or nan"):
        opt.step()
    assert_same(snapshot(params, opt), before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_like_the_original(how):
    """copy.deepcopy / pickle of a stepped FGSGD (torch keeps defaults, state and param_groups; the step's caches
    and side streams are made anew): the copy's next step equals the original's, bit for bit, with group_clip."""
    import pickle
    model = small_cnn()
    opt = FGSGD(param_groups(model, group_size=4, group_clip=1.0), lr=0.05, momentum=0.9)
    for k in range(2):
        loss_of(model, *batch(k)).backward()
        opt.step()
        opt.zero_grad()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    loss_of(model, *batch(5)).backward()
    for a, b in zip(opt.param_groups, twin.param_groups):
        for p, q in zip(a["params"], b["params"]):
            q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for a, b in zip(opt.param_groups, twin.param_groups):
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])


def test_foreach_and_fused_together_are_refused_as_in_sgd():
    m = small_cnn(4)
    with pytest.raises(RuntimeError):
        torch.optim.SGD(m.parameters(), lr=0.1, foreach=True, fused=True)
    for groups in (m.parameters(), param_groups(m)):
        with pytest.raises(ValueError, match="foreach and fused: cannot both be True"):
            FGSGD(groups, lr=0.1, momentum=0.9, foreach=True, fused=True)


@pytest.mark.parametrize("capturable", [False, True])
def test_no_state_without_momentum_as_in_sgd(capturable):
    """Without momentum a Euclidean group keeps no state: its state_dict is SGD's (it held an empty entry per
    parameter)."""
    m, ref = small_cnn(5), small_cnn(5)
    kw = dict(fused=True) if capturable else {}
    opt = FGSGD(m.parameters(), lr=0.1, capturable=capturable, **kw)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, **kw)
    for o, model in ((opt, m), (sgd, ref)):
        loss_of(model, *batch(1)).backward()
        o.step()
    assert opt.state_dict()["state"] == sgd.state_dict()["state"] == {}
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))


def test_sgd_checkpoint_loads_into_a_euclidean_fgsgd():
    """A torch.optim.SGD checkpoint resumes in FGSGD (the options SGD's groups lack are this optimizer's), exactly as
    in SGD; loaded into a manifold group it is refused by name and nothing is loaded. (It raised a KeyError after
    torch had replaced the state, leaving an optimizer that could not step.)"""
    m1, m2 = small_cnn(6), small_cnn(6)
    sgd1 = torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9)
    for k in range(2):
        sgd1.zero_grad()
        loss_of(m1, *batch(k)).backward()
        sgd1.step()
    m2.load_state_dict(m1.state_dict())
    opt = FGSGD(m2.parameters(), lr=0.05, momentum=0.9, backend="torch")
    opt.load_state_dict(copy.deepcopy(sgd1.state_dict()))  # a state_dict holds the optimizer's own tensors
    assert opt.param_groups[0]["manifolds"] is None and opt.param_groups[0]["backend"] == "torch"
    for k in range(2, 4):
        for model, o in ((m1, sgd1), (m2, opt)):
            o.zero_grad()
            loss_of(model, *batch(k)).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    # into a manifold group: refused, nothing loaded, the next step works
    m3 = small_cnn(6)
    filters = [p for p in m3.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    rest = [p for p in m3.parameters() if not any(p is q for q in filters)]
    fg3 = FGSGD([{"params": filters, "manifolds": ["sphere"]}, {"params": rest}], lr=0.05, momentum=0.9)
    sgd3 = torch.optim.SGD([{"params": filters}, {"params": rest}], lr=0.05, momentum=0.9)
    loss_of(m3, *batch(0)).backward()
    sgd3.step()
    before = snapshot(list(m3.parameters()), fg3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*no manifold codes.*nothing was loaded"):
        fg3.load_state_dict(sgd3.state_dict())
    assert_same(snapshot(list(m3.parameters()), fg3), before)
    fg3.step()


def test_numpy_scalars_as_options_step_as_floats():
    """lr and momentum given as numpy scalars (as torch.optim.SGD takes them; FGSGD had refused np.float32(0.1) with
    'must be a non-negative number') give the bits of the same floats; param_groups takes one kind as a string."""
    np = pytest.importorskip("numpy")
    runs = []
    for lr, mom in ((0.1, 0.9), (np.float64(0.1), np.float64(0.9))):
        model = small_cnn(3)
        opt = FGSGD(param_groups(model, manifolds="sphere", group_size=4), lr=lr, momentum=mom)
        for k in range(2):
            opt.zero_grad()
            loss_of(model, *batch(k)).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert param_groups(small_cnn(), manifolds="sphere")[0]["manifolds"] == ["sphere"]
    FGSGD(param_groups(small_cnn(), group_clip=np.float32(1.0)), lr=0.1)  # group_clip too
