"""The CUDA sources compile with the local nvcc, with no GPU and no torch headers (DESIGN.md §2:
csrc/cuda is plain CUDA C++), and the shared header math of csrc/fgsgd is __host__ __device__ clean; the
torch-facing csrc/ops_cuda.cpp and csrc/channel_directed_ops_cuda.cpp pass the host compiler against torch's CUDA
headers."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (not on PATH, nor in CUDA_HOME/CUDA_PATH or "
                                                     "/usr/local/cuda): cannot test that the CUDA sources compile")

# Host/device mix-ups are warnings by default for __host__ __device__ code; make them errors.
FLAGS = ["-std=c++17", "-arch=sm_90", "-O3", "-I", str(CSRC), "--Werror", "cross-execution-space-call"]

# Every operator of the header, called from __global__ kernels, for float and double and both shape
# policies (Fixed<3,3>: the unrolled path; Dyn: run-time A, B).
HEADER_PROBE = r"""
#include "fgsgd/batched.h"

template <class S, class T>
__global__ void step_probe(S s, fgsgd::TensorSlot<T> t, fgsgd::StepHParams<T> h) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= t.n) return;
  T p[S::kCap], g[S::kCap], m[S::kCap];
  const int64_t off = i * s.size();
  for (int k = 0; k < s.size(); ++k) { p[k] = t.p[off + k]; g[k] = t.g[off + k]; m[k] = t.m[off + k]; }
  fgsgd::component_step(s, int(t.codes[i]), p, g, m, fgsgd::rescale_at(t, i), fgsgd::step_scale_at(t, i), h);
  for (int k = 0; k < s.size(); ++k) { t.p[off + k] = p[k]; t.m[off + k] = m[k]; }
}

template <class S, class T>
__global__ void everything_probe(S s, fgsgd::UnaryArgs<T> a, fgsgd::TensorSlot<T> t, fgsgd::StepHParams<T> h, T wd) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= a.n) return;
  fgsgd::proj_at(s, a, i);
  fgsgd::retr_at(s, a, i);
  fgsgd::projx_at(s, a, i);
  fgsgd::norms_at(s, a, i);
  fgsgd::step_at(s, t, h, i);
  fgsgd::sqnorm_at(s, t, wd, i);
  fgsgd::projx_slot_at(s, t, i);
  fgsgd::rescale_slot_at(s, t, i);
}

template __global__ void step_probe<fgsgd::Fixed<3, 3>, float>(fgsgd::Fixed<3, 3>, fgsgd::TensorSlot<float>,
                                                               fgsgd::StepHParams<float>);
template __global__ void step_probe<fgsgd::Fixed<3, 3>, double>(fgsgd::Fixed<3, 3>, fgsgd::TensorSlot<double>,
                                                                fgsgd::StepHParams<double>);
template __global__ void step_probe<fgsgd::Dyn, float>(fgsgd::Dyn, fgsgd::TensorSlot<float>, fgsgd::StepHParams<float>);
template __global__ void step_probe<fgsgd::Dyn, double>(fgsgd::Dyn, fgsgd::TensorSlot<double>,
                                                        fgsgd::StepHParams<double>);
template __global__ void everything_probe<fgsgd::Fixed<3, 3>, float>(fgsgd::Fixed<3, 3>, fgsgd::UnaryArgs<float>,
                                                                     fgsgd::TensorSlot<float>,
                                                                     fgsgd::StepHParams<float>, float);
template __global__ void everything_probe<fgsgd::Dyn, double>(fgsgd::Dyn, fgsgd::UnaryArgs<double>,
                                                              fgsgd::TensorSlot<double>, fgsgd::StepHParams<double>,
                                                              double);

// The same functions are callable on the host (the CPU build relies on it).
double host_side() {
  double p[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1}, g[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, m[9] = {0};
  fgsgd::StepHParams<double> h{0.1, 0.9, 0.0, 0.0, false, true, false};
  fgsgd::component_step(fgsgd::Fixed<3, 3>{}, int(fgsgd::kStiefelCayley), p, g, m, 1.0, 1.0, h);
  return p[0];
}
"""

# A negative control: with the flags above, a __host__ __device__ function calling a __host__-only one
# must not compile, so a passing header probe means something.
BAD_PROBE = r"""
__host__ int host_only(int x) { return x + 1; }
template <class T> __host__ __device__ T both(T x) { return T(host_only(int(x))); }
__global__ void k(float* out) { out[0] = both(out[0]); }
"""


def _compile(src: Path, out: Path, extra=()) -> subprocess.Popen:
    return subprocess.Popen([NVCC, *FLAGS, *extra, "-c", str(src), "-o", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs the four compiles at once (about 20 s together) and returns {name: (returncode, output, object)}."""
    tmp = tmp_path_factory.mktemp("nvcc")
    (tmp / "probe.cu").write_text(HEADER_PROBE)
    (tmp / "bad.cu").write_text(BAD_PROBE)
    jobs = {
        "kernels": (_compile(CSRC / "cuda" / "kernels.cu", tmp / "kernels.o"), tmp / "kernels.o"),
        "fibers": (_compile(CSRC / "cuda" / "channel_directed.cu", tmp / "fibers.o"), tmp / "fibers.o"),
        "probe": (_compile(tmp / "probe.cu", tmp / "probe.o"), tmp / "probe.o"),
        "bad": (_compile(tmp / "bad.cu", tmp / "bad.o"), tmp / "bad.o"),
    }
    out = {}
    for name, (proc, obj) in jobs.items():
        try:
            text, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
            text = "timed out\n" + text
        out[name] = (proc.returncode, text, obj)
    return out


def test_cuda_kernels_compile(compiled):
    """nvcc -c -std=c++17 -arch=sm_90 -O3 -I csrc csrc/cuda/kernels.cu"""
    rc, text, obj = compiled["kernels"]
    assert rc == 0, f"nvcc failed on csrc/cuda/kernels.cu:\n{text}"
    assert obj.is_file() and obj.stat().st_size > 0


def test_channel_directed_kernel_compiles(compiled):
    """nvcc -c -std=c++17 -arch=sm_90 -O3 -I csrc csrc/cuda/channel_directed.cu (csrc/fgsgd/channel_directed.h in
    __global__ code)"""
    rc, text, obj = compiled["fibers"]
    assert rc == 0, f"nvcc failed on csrc/cuda/channel_directed.cu:\n{text}"
    assert obj.is_file() and obj.stat().st_size > 0


def test_header_is_host_device_clean(compiled):
    rc, text, obj = compiled["probe"]
    assert rc == 0, f"csrc/fgsgd/batched.h does not compile in __global__ code:\n{text}"
    assert obj.is_file() and obj.stat().st_size > 0


def test_negative_control_fails(compiled):
    rc, text, _ = compiled["bad"]
    assert rc != 0, "a __host__ call from __host__ __device__ code compiled: the probe above proves nothing"
    assert "host_only" in text


def test_kernels_do_not_include_torch():
    """DESIGN.md §2: csrc/cuda is plain CUDA C++ (raw pointers and cudaStream_t), no torch headers."""
    for path in sorted((CSRC / "cuda").iterdir()) + sorted((CSRC / "fgsgd").iterdir()):
        text = path.read_text()
        for bad in ("<torch/", "<ATen/", "<c10/"):
            assert bad not in text, f"{path.relative_to(ROOT)} includes {bad}"


def _torch_cuda_compile_command(tmp: Path, source: str) -> list[str] | None:
    """g++ -fsyntax-only of csrc/ops_cuda.cpp (the torch-facing code of the CUDA build: op_impl.h over
    csrc/cuda) against the installed torch's headers and the CUDA toolkit's, or None where they are missing. A
    CPU-only torch wheel ships c10/cuda but not the header its CMake generates (cuda_cmake_macros.h): a stand-in."""
    import sysconfig

    import torch.utils.cpp_extension as ext
    cxx = shutil.which("g++") or shutil.which("c++")
    includes = ext.include_paths()
    homes = [Path(NVCC).resolve().parent.parent, *(Path(h) for h in (os.environ.get("CUDA_HOME"),
                                                                    os.environ.get("CUDA_PATH")) if h),
             Path("/usr/local/cuda")]
    cuda_include = next((h / "include" for h in homes if (h / "include" / "cuda_runtime.h").is_file()), None)
    if cxx is None or cuda_include is None or \
            not any((Path(d) / "c10" / "cuda" / "CUDAStream.h").is_file() for d in includes):
        return None
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for d in includes):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    flags = [f"-I{d}" for d in [str(CSRC), *includes, str(tmp / "stub"), str(cuda_include),
                                sysconfig.get_paths()["include"]]]
    return [cxx, "-std=c++20", "-fsyntax-only", "-DFGSGD_WITH_CUDA", *flags, str(CSRC / source)]


@pytest.mark.parametrize("source", ["ops_cuda.cpp", "channel_directed_ops_cuda.cpp"])
def test_torch_facing_cuda_code_compiles(tmp_path, source):
    """csrc/ops_cuda.cpp and csrc/channel_directed_ops_cuda.cpp, compiled in the GPU build by the host compiler
    against torch's CUDA headers: checked here for syntax and types (no GPU, no CUDA build of torch), so that a
    change of op_impl.h or channel_directed_impl.h cannot break them unseen."""
    cmd = _torch_cuda_compile_command(tmp_path, source)
    if cmd is None:
        pytest.skip("needs g++, the CUDA toolkit's headers and torch's c10/cuda headers")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, f"csrc/{source} does not compile:\n{proc.stdout}{proc.stderr}"
