"""A side CUDA stream for the small launches of a step, so that they overlap the large ones.

A network's manifold parameters come in a few component shapes, one launch each (fgsgd_cuda/functional.py):
ResNet's 3×3 filters hold nearly every parameter, its 7×7 stem 0.2 %. The 3×3 launch is bandwidth-bound;
the stem's, one thread per 7×7 component on a few SMs, is latency-bound. On one stream the stem's launch
runs after the others, alone on the GPU. On a side stream it runs beside them instead.

``Overlap.fork(device)`` (or the first ``Overlap.side(device)`` of a step) forks: the side stream waits for the
current stream, so everything launched before (gradients, buffers made by this step) is ready.
``Overlap.join()`` makes the current stream wait for the side stream, so everything after the step (the next
backward, a free of a gradient, a host read) is ordered after the side launches. A CUDA graph capture records
the fork and the join as two branches of the graph. ``FGSGD_CUDA_OVERLAP=0`` runs everything on the current
stream.
"""
from __future__ import annotations

import contextlib
import os

import torch


def enabled() -> bool:
    """Whether steps put their small CUDA launches on a side stream (FGSGD_CUDA_OVERLAP, default on)."""
    return os.environ.get("FGSGD_CUDA_OVERLAP", "1") != "0"


class Overlap:
    """One side stream per device, kept across steps; forked once per step, joined at its end."""

    def __init__(self):
        self._streams: dict = {}
        self._forked: list = []

    def fork(self, device: torch.device):
        """The side stream of ``device``, made to wait for the current stream at its first use in a step (None off
        CUDA or when disabled). A step forks before it launches anything, so that the side stream waits for
        nothing of the step itself."""
        if device.type != "cuda" or not enabled():
            return None
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        if device not in self._forked:
            stream.wait_stream(torch.cuda.current_stream(device))
            self._forked.append(device)
        return stream

    def side(self, device: torch.device):
        """A context that runs launches on ``device``'s side stream, forked (:meth:`fork`) if it was not yet (the
        current stream off CUDA or when disabled)."""
        stream = self.fork(device)
        return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)

    def join(self) -> None:
        """The current stream of every forked device waits for its side stream."""
        for device in self._forked:
            torch.cuda.current_stream(device).wait_stream(self._streams[device])
        self._forked.clear()
