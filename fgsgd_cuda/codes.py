"""Component codes: one small integer per (manifold, retraction) pair.

The same numbering is used by the C++/CUDA header (``csrc/fgsgd/codes.h``), the Triton kernels and
the torch reference, so a per-component ``uint8`` tensor of codes tells every backend what to do.
``manifold id = (code + 1) >> 1`` and ``variant = (code + 1) & 1`` (0: normalize/qr, 1: exp/cayley).
"""
import torch
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


# -- packed codes: 2 bits per component ---------------------------------------------------------------
# A tensor whose components use at most 4 distinct codes stores them as int32 words: word 0 is the palette
# (byte j: the code of 2-bit value j), then 16 components per word, component i in bits 2·(i mod 16) and up of
# word 1 + i // 16. 0.25 B per component instead of 1 (csrc/fgsgd/batched.h code_at reads it in the kernels;
# the Triton and torch backends unpack it).
CODES_PER_WORD = 16


def packed_len(n: int) -> int:
    """int32 words of n packed codes (the palette included)."""
    return 1 + -(-n // CODES_PER_WORD)


def is_packed(codes) -> bool:
    return codes.dtype == torch.int32


def fits(codes, n: int) -> bool:
    """Whether ``codes`` holds the codes of n components: a uint8 (n,) tensor or its packed int32 form."""
    return isinstance(codes, torch.Tensor) and (
        (codes.dtype == torch.uint8 and codes.shape == (n,)) or
        (codes.dtype == torch.int32 and codes.shape == (packed_len(n),)))


def pack(codes):
    """The packed form of a uint8 (N,) tensor of codes, or the tensor itself when it has more than 4 distinct
    codes (or no components)."""
    uniq, vals = torch.unique(codes, return_inverse=True)  # vals: each code's place in the palette
    distinct = uniq.tolist()
    if len(distinct) > 4 or codes.numel() == 0:
        return codes
    palette = distinct + [distinct[0]] * (4 - len(distinct))
    n = codes.numel()
    padded = torch.zeros(packed_len(n) * CODES_PER_WORD - CODES_PER_WORD, dtype=torch.int64, device=codes.device)
    padded[:n] = vals
    shifts = 2 * torch.arange(CODES_PER_WORD, dtype=torch.int64, device=codes.device)
    words = (padded.view(-1, CODES_PER_WORD) << shifts).sum(1)
    head = sum(int(c) << (8 * j) for j, c in enumerate(palette))
    out = torch.cat([torch.tensor([head], dtype=torch.int64, device=codes.device), words])
    return (out - ((out >= 2 ** 31).long() << 32)).to(torch.int32)  # the uint32 words as int32


def unpack(codes, n: int):
    """The uint8 (n,) codes of a packed tensor (a uint8 tensor is returned as it is)."""
    if not is_packed(codes):
        return codes
    w = codes.long() & 0xFFFFFFFF
    palette = torch.stack([(w[0] >> (8 * j)) & 0xFF for j in range(4)])
    shifts = 2 * torch.arange(CODES_PER_WORD, dtype=torch.int64, device=codes.device)
    vals = ((w[1:, None] >> shifts) & 3).reshape(-1)[:n]
    return palette[vals].to(torch.uint8)


def unpacked(codes, params) -> list:
    """The uint8 codes of every tensor of a multi-tensor call (for backends that read one byte per component);
    params are (N, A, B) or (..., A, B)."""
    return [unpack(c, p.shape[:-2].numel()) for c, p in zip(codes, params)]
