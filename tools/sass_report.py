"""What nvcc made of the CUDA kernels: reads the built extension's SASS and resource usage
(cuobjdump, from the CUDA toolkit or the triton wheel that torch installs) and checks:

- every aligned dropout or fused kernel (dropout's ScaleEpilogue<T, true>, the fused ops'
  Forward/BackwardEpilogue, which branch to their vector path at run time) has 128-bit global
  loads and stores (LDG.E.128, STG.E.128): a lane moves 16 bytes per access;
- no fastreg kernel touches local memory (LDL/STL: spilled registers or an array indexed at
  run time, a memory round trip in the element loop);
- no fastreg kernel uses more than MAX_REGISTERS registers per thread.

    python tools/sass_report.py [path/to/_C.so] [--all]

Prints a sample of kernels (every kernel with --all) and a summary; exits 1 when a check fails
(`--allow local` reports local memory without failing), 2 when there is nothing to read (no
CUDA kernels in the build, or no cuobjdump). tests/test_sass_report.py runs it on the build.
"""

import argparse
import collections
import functools
import glob
import os
import re
import shutil
import subprocess
import sys

# 64 registers per thread: a block of 256 threads then takes 16K of an SM's 64K registers, so
# 4 blocks (1024 threads, half the SM's thread slots) stay resident: enough 16-byte loads in
# flight for a streaming kernel (the kernels keep E = 4 or 8 elements per lane in registers,
# plus Philox's state). Measured on nvcc 13.0 for sm_90: 45-64 before any tuning. The kernels'
# __launch_bounds__(256, kMinBlocksPerSm = 4) make nvcc hold to it (csrc/device/common.h).
MAX_REGISTERS = 64

INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    except ImportError:
        pass
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def demangle(names):
    if not names:
        return {}
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out))


def parse_resources(text):
    """{mangled name: {"REG": n, "STACK": n, "LOCAL": n, ...}} from `cuobjdump -res-usage`."""
    usage, name = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function (\S+):\s*$", line)
        if match:
            name = match.group(1)
            continue
        if name and "REG:" in line:
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            entry = usage.setdefault(name, {})
            for key, value in fields.items():
                entry[key] = max(entry.get(key, 0), int(value))
            name = None
    return usage


def parse_sass(text):
    """{mangled name: Counter of instruction mnemonics} from `cuobjdump -sass`."""
    counts, name = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            name = match.group(1)
            counts.setdefault(name, collections.Counter())
            continue
        if name is None:
            continue
        match = INSTRUCTION.search(line)
        if match:
            counts[name][match.group(1)] += 1
    return counts


def memory_ops(counter):
    """(128-bit global loads, 128-bit global stores, local loads, local stores)."""

    def total(prefix, wide):
        return sum(
            n for op, n in counter.items() if op.startswith(prefix) and (not wide or ".128" in op)
        )

    return total("LDG", True), total("STG", True), total("LDL", False), total("STL", False)


def is_aligned_elementwise(demangled):
    """An aligned dropout kernel, or a fused one (whose vector path is chosen at run time)."""
    if "dropout_kernel<" not in demangled:
        return False
    return (
        ("ScaleEpilogue<" in demangled and re.search(r"ScaleEpilogue<[^<>]*, true>", demangled))
        or "ForwardEpilogue<" in demangled
        or "BackwardEpilogue<" in demangled
    )


def family(demangled):
    """A short name: the kernel and the template arguments that tell it apart."""
    name = demangled.split("(")[0]
    name = name.replace("fastreg::device::", "").replace("c10::", "")
    return name


def check(usage, sass, names):
    """(rows, problems): a row per fastreg kernel, and (kind, text) per failed check, kind
    "vector", "local" or "registers"."""
    rows, problems = [], []
    for mangled in sorted(set(usage) | set(sass)):
        demangled = names.get(mangled, mangled)
        if "fastreg" not in demangled:
            continue
        regs = usage.get(mangled, {}).get("REG", 0)
        local = usage.get(mangled, {}).get("LOCAL", 0)
        ldg128, stg128, ldl, stl = memory_ops(sass.get(mangled, collections.Counter()))
        short = family(demangled)
        rows.append((short, regs, local, ldg128, stg128, ldl, stl))
        if is_aligned_elementwise(demangled) and (ldg128 == 0 or stg128 == 0):
            problems.append(
                ("vector", f"{short}: no 128-bit global {'loads' if ldg128 == 0 else 'stores'}")
            )
        if ldl or stl or local:
            problems.append(
                ("local", f"{short}: local memory ({ldl} LDL, {stl} STL, {local} bytes)")
            )
        if regs > MAX_REGISTERS:
            problems.append(("registers", f"{short}: {regs} registers, more than {MAX_REGISTERS}"))
    return rows, problems


def default_library():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(root, "fastreg", "_C*.so")))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def analyse(library):
    """(rows, problems) of check() for the extension at `library`, or why there is nothing
    to read."""
    tool = find_cuobjdump()
    if library is None or tool is None:
        return f"nothing to read (extension: {library}, cuobjdump: {tool})"
    resources = subprocess.run([tool, "-res-usage", library], capture_output=True, text=True)
    if resources.returncode != 0 or "Function" not in resources.stdout:
        return f"{library} holds no CUDA kernels ({resources.stderr.strip()[:200]})"
    sass = subprocess.run([tool, "-sass", library], capture_output=True, text=True, check=True)
    usage, counts = parse_resources(resources.stdout), parse_sass(sass.stdout)
    names = demangle(sorted(set(usage) | set(counts)))
    return check(usage, counts, names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", nargs="?", help="the extension (default: fastreg/_C*.so)")
    parser.add_argument("--all", action="store_true", help="a line for every kernel")
    parser.add_argument(
        "--allow",
        nargs="*",
        default=[],
        choices=("vector", "local", "registers"),
        help="report these checks' failures without failing",
    )
    args = parser.parse_args(argv)
    library = args.library or default_library()
    result = analyse(library)
    if isinstance(result, str):
        print(f"sass report: {result}")
        return 2
    rows, problems = result
    width = max(len(r[0]) for r in rows) if args.all else 60
    print(f"{'kernel':<{width}}  regs  local  LDG.128  STG.128  LDL  STL")
    shown = rows if args.all else rows[:: max(1, len(rows) // 24)]
    for short, regs, local, ldg, stg, ldl, stl in shown:
        print(f"{short[:width]:<{width}}  {regs:4}  {local:5}  {ldg:7}  {stg:7}  {ldl:3}  {stl:3}")
    regs = [r[1] for r in rows]
    size_mb = os.path.getsize(library) / 1e6  # MB, as README and benchmarks/compile_times.py
    print(
        f"sass report: {len(rows)} fastreg kernels, {min(regs)}-{max(regs)} registers, "
        f"{sum(1 for r in rows if r[5] or r[6])} with local memory, extension {size_mb:.1f} MB"
        + ("" if args.all else f" ({len(shown)} of {len(rows)} shown; --all for every one)")
    )
    failed = False
    for kind, problem in problems:
        allowed = kind in args.allow
        failed = failed or not allowed
        print(f"{'allowed' if allowed else 'FAIL'} ({kind}) {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
