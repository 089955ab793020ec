"""Backends: objects with the same methods (see :class:`fgsgd_cuda.backends.torch_ref.TorchBackend`)
that run the FG-SGD ops on (N, A, B) components (the multi-tensor ops: lists of (N, A, B) or (..., A, B)
tensors). ``fgsgd_cuda.dispatch`` picks one."""


def as_components(tensors) -> list:
    """(N, A, B) views of the (..., A, B) tensors of a multi-tensor op, for backends whose code indexes
    components by the first dimension; (N, A, B) tensors as they are."""
    return [t if t.dim() == 3 else t.view(-1, t.shape[-2], t.shape[-1]) for t in tensors]
