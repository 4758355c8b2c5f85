"""Builds fastreg: the package and, when torch is importable, fastreg._C, its C++ (and,
where possible, CUDA) kernels.

What is compiled, and with which flags, is defined in fastreg/_build.py (loaded here by
path), which `python -m fastreg build` uses too. Two cases:

* torch importable (`pip install --no-build-isolation .`, `setup.py build_ext --inplace`):
  fastreg._C is built here. CUDA sources are compiled when torch is a CUDA build and an
  nvcc of the same CUDA major version is found (CUDA_HOME); whether a GPU is visible does
  not matter. Knobs: FASTREG_CPU_ONLY=1 skips CUDA, TORCH_CUDA_ARCH_LIST picks the GPU
  architectures and MAX_JOBS the parallel compile jobs (both read by
  torch.utils.cpp_extension).
* torch not importable (plain `pip install .` or `pip install git+...`: pip's build
  isolation hides the installed torch): a pure-Python wheel that carries the sources as
  fastreg/csrc, to be compiled against the torch found at run time with
  `python -m fastreg build` (until then fastreg runs its pure-PyTorch reference).
"""

import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def log(message):
    print(f"fastreg setup: {message}", file=sys.stderr, flush=True)


def load_build_module():
    spec = importlib.util.spec_from_file_location(
        "fastreg_build", os.path.join(ROOT, "fastreg", "_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the package as fastreg/csrc (C++/CUDA sources only), so that
    an installed fastreg can compile its kernels (fastreg/_build.py). Editable installs
    read the checkout's csrc/ instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "fastreg", "csrc")
        for folder, _, files in os.walk(CSRC):
            for name in sorted(files):
                if name.endswith((".h", ".cuh", ".cpp", ".cu")):
                    source = os.path.join(folder, name)
                    destination = os.path.join(target, os.path.relpath(source, CSRC))
                    os.makedirs(os.path.dirname(destination), exist_ok=True)
                    shutil.copyfile(source, destination)


def extensions():
    try:
        import torch  # noqa: F401
    except ImportError:
        log(
            "torch is not importable here (pip's build isolation hides it), so no kernels "
            "are compiled now: the package carries their sources; after installing, run "
            "`python -m fastreg build` (or install with `pip install --no-build-isolation .`)"
        )
        return [], {}
    from torch.utils import cpp_extension

    spec = load_build_module().spec(root=ROOT)
    log(
        ("building CUDA kernels: " if spec["with_cuda"] else "building CPU kernels only: ")
        + spec["reason"]
    )
    if not spec["with_cuda"]:
        ext = cpp_extension.CppExtension(
            "fastreg._C",
            spec["sources"],
            include_dirs=spec["include_dirs"],
            extra_compile_args={"cxx": spec["cxx"]},
            extra_link_args=spec["link"],
        )
    else:
        ext = cpp_extension.CUDAExtension(
            "fastreg._C",
            spec["sources"],
            include_dirs=spec["include_dirs"],
            extra_compile_args={"cxx": spec["cxx"], "nvcc": spec["nvcc"]},
            extra_link_args=spec["link"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="fastreg",
    version="0.1.0",
    description="Fused dropout and L1/L2 penalties for PyTorch, in C++ and CUDA",
    packages=find_packages(include=["fastreg", "fastreg.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **cmdclass},
    entry_points={"console_scripts": ["fastreg=fastreg.__main__:main"]},
)
