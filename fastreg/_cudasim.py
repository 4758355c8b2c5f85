"""The CUDA simulator: fastreg's CUDA sources compiled with the host compiler and run on the
CPU with CUDA's execution semantics (csrc/sim; docs/cuda-simulator.md).

`FASTREG_BACKEND=cudasim` loads the module built here instead of fastreg._C: every fastreg
operator on a CPU tensor then runs the real CUDA glue and kernels, block by block, each
block's threads as fibers in lockstep. The configuration of the launches comes from
FASTREG_CUDASIM_ORDER (forward, reverse, random), FASTREG_CUDASIM_BLOCKS (the resident
blocks that cap every grid, so that grid-stride loops iterate) and FASTREG_CUDASIM_SEED,
or from `configure()` of the loaded module.

`python -m fastreg._cudasim [--sanitize]` builds the module (the first load builds it too);
with FASTREG_CUDASIM_SANITIZE=1 (or --sanitize) it is built with AddressSanitizer and
UndefinedBehaviorSanitizer, and the process must preload the ASan runtime
(`asan_preload()` names it).
"""

import argparse
import glob
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SANITIZE_ENV = "FASTREG_CUDASIM_SANITIZE"

# The simulated sources are compiled like the extension's C++ (no FMA contraction: the
# results are promised bit-exact), without strict aliasing (the kernels' vector accesses
# reinterpret element arrays, which nvcc allows), and with symbols the debugger can read.
FLAGS = [
    "-O2",
    "-g",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-DFASTREG_CUDA_SIM",
    f"-DFASTREG_BUILT_WITH_TORCH={torch.__version__}",
]
SANITIZER_FLAGS = [
    "-O1",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
]


def sanitized():
    return os.environ.get(SANITIZE_ENV, "0") == "1"


def cuda_sources():
    """The CUDA glue files that the simulator compiles, each through a wrapper."""
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))


def _wrappers(build_dir):
    """One C++ file per CUDA source: the shim first, then the source itself."""
    folder = os.path.join(build_dir, "sources")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for source in cuda_sources():
        stem = os.path.splitext(os.path.basename(source))[0]
        path = os.path.join(folder, f"{stem}.cpp")
        text = f'#include "sim/cuda_shim.h"\n#include "cuda/{os.path.basename(source)}"\n'
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        paths.append(path)
    return paths


def load(sanitize=None, verbose=None):
    """Builds (when needed) and imports the simulator module; registers fastreg's ops."""
    from torch.utils import cpp_extension

    sanitize = sanitized() if sanitize is None else sanitize
    if verbose is None:
        verbose = os.environ.get("FASTREG_CUDASIM_VERBOSE", "0") == "1"
    name = "fastreg_cudasim_asan" if sanitize else "fastreg_cudasim"
    build_dir = os.path.join(ROOT, "build", name)
    os.makedirs(build_dir, exist_ok=True)
    sources = (
        [os.path.join(CSRC, "sim", f) for f in ("runtime.cpp", "module.cpp", "selftest.cpp")]
        + [
            os.path.join(CSRC, "ops", f)
            for f in (
                "schema.cpp",
                "dropout_autograd.cpp",
                "inplace_autograd.cpp",
                "penalty_autograd.cpp",
                "penalty_front.cpp",
            )
        ]
        + _wrappers(build_dir)
    )
    flags = FLAGS + (SANITIZER_FLAGS if sanitize else [])
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=flags,
        extra_ldflags=["-fsanitize=address,undefined"] if sanitize else [],
        extra_include_paths=[CSRC],
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )


def asan_preload():
    """What a sanitized simulator needs preloaded (LD_PRELOAD): the AddressSanitizer runtime,
    since the Python executable is not instrumented, and libstdc++, so that ASan's
    __cxa_throw interceptor finds the real one (a failed launch throws)."""
    cxx = os.environ.get("CXX", "c++")
    return " ".join(
        subprocess.check_output([cxx, f"-print-file-name={lib}"], text=True).strip()
        for lib in ("libasan.so", "libstdc++.so")
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastreg._cudasim", description="Build the CUDA simulator module."
    )
    parser.add_argument(
        "--sanitize",
        action="store_true",
        help="build with AddressSanitizer and UndefinedBehaviorSanitizer",
    )
    parser.add_argument(
        "--print-preload", action="store_true", help="print the ASan runtime to preload, and exit"
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    if args.print_preload:
        print(asan_preload())
        return 0
    # In a child that loads fastreg on this backend, so that fastreg._C (which registers
    # the same operators) is not loaded; a sanitized module also needs the ASan runtime.
    env = dict(
        os.environ, FASTREG_BACKEND="cudasim", **{SANITIZE_ENV: "1" if args.sanitize else "0"}
    )
    if args.sanitize:
        env.update(LD_PRELOAD=asan_preload(), ASAN_OPTIONS="detect_leaks=0")
    if args.verbose:
        env["FASTREG_CUDASIM_VERBOSE"] = "1"
    code = "import fastreg; print('fastreg:', fastreg.info())"
    return subprocess.call([sys.executable, "-c", code], env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
