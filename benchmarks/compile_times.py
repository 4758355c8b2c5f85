"""Compile time of each translation unit of the last build, and the extension's size.

    python benchmarks/compile_times.py [build/temp.*/.ninja_log] [--markdown]

Reads the ninja log that `setup.py build_ext` leaves in build/temp.*/ (one line per object:
start and end in milliseconds since the build started; a later line for the same object
replaces an earlier one) and prints each unit's wall time, longest first. The times depend
on what else ran: with MAX_JOBS=2 on 2 cores two units share the machine, so a unit's time
is that of one core. The size is that of fastreg/_C*.so.
"""

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(path):
    """{source path relative to the tree: seconds}, the last build of each object."""
    times = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            start, end, _mtime, target, _hash = line.rstrip("\n").split("\t")
            source = target.split("/build/temp", 1)[-1].split("/", 1)[-1]
            source = source[:-2] if source.endswith(".o") else source
            for ext in (".cpp", ".cu"):  # the object's name has no source suffix
                if os.path.exists(os.path.join(ROOT, source + ext)):
                    source += ext
            times[source] = (int(end) - int(start)) / 1000
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", nargs="?", help="a .ninja_log (default: build/temp.*/.ninja_log)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    logs = (
        [args.log] if args.log else glob.glob(os.path.join(ROOT, "build", "temp.*", ".ninja_log"))
    )
    if not logs or not os.path.exists(logs[0]):
        print("no .ninja_log: build first (setup.py build_ext)", file=sys.stderr)
        return 2
    times = read_log(logs[0])
    rows = sorted(times.items(), key=lambda kv: -kv[1])
    if args.markdown:
        print("| translation unit | seconds |\n| --- | --- |")
        for source, seconds in rows:
            print(f"| `{source}` | {seconds:.0f} |")
    else:
        for source, seconds in rows:
            print(f"{seconds:8.1f} s  {source}")
    print(f"{len(rows)} units, {sum(times.values()):.0f} s in all (one core each)")
    for so in glob.glob(os.path.join(ROOT, "fastreg", "_C*.so")):
        print(f"{os.path.relpath(so, ROOT)}: {os.path.getsize(so) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
