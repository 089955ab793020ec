"""Backends: objects with the same methods (see :class:`fgsgd_cuda.backends.torch_ref.TorchBackend`)
that run the FG-SGD ops on lists of (N, A, B) components. ``fgsgd_cuda.dispatch`` picks one."""
