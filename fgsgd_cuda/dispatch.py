"""The one dispatch point: which backend runs the FG-SGD ops for tensors on a given device.

``backend`` is ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``. ``auto`` picks the compiled
kernels of the tensors' device when the build has them, then Triton on CUDA devices, then the
pure-torch reference.
"""
from __future__ import annotations

import functools

import torch

from . import _ext

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


def available(name: str, device: torch.device) -> bool:
    device = torch.device(device)
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu" and _ext.HAS_CPU_KERNELS
    if name == "cuda":
        return device.type == "cuda" and _ext.HAS_CUDA_KERNELS
    if name == "triton":
        from . import triton_kernels
        return triton_kernels.available(device)
    return False


def resolve(name: str, device) -> str:
    """The concrete backend name for ``name`` on ``device``; a clear error when it cannot run there."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            if available("cuda", device):
                return "cuda"
            _ext.note_missing_cuda()
            return "triton" if available("triton", device) else "torch"
        return "cpu" if available("cpu", device) else "torch"
    if not available(name, device):
        why = {"cpu": "needs CPU tensors and the compiled extension fgsgd_cuda._C",
               "cuda": "needs CUDA tensors and fgsgd_cuda._C built with CUDA",
               "triton": "needs triton, and a CUDA device or TRITON_INTERPRET=1"}[name]
        raise RuntimeError(f"backend: {name!r} is not available for tensors on {device}: it {why}")
    return name


@functools.lru_cache(maxsize=None)
def _instance(name: str):
    if name == "torch":
        from .backends.torch_ref import TorchBackend
        return TorchBackend()
    if name == "triton":
        from .backends.triton_backend import TritonBackend
        return TritonBackend()
    from .backends.compiled import CompiledBackend
    return CompiledBackend(name)


def get(name: str, device):
    """The backend object (see fgsgd_cuda/backends) for ``name`` on ``device``."""
    impl = _resolved.get((name, device))
    if impl is None:
        impl = _resolved[(name, device)] = _instance(resolve(name, device))
    return impl


# (name, device) -> backend object: what resolve() decides depends only on the build and the device type
_resolved: dict = {}
