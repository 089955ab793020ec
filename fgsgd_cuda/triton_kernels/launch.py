"""Building, caching and launching the generated Triton kernels (see the package docstring)."""
from __future__ import annotations

import collections
import contextlib
import functools
import linecache
import math
import struct

import torch
import triton
import triton.language as tl  # noqa: F401  (the generated sources use it)

from .. import checks
from .. import codes as _codes
from . import codegen as _cg
from . import interpreting
from . import rows as _rows

_GENERATED_MODULE = "fgsgd_cuda.triton_kernels._generated"
_BIG = 1 << 62                     # padding of the first-block column of the pointer table
_TABLE_CACHE_SIZE = 64
_table_cache: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()

# Compile options of every launch. FMA contraction on, as nvcc's default for the CUDA kernels; set explicitly
# because Triton's default changes (off from Triton 3.10), which would change the bits of every step.
OPTIONS = dict(num_stages=1, enable_fp_fusion=True)

# Components per program and warps per program by A*B: one component per thread (the per-thread
# register footprint grows with A*B, so larger components get smaller programs); 1×1 components
# are plain elementwise work and take several per thread. Tests may lower BLOCK_OVERRIDE to get
# many programs (masked tails, the pointer-table search) from a few components.
BLOCK_OVERRIDE: int | None = None


def config(ab: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for components of A*B elements."""
    if ab == 1:
        block, warps = 512, 4
    elif ab <= 9:
        block, warps = 128, 4
    elif ab <= 25:
        block, warps = 64, 2
    else:
        block, warps = 32, 1
    return (BLOCK_OVERRIDE or block), warps


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "fp32"
    if dtype == torch.float64:
        return "fp64"
    raise TypeError(f"triton backend: expected float32 or float64 tensors, got {dtype}")


@functools.lru_cache(maxsize=None)
def _jit(name: str, body: str):
    """A triton.jit function from generated source; the source is registered with linecache so that
    inspect.getsource (used by both the Triton compiler and its interpreter) finds it."""
    code = "import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + body
    filename = f"<{_GENERATED_MODULE}.{name}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    namespace = {"__name__": _GENERATED_MODULE}
    exec(compile(code, filename, "exec"), namespace)  # noqa: S102  (our own generated source)
    return namespace[name]


@functools.lru_cache(maxsize=None)
def kernel(kind: str, a: int, b: int, dtype: str, **flags):
    """The jit function of one op, component shape, dtype and set of flags (generated once)."""
    gen = {"step": _cg.step_source, "sqnorm": _cg.sqnorm_source, "projxm": _cg.projx_multi_source,
           "rescalem": _cg.rescale_multi_source}.get(kind)
    if kind in ("rowstep", "rowsqnorm"):
        gen = _rows.row_step_source if kind == "rowstep" else _rows.row_sqnorm_source
        name, body = gen(dtype, **flags)
    elif gen is not None:
        name, body = gen(a, b, dtype, **flags)
    else:
        name, body = _cg.unary_source(kind, a, b, dtype, **flags)
    return _jit(name, body)


@contextlib.contextmanager
def _quiet():
    """The interpreter runs the kernels with numpy: masked-off lanes and the branches of the codes a
    component does not have may divide by zero there, harmlessly (tl.where drops them)."""
    if interpreting():
        import numpy as np
        with np.errstate(all="ignore"):
            yield
    else:
        yield


def _double_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _table(rows, block: int, device, hyper=None):
    """The int64 pointer table of a multi-tensor launch; returns (table, log2 size of the search, blocks).

    rows: (p, g, m, codes, rescale, group_index, group_scale, out, n[, step count[, interleave L]]) per tensor with
    n > 0, pointers as ints (0: absent). Cached by content on CUDA, so steady-state steps make no host-to-device copy (and,
    after one eager step, a step with unchanged tensors and hyper-parameters can be captured in a CUDA graph).
    """
    t = len(rows)
    log_t = max(0, math.ceil(math.log2(t))) if t > 1 else 0
    firsts, total = [], 0
    for r in rows:
        firsts.append(total)
        total += triton.cdiv(r[8], block)
    firsts += [_BIG] * ((1 << log_t) - t)
    vals = [_double_bits(v) for v in (hyper or (0.0, 0.0, 0.0, 0.0))] + firsts
    for r, first in zip(rows, firsts):
        vals += list(r[:9]) + [first, r[9] if len(r) > 9 else 0, r[10] if len(r) > 10 else 0]
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(vals, dtype=torch.int64), log_t, total
    # per stream: a table is first used on the stream that copied it there
    key = (str(device), torch.cuda.current_stream(device).cuda_stream, tuple(vals))
    tab = _table_cache.get(key)
    if tab is None and torch.cuda.is_current_stream_capturing():
        # torch.cuda.graph captures on a stream of its own, where a copy cannot be made: the table an eager step
        # made on another stream (a blocking copy: complete when .to() returned), which stays cached
        tab = next((t for k, t in reversed(_table_cache.items()) if k[0] == key[0] and k[2] == key[2]), None)
    if tab is None:
        tab = torch.tensor(vals, dtype=torch.int64).to(device)
        _table_cache[key] = tab
        while len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    else:
        _table_cache.move_to_end(key)
    return tab, log_t, total


def _ptr(t) -> int:
    return t.data_ptr() if t is not None else 0


def _offset(t, base) -> int:
    """t's first element as an element offset from base's (the same dtype; any two allocations qualify)."""
    delta = t.data_ptr() - base.data_ptr()
    assert delta % t.element_size() == 0, "misaligned group_scale tensor"
    return delta // t.element_size()


def _control_args(tab, found_inf, lr_tensor, grad_scale, stabilize_every) -> tuple:
    """The kernel arguments of the run-time controls (codegen.CONTROL_ARGS): absent tensors replaced by the
    table (never read: the kernel has no code for them); stabilize_every 0 (never) as 2^31 - 1, which no
    float32 count reaches (the kernel then needs no test of its own, nor a modulo by 0)."""
    every = int(stabilize_every) if stabilize_every else 2 ** 31 - 1
    return (tab if found_inf is None else found_inf, tab if lr_tensor is None else lr_tensor,
            tab if grad_scale is None else grad_scale, every)


def _run(kind, params, rows, hyper=None, ctl=None, args=(), **flags):
    """One launch over the tensors of a call; ``ctl``: (found_inf, lr_tensor, grad_scale, stabilize_every) for a
    kernel generated with run-time controls; ``args``: the kernel's own arguments after the table. Row
    components (n×1, n > 64) get one program per row (rows.py, BLOCK elements per chunk), the others one
    program per BLOCK components."""
    rows = [r for r in rows if r[8] > 0]
    if not rows:
        return
    a, b = params[0].shape[-2], params[0].shape[-1]
    if checks.is_row_shape(a, b):
        assert not flags.pop("interleaved", False), "row components are never channels-last (checks.is_interleaved)"
        kind, lead, per_program = "row" + kind, (a,), 1
        a, b, block, warps = 0, 1, min(1024, triton.next_power_of_2(a)), 4
    else:
        block, warps = config(a * b)
        lead, per_program = (), block
    tab, log_t, total = _table(rows, per_program, params[0].device, hyper)
    fn = kernel(kind, a, b, _dtype_name(params[0].dtype), log_tensors=log_t, **flags)
    extra = _control_args(tab, *ctl) if ctl else ()
    with _quiet():
        fn[(total,)](tab, *lead, *args, *extra, BLOCK=block, num_warps=warps, **OPTIONS)


# -- the multi-tensor ops (one launch per call; a call has one component shape) ----------------------

# The tensors of the multi-tensor ops come as (N, A, B) components, or (TritonBackend, backends.as_components) as
# whole channels-last (O, I, kh, kw) weights, which have no such view: a tensor that is not 3-D is one of those.

def _count(p) -> int:
    """Components of an (N, A, B) tensor or of a whole channels-last conv weight."""
    return p.shape[0] if p.dim() == 3 else checks.num_components(p)


def _by_layout(params):
    """The interleave L of every tensor (the input channels of a channels-last (O, L, kh, kw) weight, read where it
    is by the kernels generated with ``interleaved``; 0: (N, A, B) components) and, per layout present, the indices
    of its tensors: a launch each (a model is usually all one or all the other)."""
    il = [0 if p.dim() == 3 else p.shape[1] for p in params]
    parts = [[k for k, v in enumerate(il) if (v != 0) == inter] for inter in (False, True)]
    return il, [(inter, idx) for inter, idx in zip((False, True), parts) if idx]


def _codes_of(codes, params):
    """(codes, packed): the kernels read packed codes (fgsgd_cuda/codes.py) when every tensor of the call has
    them, else one byte per component (the packed ones of a mixed call are unpacked)."""
    packed = [_codes.is_packed(c) for c in codes]
    if all(packed):
        return list(codes), True
    return (_codes.unpacked(codes, params) if any(packed) else list(codes)), False


def step_(params, grads, momenta, codes, rescale, group_index, group_scale, lr, momentum, dampening, nesterov,
          weight_decay, first_step, stabilize, steps=(), found_inf=None, lr_tensor=None, stabilize_every=0,
          grad_scale=None):
    """The step; the run-time controls (fgsgd_cuda/controls.py) are read by the kernel, and the step counts
    incremented by a multi-tensor op after it (by 1 - found_inf): no host synchronisation."""
    use_m = momentum != 0
    codes, packed = _codes_of(codes, params)
    controls = "".join(ch for ch, on in (("f", found_inf is not None), ("l", lr_tensor is not None),
                                         ("u", grad_scale is not None), ("s", bool(steps))) if on)
    if "s" in controls:
        stabilize = False  # decided per tensor in the kernel, and so is the first step unless first_step forces it
    rows = []
    gs0 = group_scale[0] if group_index else None  # the s_g columns: element offsets from group_scale[0]
    il, layouts = _by_layout(params)
    for k, p in enumerate(params):
        rows.append((p.data_ptr(), grads[k].data_ptr(), momenta[k].data_ptr() if use_m else 0, codes[k].data_ptr(),
                     _ptr(rescale[k]) if rescale else 0, _ptr(group_index[k]) if group_index else 0,
                     _offset(group_scale[k], gs0) if group_index else 0, 0, _count(p),
                     steps[k].data_ptr() if steps else 0, il[k]))
    for inter, idx in layouts:
        _run("step", [params[k] for k in idx], [rows[k] for k in idx], (lr, momentum, dampening, weight_decay),
             momentum=use_m, first_step=bool(first_step) and use_m, nesterov=bool(nesterov) and use_m,
             stabilize=bool(stabilize), rescale=bool(rescale), group=bool(group_index),
             weight_decay=weight_decay != 0, packed=packed, controls=controls, interleaved=inter,
             ctl=(found_inf, lr_tensor, grad_scale, stabilize_every) if controls else None,
             args=(gs0,) if group_index else ())
    if steps:
        taken = None if found_inf is None else 1.0 - found_inf.reshape(())
        torch._foreach_add_(list(steps), 1.0 if taken is None else taken)


def tangent_sqnorm(params, grads, codes, rescale, weight_decay):
    total = sum(_count(p) for p in params)
    out = torch.empty(total, dtype=torch.float64, device=params[0].device)  # float64 for every dtype
    codes, packed = _codes_of(codes, params)
    rows, off = [], 0
    il, layouts = _by_layout(params)
    for k, p in enumerate(params):
        n = _count(p)
        rows.append((p.data_ptr(), grads[k].data_ptr(), 0, codes[k].data_ptr(), _ptr(rescale[k]) if rescale else 0,
                     0, 0, off, n, 0, il[k]))  # out: an offset into `out` (a new tensor every call)
        off += n
    for inter, idx in layouts:
        _run("sqnorm", [params[k] for k in idx], [rows[k] for k in idx], (0.0, 0.0, 0.0, weight_decay), args=(out,),
             rescale=bool(rescale), weight_decay=weight_decay != 0, packed=packed, interleaved=inter)
    return out


def projx_(params, codes, rescale):
    codes, packed = _codes_of(codes, params)
    rows = [(p.data_ptr(), 0, 0, codes[k].data_ptr(), _ptr(rescale[k]) if rescale else 0, 0, 0, 0, p.shape[0])
            for k, p in enumerate(params)]
    _run("projxm", params, rows, rescale=bool(rescale), packed=packed)


def rescale_(params, codes, ratio):
    rows = [(p.data_ptr(), 0, 0, codes[k].data_ptr(), ratio[k].data_ptr(), 0, 0, 0, p.shape[0])
            for k, p in enumerate(params)]
    _run("rescalem", params, rows)


# -- single-tensor ops (the code is fixed in the kernel's source) ------------------------------------

def _unary(op, x, u=None, code=None):
    n, a, b = x.shape
    out = torch.empty((n, 3) if op == "norms" else x.shape, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block, warps = config(a * b)
    fn = kernel(op, a, b, _dtype_name(x.dtype), code=None if code is None else int(code))
    args = (x, out, n) if u is None else (x, u, out, n)
    with _quiet():
        fn[(triton.cdiv(n, block),)](*args, BLOCK=block, num_warps=warps, **OPTIONS)
    return out


def proj(x, u, code):
    return _unary("proj", x, u, code)


def retr(x, v, code):
    return _unary("retr", x, v, code)


def projx(x, code):
    return _unary("projx", x, None, code)


def norms(x):
    return _unary("norms", x)
