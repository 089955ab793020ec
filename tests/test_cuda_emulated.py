"""The staged CUDA step kernel's block code (csrc/cuda/staged.cuh, slot_table.cuh) run on the CPU against
the float64 reference: tests/cuda_emu/staged_step_emu.cpp compiles that very device code as C++ with a
stand-in <cuda_runtime.h> (a std::thread per CUDA thread, a barrier for __syncthreads), so the staging
(whole and partial chunks, the 16-byte vector path and the scalar one, unaligned tensors, tables of more
than 36 tensors, empty tensors), the code-sorted variant's permutation, and channels-last filter banks read and
written where they are (also by the one-thread-per-component kernel, batched.h step_at), are checked on machines
without a GPU. The GPU runs the same code
(tests/test_cuda_step.py). Likewise tests/cuda_emu/fibers_emu.cpp runs the channel-directed kernel's code
(csrc/cuda/fibers.cuh: launch tables, block-to-tensor search, a thread per fiber)."""
from __future__ import annotations

import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from conftest import FP32_RTOL, make_gen, make_step_tensors, max_rel_err, rel_err
from fgsgd_cuda import reference as R

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++20 compiler (g++ or clang++)")
TOL = {torch.float32: FP32_RTOL, torch.float64: 1e-12}


def build_emulator(tmp_path_factory, name: str, *flags: str):
    """tests/cuda_emu/<name>.cpp compiled against csrc/ and the emulated cuda_runtime.h; the executable's path."""
    exe = tmp_path_factory.mktemp("emu") / name
    proc = subprocess.run([CXX, "-std=c++20", "-O1", *flags, f"-I{ROOT / 'tests' / 'cuda_emu'}", f"-I{ROOT / 'csrc'}",
                           str(ROOT / "tests" / "cuda_emu" / f"{name}.cpp"), "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory, "staged_step_emu", "-fno-strict-aliasing", "-pthread")


def _fmt(t: torch.Tensor) -> str:
    return " ".join(repr(float(v)) if t.is_floating_point() else str(int(v)) for v in t.reshape(-1).tolist())


def _interleaved(x: torch.Tensor, L: int) -> torch.Tensor:
    """The (N, 3, 3) components of x as a channels-last (N/L, L, 3, 3) weight holds them in memory (L = 0: as they
    are): entry e of component o·L + j at o·9·L + e·L + j (TensorSlot::interleave)."""
    return x if not L else x.reshape(-1, L, 9).transpose(1, 2).reshape(x.shape)


def _from_interleaved(x: torch.Tensor, L: int) -> torch.Tensor:
    """The inverse of _interleaved."""
    return x if not L else x.reshape(-1, 9, L).transpose(1, 2).reshape(x.shape)


def _run(emulator, dtype, hp, tensors, offsets, use_rescale, use_groups, variant="staged", control=None, packed=False,
         interleave=None):
    """The emulator's p and m per tensor; with ``control`` (found_inf, lr_kind, lr_value, stabilize_every, steps,
    grad_scale:
    csrc/fgsgd/step_control.h), also the step counts after the step. ``interleave`` (L per tensor, 0: contiguous):
    p and g go to the kernels as channels-last filters (TensorSlot::interleave), and come back as components."""
    interleave = interleave or [0] * len(tensors)
    c = {**dict(found_inf=-1, lr_kind=0, lr_value=0.0, stabilize_every=0, steps=None, grad_scale=0),
         **(control or {})}
    lines = [str(8 if dtype == torch.float64 else 4),
             " ".join(str(v) for v in (hp["momentum"], hp["dampening"], int(hp["nesterov"]), hp["weight_decay"],
                                       hp["lr"], int(hp["first_step"]), int(hp["stabilize"]), int(use_rescale),
                                       int(use_groups), len(tensors))),
             " ".join(str(v) for v in (c["found_inf"], c["lr_kind"], repr(float(c["lr_value"])), c["stabilize_every"],
                                       int(c["steps"] is not None), repr(float(c["grad_scale"]))))]
    for k, (t, off) in enumerate(zip(tensors, offsets)):
        step = () if c["steps"] is None else (c["steps"][k],)
        lines.append(" ".join(str(v) for v in (t["p"].shape[0], *off, t["gs"].numel(), *step)))
    for t, L in zip(tensors, interleave):
        for key in ("p", "g", "m", "codes") + (("r",) if use_rescale else ()) + (("gi", "gs") if use_groups else ()):
            lines.append(_fmt(_interleaved(t[key], L) if key in ("p", "g") else t[key]))
    env = dict(os.environ, EMU_PACKED="1" if packed else "0", EMU_INTERLEAVE=" ".join(map(str, interleave)))
    proc = subprocess.run([str(emulator), *variant.split()], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    values = torch.tensor([float(v) for v in proc.stdout.split()], dtype=torch.float64)
    out, start = [], 0
    for t, L in zip(tensors, interleave):
        k = t["p"].numel()
        out.append((_from_interleaved(values[start:start + k].view_as(t["p"]), L),
                    values[start + k:start + 2 * k].view_as(t["p"])))
        start += 2 * k
    if c["steps"] is not None:
        steps = values[start:start + len(tensors)].tolist()
        start += len(tensors)
        assert start == values.numel()
        return out, steps
    assert start == values.numel()
    return out


CONFIGS = {
    "momentum": dict(momentum=0.9),
    "first": dict(momentum=0.9, first_step=True),
    "none": dict(momentum=0.0),
    "nesterov-stabilize-wd": dict(momentum=0.5, nesterov=True, stabilize=True, weight_decay=0.05),
    "dampening": dict(momentum=0.9, dampening=0.3),
}
# sizes around the block (128 components): a lone component, a tail, exactly one block, one block + 1
SIZES = [1, 127, 128, 129, 300]
OFFSETS = {"aligned": [(0, 0, 0)] * len(SIZES),               # every tensor at a 64-byte boundary: vectors
           "unaligned": [(1, 0, 3), (0, 2, 0), (3, 3, 3), (0, 0, 1), (2, 1, 0)]}


@pytest.mark.parametrize("variant", ["staged", "sorted"])
@pytest.mark.parametrize("offsets", list(OFFSETS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_staged_step_block(emulator, dtype, config, offsets, variant):
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(CONFIGS[config])
    gen = make_gen(zlib.crc32(repr((dtype, config, offsets)).encode()))
    ts = make_step_tensors(SIZES, (3, 3), dtype, gen)
    use_rescale, use_groups = config != "none", config in ("momentum", "nesterov-stabilize-wd")
    got = _run(emulator, dtype, hp, ts, OFFSETS[offsets], use_rescale, use_groups, variant)
    for k, (t, (p, m)) in enumerate(zip(ts, got)):
        s = t["gs"].double()[t["gi"].long()] if use_groups else None
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None,
                              t["codes"], t["r"].double() if use_rescale else None, s, **hp)
        assert rel_err(p, p_ref) <= TOL[dtype], f"params[{k}] (N={SIZES[k]})"
        if hp["momentum"]:
            assert rel_err(m, m_ref) <= TOL[dtype], f"momentum_buffers[{k}] (N={SIZES[k]})"
        else:
            assert torch.equal(m, t["m"].double())                 # momentum 0: buffers untouched


@pytest.mark.parametrize("layout", ["contiguous", "mixed", "channels-last"])
@pytest.mark.parametrize("variant", ["staged", "sorted"])
def test_more_tensors_than_one_table(emulator, variant, layout):
    """45 tensors (two tables of at most 36), one of them empty, in fp32; contiguous, every other one channels-last
    (by_layout: a table of each layout), or all channels-last (two tables of them)."""
    gen = make_gen(45)
    sizes = [int(s) for s in torch.randint(1, 200, (45,), generator=gen)]
    sizes[17] = 0
    ts = make_step_tensors(sizes, (3, 3), torch.float32, gen)
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, first_step=False,
              stabilize=False)
    cl = [s > 0 and (layout == "channels-last" or (layout == "mixed" and k % 2 == 1)) for k, s in enumerate(sizes)]
    interleave = [(s // 2 if s % 2 == 0 else s) if c else 0 for s, c in zip(sizes, cl)]  # (2, s/2) or (1, s) filters
    got = _run(emulator, torch.float32, hp, ts, [(k % 4, 0, (k * 3) % 4) for k in range(45)], True, False, variant,
               interleave=interleave)
    for k, (t, (p, m)) in enumerate(zip(ts, got)):
        if not sizes[k]:
            assert p.numel() == 0
            continue
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double(), t["codes"], t["r"].double(), None,
                              **hp)
        assert rel_err(p, p_ref) <= FP32_RTOL, f"params[{k}]"
        assert rel_err(m, m_ref) <= FP32_RTOL, f"momentum_buffers[{k}]"


ROW_CONFIGS = {"momentum": dict(momentum=0.9), "none-stabilize": dict(momentum=0.0, stabilize=True),
               "nesterov-first-wd": dict(momentum=0.5, nesterov=True, first_step=True, weight_decay=0.05)}


@pytest.mark.parametrize("n", [65, 300])
@pytest.mark.parametrize("config", list(ROW_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_row_step_block(emulator, dtype, config, n):
    """The CUDA row kernel's block code (csrc/cuda/rows.cuh: 128 threads stride over a row, shared-memory sums):
    n×1 rows (n not a multiple of 128, and shorter than 128 threads × 3 passes), every row code, R and s_g."""
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(ROW_CONFIGS[config])
    gen = make_gen(zlib.crc32(repr(("rows", dtype, config, n)).encode()))
    ts = make_step_tensors([1, 6, 0, 5], (n, 1), dtype, gen)
    for t in ts:
        t["g"] = (t["g"] / n ** 0.5).contiguous()
        t["m"] = (t["m"] / n ** 0.5).contiguous()
    got = _run(emulator, dtype, hp, ts, [(0, 1, 3), (2, 0, 0), (0, 0, 0), (1, 1, 1)], True, True, f"rows {n}")
    for k, (t, (p, m)) in enumerate(zip(ts, got)):
        if not t["p"].shape[0]:
            continue
        s = t["gs"].double()[t["gi"].long()]
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None,
                              t["codes"], t["r"].double(), s, **hp)
        assert rel_err(p, p_ref) <= TOL[dtype], f"params[{k}]"
        if hp["momentum"]:
            assert rel_err(m, m_ref) <= TOL[dtype], f"momentum_buffers[{k}]"
        else:
            assert torch.equal(m, t["m"].double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_row_step_block_far_along_the_point(emulator, dtype):
    """Exp rows near a coordinate axis with gradients far along them (λ·ω + noise): ‖d‖² − ⟨ω,d⟩² cancels, and the
    block code (Acc = T: float sums for fp32) forms d⊥ in double with a second Gram–Schmidt pass (row_step.h):
    every row lands on its sphere (it was 0.05 off in fp32 on the CPU's row kernel)."""
    n, rows = 100, 8
    gen = make_gen(zlib.crc32(repr(("rows-far", str(dtype))).encode()))
    bound = 1e-6 if dtype == torch.float32 else 1e-12
    for lam in ([1e10, 1e20, 1e30] if dtype == torch.float32 else [1e20, 1e100, 1e200]):
        w = 1e-3 * torch.randn(rows, n, 1, generator=gen, dtype=torch.float64)
        w[:, 0] = 1.0
        w = w / w.norm(dim=1, keepdim=True)
        t = dict(p=w.to(dtype), g=(lam * w + torch.randn(rows, n, 1, generator=gen, dtype=torch.float64)).to(dtype),
                 m=torch.zeros(rows, n, 1, dtype=dtype),
                 codes=torch.tensor([2, 4] * (rows // 2), dtype=torch.uint8), gs=torch.ones(1, dtype=dtype))
        hp = dict(lr=0.5, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
                  stabilize=False)
        (p, _), = _run(emulator, dtype, hp, [t], [(0, 0, 0)], False, False, f"rows {n}")
        off = float((p.norm(dim=1) - 1).abs().max())
        assert off <= bound, f"λ = {lam:g}: off the sphere by {off:.3g}"


def _expected(t, hp, use_rescale=True):
    p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None, t["codes"],
                          t["r"].double() if use_rescale else None, None, **hp)
    return p_ref, m_ref


@pytest.mark.parametrize("variant", ["staged", "sorted", "rows 150"])
def test_run_time_controls(emulator, variant):
    """csrc/fgsgd/step_control.h in the CUDA block code: per-tensor step counts decide first_step and stabilize
    (the launch's flags say the opposite, and are ignored), the lr tensor replaces lr, gradients scaled by
    1024 are read unscaled (grad_scale), every count goes up by one; found_inf = 1 leaves every value and
    count as it was."""
    shape = (150, 1) if variant.startswith("rows") else (3, 3)
    gen = make_gen(zlib.crc32(variant.encode()))
    ts = make_step_tensors([129, 5, 40, 1], shape, torch.float32, gen)
    steps = [0, 3, 4, 9]                                    # stabilize_every 5: tensors 2 and 3 re-project
    launch = dict(lr=0.5, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
                  stabilize=True)
    control = dict(found_inf=0, lr_kind=2, lr_value=0.03, stabilize_every=5, steps=steps, grad_scale=1024.0)
    scaled = [dict(t, g=t["g"] * 1024) for t in ts]         # read as g / 1024 (exact: a power of two)
    got, counts = _run(emulator, torch.float32, launch, scaled, [(0, 0, 0)] * 4, True, False, variant, control)
    assert counts == [1, 4, 5, 10]
    for k, (t, (p, m)) in enumerate(zip(ts, got)):
        hp = dict(launch, lr=0.03, first_step=steps[k] == 0, stabilize=(steps[k] + 1) % 5 == 0)
        p_ref, m_ref = _expected(t, hp)
        assert rel_err(p, p_ref) <= FP32_RTOL, f"params[{k}]"
        assert rel_err(m, m_ref) <= FP32_RTOL, f"momentum_buffers[{k}]"
    skipped, counts = _run(emulator, torch.float32, launch, ts, [(0, 0, 0)] * 4, True, False, variant,
                           dict(control, found_inf=1, lr_kind=1))
    assert counts == [float(s) for s in steps]
    for t, (p, m) in zip(ts, skipped):
        assert torch.equal(p, t["p"].double()) and torch.equal(m, t["m"].double())


@pytest.mark.parametrize("variant", ["staged", "sorted", "rows 100"])
def test_packed_codes(emulator, variant):
    """Codes packed 2 bits per component (csrc/fgsgd/batched.h code_at, through the slot table): the block code
    gives the float64 reference's step for tensors of four codes each, sizes around the block."""
    shape = (100, 1) if variant.startswith("rows") else (3, 3)
    gen = make_gen(zlib.crc32(("packed " + variant).encode()))
    sizes = [1, 17, 129, 300] if shape == (3, 3) else [1, 17, 5]
    ts = make_step_tensors(sizes, shape, torch.float64, gen)
    for t in ts:
        keep = torch.unique(t["codes"])[:4]
        t["codes"] = torch.where(torch.isin(t["codes"], keep), t["codes"], keep[0])
        if shape[1] == 1:
            t["g"], t["m"] = t["g"] / 10, t["m"] / 10
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, first_step=False,
              stabilize=True)
    got = _run(emulator, torch.float64, hp, ts, [(0, 0, 0)] * len(ts), True, False, variant, packed=True)
    for k, (t, (p, m)) in enumerate(zip(ts, got)):
        p_ref, m_ref = R.step(t["p"], t["g"], t["m"], t["codes"], t["r"], None, **hp)
        assert rel_err(p, p_ref) <= 1e-12 and rel_err(m, m_ref) <= 1e-12, f"tensor {k}"


@pytest.mark.parametrize("offsets", list(OFFSETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_staged_sqnorm_block(emulator, dtype, offsets):
    """group_clip's ‖ξ_i‖² with staged loads (csrc/cuda/staged.cuh staged_sqnorm_block): every code, R, weight
    decay on the euclidean components, the sizes around the block, aligned and unaligned tensors."""
    gen = make_gen(zlib.crc32(repr(("sqnorm", dtype, offsets)).encode()))
    ts = make_step_tensors(SIZES, (3, 3), dtype, gen, groups=False)
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.05, first_step=False,
              stabilize=False)
    for k, (t, got) in enumerate(zip(ts, _run_sqnorm(emulator, dtype, hp, ts, OFFSETS[offsets]))):
        ref = R.tangent_sqnorm(t["p"].double(), t["g"].double(), t["codes"], t["r"].double(), 0.05)
        assert rel_err(got, ref) <= TOL[dtype], f"tensor {k} (N={SIZES[k]})"


@pytest.mark.parametrize("variant", ["sqnorm", "rowsqnorm 100"])
def test_sqnorm_blocks_beyond_the_float_range(emulator, variant):
    """‖ξ_i‖² of float32 components where it overflows float (‖ξ_i‖ up to 1e36): the staged block's per-thread sum
    redone in double (csrc/fgsgd/step.h tangent_sqnorm), the row block's float sums redone scaled
    (row_step.h row_tangent_sqnorm; the CPU's rows sum in double, so only this block code takes that path),
    ordinary components beside huge ones, each to float precision against the float64 reference."""
    shape = (100, 1) if variant.startswith("row") else (3, 3)
    gen = make_gen(zlib.crc32(("huge " + variant).encode()))
    ts = make_step_tensors([129, 7] if shape == (3, 3) else [5, 4], shape, torch.float32, gen, groups=False)
    for k, t in enumerate(ts):
        g = t["g"].double()
        g[1::2] *= (1e15, 1e25, 1e36)[k % 3] if shape == (3, 3) else 1e25
        t["g"] = g.float()
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.05, first_step=False,
              stabilize=False)
    for k, (t, got) in enumerate(zip(ts, _run_sqnorm(emulator, torch.float32, hp, ts, [(0, 0, 0)] * 2, variant))):
        ref = R.tangent_sqnorm(t["p"].double(), t["g"].double(), t["codes"], t["r"].double(), 0.05)
        assert bool(torch.isfinite(got).all()), f"tensor {k}: ‖ξ_i‖² not finite"
        err = max_rel_err(got, ref)
        assert err <= FP32_RTOL, f"tensor {k}: relative error {err:.3g}"


def _run_sqnorm(emulator, dtype, hp, tensors, offsets, variant="sqnorm", interleave=None):
    """The emulator's ‖ξ_i‖² per tensor (mode "sqnorm", "threadsqnorm" or "rowsqnorm L"; the inputs as _run writes
    them, ``interleave`` too)."""
    interleave = interleave or [0] * len(tensors)
    lines = [str(8 if dtype == torch.float64 else 4),
             " ".join(str(v) for v in (hp["momentum"], hp["dampening"], int(hp["nesterov"]), hp["weight_decay"],
                                       hp["lr"], 0, 0, 1, 0, len(tensors))),
             "-1 0 0.0 0 0 0.0"]
    for t, off in zip(tensors, offsets):
        lines.append(" ".join(str(v) for v in (t["p"].shape[0], *off, 0)))
    for t, L in zip(tensors, interleave):
        for key in ("p", "g", "m", "codes", "r"):
            lines.append(_fmt(_interleaved(t[key], L) if key in ("p", "g") else t[key]))
    proc = subprocess.run([str(emulator), *variant.split()], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, EMU_INTERLEAVE=" ".join(map(str, interleave))))
    assert proc.returncode == 0, proc.stderr
    values = torch.tensor([float(v) for v in proc.stdout.split()], dtype=torch.float64)
    out, start = [], 0
    for t in tensors:
        out.append(values[start:start + t["p"].shape[0]])
        start += t["p"].shape[0]
    assert start == values.numel()
    return out


# Channels-last filter banks (O, L) of one call: blocks of 128 components that cross output channels (L = 37, 3, 129),
# L = 64 (two channels a block), L = 300 (channels across blocks), a lone filter; one contiguous tensor beside them
CHANNELS_LAST = [(3, 37), (43, 3), (2, 64), (2, 129), (1, 300), (1, 1)]


@pytest.mark.parametrize("variant", ["staged", "sorted", "thread"])
@pytest.mark.parametrize("offsets", ["aligned", "unaligned"])
@pytest.mark.parametrize("config", ["momentum", "first", "none", "nesterov-stabilize-wd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_channels_last_filters(emulator, dtype, config, offsets, variant):
    """Channels-last 3×3 filter banks stepped where they are (TensorSlot::interleave: staged.cuh gather_in /
    scatter_out, batched.h entries_of for one thread per component): the float64 reference's step, and bit for bit
    the step of the same components laid out contiguous (the same math on the same values); packed codes on every
    other call; nothing written outside the tensors (the emulator's sentinels)."""
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False,
              stabilize=False)
    hp.update(CONFIGS[config])
    gen = make_gen(zlib.crc32(repr(("channels-last", dtype, config, offsets, variant)).encode()))
    sizes = [o * i for o, i in CHANNELS_LAST] + [50]
    ts = make_step_tensors(sizes, (3, 3), dtype, gen)
    packed = list(CONFIGS).index(config) % 2 == 1
    if packed:  # at most four codes per tensor
        for t in ts:
            keep = torch.unique(t["codes"])[:4]
            t["codes"] = torch.where(torch.isin(t["codes"], keep), t["codes"], keep[0])
    interleave = [i for _, i in CHANNELS_LAST] + [0]
    offs = [(k % 3, (2 * k) % 3, k % 2) if offsets == "unaligned" else (0, 0, 0) for k in range(len(ts))]
    use_rescale, use_groups = config != "none", config in ("momentum", "nesterov-stabilize-wd")
    got = _run(emulator, dtype, hp, ts, offs, use_rescale, use_groups, variant, packed=packed, interleave=interleave)
    flat = _run(emulator, dtype, hp, ts, offs, use_rescale, use_groups, variant, packed=packed)
    for k, (t, (p, m), (p_flat, m_flat)) in enumerate(zip(ts, got, flat)):
        what = f"tensor {k} (L={interleave[k]}, N={sizes[k]})"
        s = t["gs"].double()[t["gi"].long()] if use_groups else None
        p_ref, m_ref = R.step(t["p"].double(), t["g"].double(), t["m"].double() if hp["momentum"] else None,
                              t["codes"], t["r"].double() if use_rescale else None, s, **hp)
        assert rel_err(p, p_ref) <= TOL[dtype], what
        assert torch.equal(p, p_flat) and torch.equal(m, m_flat), f"{what}: differs from the contiguous layout"
        if hp["momentum"]:
            assert rel_err(m, m_ref) <= TOL[dtype], what
        else:
            assert torch.equal(m, t["m"].double())


@pytest.mark.parametrize("variant", ["sqnorm", "threadsqnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_channels_last_sqnorm(emulator, dtype, variant):
    """‖ξ_i‖² of channels-last 3×3 filter banks read where they are: the float64 reference's, and bit for bit the
    contiguous layout's."""
    gen = make_gen(zlib.crc32(repr(("channels-last sqnorm", dtype, variant)).encode()))
    sizes = [o * i for o, i in CHANNELS_LAST] + [50]
    ts = make_step_tensors(sizes, (3, 3), dtype, gen, groups=False)
    interleave = [i for _, i in CHANNELS_LAST] + [0]
    hp = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.05, first_step=False,
              stabilize=False)
    offs = [(k % 3, k % 2, 0) for k in range(len(ts))]
    got = _run_sqnorm(emulator, dtype, hp, ts, offs, variant, interleave)
    flat = _run_sqnorm(emulator, dtype, hp, ts, offs, variant)
    for k, (t, sq, sq_flat) in enumerate(zip(ts, got, flat)):
        ref = R.tangent_sqnorm(t["p"].double(), t["g"].double(), t["codes"], t["r"].double(), 0.05)
        assert rel_err(sq, ref) <= TOL[dtype], f"tensor {k} (L={interleave[k]})"
        assert torch.equal(sq, sq_flat), f"tensor {k} (L={interleave[k]}): differs from the contiguous layout"


@pytest.fixture(scope="module")
def fibers_emulator(tmp_path_factory):
    """tests/cuda_emu/fibers_emu.cpp: the CUDA channel-directed kernel's code (csrc/cuda/fibers.cuh) on the CPU."""
    return build_emulator(tmp_path_factory, "fibers_emu")


# (outer, L, C) of the tensors of one call: fibers of length 1, 2 and 300; 128 fibers (one block), 129 (a
# block + 1), 1 fiber; outer > 1 (fibers along dim 1); 40 tensors (two tables of at most 32), one of them empty
FIBER_CALLS = {
    "shapes": [(1, 16, 72), (1, 1, 45), (1, 2, 27), (1, 300, 6), (1, 5, 128), (1, 7, 129), (1, 9, 1), (4, 9, 9)],
    "two-tables": [(1, 3 + k % 7, 11 * k % 37) for k in range(40)],
}


@pytest.mark.parametrize("call", list(FIBER_CALLS))
@pytest.mark.parametrize("metric,lam", [("sobolev", 1.5), ("sobolev", 400.0), ("reweighted", 3.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_channel_directed_kernel(fibers_emulator, dtype, metric, lam, call):
    """Every fiber of every tensor against the float64 dense solve (fgsgd_cuda.reference.channel_directed), nothing
    written outside the tensors."""
    shapes = FIBER_CALLS[call]
    gen = make_gen(zlib.crc32(repr((call, metric, lam, str(dtype))).encode()))
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    lines = [str(8 if dtype == torch.float64 else 4), f"{int(metric == 'sobolev')} {lam!r} {len(shapes)}",
             " ".join(str(v) for s in shapes for v in s)] + [_fmt(g) for g in grads if g.numel()]
    proc = subprocess.run([str(fibers_emulator)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    values = torch.tensor([float(v) for v in proc.stdout.split()], dtype=torch.float64)
    start = 0
    for k, g in enumerate(grads):
        got = values[start:start + g.numel()].view(g.shape)
        start += g.numel()
        if g.numel():
            ref = R.channel_directed(g.double(), metric, lam, dim=1)
            # the recursions round as 1/(1 − r) ≈ √λ: 20 at λ = 400
            assert rel_err(got, ref) <= TOL[dtype] * max(1.0, lam ** 0.5), f"tensor {k} {tuple(g.shape)}"
    assert start == values.numel()
