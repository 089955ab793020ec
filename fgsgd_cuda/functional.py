"""The functional FG-SGD step of a parameter group (DESIGN.md §1, Algorithm 1), with the one dispatch point.

Manifold parameters are batched by component shape (and by whether their momentum buffer is new,
whether this step re-projects, whether they carry a rescale R), and each batch is one call of the
chosen backend's multi-tensor ops: a whole network costs a handful of launches, whatever its depth.
Row components (n×1, n > 64: the row view of 1×1 convs and linear weights) stay on the chosen
backend, which streams them (csrc/fgsgd/row_step.h, triton_kernels/rows.py); other components of more
than 64 entries go to the pure-torch backend.
"""
from __future__ import annotations

import contextlib
import functools
from collections import defaultdict

import torch

from . import checks, controls, dispatch, streams
from .state_checks import explain_step_failure


def component_view(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The (N, A, B) view of a weight (or its gradient / momentum) whose components are A×B."""
    return t.view(-1, shape[0], shape[1])


def staged(t: torch.Tensor, buffers: dict | None = None, key=None) -> torch.Tensor:
    """t itself when it is contiguous, else a contiguous copy to work on (a channels-last conv weight, whose
    kh×kw filters are strided): the kernels take contiguous components. Write the copy back with
    :func:`unstage` once the work on it has succeeded, so that a failure leaves t as it was.

    ``buffers`` (CPU tensors only): the copy goes to ``buffers[key]``, kept across steps. A fresh CPU tensor
    of many MiB costs its page faults on every step (ResNet-101 channels-last, 2 threads: 145 → 83 ms a step);
    CUDA's caching allocator reuses its blocks anyway, so there the copy stays a temporary (no memory held)."""
    if t.is_contiguous():
        return t
    if buffers is None or t.device.type != "cpu":
        return t.contiguous()
    b = buffers.get(key)
    if b is None or b.shape != t.shape or b.dtype != t.dtype:
        b = buffers[key] = torch.empty(t.shape, dtype=t.dtype)
    return b.copy_(t)


def in_place(impl, p: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the backend ``impl`` steps the (O, I, kh, kw) weight p with kh×kw components as it is although it
    is not contiguous: a channels-last weight with a channels-last gradient on a backend that reads their
    filters where they are (``impl.interleaved_weights``: cpu, cuda and triton; csrc/cpu/interleaved.h,
    csrc/cuda/staged.cuh, triton_kernels/codegen.py). Else p and g are :func:`staged`."""
    return (getattr(impl, "interleaved_weights", False) and checks.is_interleaved(p)
            and g.is_contiguous(memory_format=torch.channels_last))


def unstage(t: torch.Tensor, work: torch.Tensor) -> None:
    """Writes ``work`` (from :func:`staged`) back into ``t`` in t's own layout; nothing when it is t."""
    if work is not t:
        t.copy_(work)


def cached_view(views: dict | None, t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """component_view(t, shape), kept in ``views`` across steps for tensors that live across steps (weights,
    momentum buffers): a hit needs the same tensor object and the same storage address (``p.data = ...``
    makes a new view). The entry holds t through the view, so id(t) cannot be reused while it is there."""
    if views is None:
        return component_view(t, shape)
    v = views.get(id(t))
    if v is None or v._base is not t or v.data_ptr() != t.data_ptr():
        v = views[id(t)] = component_view(t, shape)
    return v


def group_members(gidx, num_groups):
    """(members, offsets) of the groups of several tensors, numbered on from tensor to tensor (tensor j's groups
    ``gidx[j]``, ``num_groups[j]`` of them): members (int32) lists the components of group g, in index order, at
    [offsets[g], offsets[g+1]) (int64): the input of ``group_scale``."""
    starts = torch.tensor([0] + list(num_groups[:-1])).cumsum(0).tolist()
    gid = torch.cat([gi.long() + st for gi, st in zip(gidx, starts)])
    members = torch.argsort(gid, stable=True).to(torch.int32)  # 4 bytes per component in the cache
    offsets = torch.cat([gid.new_zeros(1), torch.bincount(gid, minlength=sum(num_groups)).cumsum(0)])
    return members, offsets


def group_step_sizes(impl, ps, gs, codes, rescale, group_index_of, num_groups, *, weight_decay, group_clip, cache,
                     key):
    """(group_index, s_g): the (N,) int32 groups of every tensor and s_g = 1 / max(1, ‖ξ_g‖/c) of every
    group (step 2), one list entry per tensor.

    ‖ξ_g‖² is summed in float64 over the members of each group in index order (``impl.group_scale``: a
    deterministic segmented sum, the same bits on every run and every DDP rank). The groups
    (``group_index_of(j)`` for tensor j), their members sorted by group and the group offsets are made
    once per ``key`` (the batch) and kept in ``cache``.
    """
    sq = impl.tangent_sqnorm(ps, gs, codes, rescale, weight_decay)
    if key not in cache:
        gidx = [group_index_of(j).to(device=sq.device, dtype=torch.int32) for j in range(len(ps))]
        cache[key] = (gidx, *group_members(gidx, num_groups))
    gidx, members, offsets = cache[key]
    scale = impl.group_scale(sq, members, offsets, group_clip, ps[0].dtype)  # sq: float64 (a float32 one overflows)
    return gidx, list(scale.split(num_groups))


def manifold_step(params, grads, states, **kw) -> None:
    """One step of the manifold parameters of a group: :func:`prepare_manifold_step` (every keyword argument is
    its), then the launches it returns."""
    prepare_manifold_step(params, grads, states, **kw)()


def prepare_manifold_step(params, grads, states, *, lr, momentum, dampening, nesterov, weight_decay, group_clip,
                          stabilize, backend, cache, views=None, group_index=None, capturable=False, found_inf=None,
                          grad_scale=None, overlap=None, staging=None, names=None):
    """The step of the manifold parameters of a group in two phases: this call does everything that allocates or
    may fail (batches, new momentum buffers, contiguous copies, views, the group step sizes s_g) and changes
    nothing; the function it returns launches the steps and updates the states. So a failure while preparing any
    batch (an allocation, a grouping that does not match its codes) leaves every parameter and state as it was
    (the optimizer prepares all its groups before it launches any). The launches themselves only check the tensors
    (shapes, dtypes, devices), which FGSGD made and load_state_dict checks (fgsgd_cuda/state_checks.py).
    ``states`` are the optimizer's per-parameter states.

    Every state holds ``shape`` (A, B), ``codes`` (uint8 (N,), or packed: fgsgd_cuda/codes.py),
    ``num_groups``, ``step`` and optionally ``rescale`` (N,) and ``momentum_buffer``. With ``group_clip``,
    ``group_index(k)`` gives the (N,) int32 groups of params[k]; it is called once per batch, the work built
    from it is kept in ``cache`` (keyed by the parameters' ids). ``views`` (optional) keeps the component views
    of weights and buffers that are not passed whole (the row view's rows). A channels-last filter bank with a
    channels-last gradient is stepped where it is on a backend that reads it so (:func:`in_place`: cpu, cuda, triton);
    any other weight or gradient that is not contiguous is worked on through a contiguous copy (:func:`staged`),
    kept in ``staging`` (optional) across steps on the CPU.

    ``capturable``: every ``step`` is a float32 tensor on the parameter's device that the kernels read (first
    step, stabilize) and increment, ``lr`` may be a one-element tensor, and ``found_inf`` (a float32 flag)
    skips the step on the device, ``grad_scale`` (GradScaler's scale) is read by the kernels that unscale the
    gradients on the fly (fgsgd_cuda/controls.py): no host synchronisation.

    On CUDA every batch but the largest runs on a side stream (fgsgd_cuda/streams.py), beside the largest, and so
    does the device work of its preparation (the copies and s_g it launches; a batch without any enters the side
    stream once, to launch): ``overlap`` is the caller's
    :class:`~fgsgd_cuda.streams.Overlap`, joined by the caller at the end of its step (None: one made here, joined
    by the launch).

    ``names(k)`` (optional) names params[k] in errors: when an op refuses its tensors, the parameter whose
    gradient or state does not fit it is named (fgsgd_cuda/state_checks.py explain_step_failure).
    """
    batches = defaultdict(list)
    every = 0 if capturable or not stabilize else int(stabilize)  # capturable: the kernels count (step_control.h)
    kernels = {}  # component shape (a tuple, the state's) -> the backend that steps it
    for k, st in enumerate(states):  # a few hundred ns per tensor of an eager step's host time
        shape = st["shape"]
        name = kernels.get(shape)
        if name is None:
            name = kernels[shape] = backend if checks.takes_step_kernels(*shape) else "torch"
        batches[(shape, momentum != 0 and st.get("momentum_buffer") is None,
                 None if capturable else every > 0 and (st["step"] + 1) % every == 0,
                 st.get("rescale") is not None, name)].append(k)
    # buffers made on the current stream, before any launch on the side stream; contiguous whatever the
    # weight's layout (the kernels index m by component, also when they read a channels-last weight in place).
    # Capturable: zeros, as the kernels may skip the step (found_inf) and leave them unwritten in the state, where
    # a checkpoint would keep whatever memory held (the kernels tell a first step by its count, not by them)
    new_buffer = torch.zeros_like if capturable else torch.empty_like
    new_buffers = {k: new_buffer(params[k], memory_format=torch.contiguous_format)
                   for (_, first, *_), idx in batches.items() if first for k in idx}
    own = overlap is None
    overlap = streams.Overlap() if own else overlap
    largest = _largest(batches, params) if len(batches) > 1 else None
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
              group_clip=group_clip, stabilize=stabilize, cache=cache, views=views, group_index=group_index,
              capturable=capturable, found_inf=found_inf, grad_scale=grad_scale, staging=staging)
    stream_of = {}  # batch -> the context of its stream: the current one for the largest, else the side stream
    for key, idx in batches.items():
        if largest is None or key == largest:
            stream_of[key] = contextlib.nullcontext
        else:  # forked before anything of the step is launched: the side stream waits for none of it
            overlap.fork(params[idx[0]].device)
            stream_of[key] = functools.partial(overlap.side, params[idx[0]].device)
    launches = []  # (the context of its stream, launch) of every batch
    try:
        for key, idx in batches.items():
            _check_first_state(params, states, idx[0])
            stream = stream_of[key]
            launches.append((stream, _prepare_batch(key, idx, params, grads, states, new_buffers, stream=stream, **hp)))
    except BaseException as e:
        if own:
            overlap.join()
        _explain(e, params, grads, states, names)
        raise

    def launch() -> None:
        try:
            for stream, run in launches:
                with stream():
                    run()
        except BaseException as e:
            _explain(e, params, grads, states, names)
            raise
        finally:
            if own:
                overlap.join()
        for k, buf in new_buffers.items():
            states[k]["momentum_buffer"] = buf
        if not capturable:  # else the step counted on the device
            for st in states:
                st["step"] += 1
    return launch


def _check_first_state(params, states, k) -> None:
    """The state of a batch's first weight is where the weight is (a momentum buffer of its dtype and device, else
    its codes on its device): a model moved after the optimizer made its state is refused while preparing, before
    any batch or group launches (the ops check every tensor, but only when their batch launches: a later batch's
    refusal came after earlier ones had stepped). A few attribute reads per batch, not per tensor."""
    p, st = params[k], states[k]
    ref = st.get("momentum_buffer")
    if ref is None:
        ref = st["codes"]
    elif ref.dtype is not p.dtype:
        raise ValueError("momentum buffer: not of its weight's dtype")  # named by _explain
    if ref.device != p.device:
        raise ValueError("state: not on its weight's device")
    r = st.get("rescale")  # R of a Renormalizer (momentum 0 leaves it as the only float state)
    if r is not None and r.dtype is not p.dtype:
        raise ValueError("rescale: not of its weight's dtype")


def _largest(batches, params):
    """The key of the batch with the most elements (it stays on the current stream)."""
    best, most = None, -1
    for key, idx in batches.items():
        n = 0
        for k in idx:
            n += params[k].numel()
        if n > most:
            best, most = key, n
    return best


def _explain(e: BaseException, params, grads, states, names) -> None:
    """An op's error (RuntimeError, ValueError, TypeError) explained by the parameter it concerns, when ``names``
    is given: raises the named error, or returns (the caller re-raises ``e``). Plain try/except at the call
    sites: a context manager would cost every step ~2 µs of host time."""
    if names is not None and isinstance(e, (RuntimeError, ValueError, TypeError)):
        explain_step_failure(params, grads, states, names)


def _prepare_batch(key, idx, params, grads, states, new_buffers, *, stream, lr, momentum, dampening, nesterov,
                   weight_decay, group_clip, stabilize, cache, views, group_index, capturable, found_inf, grad_scale,
                   staging):
    """One batch of the step (one component shape and set of flags), prepared: returns its launch, one call of
    the backend and the write-back of its contiguous copies. ``stream()`` is the context of the batch's stream,
    entered around the work that launches or allocates on the device (copies, s_g) and only then: on CUDA an
    entry of a side stream costs host time (torch.cuda.StreamContext)."""
    shape, first, stab, has_r, name = key
    impl = dispatch.get(name, params[idx[0]].device)
    ps, gs, ms, codes, rescale, work = [], [], [], [], [], {}
    for k in idx:  # one pass: about 1 µs per tensor of an eager step's host time (benchmarks/host_overhead.py)
        p, g, st = params[k], grads[k], states[k]
        # a conv weight (O, I, kh, kw) with kh×kw components is a (..., A, B) tensor the ops take as it is, and so
        # are its gradient and momentum buffer (their shapes are its shape): no views to make; other layouts (the
        # row view, n×1 rows of an (O, I, 1, 1) weight) go as (N, A, B) views
        whole = p.dim() >= 3 and p.shape[-2:] == shape
        if not (p.is_contiguous() and g.is_contiguous()) and not (whole and in_place(impl, p, g)):
            # steps in a contiguous copy, written back at the end (a channels-last weight the backend cannot read
            # where it is, or a strided gradient)
            with stream():
                p, g = staged(p, staging, ("p", id(params[k]))), staged(g, staging, ("g", id(params[k])))
            if p is not params[k]:
                work[k] = p
        ps.append(p if whole else cached_view(views if p is params[k] else None, p, shape))
        gs.append(g if whole else component_view(g, shape))
        if momentum != 0:
            m = new_buffers[k] if first else st["momentum_buffer"]
            ms.append(m if whole else cached_view(None if first else views, m, shape))
        codes.append(st["codes"])
        if has_r:
            rescale.append(st["rescale"])
    gidx, gscale = [], []
    if group_clip is not None:
        if group_index is None:
            raise ValueError("group_index: group_clip needs the groups of every component")
        with stream():
            gidx, gscale = group_step_sizes(impl, ps, gs, codes, rescale, lambda j: group_index(idx[j]),
                                            [states[k]["num_groups"] for k in idx], weight_decay=weight_decay,
                                            group_clip=group_clip, cache=cache,
                                            key=tuple(id(params[k]) for k in idx))

    def run() -> None:
        if capturable:
            lr_t = lr if isinstance(lr, torch.Tensor) else None
            controls.step(impl, ps, gs, ms, codes, rescale, gidx, gscale, 0.0 if lr_t is not None else lr, momentum,
                          dampening, nesterov, weight_decay, first, False, [states[k]["step"] for k in idx],
                          found_inf, lr_t, int(stabilize or 0), grad_scale)
        else:
            impl.step_(ps, gs, ms, codes, rescale, gidx, gscale, lr, momentum, dampening, nesterov, weight_decay,
                       first, stab)
        for k, copy in work.items():
            unstage(params[k], copy)
    return run
