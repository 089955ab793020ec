"""fgsgd_cuda: Fine-grained SGD (FG-SGD) on products of weight manifolds, with fused kernels.

See README.md and DESIGN.md §1 for the method. The pure-torch reference of every operator lives
in :mod:`fgsgd_cuda.manifolds` and :mod:`fgsgd_cuda.reference`; :mod:`fgsgd_cuda.ops` runs them on
the compiled CPU/CUDA kernels, Triton or torch (:mod:`fgsgd_cuda.dispatch`).
"""
from . import _ext
from . import codes, manifolds, reference, dispatch, ops
from .manifolds import Euclidean, Oblique, Sphere, Stiefel, manifold
from .grouping import Grouping, make_grouping
from .optimizer import FGSGD
from .param_groups import param_groups
from .renorm import Renormalizer
from .channel_directed import channel_directed_, conv_weights
from .zero_sync import sync_zero_weights

if _ext.HAS_CPU_KERNELS:
    from . import _fake

    _fake.register()

__version__ = "0.1.0"

__all__ = ["FGSGD", "param_groups", "Renormalizer", "channel_directed_", "conv_weights", "sync_zero_weights", "Grouping", "make_grouping", "codes", "manifolds", "reference", "dispatch", "ops", "manifold", "Sphere", "Oblique", "Stiefel",
           "Euclidean"]
