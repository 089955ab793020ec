"""The step of a Euclidean group: torch.optim.SGD's functional step, with a shortcut to its fused kernel.

``torch.optim.sgd.sgd(..., fused=True)`` groups its tensors by device and dtype at every call
(``Optimizer._group_tensors_by_device_and_dtype``, about half of the call's host time: 80 of 175 µs for
ResNet-101's 280 non-filter tensors on a 2-core CPU) and then calls ``torch._fused_sgd_`` once per group.
When the parameters share one device and one dtype (checked at every step, 30 µs there; gradients and
momentum buffers follow their parameters), the step here calls ``torch._fused_sgd_`` once with the lists
as they are: the arguments torch's own step would pass, so the same bits. Every other case (foreach, the
for-loop, a first step that makes the momentum buffers, several devices or dtypes) is torch's functional
step itself.
"""
from __future__ import annotations

import torch
from torch.optim.sgd import sgd


def _one_device_and_dtype(params) -> bool:
    return len({p.device for p in params}) == 1 and len({p.dtype for p in params}) == 1


def sgd_step(params, grads, bufs, *, weight_decay, momentum, lr, dampening, nesterov, foreach, fused,
             maximize=False, has_sparse_grad=False) -> None:
    """SGD on ``params`` (their ``grads``; ``bufs`` the momentum buffers, None where there is none yet: torch's
    step fills them in, in place). ``has_sparse_grad``: some gradients are sparse (torch's step then adds them one
    by one, as torch.optim.SGD does)."""
    direct = (fused and not has_sparse_grad and hasattr(torch, "_fused_sgd_") and not isinstance(lr, torch.Tensor)
              and (momentum == 0 or all(b is not None for b in bufs)) and _one_device_and_dtype(params))
    if direct:
        torch._fused_sgd_(params, grads, [] if momentum == 0 else bufs, weight_decay=weight_decay, momentum=momentum,
                          lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize, is_first_step=False)
    else:
        sgd(params, grads, bufs, has_sparse_grad=has_sparse_grad, weight_decay=weight_decay, momentum=momentum, lr=lr,
            dampening=dampening, nesterov=nesterov, maximize=maximize, foreach=foreach, fused=fused)
