"""Builds fgsgd_cuda._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Environment: FGSGD_NO_CUDA=1 never builds the CUDA kernels (no GPU needs to be visible to build
them, only a CUDA build of torch and nvcc), FGSGD_NO_OPENMP=1 builds without -fopenmp (then the CPU
kernels run on one thread), TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0"),
MAX_JOBS limits the parallel compile jobs.
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("FGSGD_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def openmp_flags() -> list[str]:
    """-fopenmp where torch uses OpenMP: at::parallel_for is inline, and without _OPENMP in this
    build it runs every CPU kernel on one thread (libgomp is torch's own, already loaded)."""
    if os.environ.get("FGSGD_NO_OPENMP") == "1":
        return []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def extension():
    # No -march: the build must run on any x86-64 (or other) CPU. The AVX2 and AVX-512 fast paths of the CPU
    # step are compiled for their instruction sets inside csrc/cpu/fast_avx2.cpp and fast_avx512.cpp alone and
    # chosen at run time.
    # -fopenmp-simd: `#pragma omp simd` (the row kernels, csrc/cpu/serial_row.h) vectorises without -fopenmp too
    simd = [] if openmp_flags() or sys.platform == "win32" else ["-fopenmp-simd"]
    # The C++ standard is the one torch's cpp_extension passes (its headers' own: C++20 with torch 2.13, where an
    # explicit -std=c++17 drew warnings from c10's headers); the sources need C++17 or later.
    cxx = ["-O3", "-Wno-unknown-pragmas"] + openmp_flags() + simd
    link = openmp_flags()
    sources = ["csrc/ops.cpp", "csrc/channel_directed_ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include = [os.path.join(HERE, "csrc")]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += ["csrc/ops_cuda.cpp", "csrc/channel_directed_ops_cuda.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "fgsgd_cuda._C", sources, include_dirs=include,
            define_macros=[("FGSGD_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link)
    return CppExtension("fgsgd_cuda._C", sources, include_dirs=include, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
