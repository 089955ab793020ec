"""Codes packed 2 bits per component (fgsgd_cuda/codes.py pack / unpack; csrc/fgsgd/batched.h code_at; the CPU
fast path's chunk decoder): every op of every backend gives the same bits with the packed codes as with one
byte per component, for every shape, including ranges that start inside a packed byte."""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import SHORT_ROW, backends_on, make_gen, make_row_tensors, make_step_tensors
from fgsgd_cuda import codes as C
from fgsgd_cuda import dispatch, ops


BACKENDS = backends_on((("cpu", "cpu"), ("torch", "cpu"), ("triton", "cpu"), ("cuda", "cuda")))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1000])
@pytest.mark.parametrize("palette", [[1], [1, 3, 5], [0, 1, 3, 5], [6, 2]], ids=["one", "three", "four", "two"])
def test_pack_round_trip(n, palette):
    gen = make_gen(n + 7 * len(palette))
    codes = torch.tensor(palette, dtype=torch.uint8)[torch.randint(len(palette), (n,), generator=gen)]
    packed = C.pack(codes)
    if n == 0:
        assert packed is codes
        return
    assert packed.dtype == torch.int32 and packed.shape == (C.packed_len(n),)
    assert torch.equal(C.unpack(packed, n), codes)


def test_five_codes_stay_bytes():
    codes = torch.arange(5, dtype=torch.uint8).repeat(4)
    assert C.pack(codes) is codes and C.unpack(codes, 20) is codes


def _pair(ts):
    """(byte codes, packed codes) of the tensors, the packed ones made from at most 4 codes per tensor."""
    out = []
    for t in ts:
        c = t["codes"]
        keep = torch.unique(c)[:4]
        c = torch.where(torch.isin(c, keep), c, keep[0]).contiguous()
        t["codes"] = c
        out.append(C.pack(c))
    return out


@pytest.mark.parametrize("shape", [(3, 3), (2, 3), (5, 5), (100, 1), SHORT_ROW],
                         ids=["3x3", "2x3", "5x5", "row100", "row16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_packed_codes_give_the_same_bits(backend, device, dtype, shape):
    gen = make_gen(zlib.crc32(repr((backend, dtype, shape)).encode()))
    sizes = [3, 1237, 40, 17]
    ts = (make_row_tensors(sizes, shape[0], dtype, gen) if shape[1] == 1 and shape[0] > 64
          else make_step_tensors(sizes, shape, dtype, gen))
    ts = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in ts]
    packed = [p.to(device) for p in _pair(ts)]
    assert all(p.dtype == torch.int32 for p in packed)
    byte = [t["codes"] for t in ts]
    hp = dict(lr=0.1, momentum=0.9, nesterov=True, stabilize=True)
    runs = []
    for codes in (byte, packed):
        ps, ms = [t["p"].clone() for t in ts], [t["m"].clone() for t in ts]
        gs, r = [t["g"] for t in ts], [t["r"] for t in ts]
        sq = ops.tangent_sqnorm(ps, gs, codes, rescale=r, backend=backend)
        ops.step_(ps, gs, ms, codes, rescale=r, backend=backend, **hp)
        if shape[1] != 1 or shape[0] <= 64:
            ops.projx_(ps, codes, rescale=r, backend=backend)
        runs.append((sq, ps, ms))
    (sq0, p0, m0), (sq1, p1, m1) = runs
    assert torch.equal(sq0, sq1)
    for k in range(len(ts)):
        assert torch.equal(p0[k], p1[k]) and torch.equal(m0[k], m1[k]), f"tensor {k}"


@pytest.mark.skipif(not dispatch.available("cpu", torch.device("cpu")), reason="needs the compiled extension")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "base", "scalar"])
def test_cpu_fast_path_ranges_inside_packed_bytes(isa):
    """The CPU fast path splits a tensor into ranges at any component (threads), and decodes packed codes 4096
    at a time: 9000 components whose codes change every 1 to 40 components, stepped in one call with two
    threads, against the byte codes; every instruction set this CPU runs."""
    from fgsgd_cuda import _C
    old = _C._cpu_isa()
    if not _C._set_cpu_isa(isa):
        pytest.skip(f"{isa} is not available here")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gen = make_gen(9000)
        t = make_step_tensors([9001], (3, 3), torch.float32, gen, groups=False)[0]
        runs = torch.randint(1, 41, (9001,), generator=gen)
        kinds = torch.tensor([1, 3, 5, 0], dtype=torch.uint8)
        t["codes"] = kinds[torch.arange(9001).repeat_interleave(runs)[:9001] % 4].contiguous()
        out = []
        for codes in (t["codes"], C.pack(t["codes"])):
            p, m = t["p"].clone(), t["m"].clone()
            ops.step_([p], [t["g"]], [m], [codes], rescale=[t["r"]], lr=0.05, momentum=0.9, backend="cpu")
            out.append((p, m))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    finally:
        _C._set_cpu_isa(old)
        torch.set_num_threads(threads)


def test_bad_packed_codes_are_refused_by_name():
    p = torch.randn(20, 3, 3)
    with pytest.raises(ValueError, match=r"codes\[0\]: expected a uint8 tensor of shape \(20,\) or its packed int32"):
        ops.step_([p], [p.clone()], [], [torch.zeros(2, dtype=torch.int32)], lr=0.1, backend="torch")
    if dispatch.available("cpu", torch.device("cpu")):
        with pytest.raises(RuntimeError, match=r"codes\[0\] \(packed: int32\) must have shape \(3,\)"):
            torch.ops.fgsgd.step_([p], [p.clone()], [], [torch.zeros(2, dtype=torch.int32)], [], [], [], 0.1, 0.0,
                                  0.0, False, 0.0, False, False)
