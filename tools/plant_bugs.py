"""Shows that the CUDA simulator bites: plants known bugs in a copy of the CUDA sources, one at
a time, builds the simulator from each copy and checks that the simulated suite fails.

    python tools/plant_bugs.py [--tests tests/test_cudasim.py] [--keep DIR]

The copy is built once clean (the suite must pass on it), then each bug is planted, the
simulator rebuilt (only the translation units that include the changed file) and the suite
run; the bug is restored before the next. Prints one line per bug: caught (and the first
failing test) or MISSED; exits 1 if any bug was missed or the clean copy failed. About 15
minutes on 2 cores. The result is recorded in docs/cuda-simulator.md.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, text in the clean source, text of the bug): each text occurs exactly once.
BUGS = [
    (
        "mask word written by the wrong lane",
        "csrc/device/dropout_kernel.cuh",
        "sink.store_word(chunk * kWarp + lane, word);",
        "sink.store_word(chunk * kWarp + (lane ^ 1), word);",
    ),
    (
        "missing + b in a Philox counter",
        "csrc/device/dropout_kernel.cuh",
        "philox_block(seed, offset, static_cast<uint64_t>(e0 / 4 + b))",
        "philox_block(seed, offset, static_cast<uint64_t>(e0 / 4))",
    ),
    (
        "removed __syncthreads in the penalty's block sum",
        "csrc/device/penalty_kernels.cuh",
        "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();\n",
        "  if (lane == 0) warp_sums[warp] = v;\n",
    ),
    (
        "off-by-one tail: a lane with one element left skips it",
        "csrc/device/dropout_kernel.cuh",
        "      if (e0 < n) {",
        "      if (e0 + 1 < n) {",
    ),
    (
        "bool mask loaded as a vector from any address",
        "csrc/cuda/dropout_launch.h",
        "aligned_to(device::lane_elements<scalar_t>(), {m})",
        "true",
    ),
]


def copy_tree(destination):
    """The sources, package and tests, without builds or virtual environments."""
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "build",
        "*.so",
        "__pycache__",
        ".pytest_cache",
        ".hypothesis",
        "*.egg-info",
    )
    shutil.copytree(ROOT, destination, ignore=ignore)


def run_suite(tree, tests, log_path):
    """(passed, first failing test or the tail of the log) of the suite on the simulator
    built from `tree`."""
    env = dict(
        os.environ,
        FASTREG_BACKEND="cudasim",
        FASTREG_CUDASIM_ORDER="random",
        PYTHONPATH=tree,
        HYPOTHESIS_PROFILE="ci",
    )
    with open(log_path, "w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    text = open(log_path).read()
    failed = [line.split(" ")[1] for line in text.splitlines() if line.startswith("FAILED ")]
    return code == 0, failed[0] if failed else (text.strip().splitlines()[-1:] or ["?"])[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tests",
        nargs="+",
        default=["tests/test_cudasim.py"],
        help="the simulated suite (default: tests/test_cudasim.py)",
    )
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep it")
    args = parser.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="fastreg-plant-bugs-")
    tree = os.path.join(work, "tree")
    shutil.rmtree(tree, ignore_errors=True)  # a --keep folder's old copy would be stale
    copy_tree(tree)
    start = time.time()
    ok, detail = run_suite(tree, args.tests, os.path.join(work, "clean.log"))
    print(
        f"clean copy: {'passes' if ok else 'FAILS: ' + detail} ({time.time() - start:.0f} s)",
        flush=True,
    )
    missed = not ok
    for name, path, clean, bug in BUGS:
        source = os.path.join(tree, path)
        text = open(source).read()
        if text.count(clean) != 1:
            print(f"{name}: the clean text is not found once in {path}: update this script")
            missed = True
            continue
        start = time.time()
        with open(source, "w") as f:
            f.write(text.replace(clean, bug))
        try:
            ok, detail = run_suite(
                tree,
                args.tests,
                os.path.join(work, f"bug-{BUGS.index((name, path, clean, bug))}.log"),
            )
        finally:
            with open(source, "w") as f:
                f.write(text)
        print(
            f"{name}: {'MISSED' if ok else 'caught by ' + detail} ({time.time() - start:.0f} s)",
            flush=True,
        )
        missed = missed or ok
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
