"""Checkpoint and resume: N steps, save, a fresh model and optimizer, load both, M more steps must give the
bitwise same weights as N + M steps without stopping; the grouping comes from the checkpoint."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from conftest import make_gen
from fgsgd_cuda import FGSGD, param_groups
from fgsgd_cuda import codes as C

N, M = 4, 5


def cnn(seed) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, (3, 2)),
                         nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def make_optimizer(model, seed, sched=True):
    groups = param_groups(model, row_view=True, weight_decay=1e-3, group_size=3, group_clip=1.0, stabilize=3,
                          seed=seed, manifolds=("sphere", "oblique", "stiefel", "euclidean"),
                          retraction={"stiefel": "cayley", "sphere": "exp"})
    opt = FGSGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if sched else None
    return opt, scheduler


def train(model, opt, scheduler, steps, start):
    for t in range(start, start + steps):
        gen = make_gen(100 + t)
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        scheduler.step()


def save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def roundtrip(obj):
    return load(save(obj))


def grouping(opt):
    return [(opt.codes(p).clone(), opt.grouping(p).group_index) for _, p, _ in opt.manifold_params()]


def test_resume_is_bitwise_identical():
    # straight through
    straight = cnn(0)
    opt_s, sched_s = make_optimizer(straight, seed=1)
    train(straight, opt_s, sched_s, N + M, 0)

    # N steps, checkpoint
    first = cnn(0)
    opt_a, sched_a = make_optimizer(first, seed=1)
    train(first, opt_a, sched_a, N, 0)
    ckpt = roundtrip({"model": first.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()})
    saved_grouping = grouping(opt_a)

    # a fresh model (another init) and optimizer (another seed: another grouping), then load both
    fresh = cnn(123)
    opt_b, sched_b = make_optimizer(fresh, seed=99)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(saved_grouping, grouping(opt_b)))
    fresh.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    # the grouping (and its dtypes) comes from the checkpoint
    for (c, g), (c2, g2) in zip(saved_grouping, grouping(opt_b)):
        assert c2.dtype == torch.uint8 and g2.dtype == torch.int32
        assert torch.equal(c, c2) and torch.equal(g, g2)
    assert all(g["seed"] == 1 for g in opt_b.param_groups[:2])
    train(fresh, opt_b, sched_b, M, N)

    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{name}: resumed training differs from training straight through"
    for (name, b), b2 in zip(straight.named_buffers(), fresh.buffers()):
        assert torch.equal(b, b2), name
    for p, q in zip(straight.parameters(), fresh.parameters()):
        s, s2 = opt_s.state[p], opt_b.state[q]
        assert torch.equal(s["momentum_buffer"], s2["momentum_buffer"])
        assert s.get("step") == s2.get("step")
    assert opt_s.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] < 0.1
    # and the run is not trivially constant
    assert not torch.equal(straight[0].weight, first[0].weight)


def test_load_state_dict_into_a_stepped_optimizer_with_another_grouping():
    """Loading over an optimizer that already stepped with another grouping (its cached group sums must go)."""
    straight = cnn(0)
    opt_s, sched_s = make_optimizer(straight, seed=1)
    train(straight, opt_s, sched_s, N + M, 0)

    first = cnn(0)
    opt_a, sched_a = make_optimizer(first, seed=1)
    train(first, opt_a, sched_a, N, 0)
    data = save({"model": first.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()})

    other = cnn(7)
    opt_b, sched_b = make_optimizer(other, seed=42)
    for _ in range(3):  # several loads: stale cache entries keyed by freed addresses must not be reused
        train(other, opt_b, sched_b, 2, 50)
        # (a fresh copy each time: like torch.optim.SGD, load_state_dict keeps the checkpoint's float tensors)
        ckpt = load(data)
        other.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
        sched_b.load_state_dict(ckpt["sched"])
    train(other, opt_b, sched_b, M, N)
    for (name, p), q in zip(straight.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name


def test_state_dict_is_loadable_with_weights_only_and_complete():
    model = cnn(0)
    opt, sched = make_optimizer(model, seed=1)
    train(model, opt, sched, 2, 0)
    sd = opt.state_dict()
    loaded = roundtrip(sd)
    conv = model[0].weight
    pid = next(i for i, p in enumerate(q for g in opt.param_groups for q in g["params"]) if p is conv)
    st = loaded["state"][pid]
    for key in ("codes", "group_codes", "num_groups", "membership", "step", "shape", "momentum_buffer"):
        assert key in st, key
    assert st["codes"].dtype == torch.int32 and "group_index" not in st  # packed: 2 bits per component


@pytest.mark.parametrize("dtype", [torch.float64])
def test_resume_float64_params(dtype):
    """float64 parameters: the integer grouping tensors must not be cast to float64 either."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).to(dtype)
    opt = FGSGD([conv.weight], lr=0.1, momentum=0.9, manifolds=["sphere", "stiefel"], group_clip=1.0, group_size=2)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    sd = roundtrip(opt.state_dict())
    opt2 = FGSGD([conv.weight], lr=0.1, momentum=0.9, manifolds=["sphere", "stiefel"], group_clip=1.0, group_size=2,
                 init_projx=False)
    opt2.load_state_dict(sd)
    st = opt2.state[conv.weight]
    assert st["codes"].dtype == torch.int32 and st["group_codes"].dtype == torch.uint8
    assert opt2.grouping(conv.weight).group_index.dtype == torch.int32
    assert st["momentum_buffer"].dtype == dtype
    opt2.step()  # runs
    assert st["step"] == 2


def test_state_keeps_membership_options_not_a_group_index():
    """Per component the state holds only the code, packed 2 bits each; the groups are recomputed from the
    membership options in the state, and a state whose codes they do not reproduce is refused by name."""
    model = cnn(0)
    opt, _ = make_optimizer(model, seed=1)
    conv = model[3].weight
    st = opt.state[conv]
    assert "group_index" not in st and set(st["membership"]) == {"collection", "group_size", "num_groups",
                                                                 "selection", "seed"}
    n = opt.num_components(conv)
    per_component = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.numel() >= n]
    assert per_component == [] and st["codes"].numel() == C.packed_len(n)
    g = opt.grouping(conv)
    assert torch.equal(g.codes, opt.codes(conv)) and g.num_groups == st["num_groups"]
    st["codes"] = C.pack(opt.codes(conv).flip(0).clone())  # a code per component no longer matching the membership
    if torch.equal(opt.codes(conv), g.codes):
        pytest.skip("the flip happened to keep the codes")
    with pytest.raises(RuntimeError, match=r"grouping: the membership options .* do not reproduce the stored codes"):
        opt.grouping(conv)


def _resume_from_edited_checkpoint(edit):
    """N steps, a checkpoint whose manifold parameters' saved states ``edit(state, p, opt)`` rewrites into an
    older form, M more steps; a fresh model and optimizer loaded from that checkpoint take the same M steps
    with the same bits. Returns the resumed optimizer."""
    model = cnn(0)
    opt, sched = make_optimizer(model, seed=1)
    train(model, opt, sched, N, 0)
    sd = load(save(opt.state_dict()))
    ids = [i for g in sd["param_groups"] for i in g["params"] if "membership" in sd["state"].get(i, {})]
    assert len(ids) == len(list(opt.manifold_params())) > 0
    for (_, p, _), i in zip(opt.manifold_params(), ids):
        edit(sd["state"][i], p, opt)
    weights = save(model.state_dict())
    blob, sched_blob = save(sd), save(sched.state_dict())
    train(model, opt, sched, M, N)
    model2 = cnn(0)
    opt2, sched2 = make_optimizer(model2, seed=1)
    model2.load_state_dict(load(weights))
    opt2.load_state_dict(load(blob))
    sched2.load_state_dict(load(sched_blob))
    train(model2, opt2, sched2, M, N)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    return opt2


def test_loads_a_checkpoint_that_stored_the_group_index():
    """Checkpoints written before the membership options were kept (a group_index per parameter, no
    ``membership``): they load into an optimizer built with the same seed and resume bitwise."""
    def old_form(st, p, opt):
        st["group_index"] = opt.grouping(p).group_index
        del st["membership"]
    opt2 = _resume_from_edited_checkpoint(old_form)
    for _, p, st in opt2.manifold_params():
        assert "group_index" not in st and "membership" in st


def test_loads_a_checkpoint_with_a_byte_per_code():
    """Checkpoints written before the codes were packed (a uint8 code per component): they load as they are
    (every backend reads both forms) and resume bitwise."""
    def old_form(st, p, opt):
        assert st["codes"].dtype == torch.int32
        st["codes"] = opt.codes(p).clone()
    opt2 = _resume_from_edited_checkpoint(old_form)
    assert all(st["codes"].dtype == torch.uint8 for _, _, st in opt2.manifold_params())


def test_group_clip_recomputes_the_membership_once_per_parameter(monkeypatch):
    """A batch whose parameters change between steps (one without a gradient) rebuilds its group sort from
    the cached groups of each parameter, not from the membership options (slow on a large model)."""
    model = cnn(0)
    opt, _ = make_optimizer(model, seed=1, sched=False)
    calls = []
    original = FGSGD.grouping
    monkeypatch.setattr(FGSGD, "grouping", lambda self, p: calls.append(id(p)) or original(self, p))
    x = torch.randn(2, 3, 8, 8, generator=make_gen(3))
    for step in range(4):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step % 2:
            model[3].weight.grad = None   # another batch of manifold parameters this step
        opt.step()
    assert sorted(calls) == sorted(set(calls)) and len(calls) == len(list(opt.manifold_params()))


def test_an_inconsistent_grouping_is_refused_before_anything_changes():
    """group_clip on a state whose stored codes do not match its membership options (a tampered or mixed-up
    checkpoint): the step raises by name before any parameter or buffer changes."""
    model = cnn(0)
    opt, _ = make_optimizer(model, seed=1, sched=False)
    late = list(opt.manifold_params())[-1][1]
    st = opt.state[late]
    st["codes"] = C.pack(opt.codes(late).flip(0).clone())
    x = torch.randn(2, 3, 8, 8, generator=make_gen(4))
    model(x).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"grouping: the membership options .* do not reproduce the stored codes"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())


def test_the_backend_is_this_optimizers_not_the_checkpoints():
    """A checkpoint's backend does not replace the loading optimizer's: a GPU run's backend="cuda" resumes on a CPU
    optimizer (it made every step fail), and a reference run's "torch" does not move a "cpu" optimizer onto the
    reference (silently slower). The resumed run steps as an uninterrupted one on the loading backend."""
    from fgsgd_cuda import dispatch
    own = "cpu" if dispatch.available("cpu", torch.device("cpu")) else "torch"
    straight = cnn(0)
    opt_s, _ = make_optimizer(straight, seed=1, sched=False)
    for g in opt_s.param_groups:
        g["backend"] = own
    train(straight, opt_s, torch.optim.lr_scheduler.LambdaLR(opt_s, lambda _: 1.0), N + M, 0)
    first = cnn(0)
    opt_a, _ = make_optimizer(first, seed=1, sched=False)
    for g in opt_a.param_groups:
        g["backend"] = own
    train(first, opt_a, torch.optim.lr_scheduler.LambdaLR(opt_a, lambda _: 1.0), N, 0)
    saved = roundtrip(opt_a.state_dict())
    for g in saved["param_groups"]:
        g["backend"] = "cuda"  # as a GPU run saves it
    fresh = cnn(5)
    opt_b, _ = make_optimizer(fresh, seed=1, sched=False)
    for g in opt_b.param_groups:
        g["backend"] = own
    fresh.load_state_dict(first.state_dict())
    opt_b.load_state_dict(saved)
    assert [g["backend"] for g in opt_b.param_groups] == [own] * len(opt_b.param_groups)
    train(fresh, opt_b, torch.optim.lr_scheduler.LambdaLR(opt_b, lambda _: 1.0), M, N)
    for (name, p), q in zip(straight.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{name}: resumed training differs from training straight through"
