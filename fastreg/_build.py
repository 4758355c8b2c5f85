"""How fastreg's kernels are compiled, written once for both ways of building them:

* ``setup.py`` (``pip install --no-build-isolation .``) builds ``fastreg._C`` in place;
* ``python -m fastreg build`` (or ``fastreg.build()``) compiles the same sources with the
  same flags, through ``torch.utils.cpp_extension.load``, into a cache folder keyed by the
  torch version, its CUDA, the Python ABI, the flags and the sources' contents; the loader
  in fastreg/_ops.py imports that build when no ``fastreg._C`` is installed. This is the
  way for a package installed with pip's build isolation (``pip install .``), where torch
  is not importable while the wheel is built, so it ships the sources instead.

This module imports neither fastreg nor (until called) torch: setup.py loads it by path.

Environment: FASTREG_CPU_ONLY=1 (no CUDA kernels), TORCH_CUDA_ARCH_LIST, CUDA_HOME and
MAX_JOBS (read by torch.utils.cpp_extension), FASTREG_CACHE (the cache folder; default
$XDG_CACHE_HOME/fastreg or ~/.cache/fastreg).
"""

import contextlib
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig

PACKAGE = os.path.dirname(os.path.abspath(__file__))
CACHE_ENV = "FASTREG_CACHE"
BUILD_ON_IMPORT_ENV = "FASTREG_BUILD_ON_IMPORT"
BUILD_COMMAND = "python -m fastreg build"
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
COMPLETE = "complete.json"  # written last: a build folder without it is not a build


def csrc_dir():
    """The C++/CUDA sources: fastreg/csrc in an installed wheel, else the checkout's csrc/
    (includes are written from there: "device/philox.h")."""
    for folder in (os.path.join(PACKAGE, "csrc"), os.path.join(os.path.dirname(PACKAGE), "csrc")):
        if os.path.isfile(os.path.join(folder, "ops", "module.cpp")):
            return folder
    raise FileNotFoundError(
        f"fastreg: no C++ sources found (looked for csrc/ in {PACKAGE} and its parent folder)"
    )


def log(message):
    print(f"fastreg build: {message}", file=sys.stderr, flush=True)


def nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        output = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_cuda_home():
    """The CUDA toolkit, found as torch.utils.cpp_extension finds it (CUDA_HOME or
    CUDA_PATH, else the nvcc on PATH, else /usr/local/cuda), without importing that module
    (which logs a warning where no GPU is visible) at every fastreg import."""
    found = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if found is None:
        import shutil

        nvcc = shutil.which("nvcc")
        if nvcc is not None:
            found = os.path.dirname(os.path.dirname(nvcc))
        elif os.path.exists("/usr/local/cuda"):
            found = "/usr/local/cuda"
    return found


def cuda_build_decision():
    """(build CUDA?, reason). CUDA sources are compiled when torch is a CUDA build and an
    nvcc of the same CUDA major version is found (CUDA_HOME); a visible GPU is not needed."""
    import torch

    if os.environ.get("FASTREG_CPU_ONLY", "0") == "1":
        return False, "FASTREG_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    found = nvcc_version(cuda_home)
    if found is None:
        return False, f"no working nvcc under CUDA_HOME={cuda_home}"
    torch_major = int(torch.version.cuda.split(".")[0])
    if found[0] != torch_major:
        return False, (
            f"nvcc {found[0]}.{found[1]} in {cuda_home} does not match the CUDA "
            f"{torch.version.cuda} that torch was built with"
        )
    return True, f"nvcc {found[0]}.{found[1]} in {cuda_home}, torch CUDA {torch.version.cuda}"


def wheel_cuda_includes():
    """CUDA headers shipped in the nvidia-* wheels (cuBLAS, cuSPARSE, ...), when present."""
    import site

    folders = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        folders += glob.glob(os.path.join(base, "nvidia", "cu[0-9]*", "include"))
    return folders


def spec(with_cuda=None, root=None):
    """What to compile and how: a dict of with_cuda, reason, sources (relative to `root`
    when given, else absolute), include_dirs, cxx, nvcc and link flags."""
    import torch

    reason = "requested"
    if with_cuda is None:
        with_cuda, reason = cuda_build_decision()
    csrc = csrc_dir()
    sources = sorted(
        glob.glob(os.path.join(csrc, "ops", "*.cpp"))
        + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    )
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    if root is not None:
        sources = [os.path.relpath(s, root) for s in sources]
    defines = [f"-DFASTREG_BUILT_WITH_TORCH={torch.__version__}"]  # stringified in module.cpp
    # The C++ standard is torch.utils.cpp_extension's choice. -fopenmp makes
    # at::parallel_for parallel (without it the header falls back to a serial loop); the
    # OpenMP runtime is the libgomp.so.1 that libtorch_cpu has already loaded.
    # No a * b + c contracted into fma (g++ does it in C++ on targets with fma, such as
    # aarch64 or -march=native): the penalty's gradients are promised bit-exact.
    cxx = ["-O3", "-fopenmp"] + defines + ["-ffp-contract=off"]
    link = ["-fopenmp"]
    include_dirs = [csrc]
    nvcc = []
    if with_cuda:
        cxx.append("-DFASTREG_WITH_CUDA")
        # No --use_fast_math: the kernels' results are promised bit-exact.
        nvcc = ["-O3", "-lineinfo", "-DFASTREG_WITH_CUDA"] + defines
        include_dirs += wheel_cuda_includes()
    return {
        "with_cuda": with_cuda,
        "reason": reason,
        "sources": sources,
        "include_dirs": include_dirs,
        "cxx": cxx,
        "nvcc": nvcc,
        "link": link,
    }


def cache_root():
    """FASTREG_CACHE, else $XDG_CACHE_HOME/fastreg, else ~/.cache/fastreg."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return os.path.abspath(os.path.expanduser(given))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastreg")


def cache_key(build):
    """The cache folder's name for `build` (a spec()): torch version and CUDA, the Python
    ABI, the CUDA architectures, the flags and a hash of every source file's contents."""
    import torch

    digest = hashlib.sha256()
    csrc = csrc_dir()
    for path in sorted(glob.glob(os.path.join(csrc, "*", "*"))):
        if path.endswith(SOURCE_SUFFIXES):
            digest.update(os.path.relpath(path, csrc).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    flags = {k: build[k] for k in ("with_cuda", "cxx", "nvcc", "link")}
    flags["include_dirs"] = build["include_dirs"][1:]  # not the sources' own folder
    flags["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build["with_cuda"] else ""
    digest.update(json.dumps(flags, sort_keys=True).encode())
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if build["with_cuda"] else "cpu"
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    torch_version = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return f"torch{torch_version}-{cuda}-{abi}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on `path` (created if needed), held by one process at a time;
    the others wait. Released when the process dies, so a killed build blocks nobody."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_module_path(folder):
    """The module file of a finished build in `folder`, or None."""
    try:
        with open(os.path.join(folder, COMPLETE)) as f:
            name = json.load(f)["module"]
    except (OSError, ValueError, KeyError):
        return None
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def find_cached(build=None):
    """The module file of a finished cached build for this torch, these flags and these
    sources, or None. Without `build`: the build that `python -m fastreg build` would make
    here, else a CPU-only one (`--cpu-only`)."""
    builds = [build] if build is not None else [spec()]
    if build is None and builds[0]["with_cuda"]:
        builds.append(spec(with_cuda=False))
    for candidate in builds:
        found = cached_module_path(os.path.join(cache_root(), cache_key(candidate)))
        if found:
            return found
    return None


def build(with_cuda=None, force=False, verbose=False):
    """Compiles the kernels into the cache (unless a finished build is there, or `force`),
    under a lock, so that many processes build once; returns the module file's path.

    The module is loaded by the next ``import fastreg`` (in a new process)."""
    from torch.utils import cpp_extension

    build_spec = spec(with_cuda)
    folder = os.path.join(cache_root(), cache_key(build_spec))
    with file_lock(folder + ".lock"):
        found = cached_module_path(folder)
        if found and not force:
            log(f"already built: {found}")
            return found
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, COMPLETE))
        os.makedirs(folder, exist_ok=True)
        log(
            (
                "compiling CUDA and CPU kernels: "
                if build_spec["with_cuda"]
                else "compiling CPU kernels only: "
            )
            + f"{build_spec['reason']}; into {folder} "
            "(minutes with CUDA)"
        )
        # is_python_module=False: dlopen only (registers the operators in this process,
        # as importing fastreg._C would); the module itself is imported by fastreg/_ops.py
        path = cpp_extension.load(
            name="_C",
            sources=build_spec["sources"],
            extra_cflags=build_spec["cxx"],
            extra_cuda_cflags=build_spec["nvcc"],
            extra_ldflags=build_spec["link"],
            extra_include_paths=build_spec["include_dirs"],
            with_cuda=build_spec["with_cuda"],
            build_directory=folder,
            verbose=verbose,
            is_python_module=False,
        )
        record = {
            "module": os.path.basename(path),
            "with_cuda": build_spec["with_cuda"],
            "reason": build_spec["reason"],
        }
        temporary = os.path.join(folder, COMPLETE + ".tmp")
        with open(temporary, "w") as f:
            json.dump(record, f)
        os.replace(temporary, os.path.join(folder, COMPLETE))
    log(f"built {path}")
    return path


def import_module(path):
    """Imports the compiled module at `path` as fastreg._C."""
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("fastreg._C", path)
    module = importlib.util.module_from_spec(spec_)
    sys.modules["fastreg._C"] = module
    try:
        spec_.loader.exec_module(module)
    except BaseException:
        del sys.modules["fastreg._C"]
        raise
    return module


def build_in_subprocess(force=False, cpu_only=False, verbose=False):
    """build() in a fresh Python process that does not import fastreg (so that no
    fastreg._C already loaded meets the new one); returns the module file's path."""
    command = [sys.executable, os.path.abspath(__file__)]
    command += ["--force"] * force + ["--verbose"] * verbose
    env = dict(os.environ, **({"FASTREG_CPU_ONLY": "1"} if cpu_only else {}))
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"fastreg: building the kernels failed (exit status "
            f"{result.returncode}; the compiler's messages are above)"
        )
    return result.stdout.strip().splitlines()[-1]


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog=BUILD_COMMAND, description=BUILD_HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.cpu_only:
        os.environ["FASTREG_CPU_ONLY"] = "1"
    if args.print_cache:
        print(os.path.join(cache_root(), cache_key(spec())))
        return 0
    print(build(force=args.force, verbose=args.verbose))
    return 0


BUILD_HELP = """\
Compiles fastreg's C++ (and, where possible, CUDA) kernels against the torch installed
here, into a cache folder keyed by the torch version, its CUDA, the Python ABI, the flags
and the sources (FASTREG_CACHE, default ~/.cache/fastreg). The next `import fastreg`
loads it. Many processes may run this at once: one compiles, the others wait for it.
CUDA kernels are built when torch is a CUDA build and an nvcc of the same CUDA major
version is found (CUDA_HOME); TORCH_CUDA_ARCH_LIST picks the architectures (needed when
no GPU is visible), MAX_JOBS the parallel compile jobs. Minutes: many with CUDA, a few
without."""


def add_arguments(parser):
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument(
        "--cpu-only", action="store_true", help="CPU kernels only (as FASTREG_CPU_ONLY=1)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument(
        "--print-cache",
        action="store_true",
        help="print the cache folder for this torch and these sources, build nothing",
    )


if __name__ == "__main__":
    sys.exit(main())
