"""Component codes: one small integer per (manifold, retraction) pair.

The same numbering is used by the C++/CUDA header (``csrc/fgsgd/codes.h``), the Triton kernels and
the torch reference, so a per-component ``uint8`` tensor of codes tells every backend what to do.
``manifold id = (code + 1) >> 1`` and ``variant = (code + 1) & 1`` (0: normalize/qr, 1: exp/cayley).
"""
EUCLIDEAN = 0
SPHERE_NORMALIZE = 1
SPHERE_EXP = 2
OBLIQUE_NORMALIZE = 3
OBLIQUE_EXP = 4
STIEFEL_QR = 5
STIEFEL_CAYLEY = 6

MANIFOLDS = ("euclidean", "sphere", "oblique", "stiefel")
RETRACTIONS = {
    "euclidean": ("add",),
    "sphere": ("normalize", "exp"),
    "oblique": ("normalize", "exp"),
    "stiefel": ("qr", "cayley"),
}
DEFAULT_RETRACTION = {"euclidean": "add", "sphere": "normalize", "oblique": "normalize", "stiefel": "qr"}
ALL_CODES = tuple(range(7))


def code_of(manifold: str, retraction: str | None = None) -> int:
    """Code of ``manifold`` with ``retraction`` (its default when None)."""
    if manifold not in RETRACTIONS:
        raise ValueError(f"manifold: unknown manifold {manifold!r}; expected one of {MANIFOLDS}")
    retraction = DEFAULT_RETRACTION[manifold] if retraction is None else retraction
    choices = RETRACTIONS[manifold]
    if retraction not in choices:
        raise ValueError(
            f"retraction: {retraction!r} is not a retraction of the {manifold} manifold; expected one of {choices}")
    if manifold == "euclidean":
        return EUCLIDEAN
    return 2 * MANIFOLDS.index(manifold) - 1 + choices.index(retraction)


def manifold_of(code: int) -> str:
    return MANIFOLDS[(int(code) + 1) >> 1]


def retraction_of(code: int) -> str:
    name = manifold_of(code)
    return RETRACTIONS[name][(int(code) + 1) & 1] if name != "euclidean" else "add"
