"""The result tables of README.md and docs/*.md, generated from the JSON of the runs in
benchmarks/results/: ``python -m fastreg.bench.tables`` (``make tables``) rewrites every
table between markers, ``--check`` only reports the ones that differ (and exits 1).

A table sits between two HTML comments, which Markdown does not show::

    <!-- table: KIND source=benchmarks/results/cpu-2026-12-01.json [key=value ...] -->
    (generated: a line of conditions, then the table)
    <!-- /table -->

``source`` is relative to the repository root. KIND and its options:

* ``results``: forward + backward of dropout and ``bias_dropout_add`` at each size, and the
  penalty: op, size, native ms, fastreg ms, speedup [interquartile range], kept B/el
  (README's per-device table). ``sizes`` (default ``2^20,2^24``), ``dtype`` (default
  float32), ``mask`` (default bits), ``params`` (the penalty's parameter set, default mlp;
  ``none`` leaves the penalty out).
* ``bench``: the bench's tables, one per family (dropout, fused, penalty, host), rows by
  op, dtype, size and impl, the columns of ``python -m fastreg bench``. ``ops`` (names or
  groups as ``--ops`` takes them), ``dtypes``, ``sizes`` narrow it.
* ``memory``: a ``bench --memory`` JSON: one row per model and variant, whatever models
  and variants it holds (any entry of its ``memory`` object with ``rows``), with the
  columns that its rows have: bytes kept per layer, masks, kept in all, peak. ``models``,
  ``variants`` and ``columns`` (row keys, e.g. ``layer_bytes,mask_bytes,masks_removed``)
  narrow it.

A field that a JSON lacks (the load of an older run, say) is rendered as "unknown".
"""

import argparse
import difflib
import glob
import json
import os
import re
import sys

from fastreg.bench.grid import (
    COMPILE_IMPL,
    DROPOUT_IMPLS,
    DTYPES,
    FAMILY,
    FUSED_WIDTH,
    HOST_IMPLS,
    OP_GROUPS,
    OP_LABELS,
    OPS,
    PENALTY_IMPLS,
    human_size,
    parse_list,
    parse_size,
)
from fastreg.bench.report import fmt_ms, last_cell, measured_cells, table_columns

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPEN = re.compile(r"^<!--\s*table:\s*(\S+)((?:\s+[\w-]+=\S+)*)\s*-->\s*$")
CLOSE = re.compile(r"^<!--\s*/table\s*-->\s*$")
UNKNOWN = "unknown"


class TableError(ValueError):
    """A marker that cannot be rendered: unknown kind or option, missing source, no rows."""


def default_files(root=ROOT):
    """README.md and docs/*.md."""
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


# ---- cells ----------------------------------------------------------------------------


def fmt_kept(value):
    return "" if value is None else f"{round(value, 3):g}"


def fmt_speedup_iqr(row):
    """11.4x [9.3-12.5]; "spread too wide [q1-q3]" where the ratios do not support one."""
    if row.get("speedup") is None:
        return ""
    q1, q3 = row.get("speedup_q1"), row.get("speedup_q3")
    spread = "" if q1 is None or q3 is None else f" [{q1:.1f}-{q3:.1f}]"
    if row.get("speedup_clear") is False:
        return "spread too wide" + spread
    return f"{row['speedup']:.1f}x" + spread


def markdown_table(names, body):
    out = ["| " + " | ".join(names) + " |", "|" + "|".join(" --- " for _ in names) + "|"]
    return out + ["| " + " | ".join(cells) + " |" for cells in body]


# ---- conditions -----------------------------------------------------------------------


def _get(doc, key):
    value = doc.get(key)
    return UNKNOWN if value in (None, "") else value


def load_text(doc):
    """Other processes' share of the CPUs and the load averages, or "unknown"."""
    load = doc.get("load")
    if isinstance(load, dict):
        parts = []
        share = load.get("others_cpu_share")
        if share is not None:
            cpus = load.get("cpus")
            parts.append(
                f"other processes {share:.0%} of the {cpus} CPUs"
                if cpus
                else f"other processes {share:.0%} of the CPUs"
            )
        if load.get("load_before") is not None and load.get("load_max") is not None:
            parts.append(
                f"load average {load['load_before']:.2f} before, {load['load_max']:.2f} at most"
            )
        if load.get("competed"):
            parts.append("competed: timings may be inflated")
        if parts:
            return ", ".join(parts)
    before, after = doc.get("load_before"), doc.get("load_after")
    if before is not None and after is not None:
        return f"load average {before:.2f} before, {after:.2f} after"
    return UNKNOWN


def conditions(doc, source):
    """The line of conditions above a table: device, threads, torch, fastreg, commit, date,
    load and the source file."""
    device = _get(doc, "device")
    threads = doc.get("threads")
    if threads is not None and str(device).startswith("cpu"):
        device = f"{device}, {threads} threads"
    return (
        f"{device}; torch {_get(doc, 'torch')}; fastreg {_get(doc, 'fastreg')}, "
        f"commit {_get(doc, 'commit')}; {_get(doc, 'date')}; load: {load_text(doc)}; "
        f"from `{source}`"
    )


# ---- kinds ----------------------------------------------------------------------------


def _find(rows, **key):
    found = [r for r in rows if all(r.get(k) == v for k, v in key.items())]
    return found[0] if found else None


def _size_label(op, numel):
    if op in ("bias_dropout_add", "bias_gelu_dropout") and numel % FUSED_WIDTH == 0:
        return f"{human_size(numel)} ({numel // FUSED_WIDTH} x {FUSED_WIDTH})"
    return human_size(numel)


def results_table(doc, options):
    """README's per-device table: forward + backward against the native baseline."""
    sizes = [parse_size(s) for s in options.pop("sizes", "2^20,2^24").split(",")]
    dtype = options.pop("dtype", "float32")
    mask = options.pop("mask", "bits")
    params = options.pop("params", "mlp")
    p = (doc.get("settings") or {}).get("p")
    p_text = "" if p is None else f", p = {p:g}"
    rows = doc.get("results") or []
    impl = f"fastreg:{mask}"
    body = []
    for op, label in (("dropout_fwdbwd", "dropout"), ("bias_dropout_add", "`bias_dropout_add`")):
        for n in sizes:
            base = _find(rows, op=op, dtype=dtype, numel=n, impl="native")
            fast = _find(rows, op=op, dtype=dtype, numel=n, impl=impl)
            if base is None or fast is None:
                raise TableError(f"no {op} rows for {dtype} {human_size(n)} ({impl} and native)")
            body.append(
                [
                    f"{label}{p_text}",
                    _size_label(op, n),
                    f"{fmt_ms(base['median_ms'])} ms",
                    f"{fmt_ms(fast['median_ms'])} ms (`{mask}`)",
                    fmt_speedup_iqr(fast),
                    f"{fmt_kept(base['saved_bytes_per_elem'])}, "
                    f"{fmt_kept(fast['saved_bytes_per_elem'])}",
                ]
            )
    if params != "none":
        base = _find(rows, op="penalty_fwdbwd", dtype=dtype, params=params, impl="loop")
        fast = _find(rows, op="penalty_fwdbwd", dtype=dtype, params=params, impl="fastreg")
        if base is None or fast is None:
            raise TableError(f"no penalty_fwdbwd rows for {dtype} {params} (fastreg and loop)")
        tensors = fast.get("tensors")
        label = "penalty" + (f", {tensors} tensors" if tensors else "")
        body.append(
            [
                label,
                human_size(fast["numel"]),
                f"{fmt_ms(base['median_ms'])} ms (loop)",
                f"{fmt_ms(fast['median_ms'])} ms",
                fmt_speedup_iqr(fast),
                "",
            ]
        )
    names = [
        "op",
        "size",
        "native",
        "fastreg",
        "speedup [interquartile range]",
        "kept B/el (native, fastreg)",
    ]
    return markdown_table(names, body)


_IMPL_ORDER = {
    impl: i
    for i, impl in enumerate(
        dict.fromkeys(DROPOUT_IMPLS + PENALTY_IMPLS + HOST_IMPLS["host_penalty"] + (COMPILE_IMPL,))
    )
}
FAMILY_CAPTIONS = {
    "dropout": "dropout: speedup against `F.dropout`",
    "fused": f"fused ops, forward and backward, bias over a last dimension of {FUSED_WIDTH}: "
    "speedup against the native composition",
    "penalty": "penalty over a parameter set: speedup against the Python loop; rel err "
    "against float64",
    "host": "the penalty's host overhead, microseconds per call: speedup against the Python loop",
}


def bench_tables(doc, options):
    """The bench's tables by family, as ``python -m fastreg bench`` prints them."""
    rows = list(doc.get("results") or [])
    if "ops" in options:
        ops = parse_list(options.pop("ops"), OPS, groups=OP_GROUPS, what="op")
        rows = [r for r in rows if r["op"] in ops]
    if "dtypes" in options:
        dtypes = parse_list(options.pop("dtypes"), list(DTYPES), what="dtype")
        rows = [r for r in rows if r["dtype"] in dtypes]
    if "sizes" in options:
        sizes = {parse_size(s) for s in options.pop("sizes").split(",")}
        rows = [r for r in rows if r["params"] or r["numel"] in sizes]
    if not rows:
        raise TableError("no rows selected")
    order = {op: i for i, op in enumerate(OPS)}
    rows.sort(
        key=lambda r: (
            order.get(r["op"], 99),
            list(DTYPES).index(r["dtype"]) if r["dtype"] in DTYPES else 99,
            r["numel"],
            r["params"] or "",
            _IMPL_ORDER.get(r["impl"], 99),
        )
    )
    families = [
        f
        for f in ("dropout", "fused", "penalty", "host")
        if any(FAMILY.get(r["op"]) == f for r in rows)
    ]
    out = []
    for family in families:
        host = family == "host"
        names = table_columns(family)
        body, previous = [], None
        for r in (r for r in rows if FAMILY.get(r["op"]) == family):
            group = (r["op"], r["dtype"], r["numel"], r["params"])
            lead = (
                [OP_LABELS.get(r["op"], r["op"]), r["dtype"], r["params"] or human_size(r["numel"])]
                if group != previous
                else ["", "", ""]
            )
            previous = group
            if r.get("median_ms") is None:
                body.append(lead + [r["impl"], r.get("note") or "no result"] + [""] * 5)
                continue
            scale = 1e3 if host else 1.0
            body.append(lead + [f"`{r['impl']}`", *measured_cells(r, scale), last_cell(family, r)])
        if len(families) > 1:
            out += [f"*{FAMILY_CAPTIONS[family]}*", ""]
        out += markdown_table(names, body) + [""]
    return out[:-1]


def _mib(n):
    return "" if n is None else f"{n / 2**20:.1f}"


def _ratio(x):
    return "" if x is None else f"{x:.2f}x"


def _share(x):
    return "" if x is None else f"{x:.0%}"


def _slowdown(x):
    """A step-time ratio against another variant, {"slowdown", "slowdown_q1", ...}."""
    if not x or x.get("slowdown") is None:
        return ""
    return f"{x['slowdown']:.2f}x [{x['slowdown_q1']:.2f}-{x['slowdown_q3']:.2f}]"


# row key -> (column name, cell)
MEMORY_COLUMNS = {
    "layer_bytes": ("per layer MiB", _mib),
    "layer_vs_native": ("per layer vs nn.Dropout", _ratio),
    "mask_bytes": ("masks MiB", _mib),
    "masks_removed": ("masks removed", _share),
    "kept_bytes": ("kept MiB", _mib),
    "kept_vs_native": ("kept vs nn.Dropout", _ratio),
    "dropout_kept_bytes": ("of which dropout MiB", _mib),
    "peak_bytes": ("step peak MiB", _mib),
    "over_floor_per_call": (
        "over no dropout, B per call",
        lambda x: "" if x is None else f"{x:,.0f}",
    ),
    "vs_recompute": ("step time vs fastreg:recompute [IQR]", lambda x: _slowdown(x)),
    "bf16_gpu_bytes_per_element": (
        "bf16 GPU B/el over no dropout (computed)",
        lambda x: "" if x is None else f"{x:.3g}",
    ),
}


def memory_models(memory):
    """[(model name, its section (config ...), its rows)] of a ``bench --memory`` JSON's
    ``memory`` object: its own ``rows`` (fastreg's model, "own"), every entry that holds
    ``rows`` (``gpt2``, and whatever models a later bench adds), a ``models`` list or
    mapping of such sections, an entry whose ``models`` maps names to rows (``hf``, under
    its ``config``); rows that name their ``model`` are grouped by it."""
    sections = []
    if isinstance(memory.get("rows"), list):
        sections.append(("own", memory))
    for key, value in memory.items():
        if isinstance(value, dict) and isinstance(value.get("rows"), list):
            sections.append((value.get("name") or value.get("model") or key, value))
        elif isinstance(value, dict) and isinstance(value.get("models"), dict):
            sections += [
                (name, {"config": value.get("config"), "rows": rows})
                for name, rows in value["models"].items()
                if isinstance(rows, list)
            ]
        elif key == "models" and isinstance(value, list):
            sections += [
                (m.get("name") or m.get("model") or str(i), m)
                for i, m in enumerate(value)
                if isinstance(m, dict) and isinstance(m.get("rows"), list)
            ]
        elif key == "models" and isinstance(value, dict):
            sections += [
                (name, m)
                for name, m in value.items()
                if isinstance(m, dict) and isinstance(m.get("rows"), list)
            ]
    out = []
    for name, section in sections:
        groups = {}
        for row in section["rows"]:
            groups.setdefault(row.get("model") or name, []).append(row)
        out += [(model, section, rows) for model, rows in groups.items()]
    return out


def memory_table(doc, options):
    memory = doc.get("memory")
    if not isinstance(memory, dict):
        raise TableError("the JSON has no `memory` object: not a `bench --memory` run")
    models = memory_models(memory)
    if "models" in options:
        wanted = options.pop("models").split(",")
        unknown = set(wanted) - {m for m, _, _ in models}
        if unknown:
            raise TableError(
                f"no model {sorted(unknown)} in the JSON; it has {[m for m, _, _ in models]}"
            )
        models = [m for m in models if m[0] in wanted]
    if not models:
        raise TableError("no memory rows in the JSON")
    if "variants" in options:
        variants = options.pop("variants").split(",")  # a space in a name written as _
        models = [
            (m, section, [r for r in rs if str(r.get("variant")).replace(" ", "_") in variants])
            for m, section, rs in models
        ]
    rows = [r for _, _, rs in models for r in rs]
    if "columns" in options:
        keys = options.pop("columns").split(",")
        unknown = set(keys) - set(MEMORY_COLUMNS)
        if unknown:
            raise TableError(
                f"unknown memory columns {sorted(unknown)}; choose from {', '.join(MEMORY_COLUMNS)}"
            )
    else:
        keys = [k for k in MEMORY_COLUMNS if any(r.get(k) is not None for r in rows)]
    names = (
        (["model"] if len(models) > 1 else []) + ["variant"] + [MEMORY_COLUMNS[k][0] for k in keys]
    )
    body = []
    for model, _, model_rows in models:
        for i, r in enumerate(model_rows):
            cells = [r.get("variant", UNKNOWN)] + [MEMORY_COLUMNS[k][1](r.get(k)) for k in keys]
            body.append(([model if i == 0 else ""] if len(models) > 1 else []) + cells)
    out = markdown_table(names, body)
    dtype = memory.get("dtype")
    by_settings = {}  # models of one configuration named together
    for model, section, _ in models:
        config = section.get("config") or memory.get("config") or {}
        settings = ", ".join(f"{k} {v}" for k, v in config.items())
        by_settings.setdefault(settings or "configuration " + UNKNOWN, []).append(model)
    described = [f"{', '.join(names)}: {settings}" for settings, names in by_settings.items()]
    return ["; ".join(described) + (f"; {dtype}" if dtype else ""), ""] + out


KINDS = {"results": results_table, "bench": bench_tables, "memory": memory_table}


# ---- the files ------------------------------------------------------------------------


def render(kind, options, root=ROOT):
    """The lines between a marker pair."""
    options = dict(options)
    if kind not in KINDS:
        raise TableError(f"unknown table kind {kind!r}; choose from {', '.join(KINDS)}")
    source = options.pop("source", None)
    if source is None:
        raise TableError("no source=PATH")
    path = os.path.join(root, source)
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as error:
        raise TableError(f"cannot read {source}: {error.strerror}") from None
    try:
        lines = KINDS[kind](doc, options)
    except (KeyError, ValueError) as error:
        if isinstance(error, TableError):
            raise
        raise TableError(f"{source}: {error}") from None
    if options:
        raise TableError(f"unknown options for {kind}: {', '.join(sorted(options))}")
    # blank lines around: a Markdown parser may take a line next to a comment as HTML
    return ["", conditions(doc, source), ""] + lines + [""]


def regenerate(text, root=ROOT, where="<text>"):
    """`text` with every table between markers rendered anew; TableError names the
    marker's line."""
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        match = OPEN.match(lines[i])
        out.append(lines[i])
        if not match:
            if CLOSE.match(lines[i]):
                raise TableError(f"{where}:{i + 1}: a closing table marker without an opening one")
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not CLOSE.match(lines[end]):
            if OPEN.match(lines[end]):
                raise TableError(
                    f"{where}:{end + 1}: a table marker inside the table of line {i + 1}"
                )
            end += 1
        if end == len(lines):
            raise TableError(f"{where}:{i + 1}: no <!-- /table --> after this marker")
        options = dict(item.split("=", 1) for item in match.group(2).split())
        try:
            out += render(match.group(1), options, root)
        except TableError as error:
            raise TableError(f"{where}:{i + 1}: {error}") from None
        out.append(lines[end])
        i = end + 1
    return "\n".join(out)


def count_tables(text):
    return sum(1 for line in text.split("\n") if OPEN.match(line))


def run(files=None, root=ROOT, check=False, out=None):
    """Regenerate (or with `check`, compare) the tables of `files`; the paths that are (or
    were) out of date. Differences (check) or what was rewritten go to `out` (stdout)."""
    out = out or sys.stdout
    stale = []
    for path in files or default_files(root):
        with open(path) as f:
            text = f.read()
        if not count_tables(text):
            continue
        rel = os.path.relpath(path, root)
        new = regenerate(text, root, rel)
        if new == text:
            continue
        stale.append(rel)
        if check:
            out.writelines(
                difflib.unified_diff(
                    text.splitlines(True),
                    new.splitlines(True),
                    f"{rel} (as committed)",
                    f"{rel} (from the JSON)",
                )
            )
        else:
            with open(path, "w") as f:
                f.write(new)
            print(f"rewrote the tables of {rel}", file=out)
    return stale


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastreg.bench.tables",
        description="Regenerate the tables between <!-- table: ... --> markers in README.md "
        "and docs/*.md from the JSON in benchmarks/results/.",
    )
    parser.add_argument(
        "files", nargs="*", help="Markdown files (default: README.md and docs/*.md)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; print the differences and exit 1 if any table "
        "differs from what its JSON gives",
    )
    parser.add_argument(
        "--root",
        default=ROOT,
        help="the repository root, which sources are relative to (default: this checkout's)",
    )
    args = parser.parse_args(argv)
    try:
        stale = run(args.files or None, root=args.root, check=args.check)
    except TableError as error:
        print(f"fastreg.bench.tables: {error}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(
            f"\nout of date: {', '.join(stale)}; "
            "run `make tables` (python -m fastreg.bench.tables)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
