"""FGSGD inside torch.compile: a compiled training step (forward, backward, ``opt.step()``) runs the optimizer step
eagerly (``FGSGD.step`` is ``torch.compiler.disable``d: a graph break) and gives the bits of the eager training
step. Before, dynamo traced into the step's host-side code and failed (a view made under no_grad modified with
grad enabled; the group membership recomputed differently under tracing)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import CPU_TORCH_CUDA, compile_unusable
from fgsgd_cuda import FGSGD, param_groups


def make(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 10)).to(device)


@pytest.mark.parametrize("backend,device", CPU_TORCH_CUDA)
@pytest.mark.parametrize("options", [dict(check_finite=True), dict(check_finite=False, group_clip=0.5)],
                         ids=["check_finite", "group_clip"])
def test_compiled_training_step_matches_eager(backend, device, options):
    why = compile_unusable("aot_eager")
    if why:
        pytest.skip(why)
    torch._dynamo.reset()
    nets = [make(device) for _ in range(2)]
    opts = [FGSGD(param_groups(n, row_view=True, backend=backend, group_clip=options.get("group_clip")), lr=0.1,
                  momentum=0.9, stabilize=2, check_finite=options["check_finite"]) for n in nets]

    def train_step(net, opt, x, y):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    compiled = torch.compile(train_step, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):  # over re-projection steps (stabilize=2)
        x = torch.randn(4, 3, 12, 12, generator=gen).to(device)
        y = torch.randint(10, (4,), generator=gen).to(device)
        eager_loss = train_step(nets[0], opts[0], x, y)
        compiled_loss = compiled(nets[1], opts[1], x, y)
        assert torch.equal(compiled_loss, eager_loss)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(q, p)  # aot_eager runs the same aten ops: the same bits
    assert [st["step"] for _, _, st in opts[1].manifold_params()] == [5, 5, 5, 5]
