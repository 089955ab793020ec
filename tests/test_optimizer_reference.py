"""FGSGD's step against a plain float64 step-by-step reference of DESIGN.md §1, Algorithm 1.

The reference below is written out in the test from ``fgsgd_cuda.reference`` (tangent_sqnorm,
group_step_size, step, projx) and the grouping codes the optimizer stored: initial projection at
construction, then per step s_g (group_clip), momentum / dampening / nesterov with transport by
projection, the retraction of each component's code, and the re-projection every ``stabilize``
steps. The optimizer runs on float64 parameters (tight tolerance) and float32 parameters (1e-5).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FP32_RTOL, make_gen, rel_err, requires_cpu_kernels
from fgsgd_cuda import FGSGD, codes as C, param_groups, reference as R

F64_RTOL = 1e-10
STEPS = 5


# ------------------------------------------------------------------------------------------------ inputs
def filter_shapes(manifolds) -> list[tuple]:
    """Weights of the test 'model': k×k filters, non-square filters, and row-view weights."""
    shapes = [(6, 4, 3, 3), (5, 3, 3, 3), (4, 2, 3, 2), (3, 3, 5, 5)]
    if "stiefel" not in manifolds:
        shapes += [(3, 2, 1, 3), (5, 7), (4, 80)]  # 1×3 filters (A < B), rows of 7, rows of 80 (> 64: torch path)
    return shapes


def component_shape(shape) -> tuple[int, int]:
    if len(shape) == 4 and (shape[2] > 1 or shape[3] > 1):
        return shape[2], shape[3]
    n = 1
    for s in shape[1:]:
        n *= s
    return n, 1


def make_inits(shapes, seed) -> list[torch.Tensor]:
    gen = make_gen(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def make_grads(shapes, steps, seed) -> list[list[torch.Tensor]]:
    """Random gradients with a spread of magnitudes per component (so a group clip clips some groups only)."""
    gen = make_gen(seed)
    out = []
    for _ in range(steps):
        gs = []
        for s in shapes:
            g = torch.randn(s, generator=gen, dtype=torch.float64)
            scale = torch.exp(torch.randn(s[0], generator=gen, dtype=torch.float64))
            gs.append(g * scale.reshape(-1, *([1] * (len(s) - 1))))
        out.append(gs)
    return out


def code_set(manifolds, retraction) -> set[int]:
    return {C.code_of(m, (retraction or {}).get(m)) for m in manifolds}


# ------------------------------------------------------------------------------------------------ the reference
def reference_run(inits, groupings, grads_seq, *, lrs, momentum=0.0, dampening=0.0, nesterov=False,
                  weight_decay=0.0, group_clip=None, stabilize=50, rescale=None, init_projx=True):
    """Algorithm 1 in float64, one parameter and one step at a time.

    inits: parameter values before construction; groupings: (shape, codes, group_index, num_groups) per
    parameter; rescale: None or (N,) scales R applied right after construction (p ← R·ω).
    Returns the final parameters, momentum buffers (None when momentum == 0) and every s_g seen.
    """
    ps, ms = [], []
    for x, (shape, codes, _, _) in zip(inits, groupings):
        w = x.double().reshape(-1, *shape)
        if init_projx:
            w = R.projx(w, codes)                                 # the initial projection at construction
        ps.append(w)
        ms.append(None)
    rs = [None] * len(ps) if rescale is None else [r.double() for r in rescale]
    ps = [p if r is None else p * r.reshape(-1, 1, 1) for p, r in zip(ps, rs)]
    scales_seen = []
    for t, grads in enumerate(grads_seq, start=1):
        for k, (g, (shape, codes, gidx, ng)) in enumerate(zip(grads, groupings)):
            g = g.double().reshape(-1, *shape)
            s = None
            if group_clip is not None:
                sq = R.tangent_sqnorm(ps[k], g, codes, rs[k], weight_decay)
                sg = R.group_step_size(sq, gidx, ng, group_clip)
                scales_seen.append(sg)
                s = sg[gidx.long()]
            ps[k], m_new = R.step(ps[k], g, ms[k], codes, rs[k], s, lr=lrs[t - 1], momentum=momentum,
                                  dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                                  first_step=(t == 1), stabilize=bool(stabilize) and t % stabilize == 0)
            ms[k] = m_new
    return ps, ms, scales_seen


def stored_groupings(opt, params, manifolds, retraction):
    """The grouping the optimizer stored for each parameter, checked for consistency."""
    out = []
    allowed = code_set(manifolds, retraction)
    for p in params:
        st = opt.state[p]
        shape = component_shape(tuple(p.shape))
        assert st["shape"] == shape
        n = p.numel() // (shape[0] * shape[1])
        codes = opt.codes(p)
        assert codes.shape == (n,) and codes.dtype == torch.uint8
        packed = len(torch.unique(codes)) <= 4  # then the state keeps them 2 bits each (fgsgd_cuda.codes.pack)
        assert st["codes"].dtype == (torch.int32 if packed else torch.uint8)
        assert "group_index" not in st  # recomputed by opt.grouping, never stored
        group_index = opt.grouping(p).group_index
        assert group_index.shape == (n,) and group_index.dtype == torch.int32
        assert torch.equal(codes, st["group_codes"][group_index.long()])
        assert set(torch.unique(codes).tolist()) <= allowed
        out.append((shape, codes.clone(), group_index.clone(), st["num_groups"]))
    return out


def run_optimizer(params, grads_seq, opt, scheduler=None):
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype).clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_close(got, ref, dtype, what):
    """Relative error, with an absolute floor of 1 on the norm (a 1×k oblique component has no tangent space:
    its momentum is 0)."""
    tol = F64_RTOL if dtype == torch.float64 else FP32_RTOL
    ref = ref.double()
    err = float((got.double() - ref).norm() / ref.norm().clamp_min(1.0))
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# ------------------------------------------------------------------------------------------------ configurations
CONFIGS = {
    "sphere-normalize": dict(manifolds=["sphere"], group_size=4),
    "sphere-exp-momentum": dict(manifolds=["sphere"], retraction={"sphere": "exp"}, momentum=0.9, group_size=5),
    "oblique-normalize-dampening": dict(manifolds=["oblique"], momentum=0.8, dampening=0.3, group_size=3),
    "oblique-exp-nesterov": dict(manifolds=["oblique"], retraction={"oblique": "exp"}, momentum=0.9, nesterov=True),
    "stiefel-qr-clip": dict(manifolds=["stiefel"], momentum=0.9, group_clip=3.0, group_size=4),
    "stiefel-cayley-nesterov-clip": dict(manifolds=["stiefel"], retraction={"stiefel": "cayley"}, momentum=0.5,
                                         nesterov=True, group_clip=2.0, num_groups=3),
    "mix-PI-deterministic": dict(manifolds=["sphere", "oblique", "stiefel"], collection="PI",
                                 selection="deterministic", num_groups=2, momentum=0.9, stabilize=2),
    "mix-PO-random-assign-euclid-clip": dict(manifolds=["sphere", "oblique", "stiefel", "euclidean"],
                                             collection="PO", assign="random", group_size=2, group_clip=2.5,
                                             momentum=0.9, dampening=0.1, stabilize=3, seed=5),
    "mix-PIO-exp-cayley-stab1": dict(manifolds=["stiefel", "sphere", "oblique"],
                                     retraction={"stiefel": "cayley", "sphere": "exp", "oblique": "exp"},
                                     num_groups=5, momentum=0.9, nesterov=True, stabilize=1, seed=3),
    "sphere-euclid-no-stabilize": dict(manifolds=["sphere", "euclidean"], retraction={"sphere": "exp"},
                                       group_size=3, momentum=0.7, stabilize=0, group_clip=4.0),
    "euclidean-weight-decay": dict(manifolds=["euclidean"], momentum=0.9, weight_decay=0.05, group_clip=3.0),
}
HYPER = ("momentum", "dampening", "nesterov", "weight_decay")


def split(cfg):
    hyper = {k: cfg[k] for k in HYPER if k in cfg}
    opts = {k: v for k, v in cfg.items() if k not in HYPER}
    return hyper, opts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_matches_float64_reference(name, dtype):
    cfg = CONFIGS[name]
    hyper, opts = split(cfg)
    shapes = filter_shapes(cfg["manifolds"])
    inits = make_inits(shapes, seed=1)
    params = [nn.Parameter(x.to(dtype).clone()) for x in inits]
    lr = 0.1
    opt = FGSGD(params, lr=lr, **hyper, **opts)
    groupings = stored_groupings(opt, params, cfg["manifolds"], cfg.get("retraction"))
    # the initial projection happened at construction
    for p, x, (shape, codes, _, _) in zip(params, inits, groupings):
        assert_close(p.detach().reshape(-1, *shape), R.projx(x.to(dtype).double().reshape(-1, *shape), codes),
                     dtype, "initial projection")
    grads_seq = make_grads(shapes, STEPS, seed=2)
    run_optimizer(params, grads_seq, opt)
    ref_p, ref_m, scales = reference_run([x.to(dtype) for x in inits], groupings, grads_seq, lrs=[lr] * STEPS,
                                         stabilize=opts.get("stabilize", 50), group_clip=opts.get("group_clip"),
                                         **hyper)
    for k, p in enumerate(params):
        assert p.dtype == dtype
        shape = groupings[k][0]
        assert_close(p.detach().reshape(-1, *shape), ref_p[k], dtype, f"param {k} {tuple(p.shape)}")
        if hyper.get("momentum"):
            assert_close(opt.state[p]["momentum_buffer"].reshape(-1, *shape), ref_m[k], dtype, f"momentum {k}")
        else:
            assert opt.state[p].get("momentum_buffer") is None
        assert opt.state[p]["step"] == STEPS
    if opts.get("group_clip") is not None:
        s = torch.cat(scales)
        assert bool((s < 1 - 1e-6).any()), "the group clip never clipped: the test does not exercise it"
        assert bool((s == 1).any()), "the group clip clipped every group: the test does not exercise max(1, ·)"


@pytest.mark.parametrize("manifolds", [["sphere", "oblique", "stiefel", "euclidean"],
                                       ["sphere", "oblique", "euclidean"]], ids=["with-stiefel", "with-rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_step_with_rescale_matches_reference(dtype, manifolds):
    """p = R·ω: the step recovers ω = p/R and uses R·g (DESIGN.md §1 'Rescaling')."""
    shapes = filter_shapes(manifolds)
    inits = make_inits(shapes, seed=11)
    params = [nn.Parameter(x.to(dtype).clone()) for x in inits]
    opt = FGSGD(params, lr=0.05, momentum=0.9, manifolds=manifolds, group_size=3, group_clip=1.5, stabilize=2)
    groupings = stored_groupings(opt, params, manifolds, None)
    gen = make_gen(12)
    scales = [torch.rand(codes.numel(), generator=gen, dtype=torch.float64) * 2 + 0.25 for _, codes, _, _ in groupings]
    opt.set_rescale({p: r.to(dtype) for p, r in zip(params, scales)})
    grads_seq = make_grads(shapes, STEPS, seed=13)
    run_optimizer(params, grads_seq, opt)
    ref_p, ref_m, seen = reference_run([x.to(dtype) for x in inits], groupings, grads_seq, lrs=[0.05] * STEPS,
                                       momentum=0.9, group_clip=1.5, stabilize=2,
                                       rescale=[r.to(dtype) for r in scales])
    assert bool((torch.cat(seen) < 1).any())
    for k, p in enumerate(params):
        shape = groupings[k][0]
        assert_close(p.detach().reshape(-1, *shape), ref_p[k], dtype, f"param {k}")
        assert_close(opt.state[p]["momentum_buffer"].reshape(-1, *shape), ref_m[k], dtype, f"momentum {k}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_stabilize_reprojects_every_n_steps(dtype):
    """Off the manifold (init_projx=False), exp and cayley keep the distance to the manifold; only the
    re-projection every ``stabilize`` steps brings the components back, so its schedule is visible."""
    manifolds = ["sphere", "oblique", "stiefel"]
    retraction = {"sphere": "exp", "oblique": "exp", "stiefel": "cayley"}
    shapes = [(6, 4, 3, 3), (4, 2, 3, 2)]
    grads_seq = make_grads(shapes, STEPS, seed=62)
    finals = []
    for stabilize in (0, 2, 3):
        params = [nn.Parameter(x.to(dtype)) for x in make_inits(shapes, seed=61)]
        opt = FGSGD(params, lr=0.05, momentum=0.9, manifolds=manifolds, retraction=retraction, group_size=2,
                    stabilize=stabilize, init_projx=False)
        groupings = stored_groupings(opt, params, manifolds, retraction)
        # 5% off the manifold (further off, the projections of the step are no longer contractions)
        inits = [1.05 * R.projx(p.detach().double().reshape(-1, *g[0]), g[1]).reshape(p.shape)
                 for p, g in zip(params, groupings)]
        with torch.no_grad():
            for p, x in zip(params, inits):
                p.copy_(x)
        run_optimizer(params, grads_seq, opt)
        ref_p, ref_m, _ = reference_run([x.to(dtype) for x in inits], groupings, grads_seq, lrs=[0.05] * STEPS,
                                        momentum=0.9, stabilize=stabilize, init_projx=False)
        off = 0.0
        for k, p in enumerate(params):
            shape = groupings[k][0]
            assert_close(p.detach().reshape(-1, *shape), ref_p[k], dtype, f"stabilize={stabilize} param {k}")
            assert_close(opt.state[p]["momentum_buffer"].reshape(-1, *shape), ref_m[k], dtype, f"momentum {k}")
            sphere = groupings[k][1] == C.SPHERE_EXP
            off = max(off, float((ref_p[k][sphere].norm(dim=(-2, -1)) - 1).abs().max()))
        # exp keeps the norm of an off-manifold sphere component; a re-projection makes it exactly 1
        assert off > 0.02 if stabilize == 0 else off < 1e-12
        assert opt.state[params[0]]["step"] == STEPS
        finals.append(ref_p[0])
    assert rel_err(finals[0], finals[1]) > 1e-3 and rel_err(finals[1], finals[2]) > 1e-4  # the schedules differ


def test_init_projx_false_leaves_weights_alone():
    inits = make_inits([(6, 4, 3, 3)], seed=21)
    p = nn.Parameter(inits[0].float().clone())
    before = p.detach().clone()
    FGSGD([p], lr=0.1, manifolds=["sphere"], init_projx=False)
    assert torch.equal(p.detach(), before)
    FGSGD([p], lr=0.1, manifolds=["sphere"])
    norms = p.detach().reshape(-1, 3, 3).double().norm(dim=(-2, -1))
    assert float((norms - 1).abs().max()) <= FP32_RTOL


def test_lr_scheduler_changes_effective_lr():
    manifolds = ["sphere", "stiefel"]
    shapes = filter_shapes(manifolds)
    inits = make_inits(shapes, seed=31)
    params = [nn.Parameter(x.clone()) for x in inits]
    opt = FGSGD(params, lr=0.2, momentum=0.9, manifolds=manifolds, group_size=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    groupings = stored_groupings(opt, params, manifolds, None)
    grads_seq = make_grads(shapes, STEPS, seed=32)
    run_optimizer(params, grads_seq, opt, scheduler=sched)
    lrs = [0.2, 0.2, 0.02, 0.02, 0.002]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)  # after 5 scheduler steps: 0.2·0.1^(5 // 2)
    ref_p, _, _ = reference_run(inits, groupings, grads_seq, lrs=lrs, momentum=0.9)
    ref_const, _, _ = reference_run(inits, groupings, grads_seq, lrs=[0.2] * STEPS, momentum=0.9)
    for k, p in enumerate(params):
        shape = groupings[k][0]
        assert_close(p.detach().reshape(-1, *shape), ref_p[k], torch.float64, f"param {k}")
        assert rel_err(p.detach().reshape(-1, *shape), ref_const[k]) > 1e-3  # the schedule made a difference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_add_param_group_matches_reference(dtype):
    shapes_a, shapes_b = [(6, 4, 3, 3)], [(4, 2, 3, 2), (5, 3, 3, 3)]
    inits_a, inits_b = make_inits(shapes_a, seed=41), make_inits(shapes_b, seed=42)
    pa = [nn.Parameter(x.to(dtype).clone()) for x in inits_a]
    pb = [nn.Parameter(x.to(dtype).clone()) for x in inits_b]
    opt = FGSGD(pa, lr=0.1, momentum=0.9, manifolds=["sphere"], group_size=3)
    before_b = [p.detach().clone() for p in pb]
    opt.add_param_group({"params": pb, "manifolds": ["stiefel", "oblique"], "retraction": {"stiefel": "cayley"},
                         "lr": 0.05, "group_clip": 2.0, "collection": "PI"})
    assert len(opt.param_groups) == 2
    assert not any(torch.equal(p.detach(), b) for p, b in zip(pb, before_b))  # projected when added
    ga = stored_groupings(opt, pa, ["sphere"], None)
    gb = stored_groupings(opt, pb, ["stiefel", "oblique"], {"stiefel": "cayley"})
    grads = make_grads(shapes_a + shapes_b, STEPS, seed=43)
    run_optimizer(pa + pb, grads, opt)
    ref_a, _, _ = reference_run([x.to(dtype) for x in inits_a], ga, [g[:1] for g in grads], lrs=[0.1] * STEPS,
                                momentum=0.9)
    ref_b, _, seen = reference_run([x.to(dtype) for x in inits_b], gb, [g[1:] for g in grads], lrs=[0.05] * STEPS,
                                   momentum=0.9, group_clip=2.0)
    assert bool((torch.cat(seen) < 1).any())
    for p, (shape, *_), ref in zip(pa + pb, ga + gb, ref_a + ref_b):
        assert_close(p.detach().reshape(-1, *shape), ref, dtype, f"param {tuple(p.shape)}")


def test_manifold_euclidean_group_follows_sgd():
    """A manifold group with manifolds=['euclidean'] is SGD (weight decay, momentum, dampening) to fp32 tolerance."""
    gen = make_gen(51)
    inits = [torch.randn(s, generator=gen) for s in [(6, 4, 3, 3), (4, 2, 3, 2), (5, 7)]]
    for hyper in (dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, dampening=0.2, weight_decay=0.1),
                  dict(momentum=0.9, nesterov=True), dict()):
        ours = [nn.Parameter(x.clone()) for x in inits]
        theirs = [nn.Parameter(x.clone()) for x in inits]
        ref = [nn.Parameter(x.double().clone()) for x in inits]
        opt_o = FGSGD(ours, lr=0.1, manifolds=["euclidean"], **hyper)
        opt_t = torch.optim.SGD(theirs, lr=0.1, **hyper)
        opt_r = torch.optim.SGD(ref, lr=0.1, **hyper)
        assert all(torch.equal(o.detach(), x) for o, x in zip(ours, inits))  # projection onto R^n: identity
        for _ in range(STEPS):
            for o, t, r in zip(ours, theirs, ref):
                g = torch.randn(o.shape, generator=gen)
                o.grad, t.grad, r.grad = g.clone(), g.clone(), g.double()
            opt_o.step()
            opt_t.step()
            opt_r.step()
        for o, t, r in zip(ours, theirs, ref):
            assert rel_err(o.detach(), r.detach()) <= FP32_RTOL, hyper
            assert rel_err(t.detach(), r.detach()) <= FP32_RTOL, hyper


def test_param_groups_helper_splits_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 4))
    groups = param_groups(model, weight_decay=1e-4, group_size=4)
    assert [g["params"] for g in groups][0] == [model[0].weight]
    assert groups[0]["manifolds"] == ["sphere", "oblique", "stiefel"] and groups[0]["group_size"] == 4
    rest = {id(p) for p in groups[-1]["params"]}
    assert groups[-1]["manifolds"] is None and groups[-1]["weight_decay"] == 1e-4
    assert rest == {id(p) for p in model.parameters()} - {id(model[0].weight)}
    groups = param_groups(model, row_view=True, group_size=1)
    assert groups[1]["params"] == [model[2].weight, model[4].weight]
    assert groups[1]["manifolds"] == ["sphere", "oblique"]
    opt = FGSGD(groups, lr=0.1)
    assert opt.state[model[2].weight]["shape"] == (8, 1) and opt.state[model[4].weight]["shape"] == (8, 1)
    codes = opt.codes(model[4].weight)
    assert set(codes.tolist()) == {C.SPHERE_NORMALIZE, C.OBLIQUE_NORMALIZE}
    rows = model[4].weight.detach().double()  # an n×1 component: sphere and oblique both mean a unit row
    assert float((rows.norm(dim=1) - 1).abs().max()) <= FP32_RTOL


def test_param_groups_gives_wide_filters_a_group_without_stiefel():
    """1×7 and 3×5 filters (kh < kw) cannot be on the stiefel manifold: the default manifolds had refused them as
    soon as a group of them drew stiefel ('needs components with A >= B'). They get a group of their own with the
    other kinds; the tall 7×1 and square filters keep stiefel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, (1, 7)), nn.Conv2d(64, 64, (7, 1)), nn.Conv2d(64, 16, (3, 5)),
                          nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 32, 16, 20))
    groups = param_groups(model)
    assert groups[0]["params"] == [model[1].weight, model[3].weight]
    assert groups[0]["manifolds"] == ["sphere", "oblique", "stiefel"]
    assert groups[1]["params"] == [model[0].weight, model[2].weight] and groups[1]["manifolds"] == ["sphere", "oblique"]
    assert groups[2]["manifolds"] is None
    opt = FGSGD(groups, lr=0.1)
    kinds = {C.manifold_of(c) for _, p, _ in opt.manifold_params() for c in opt.codes(p).tolist()}
    assert kinds == {"sphere", "oblique", "stiefel"}
    assert {C.manifold_of(c) for c in opt.codes(model[0].weight).tolist()} == {"sphere", "oblique"}
    # only stiefel itself: nothing left for the wide filters, which stay in the group (refused by name there)
    assert len(param_groups(model, manifolds=["stiefel"])) == 2


@requires_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_row_view_long_rows_follow_the_reference(dtype):
    """Rows longer than 64 entries (1×1 convs and a linear of width 96) on the compiled CPU backend's streaming
    row kernel, against the same optimizer in float64 on the torch backend: momentum, nesterov, group_clip,
    stabilize, every row kind (sphere/oblique, normalize/exp retractions, euclidean) over 5 steps."""
    def build(backend, dt):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 96, 3), nn.Conv2d(96, 96, 1), nn.Conv2d(96, 80, 1), nn.Flatten(),
                            nn.Linear(80 * 4, 5)).to(dt)
        groups = param_groups(net, row_view=True, row_manifolds=["sphere", "oblique", "euclidean"], group_size=5,
                              group_clip=0.5, stabilize=2, backend=backend,
                              retraction={"sphere": "exp", "oblique": "normalize"})
        return net, FGSGD(groups, lr=0.2, momentum=0.9, nesterov=True)

    ours, opt_o = build("cpu", dtype)
    ref, opt_r = build("torch", torch.float64)
    rows = [p for p in opt_o.param_groups[1]["params"]]
    assert [opt_o.state[p]["shape"] for p in rows] == [(96, 1), (96, 1), (320, 1)]
    gen = make_gen(5)
    for _ in range(5):
        for o, r in zip(ours.parameters(), ref.parameters()):
            g = torch.randn(o.shape, generator=gen, dtype=torch.float64) / o[0].numel() ** 0.5
            o.grad, r.grad = g.to(dtype), g
        opt_o.step()
        opt_r.step()
    tol = FP32_RTOL if dtype == torch.float32 else 1e-11
    for (name, o), r in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(o.detach(), r.detach()) <= tol, name
    assert rel_err(rows[0].detach(), build("cpu", dtype)[0][1].weight.detach()) > 1e-3  # the rows really moved


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_filters_of_more_than_64_entries_follow_the_reference(dtype):
    """9×9 and 11×11 filters (more entries than the compiled and Triton kernels take: the torch backend steps them,
    checking its own tensors) beside 3×3 ones, with group_clip, against Algorithm 1 in float64."""
    manifolds = ["sphere", "oblique", "stiefel", "euclidean"]
    shapes = [(3, 2, 3, 3), (2, 2, 9, 9), (2, 1, 11, 11)]
    inits = make_inits(shapes, seed=4)
    params = [nn.Parameter(x.to(dtype).clone()) for x in inits]
    opt = FGSGD(params, lr=0.05, momentum=0.9, manifolds=manifolds, group_size=2, group_clip=20.0, stabilize=2)
    groupings = stored_groupings(opt, params, manifolds, None)
    assert [g[0] for g in groupings] == [(3, 3), (9, 9), (11, 11)]
    grads_seq = make_grads(shapes, STEPS, seed=5)
    run_optimizer(params, grads_seq, opt)
    ref_p, ref_m, _ = reference_run([x.to(dtype) for x in inits], groupings, grads_seq, lrs=[0.05] * STEPS,
                                    momentum=0.9, group_clip=20.0, stabilize=2)
    for k, p in enumerate(params):
        shape = groupings[k][0]
        assert_close(p.detach().reshape(-1, *shape), ref_p[k], dtype, f"param {k} {tuple(p.shape)}")
        assert_close(opt.state[p]["momentum_buffer"].reshape(-1, *shape), ref_m[k], dtype, f"momentum {k}")
