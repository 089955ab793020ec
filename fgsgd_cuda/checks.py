"""Input checks shared by every backend: errors name the argument and what is wrong."""
from __future__ import annotations

import math

import torch

from . import codes as _codes

MAX_ELEMS = 64          # A*B of one component (csrc/fgsgd/config.h)
MAX_CAYLEY_ROWS = 8     # the Cayley retraction solves an A×A system
FLOAT_DTYPES = (torch.float32, torch.float64)


def component_shape(p: torch.Tensor) -> tuple[tuple[int, int], bool]:
    """((A, B), is_row) of a weight's components, the one rule of every module: a 4-D weight (O, I, kh, kw) with a
    kernel larger than 1×1 is its O·I kh×kw filters; any other weight (1×1 convs, Conv1d/3d, linear) its O rows,
    n×1 each (the row view)."""
    if p.dim() == 4 and (p.shape[2] > 1 or p.shape[3] > 1):
        return (int(p.shape[2]), int(p.shape[3])), False
    return (math.prod(p.shape[1:]), 1), True


def is_row_shape(a: int, b: int) -> bool:
    """n×1 components longer than MAX_ELEMS: the row view of 1×1 convs and linear weights, which every backend
    runs with a streaming kernel for step_ and tangent_sqnorm (csrc/fgsgd/row_step.h, triton_kernels/rows.py)."""
    return b == 1 and a > MAX_ELEMS


def takes_step_kernels(a: int, b: int) -> bool:
    """Whether the step kernels of the compiled and Triton backends take A×B components (step_, tangent_sqnorm):
    at most MAX_ELEMS entries, or n×1 rows of any length; other shapes step on the torch backend."""
    return a * b <= MAX_ELEMS or is_row_shape(a, b)


def is_interleaved(x: torch.Tensor) -> bool:
    """A conv weight (O, I, kh, kw) in torch.channels_last that is not also contiguous, with kh·kw <= MAX_ELEMS: its
    kh×kw components are interleaved, I apart (csrc/cpu/interleaved.h). Longer kh×1 filters are row components,
    which the kernels stream in their contiguous layout only."""
    # contiguous weights leave at the second test (0.16 µs; 0.45 µs with the shape product first): every step asks
    # for every filter bank on the backends that read channels-last weights (functional.in_place)
    return (x.dim() == 4 and not x.is_contiguous() and x.shape[2] * x.shape[3] <= MAX_ELEMS
            and x.is_contiguous(memory_format=torch.channels_last))


def components(x: torch.Tensor, name: str, *, contiguous: bool = True, rows: bool = False,
               leading: bool = False, interleaved: bool = False) -> None:
    """x must be a dense float32/float64 tensor of shape (N, A, B) with A*B <= 64 (``rows``: or (N, n, 1));
    ``leading`` (the multi-tensor ops): or any (..., A, B), whose last two dimensions are the components;
    ``interleaved``: a channels-last (O, I, kh, kw) weight too (a backend that reads it in place)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.is_sparse:
        raise ValueError(f"{name}: sparse tensors are not supported; got layout {x.layout}")
    if x.dim() != 3 and not (leading and x.dim() > 3):
        raise ValueError(f"{name}: expected shape (N, A, B){' or (..., A, B)' if leading else ''}, got "
                         f"{tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    a, b = x.shape[-2], x.shape[-1]
    if rows and is_row_shape(a, b) and a > 2 ** 31 - 1:  # the compiled backends take A as an int
        raise ValueError(f"{name}: rows must have at most 2^31 - 1 entries, got {a}")
    if (a < 1 or b < 1 or a * b > MAX_ELEMS) and not (rows and is_row_shape(a, b)):
        raise ValueError(f"{name}: components must have 1 <= A*B <= {MAX_ELEMS}"
                         f"{' (or be n×1 rows of any length)' if rows else ''}, got {a}x{b}")
    if contiguous and not x.is_contiguous() and not (interleaved and is_interleaved(x)):
        raise ValueError(f"{name}: must be contiguous (call .contiguous() first"
                         f"{'; or a channels-last (O, I, kh, kw) weight' if interleaved else ''})")


def num_components(x: torch.Tensor) -> int:
    """N of a (..., A, B) tensor: the product of the dimensions before the last two."""
    return x.shape[:-2].numel()


def like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, *, same_layout: bool = False) -> None:
    """t must match ref in shape, dtype and device, and be dense and contiguous (``same_layout``: or
    channels-last as ref is)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.is_sparse:
        raise ValueError(f"{name}: sparse tensors are not supported; got layout {t.layout}")
    if t.shape != ref.shape:
        raise ValueError(f"{name}: has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: is on {t.device} but {ref_name} is on {ref.device}")
    if same_layout and is_interleaved(ref):
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{name}: must be channels-last, as {ref_name} is")
        return
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous() first)")


def code_for_shape(code: int, a: int, b: int, name: str = "code") -> None:
    """The manifold of ``code`` must accept A×B components."""
    if not 0 <= int(code) < len(_codes.ALL_CODES):
        raise ValueError(f"{name}: must be in [0, {len(_codes.ALL_CODES) - 1}], got {code}")
    man = _codes.manifold_of(code)
    if man == "stiefel" and a < b:
        raise ValueError(f"{name}: the stiefel manifold needs components with A >= B, got {a}x{b}")
    if code == _codes.STIEFEL_CAYLEY and a > MAX_CAYLEY_ROWS:
        raise ValueError(f"{name}: the cayley retraction supports A <= {MAX_CAYLEY_ROWS}, got A = {a}")


def code_limit(a: int, b: int) -> int:
    """One past the largest code A×B components take: the codes a shape refuses are always the last ones (stiefel's
    5 and 6 when A < B, cayley's 6 when A > MAX_CAYLEY_ROWS), so ``codes.max() < code_limit(a, b)`` checks them all
    (code_for_shape names the one that does not fit)."""
    return 5 if a < b else 6 if a > MAX_CAYLEY_ROWS else len(_codes.ALL_CODES)


def codes_tensor(codes: torch.Tensor, n: int, a: int, b: int, device, name: str = "codes") -> None:
    """A uint8 (N,) tensor of valid codes for A×B components (reads the values: construction time only)."""
    if codes.dtype != torch.uint8 or codes.shape != (n,):
        raise ValueError(f"{name}: expected a uint8 tensor of shape ({n},), got {codes.dtype} {tuple(codes.shape)}")
    if codes.device != device:
        raise ValueError(f"{name}: is on {codes.device} but the parameter is on {device}")
    for code in torch.unique(codes).tolist():
        code_for_shape(code, a, b, name)


def finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains non-finite values (inf or nan)")


def _memory_span(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, one past the last) of the memory t's elements occupy (its strides' extent); None when empty or on
    the meta device (no memory: every data_ptr is 0)."""
    if t.numel() == 0 or t.is_meta:
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def overlapping(tensors, wanted) -> tuple[int, int] | None:
    """Indices (i, j) of two of ``tensors`` whose memory overlaps, one of them in the set ``wanted``; None when
    there are none. Overlap is judged from each tensor's extent (first to last element), so two strided views
    that interleave count too. One sort of the extents per device."""
    if not wanted:
        return None
    by_device: dict = {}
    for k, t in enumerate(tensors):
        span = _memory_span(t)
        if span is not None:
            by_device.setdefault(t.device, []).append((*span, k))
    for spans in by_device.values():
        spans.sort()
        end_all = end_wanted = -1  # the furthest end so far, over all spans and over the wanted ones, and whose
        k_all = k_wanted = -1
        for start, end, k in spans:
            if k in wanted and start < end_all:
                return k_all, k
            if start < end_wanted:
                return k_wanted, k
            if end > end_all:
                end_all, k_all = end, k
            if k in wanted and end > end_wanted:
                end_wanted, k_wanted = end, k
    return None
