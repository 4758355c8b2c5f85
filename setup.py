"""Builds fastreg._C, the C++ (and, where possible, CUDA) kernels.

CUDA sources are compiled when torch is a CUDA build and an nvcc of the same CUDA major
version is found (CUDA_HOME); whether a GPU is visible does not matter. Knobs:
FASTREG_CPU_ONLY=1 skips CUDA, TORCH_CUDA_ARCH_LIST picks the GPU architectures and
MAX_JOBS the parallel compile jobs (both read by torch.utils.cpp_extension).
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")  # includes are written from here: "device/philox.h"


def log(message):
    print(f"fastreg setup: {message}", file=sys.stderr, flush=True)


def nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        output = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_build_decision():
    """(build CUDA?, reason)"""
    if os.environ.get("FASTREG_CPU_ONLY", "0") == "1":
        return False, "FASTREG_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    found = nvcc_version(cuda_home)
    if found is None:
        return False, f"no working nvcc under CUDA_HOME={cuda_home}"
    torch_major = int(torch.version.cuda.split(".")[0])
    if found[0] != torch_major:
        return False, (f"nvcc {found[0]}.{found[1]} in {cuda_home} does not match the CUDA "
                       f"{torch.version.cuda} that torch was built with")
    return True, f"nvcc {found[0]}.{found[1]} in {cuda_home}, torch CUDA {torch.version.cuda}"


def wheel_cuda_includes():
    """CUDA headers shipped in the nvidia-* wheels (cuBLAS, cuSPARSE, ...), when present."""
    import site

    folders = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        folders += glob.glob(os.path.join(base, "nvidia", "cu[0-9]*", "include"))
    return folders


def extension():
    with_cuda, reason = cuda_build_decision()
    log(("building CUDA kernels: " if with_cuda else "building CPU kernels only: ") + reason)
    sources = sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    defines = [f"-DFASTREG_BUILT_WITH_TORCH={torch.__version__}"]  # stringified in module.cpp
    # The C++ standard is torch.utils.cpp_extension's choice. -fopenmp makes
    # at::parallel_for parallel (without it the header falls back to a serial loop); the
    # OpenMP runtime is the libgomp.so.1 that libtorch_cpu has already loaded.
    cxx_flags = ["-O3", "-fopenmp"] + defines
    link_flags = ["-fopenmp"]
    # No a * b + c contracted into fma (g++ does it in C++ on targets with fma, such as
    # aarch64 or -march=native): the penalty's gradients are promised bit-exact.
    cxx_flags.append("-ffp-contract=off")
    if not with_cuda:
        return cpp_extension.CppExtension(
            "fastreg._C", sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # No --use_fast_math: the kernels' results are promised bit-exact.
    nvcc_flags = ["-O3", "-lineinfo", "-DFASTREG_WITH_CUDA"] + defines
    return cpp_extension.CUDAExtension(
        "fastreg._C", sources,
        include_dirs=[CSRC] + wheel_cuda_includes(),
        extra_link_args=link_flags,
        extra_compile_args={"cxx": cxx_flags + ["-DFASTREG_WITH_CUDA"], "nvcc": nvcc_flags})


setup(
    name="fastreg",
    version="0.1.0",
    description="Fused dropout and L1/L2 penalties for PyTorch, in C++ and CUDA",
    packages=find_packages(include=["fastreg", "fastreg.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["fastreg=fastreg.__main__:main"]},
)
