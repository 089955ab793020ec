"""Backends: objects with the same methods (see :class:`fgsgd_cuda.backends.torch_ref.TorchBackend`)
that run the FG-SGD ops on (N, A, B) components (the multi-tensor ops: lists of (N, A, B) or (..., A, B)
tensors). ``fgsgd_cuda.dispatch`` picks one."""


from .. import checks


def as_components(tensors, interleaved: bool = False) -> list:
    """(N, A, B) views of the (..., A, B) tensors of a multi-tensor op, for backends whose code indexes
    components by the first dimension; (N, A, B) tensors as they are, and with ``interleaved`` channels-last conv
    weights too (which have no such view: kernels that read their filters where they are take them whole)."""
    return [t if t.dim() == 3 or (interleaved and checks.is_interleaved(t)) else t.view(-1, t.shape[-2], t.shape[-1])
            for t in tensors]
