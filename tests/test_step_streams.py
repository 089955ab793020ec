"""The side-stream plan of a step (fgsgd_cuda/streams.py, functional.prepare_manifold_step), checked on the CPU with a
recording stand-in for ``streams.Overlap``: every batch but the largest is prepared and launched inside
``overlap.side(device)``, the largest outside it; an overlap made by the step itself is joined once, also when the
preparation fails. On a GPU the same plan runs with real streams (tests/test_cuda_step.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_gen
from fgsgd_cuda import FGSGD, dispatch, functional


class RecordingOverlap:
    """Overlap's interface; records which backend calls run inside side(), the forks (the first of a step per
    device, as streams.Overlap does) and the joins."""

    def __init__(self):
        self.inside, self.events, self.forked = 0, [], set()

    def fork(self, device):
        if device not in self.forked:
            self.forked.add(device)
            self.events.append(("fork", device.type))

    def side(self, device):
        self.fork(device)
        overlap = self

        class Side:
            def __enter__(self):
                overlap.inside += 1
                overlap.events.append(("side", device.type))

            def __exit__(self, *exc):
                overlap.inside -= 1
        return Side()

    def join(self):
        self.forked.clear()
        self.events.append(("join",))


def weights(gen, largest_first=False):
    """ResNet-like: a large 3×3 filter bank (the largest batch), a 7×7 stem and a 5×5 bank (side batches)."""
    shapes = ((16, 12, 3, 3), (4, 3, 7, 7), (3, 2, 5, 5)) if largest_first else \
        ((4, 3, 7, 7), (16, 12, 3, 3), (3, 2, 5, 5))
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def recorded_step(monkeypatch, overlap, group_clip, own=False, largest_first=False):
    """One FGSGD step (after a first one) with the cpu backend's step_ and tangent_sqnorm recorded as
    (op, component shape, inside side())."""
    gen = make_gen(11)
    ps = weights(gen, largest_first)
    opt = FGSGD([dict(params=ps, manifolds=["sphere", "oblique", "stiefel"], group_size=4, group_clip=group_clip)],
                lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    impl = dispatch.get("cpu", torch.device("cpu"))
    calls = []
    for op in ("step_", "tangent_sqnorm"):
        real = getattr(impl, op)

        def record(params, *a, _op=op, _real=real, **k):
            calls.append((_op, tuple(params[0].shape[-2:]), overlap.inside > 0))
            overlap.events.append(_op)
            return _real(params, *a, **k)
        monkeypatch.setattr(impl, op, record)
    if own:
        monkeypatch.setattr(functional.streams, "Overlap", lambda: overlap)
        states = [opt.state[p] for p in ps]
        functional.manifold_step(ps, [p.grad for p in ps], states, lr=0.1, momentum=0.9, dampening=0.0,
                                 nesterov=False, weight_decay=0.0, group_clip=group_clip, stabilize=50,
                                 backend="cpu", cache={}, group_index=lambda k: opt._group_index(ps[k]))
    else:
        opt._overlap = overlap
        opt.step()
    return calls


@pytest.mark.parametrize("group_clip", [None, 1.0], ids=["plain", "group_clip"])
def test_side_batches_run_inside_side_the_largest_outside(monkeypatch, group_clip):
    overlap = RecordingOverlap()
    calls = recorded_step(monkeypatch, overlap, group_clip)
    expect = [("step_", (3, 3), False), ("step_", (5, 5), True), ("step_", (7, 7), True)]
    if group_clip is not None:  # the group step sizes, prepared before any step is launched, on the same streams
        expect += [("tangent_sqnorm", (3, 3), False), ("tangent_sqnorm", (5, 5), True),
                   ("tangent_sqnorm", (7, 7), True)]
    assert sorted(calls) == sorted(expect)
    steps = [i for i, c in enumerate(calls) if c[0] == "step_"]
    assert all(i > j for i in steps for j, c in enumerate(calls) if c[0] == "tangent_sqnorm"), \
        "a step was launched before every batch was prepared"
    assert overlap.events.count(("join",)) == 1 and overlap.events[-1] == ("join",)  # FGSGD.step joins once


@pytest.mark.parametrize("largest_first", [False, True], ids=["stem-first", "largest-first"])
@pytest.mark.parametrize("group_clip", [None, 1.0], ids=["plain", "group_clip"])
def test_side_stream_forked_first_and_entered_once_per_side_batch(monkeypatch, group_clip, largest_first):
    """The side stream forks (waits for the current stream) before anything of the step is launched, so that it
    waits for none of it, whatever the order of the batches; a side batch enters side() to launch, and while
    preparing only for device work (s_g here): on CUDA every entry costs host time."""
    overlap = RecordingOverlap()
    recorded_step(monkeypatch, overlap, group_clip, largest_first=largest_first)
    ops = [e for e in overlap.events if e in ("step_", "tangent_sqnorm")]
    assert overlap.events[0] == ("fork", "cpu") and overlap.events.count(("fork", "cpu")) == 1
    assert len(ops) == (3 if group_clip is None else 6)
    per_batch = 1 if group_clip is None else 2  # (the launch, and the preparation's s_g)
    assert overlap.events.count(("side", "cpu")) == 2 * per_batch


def test_side_batch_copies_are_made_inside_side(monkeypatch):
    """A side batch whose gradient is not contiguous steps through a contiguous copy, made on the side stream (the
    stream that uses it, so that no record_stream is needed); the largest batch's copy on the current stream."""
    overlap = RecordingOverlap()
    copies = []
    real = functional.staged

    def record(t, *a, **k):
        if not t.is_contiguous():
            copies.append((tuple(t.shape[-2:]), overlap.inside > 0))
        return real(t, *a, **k)
    monkeypatch.setattr(functional, "staged", record)
    gen = make_gen(12)
    ps = weights(gen)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]  # the same step with contiguous gradients
    opt, ref = (FGSGD([dict(params=w, manifolds=["sphere", "oblique", "stiefel"], group_size=4)], lr=0.1,
                      momentum=0.9) for w in (ps, qs))
    opt._overlap = overlap
    for p, q in zip(ps, qs):  # gradients strided in their last two dimensions
        p.grad = torch.randn(p.shape, generator=gen).transpose(-1, -2).contiguous().transpose(-1, -2)
        q.grad = p.grad.contiguous()
    opt.step()
    ref.step()
    assert sorted(copies) == [((3, 3), False), ((5, 5), True), ((7, 7), True)]
    assert overlap.events.count(("side", "cpu")) == 4  # the two side batches' copies and launches
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_own_overlap_is_joined_after_the_launches(monkeypatch):
    overlap = RecordingOverlap()
    calls = recorded_step(monkeypatch, overlap, None, own=True)
    assert sorted(c[1:] for c in calls) == [((3, 3), False), ((5, 5), True), ((7, 7), True)]
    assert overlap.events[-1] == ("join",) and overlap.events.count(("join",)) == 1


def test_own_overlap_is_joined_when_preparing_fails(monkeypatch):
    """A side batch's preparation fails: the step's own overlap is still joined (its fork does not dangle), and no
    step was launched."""
    overlap = RecordingOverlap()
    real = functional.group_step_sizes
    seen = []

    def fail_on_side(impl, ps, *a, **k):
        seen.append(tuple(ps[0].shape[-2:]))
        if overlap.inside:
            raise torch.OutOfMemoryError("simulated")
        return real(impl, ps, *a, **k)
    monkeypatch.setattr(functional, "group_step_sizes", fail_on_side)
    with pytest.raises(torch.OutOfMemoryError):
        recorded_step(monkeypatch, overlap, 1.0, own=True)
    assert ("join",) in overlap.events
