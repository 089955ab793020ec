"""Checks of a checkpoint before FGSGD.load_state_dict takes it: errors name the parameter and what is wrong.

torch's ``Optimizer.load_state_dict`` matches saved states to parameters by position and checks only the number
of parameters per group. A checkpoint of another model (or of the same model with its parameters in another
order) then loads, and its first step fails in the middle: some batches stepped, others refused, weights
corrupted. These checks run first, on every tensor the step reads, so that a checkpoint that does not fit is
refused whole and the optimizer keeps its own state.
"""
from __future__ import annotations

import torch

from . import checks
from . import codes as _codes


def _fail(name: str, what: str) -> None:
    raise ValueError(f"load_state_dict: {name}: {what}; the checkpoint does not fit this optimizer's parameters "
                     "(another model, or its parameters in another order); nothing was loaded")


def _check_tensor(v, name: str, key: str, shape: tuple, floating: bool) -> None:
    if not isinstance(v, torch.Tensor):
        _fail(name, f"the saved {key} is a {type(v).__name__}, expected a tensor")
    if tuple(v.shape) != tuple(shape):
        _fail(name, f"the saved {key} has shape {tuple(v.shape)}, expected {tuple(shape)}")
    if floating and not v.is_floating_point():
        _fail(name, f"the saved {key} has dtype {v.dtype}, expected a floating-point tensor")


def _check_manifold_state(saved: dict, p: torch.Tensor, own: dict, name: str) -> None:
    """A manifold parameter's saved state against the parameter and the state this optimizer made for it."""
    if "codes" not in saved:
        _fail(name, "the saved state has no manifold codes (a state of a Euclidean group or of another optimizer), "
                    "but this parameter is in a manifold group")
    shape = tuple(saved.get("shape", own["shape"]))
    if shape != tuple(own["shape"]):
        _fail(name, f"the saved components are {shape[0]}x{shape[1]}, this parameter's are "
                    f"{own['shape'][0]}x{own['shape'][1]}")
    n = p.numel() // (shape[0] * shape[1])
    codes = saved["codes"]
    if not _codes.fits(codes, n):
        got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
        _fail(name, f"the saved codes are {got}, expected uint8 ({n},) or packed int32 ({_codes.packed_len(n)},) "
                    f"for its {n} components")
    unpacked = _codes.unpack(codes, n)
    try:
        checks.codes_tensor(unpacked, n, shape[0], shape[1], unpacked.device, "code")
    except ValueError as e:
        _fail(name, f"a saved {e}")
    group_codes = saved.get("group_codes")
    if group_codes is not None and group_codes.numel() != saved.get("num_groups", group_codes.numel()):
        _fail(name, f"the saved group_codes hold {group_codes.numel()} groups, num_groups says "
                    f"{saved.get('num_groups')}")
    if saved.get("rescale") is not None:
        _check_tensor(saved["rescale"], name, "rescale", (n,), floating=True)


def check_loadable(optimizer, state_dict: dict) -> None:
    """Raises ValueError, naming the parameter, when a saved state does not fit the parameter it would be given
    (the order of ``optimizer.param_groups``): a momentum buffer of another shape, manifold codes for another
    number or shape of components, codes a manifold cannot take, a rescale of another length, or no manifold
    state for a parameter of a manifold group. Reads the saved codes (construction-time cost, not per step)."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return  # torch's own check names this
    for gi, (group, saved_group) in enumerate(zip(optimizer.param_groups, groups)):
        if len(saved_group["params"]) != len(group["params"]):
            return  # torch's own check names this
        for j, (p, i) in enumerate(zip(group["params"], saved_group["params"])):
            saved = state_dict["state"].get(i) or {}
            name = f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)})"
            if saved.get("momentum_buffer") is not None:
                _check_tensor(saved["momentum_buffer"], name, "momentum_buffer", p.shape, floating=True)
            if group.get("manifolds"):
                _check_manifold_state(saved, p, optimizer.state[p], name)


def explain_step_failure(params, grads, states, names) -> None:
    """Called when a step's op refused its tensors: raises an error naming the first parameter whose gradient, state
    or dtype does not fit it (``names(k)`` names params[k]), or returns when none is found (the op's own error then
    stands). A cheap per-tensor check would cost every step; this runs on failures only. The usual cause is a model
    moved to another dtype or device after the optimizer made its state (momentum buffers, codes)."""
    fix = ("the parameter changed dtype or device after the optimizer made its state: build FGSGD after "
           "model.to(...), or reload its state (opt.load_state_dict(opt.state_dict()) moves the state to the "
           "parameters)")
    for k, (p, g, st) in enumerate(zip(params, grads, states)):
        name = f"{names(k)} (shape {tuple(p.shape)})"
        if p.dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"{name}: manifold parameters must be float32 or float64, got {p.dtype}")
        for what, t in (("gradient", g), ("momentum buffer", st.get("momentum_buffer")), ("rescale", st.get("rescale"))):
            if t is None:
                continue
            if t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"{name}: its {what} is {t.dtype} on {t.device}, the parameter {p.dtype} on "
                                 f"{p.device}; {fix}")
            if what != "rescale" and t.shape != p.shape:
                raise ValueError(f"{name}: its {what} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
        if st["codes"].device != p.device:
            raise ValueError(f"{name}: its manifold codes are on {st['codes'].device}, the parameter on {p.device}; "
                             f"{fix}")
    for k, p in enumerate(params[1:], 1):  # one call takes one dtype and device: the group's split is found once
        if p.dtype != params[0].dtype or p.device != params[0].device:
            raise ValueError(f"{names(k)} (shape {tuple(p.shape)}): is {p.dtype} on {p.device}, but {names(0)} of "
                             f"the same step call is {params[0].dtype} on {params[0].device}: it moved after the "
                             "group's first step, where the optimizer splits a group by dtype and device (reading "
                             "every weight's at each step would cost host time). The groups are split anew at the "
                             "next step; the batches launched before this one have stepped")
