"""The documentation runs: every ```python block of README.md and docs/*.md, on the CPU,
the blocks of one file in order in one shared namespace (one test per block). A block
whose fence has `<!-- skip: reason -->` on the line directly above is skipped with that
reason (it must still compile); one with `<!-- needs: package ... -->` there is skipped
when a package is not installed (the training frameworks of docs/integrations-*.md). And
the option tables of `python -m fastreg bench` and
`demo` (docs/benchmarks.md, docs/demo.md) list exactly the options of their --help."""

import argparse
import pathlib
import re
import warnings

import pytest

from fastreg import bench
from fastreg.__main__ import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SKIP = re.compile(r"^<!--\s*skip:\s*(.*?)\s*-->\s*$")
NEEDS = re.compile(r"^<!--\s*needs:\s*(.*?)\s*-->\s*$")


def python_blocks(path):
    """[(line of the fence, code, skip reason or None, needed packages)] of the ```python
    blocks of `path`."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+|~~~+)\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        indent, ticks, language = fence.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(ticks):
            end += 1
        if language == "python":
            skip = SKIP.match(lines[i - 1].strip()) if i > 0 else None
            needs = NEEDS.match(lines[i - 1].strip()) if i > 0 else None
            code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end]) + "\n"
            blocks.append(
                (
                    i + 1,
                    code,
                    skip.group(1) if skip else None,
                    needs.group(1).split() if needs else [],
                )
            )
        i = end + 1
    return blocks


BLOCKS = [
    (path, line, code, skip, needs)
    for path in FILES
    for line, code, skip, needs in python_blocks(path)
]
NAMESPACES = {}  # path -> the namespace its blocks share
FAILED = set()  # paths with a failed block: their later blocks are skipped


def block_id(block):
    path, line = block[0], block[1]
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_docs_have_python_blocks():
    names = {block[0].name for block in BLOCKS}
    assert {"README.md", "errors.md", "penalty.md", "torchscript.md"} <= names
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(b) for b in BLOCKS])
def test_block_runs(block):
    path, line, code, skip, needs = block
    where = f"{path.relative_to(ROOT)}:{line}"
    compiled = compile(code, where, "exec")  # a SyntaxError fails even a skipped block
    if skip is not None:
        pytest.skip(skip)
    for package in needs:
        pytest.importorskip(package)
    if path in FAILED:
        pytest.skip(f"an earlier block of {path.name} failed")
    namespace = NAMESPACES.setdefault(path, {"__name__": f"docs:{path.name}"})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation
            exec(compiled, namespace)
    except BaseException:
        FAILED.add(path)
        raise


def test_skip_markers_sit_on_python_fences():
    """A skip marker not directly above a ```python fence would skip nothing."""
    for path in FILES:
        lines = path.read_text().splitlines()
        fence = None  # the ticks of the open code block (a marker shown inside one is text)
        for i, line in enumerate(lines):
            ticks = re.match(r"^\s*(```+|~~~+)", line)
            if ticks and (fence is None or ticks.group(1).startswith(fence)):
                fence = ticks.group(1) if fence is None else None
                continue
            if fence is None and (SKIP.match(line.strip()) or NEEDS.match(line.strip())):
                assert i + 1 < len(lines) and lines[i + 1].strip() == "```python", (
                    f"{path.name}:{i + 1}: skip marker not directly above a ```python fence"
                )


# ---- the option tables against --help ------------------------------------------------


def option_rows(path):
    """{option: text of its row} from the tables headed `| option | meaning |`."""
    rows, in_table = {}, False
    for line in path.read_text().splitlines():
        if re.match(r"^\|\s*option\s*\|\s*meaning\s*\|", line):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            in_table = False
        if in_table and not re.match(r"^\|\s*-+", line):
            first = line.split("`")[1]
            rows[first.split()[0]] = (first, line)
    return rows


def subparsers():
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command,page", [("bench", "benchmarks.md"), ("demo", "demo.md")])
def test_option_table_matches_help(command, page):
    parser = subparsers()[command]
    actions = {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    rows = option_rows(ROOT / "docs" / page)
    assert set(rows) == set(actions), (
        f"in --help, not in docs/{page}: "
        f"{sorted(set(actions) - set(rows))}; in docs/{page}, "
        f"not in --help: {sorted(set(rows) - set(actions))}"
    )
    for option, (cell, _) in rows.items():
        action = actions[option]
        if action.choices is not None:  # `--device cpu\|cuda`
            listed = cell.split(None, 1)[1].replace("\\|", "|").split("|")
            assert set(listed) == set(action.choices), option
        elif action.nargs == 0:  # a flag: no metavar in the table
            assert cell == option, option
        else:
            metavar = action.metavar or action.dest.upper()
            assert cell == f"{option} {metavar}", (cell, metavar)


def test_bench_value_lists_are_complete():
    rows = option_rows(ROOT / "docs" / "benchmarks.md")
    values = {
        "--ops": list(bench.OPS) + list(bench.OP_GROUPS),
        "--dtype": list(bench.DTYPES) + list(bench.DTYPE_ALIASES),
        "--params": list(bench.PARAM_SETS),
    }
    for option, names in values.items():
        listed = set(re.findall(r"`([a-z0-9_]+)`", rows[option][1]))
        assert listed == set(names), f"{option}: {sorted(listed ^ set(names))}"
