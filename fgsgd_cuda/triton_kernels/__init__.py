"""Triton kernels of the FG-SGD step: the ``triton`` backend (fgsgd_cuda.backends.triton_backend).

What runs
    ``step_`` does DESIGN.md §1 steps 1, 3, 4, 5 (reference.step) for every component of every tensor
    of a call in one pass over memory: each component's p, g (and m) are read once and p (and m)
    written once; codes (uint8), rescale R, group index and group step size s_g are read per
    component. ``tangent_sqnorm``, ``projx_`` and ``rescale_`` are the other multi-tensor ops;
    ``proj``, ``retr``, ``projx`` and ``norms`` the single-tensor ones.

Launch structure
    One launch per call of a multi-tensor op (a call holds one component shape, so a whole ResNet's
    step is one launch per shape: a handful). Every tensor of the call goes into one int64 *pointer
    table*: per tensor the data pointers of p, g, m, codes, rescale, group_index, group_scale, the
    output, N and the index of its first program; in front, the float64 hyper-parameters (as bits)
    and the first-program column padded to a power of two. The grid is the total number of blocks;
    a program finds its tensor by a binary search over that column (log2 T scalar loads, unrolled),
    casts the pointers with ``.to(tl.pointer_type(...))`` and does components
    ``[i·BLOCK, (i+1)·BLOCK)`` of it, masked at N. On CUDA the table is cached by content, so an
    unchanged call (same tensors and hyper-parameters) costs no host-to-device copy.

    Pointer tables work unchanged under ``TRITON_INTERPRET=1`` with CPU tensors (the interpreter
    reads host memory at the loaded addresses; checked before this design was chosen), so the CPU
    tests run exactly the kernels a GPU runs.

Kernel bodies
    Triton has no per-thread arrays, so each kernel is generated as straight-line source for its
    component shape A×B (see :mod:`.codegen`): element (r, c) of the components of a block is one
    register vector, and every loop of the math (QR by modified Gram-Schmidt twice, Cayley by
    Gaussian elimination with partial pivoting, Jacobi for the spectral norm) is unrolled when the
    source is written. Every shape is thus specialised like the C++ ``Fixed<A, B>`` policy, 3×3 (the
    hot case) included, and any A*B <= 64 works. Codes vary per component, so the multi-tensor kernels
    compute every manifold's branch and select with ``tl.where`` (they share the B×B product ωᵀU);
    the single-tensor ops have their code fixed in the source. Flags (momentum, first step,
    nesterov, stabilize, rescale, groups, weight decay) are fixed in the source too, so each
    variant is compiled without dead work. BLOCK components per program, one per thread:
    1×1: 512 (4 warps), A*B <= 9: 128 (4 warps), <= 25: 64 (2 warps), else 32 (1 warp).

    Loads and stores go through pointer tensors carried by a one-iteration ``for`` loop: Triton's
    coalescing pass otherwise walks the whole unrolled kernel once per memory access (compile times
    of minutes for 5×5, hours for 7×7); LLVM later drops the loop, so the code is the same as
    straight-line code (3×3 fp32 step: 90 registers, no spills on sm_90). See codegen.Frame.
    ``num_stages=1``: there is nothing to software-pipeline. ``enable_fp_fusion=True`` (FMA contraction, as
    nvcc's default) is passed explicitly: Triton's default turns it off from 3.10 (launch.OPTIONS).

    The generated kernels use only core Triton (load/store/where/sqrt/sin/cos/abs/maximum/
    program_id/arange/.to), common to Triton 3.6 and 3.9. Arithmetic is in the parameters' dtype
    (float32 or float64), like the compiled kernels.

Row components
    n×1 components longer than 64 entries (the row view) get hand-written kernels (:mod:`.rows`): one
    program per row over the same pointer table, the row streamed in chunks of up to 1024 elements in
    four passes with a sum between them (the math of csrc/fgsgd/row_step.h).

Running under the interpreter
    ``TRITON_INTERPRET=1`` must be in the environment before triton is imported; then
    ``available("cpu")`` is true and the backend runs on CPU tensors (slowly: tests keep N small).
"""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels with its interpreter (TRITON_INTERPRET set in the environment)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or broken against this torch
        return False
    return True


def available(device) -> bool:
    """Triton can run the kernels for tensors on ``device``: triton importable, and a CUDA device
    (with CUDA usable) or, under TRITON_INTERPRET=1, a CPU device."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available()
    elif device.type == "cpu":
        ok = interpreting()
    else:
        ok = False
    return ok and _triton_importable()


def __getattr__(name):  # the launchers import triton: load them on first use only
    if name in ("step_", "tangent_sqnorm", "projx_", "rescale_", "proj", "retr", "projx", "norms", "launch"):
        import importlib
        launch = importlib.import_module(f"{__name__}.launch")
        return launch if name == "launch" else getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
