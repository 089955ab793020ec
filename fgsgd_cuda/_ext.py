"""Loads the compiled extension ``fgsgd_cuda._C`` once, and says clearly when it is missing."""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which fgsgd_cuda._C links against)

_C = None
LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F811  (importing registers torch.ops.fgsgd.*)
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "fgsgd_cuda: the compiled extension fgsgd_cuda._C could not be loaded "
        f"({LOAD_ERROR}); falling back to the pure-torch backend. Build it with "
        "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)

HAS_CPU_KERNELS = _C is not None
HAS_CUDA_KERNELS = bool(getattr(_C, "with_cuda", False))
_cuda_note_shown = False


def note_missing_cuda() -> None:
    """Warn once that CUDA tensors go to a slower backend because the build has no CUDA kernels."""
    global _cuda_note_shown
    if not _cuda_note_shown:
        _cuda_note_shown = True
        warnings.warn("fgsgd_cuda: this build of fgsgd_cuda._C has no CUDA kernels (built without nvcc or "
                      "with a CPU-only torch); CUDA tensors use the Triton or pure-torch backend.",
                      RuntimeWarning, stacklevel=3)
