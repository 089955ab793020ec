"""A step that fails leaves every parameter and state as it was; a checkpoint that does not fit is refused whole.

The step prepares every batch of every manifold group (new buffers, contiguous copies, group step sizes) before it
launches any (functional.prepare_manifold_step); load_state_dict checks every saved tensor the step reads against
its parameter first (fgsgd_cuda/state_checks.py).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_gen
from test_resume import load, save
from fgsgd_cuda import FGSGD, functional
from fgsgd_cuda import codes as C


def net(seed=0, width=6) -> nn.Sequential:
    """Filter banks of 3×3 (two), 5×5 and 3×2 components, a linear layer; ``width``: the first conv's outputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 4, 5, padding=2), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, (3, 2), padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def filters(m):
    return [p for n, p in m.named_parameters() if p.dim() == 4]


def optimizer(m, backend="cpu", group_clip=None, two_groups=False, **kw):
    fs = filters(m)
    rest = [p for p in m.parameters() if p.dim() != 4]
    common = dict(manifolds=["sphere", "oblique", "stiefel"], group_size=3, backend=backend, group_clip=group_clip)
    groups = ([dict(params=fs[:2], **common), dict(params=rest, manifolds=None), dict(params=fs[2:], **common)]
              if two_groups else [dict(params=fs, **common), dict(params=rest, manifolds=None)])
    return FGSGD(groups, lr=0.1, momentum=0.9, **kw)


def backward(m, seed):
    gen = make_gen(seed)
    m.zero_grad()
    m(torch.randn(2, 3, 6, 6, generator=gen)).square().mean().backward()


def snapshot(m, opt):
    weights = [p.detach().clone() for p in m.parameters()]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for p, st in opt.state.items()}
    return weights, state


def assert_same(m, opt, snap):
    weights, state = snap
    for k, (a, b) in enumerate(zip(weights, m.parameters())):
        assert torch.equal(a, b), f"parameter {k} changed"
    assert state.keys() == {id(p) for p in opt.state}
    for p, st in opt.state.items():
        saved = state[id(p)]
        assert saved.keys() == st.keys(), f"state keys of {tuple(p.shape)} changed"
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(saved[k], v), f"state {k} of {tuple(p.shape)} changed"
            else:
                assert saved[k] == v, f"state {k} of {tuple(p.shape)} changed"


def trained(seed=0, steps=2, **kw):
    m = net(seed)
    m[4].weight.data = m[4].weight.data.contiguous(memory_format=torch.channels_last)
    opt = optimizer(m, **kw)
    for t in range(steps):
        backward(m, t)
        opt.step()
    return m, opt


class FailOn:
    """Wraps a function so that its n-th call raises (an allocation failing in a later batch)."""

    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise torch.OutOfMemoryError("simulated allocation failure")
        return self.fn(*a, **k)


@pytest.mark.parametrize("two_groups", [False, True], ids=["one-group", "two-groups"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_failure_while_preparing_a_later_batch_changes_nothing(monkeypatch, backend, two_groups):
    """group_clip's group step sizes of the last batch (or last manifold group) fail: no batch, no group (the
    Euclidean one between them either) has stepped, no buffer or step count changed; the next step works."""
    m, opt = trained(backend=backend, group_clip=0.5, two_groups=two_groups)
    backward(m, 7)
    snap = snapshot(m, opt)
    batches = 3 if not two_groups else 4  # 3×3 (two), 5×5, 3×2; two groups: 3×3, 5×5 | 3×3, 3×2
    fail = FailOn(functional.group_step_sizes, batches)
    monkeypatch.setattr(functional, "group_step_sizes", fail)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert fail.calls == batches
    assert_same(m, opt, snap)
    monkeypatch.undo()
    opt.step()
    assert not torch.equal(snap[0][0], filters(m)[0])


def test_torch_backend_checks_every_tensor_before_it_writes():
    """The torch backend (the reference) refuses a gradient that does not fit the second weight of a batch, by name,
    before it writes the first (it stepped the first, then raised)."""
    m = net(6)
    opt = optimizer(m, backend="torch")
    backward(m, 0)
    opt.step()
    backward(m, 1)
    weight = filters(m)[2]
    weight.grad.data = weight.grad.double()
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] \(shape \(5, 4, 3, 3\)\): its gradient is "
                                         r"torch.float64"):
        opt.step()
    assert_same(m, opt, snap)


def test_failure_of_a_copy_changes_nothing(monkeypatch):
    """The contiguous copy of a channels-last weight on the torch backend (the 3×2 filters, the last batch) fails to
    allocate, after the other batches were prepared: nothing changed, and no new momentum buffer was kept."""
    m = net(1)
    m[6].weight.data = m[6].weight.data.contiguous(memory_format=torch.channels_last)
    opt = optimizer(m, backend="torch")
    backward(m, 3)
    snap = snapshot(m, opt)
    real = functional.staged

    def staged(t, *a, **k):
        if not t.is_contiguous():
            raise torch.OutOfMemoryError("simulated allocation failure")
        return real(t, *a, **k)
    monkeypatch.setattr(functional, "staged", staged)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert_same(m, opt, snap)
    assert all("momentum_buffer" not in opt.state[p] for p in m.parameters())


def test_checkpoint_of_another_model_is_refused_by_name():
    """A checkpoint of a model whose first conv is wider: the same parameter count per group, so torch's own check
    lets it through, and its first step used to fail half-way (the other batches stepped). Now load_state_dict
    refuses it, naming the parameter, and the optimizer keeps its state: its next step is the step without the
    load, bit for bit."""
    wide = net(2, width=7)
    wide_opt = optimizer(wide)
    backward(wide, 0)
    wide_opt.step()
    data = save(wide_opt.state_dict())
    m, opt = trained(seed=0)
    twin, twin_opt = trained(seed=0)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"load_state_dict: param_groups\[0\]\['params'\]\[0\] \(shape \(6, 3, 3, 3\)\)"
                                         r": the saved momentum_buffer has shape \(7, 3, 3, 3\), expected "
                                         r"\(6, 3, 3, 3\); the checkpoint does not fit"):
        opt.load_state_dict(load(data))
    assert_same(m, opt, snap)
    for o, mm in ((opt, m), (twin_opt, twin)):
        backward(mm, 9)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), twin.parameters()))


def _bad_states():
    """(what, change of a saved state dict, error) of every manifold state check."""
    def codes_len(sd):
        n = sd["state"][0]["codes"]
        sd["state"][0]["codes"] = C.unpack(n, 18)[:17].clone()

    def euclidean_state(sd):
        sd["state"][0] = {"momentum_buffer": sd["state"][0]["momentum_buffer"]}

    def no_state(sd):
        del sd["state"][0]

    def unknown_code(sd):
        codes = C.unpack(sd["state"][3]["codes"], 20).clone()
        codes[7] = 9
        sd["state"][3]["codes"] = codes

    def rescale_len(sd):
        sd["state"][1]["rescale"] = torch.ones(23)

    def component_shape(sd):
        sd["state"][1]["shape"] = (9, 1)

    def group_codes(sd):
        sd["state"][2]["group_codes"] = sd["state"][2]["group_codes"][:-1].clone()

    return [
        ("codes-length", codes_len, r"\[0\] \(shape \(6, 3, 3, 3\)\): the saved codes are torch.uint8 \(17,\), "
                                    r"expected uint8 \(18,\)"),
        ("euclidean-state", euclidean_state, r"\[0\] .*has no manifold codes"),
        ("no-state", no_state, r"\[0\] .*has no manifold codes"),
        ("unknown-code", unknown_code, r"\[3\] \(shape \(4, 5, 3, 2\)\): a saved code: must be in \[0, 6\], got 9"),
        ("rescale-length", rescale_len, r"\[1\] .*the saved rescale has shape \(23,\), expected \(24,\)"),
        ("component-shape", component_shape, r"\[1\] .*the saved components are 9x1, this parameter's are 5x5"),
        ("group-codes", group_codes, r"\[2\] .*group_codes hold \d+ groups, num_groups says \d+"),
    ]


@pytest.mark.parametrize("what,change,error", _bad_states(), ids=[b[0] for b in _bad_states()])
def test_bad_manifold_state_is_refused_whole(what, change, error):
    src, src_opt = trained(seed=3)
    sd = load(save(src_opt.state_dict()))
    if what == "rescale-length":  # a checkpoint with R on the 5×5 conv
        sd["state"][1]["rescale"] = torch.ones(24)
        ok = load(save(sd))
        m, opt = trained(seed=0)
        opt.load_state_dict(ok)  # the right length loads
    change(sd)
    m, opt = trained(seed=0)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"load_state_dict: param_groups\[0\]\['params'\]" + error):
        opt.load_state_dict(sd)
    assert_same(m, opt, snap)
    assert opt.param_groups[0]["lr"] == 0.1


def test_euclidean_buffer_of_another_shape_is_refused():
    src, src_opt = trained(seed=3)
    sd = load(save(src_opt.state_dict()))
    k = len(filters(src))
    sd["state"][k]["momentum_buffer"] = torch.zeros(7)
    m, opt = trained(seed=0)
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(6,\)\): the saved "
                                         r"momentum_buffer has shape \(7,\), expected \(6,\)"):
        opt.load_state_dict(sd)
    assert_same(m, opt, snap)


@pytest.mark.parametrize("order", ["manifold-first", "euclidean-first"])
@pytest.mark.parametrize("to,exc,error", [
    (torch.float64, ValueError, r"its momentum buffer is torch.float32 on cpu, the parameter torch.float64 on cpu; "
                                r"the parameter changed dtype or device after the optimizer made its state"),
    (torch.bfloat16, TypeError, r"manifold parameters must be float32 or float64, got torch.bfloat16"),
], ids=["double", "bfloat16"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_model_moved_to_another_dtype_is_named_and_nothing_changes(backend, order, to, exc, error):
    """model.to(dtype) after the optimizer made its state: the step names the first manifold parameter and what does
    not fit it (the op's own error named only its place in the batch), and changes nothing, the Euclidean group
    either, whichever group comes first (the state of each batch's first weight is checked while preparing). Reloading the state
    moves it to the parameters, and the step then works. The torch backend checks its tensors as the compiled
    kernels do (it stepped float64 weights with float32 buffers)."""
    m = net(4)
    opt = optimizer(m, backend=backend)
    if order == "euclidean-first":
        opt.param_groups.reverse()
    backward(m, 0)
    opt.step()
    m.to(to)
    gen = make_gen(5)
    m.zero_grad()
    m(torch.randn(2, 3, 6, 6, generator=gen, dtype=to)).float().square().mean().backward()
    snap = snapshot(m, opt)
    gi = 0 if order == "manifold-first" else 1
    with pytest.raises(exc, match=rf"param_groups\[{gi}\]\['params'\]\[0\] \(shape \(6, 3, 3, 3\)\): " + error):
        opt.step()
    assert_same(m, opt, snap)
    if to == torch.float64:
        opt.load_state_dict(opt.state_dict())
        opt.step()
        assert all(not torch.equal(a, b) for a, b in zip(snap[0], m.parameters()))
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


def rows_model():
    """A filter group, a row-view group (the classifier) and a Euclidean group."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def stepped_rows_model(backend, fused=None):
    from fgsgd_cuda import param_groups
    m = rows_model()
    groups = param_groups(m, row_view=True, backend=backend)
    groups[-1]["fused"] = fused
    opt = FGSGD(groups, lr=0.1, momentum=0.9)
    backward_rows(m, 0)
    opt.step()
    return m, opt


def backward_rows(m, seed, dtype=torch.float32):
    m.zero_grad()
    m(torch.randn(2, 3, 6, 6, generator=make_gen(seed), dtype=dtype)).float().square().mean().backward()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_later_group_moved_to_another_dtype_changes_nothing(backend):
    """Only the classifier (the row-view group, launched after the filters) moved to float64: refused by name while
    preparing, before the filter group launched (it had stepped the filters, then refused the rows)."""
    m, opt = stepped_rows_model(backend)
    m[3].to(torch.float64)
    m.zero_grad()
    x = torch.randn(2, 3, 6, 6, generator=make_gen(1))
    m[3](m[2](m[1](m[0](x))).double()).square().mean().backward()
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(5, 128\)\): its momentum "
                                         r"buffer is torch.float32"):
        opt.step()
    assert_same(m, opt, snap)


def test_a_bad_lr_in_a_later_group_changes_nothing():
    m, opt = stepped_rows_model("cpu")
    backward_rows(m, 1)
    snap = snapshot(m, opt)
    opt.param_groups[1]["lr"] = None
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['lr'\]: must be a number"):
        opt.step()
    assert_same(m, opt, snap)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_model_moved_with_only_its_rescale_as_float_state_changes_nothing(backend):
    """Momentum 0 and R set on the second group's weight: R is then its only float state. model.double() is refused
    by name while preparing (R's dtype is read there too), before the first group launched (it had stepped)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 5))
    opt = FGSGD([{"params": [m[0].weight], "manifolds": ["sphere"]},
                 {"params": [m[1].weight], "manifolds": ["sphere"]}], lr=0.1, backend=backend)
    opt.set_rescale({m[1].weight: torch.full((12,), 2.0)})
    m.double()
    m(torch.randn(1, 2, 9, 9, dtype=torch.float64, generator=make_gen(2))).sum().backward()
    snap = snapshot(m, opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] \(shape \(4, 3, 5, 5\)\): its rescale is "
                                         r"torch.float32"):
        opt.step()
    assert_same(m, opt, snap)
