"""A manifold group that holds weights of several dtypes (a float64 layer in a float32 model): FGSGD steps each
dtype in its own call (a call takes one dtype and device: optimizer._prepare_manifold_group), so every weight
follows the same weight stepped alone. The Triton backend checks its tensor lists as the compiled backends do:
it had built one kernel for params[0]'s dtype and read a float64 weight as float32 (zero-norm filters, and a
heap corruption when the float64 weight came first)."""
from __future__ import annotations

import pytest
import torch

from conftest import backends_on, check_two_dtype_group

BACKENDS = backends_on((("cpu", "cpu"), ("torch", "cpu"), ("cuda", "cuda")))  # Triton: tests/test_triton.py


@pytest.mark.parametrize("order", ["fp32-first", "fp64-first"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_group_of_two_dtypes_steps_each_weight_as_alone(backend, device, order):
    check_two_dtype_group(backend, device, order)


def test_triton_backend_refuses_tensors_that_do_not_fit_by_name():
    """The backend object itself (FGSGD calls it directly, not through fgsgd_cuda.ops): a momentum buffer, a second
    weight, a rescale or a gradient of another dtype is refused before any launch (no Triton run needed)."""
    pytest.importorskip("triton")
    from fgsgd_cuda.backends.triton_backend import TritonBackend
    b = TritonBackend()
    p = torch.randn(4, 3, 3)
    g = torch.randn(4, 3, 3)
    codes = torch.full((4,), 1, dtype=torch.uint8)
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    with pytest.raises((TypeError, ValueError), match=r"momentum_buffers\[0\]"):
        b.step_([p], [g], [torch.zeros(4, 3, 3, dtype=torch.float64)], [codes], [], [], [], **hp)
    with pytest.raises((TypeError, ValueError), match=r"params\[1\]"):
        b.step_([p, p.double()], [g, g.double()], [torch.zeros_like(p), torch.zeros_like(p).double()],
                [codes, codes], [], [], [], **hp)
    with pytest.raises((TypeError, ValueError), match=r"rescale\[0\]"):
        b.projx_([p], [codes], [torch.ones(4, dtype=torch.float64)])
    with pytest.raises((TypeError, ValueError), match=r"grads\[0\]"):
        b.tangent_sqnorm([p], [g.double()], [codes], [], 0.0)


def test_a_weight_moved_to_another_dtype_after_the_first_step_is_named():
    """The split of a group by dtype is found at its first step (reading every weight's dtype at every step costs
    host time): one weight converted later is named (not the op's params[1]), nothing changes here (one batch), and
    the next step splits the group anew and steps it."""
    from fgsgd_cuda import FGSGD
    ws = [torch.nn.Parameter(torch.randn(4, 3, 3, 3)), torch.nn.Parameter(torch.randn(5, 4, 3, 3))]
    opt = FGSGD([{"params": ws, "manifolds": ["sphere"]}], lr=0.1)
    for w in ws:
        w.grad = torch.randn_like(w)
    opt.step()
    ws[1].data = ws[1].data.double()
    ws[1].grad = torch.randn_like(ws[1])
    before = [w.detach().clone() for w in ws]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*float64.*split anew at the next step"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ws, before))
    opt.step()
    assert not torch.equal(ws[1].detach(), before[1])


def test_the_split_is_found_from_every_weight_not_those_with_gradients():
    """A group of a float32 and a float64 weight whose float64 weight has no gradient at its first step: the split
    is found from all the group's weights (it had been found from those with gradients, one dtype, and every later
    step was refused as if a weight had changed dtype)."""
    from fgsgd_cuda import FGSGD
    a = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    b = torch.nn.Parameter(torch.randn(5, 4, 3, 3, dtype=torch.float64))
    opt = FGSGD([{"params": [a, b], "manifolds": ["sphere"]}], lr=0.1, momentum=0.9)
    a.grad = torch.randn_like(a)
    opt.step()
    for _ in range(2):
        before = b.detach().clone()
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        assert not torch.equal(b.detach(), before)


def test_reordered_param_groups_are_split_as_they_are_now():
    """The split found for param_groups[i] belongs to that group dict: groups reordered after a step (a uniform group
    now where a mixed one was, and the other way round) are split by what they hold now."""
    from fgsgd_cuda import FGSGD
    a = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    b = torch.nn.Parameter(torch.randn(5, 4, 3, 3, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(6, 5, 3, 3))
    opt = FGSGD([{"params": [c], "manifolds": ["sphere"]}, {"params": [a, b], "manifolds": ["sphere"]}], lr=0.1)
    for _ in range(2):
        for p in (a, b, c):
            p.grad = torch.randn_like(p)
        opt.step()
        opt.param_groups.reverse()
