"""The reports of ``python -m fastreg bench``: the header and the tables, the JSON
document and where it may be written (not into ``benchmarks/results/`` from a run that
other processes competed with), and the bandwidth plot."""

import dataclasses
import json
import math
import os
import re

from fastreg.bench.grid import (
    COMPILE_IMPL,
    DROPOUT_IMPLS,
    DROPOUT_OPS,
    DTYPES,
    FUSED_OPS,
    FUSED_WIDTH,
    HOST_IMPLS,
    HOST_OPS,
    HOST_TENSOR_NUMEL,
    OP_LABELS,
    OPS,
    PARAM_SETS,
    PENALTY_IMPLS,
    PENALTY_OPS,
    Settings,
    human_size,
    param_set_numel,
)
from fastreg.bench.load import load_average
from fastreg.bench.timing import L2_FLUSH_MIN_BYTES, SPREAD_LIMIT


def is_results_path(path):
    """Whether `path` is a file in a folder benchmarks/results/ (where published figures
    live)."""
    folder = os.path.dirname(os.path.abspath(path))
    return (
        os.path.basename(folder) == "results"
        and os.path.basename(os.path.dirname(folder)) == "benchmarks"
    )


def load_refusal(path, load):
    """Why the JSON of a run must not be written to `path`, or None: a path in
    benchmarks/results/ and a run that other processes competed with."""
    if not load or not load.get("competed") or not is_results_path(path):
        return None
    return (
        f"not writing {path}: {load['why']}; figures published in benchmarks/results/ "
        "come from an idle machine. Rerun when it is idle, or pass --allow-load to write "
        "it anyway (the JSON records the load)"
    )


def load_line(env):
    """How busy the machine was: on a shared CPU, other processes stretch the timings
    (with OpenMP, a thread that waits for a descheduled one waits a whole time slice)."""
    load = env.get("load")
    if load is not None:
        env["load_after"] = load["load_after"]
        parts = []
        if load["others_cpu_share"] is not None:
            parts.append(
                f"other processes took {load['others_cpu_share']:.0%} of the "
                f"{load['cpus']} CPUs' time during the run"
            )
        if load["load_before"] is not None:
            parts.append(
                f"load average (1 min) {load['load_before']:.2f} before, "
                f"{load['load_max']:.2f} at most, {load['load_after']:.2f} after"
            )
        line = "; ".join(parts) or load["why"]
        if load["competed"]:
            line += ": other processes competed, timings may be inflated; rerun when idle"
        return line
    before, after = env.get("load_before"), load_average()
    env["load_after"] = after
    if before is None:
        return None
    line = (
        f"load average (1 min) before the run {before:.2f}, after {after:.2f}, "
        f"on {env['cpus']} CPUs"
    )
    if env["device_type"] == "cpu" and before >= 1.0:
        line += ": other processes were running, CPU timings may be inflated; rerun when idle"
    return line


def fmt_ms(ms):
    """Three significant digits (at least the unit): 377, 58.7, 1.73, 0.978."""
    if ms is None:
        return ""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}" if ms >= 0.01 else f"{ms:.4f}"


def fmt(value, spec, suffix=""):
    return "" if value is None else f"{value:{spec}}{suffix}"


MEASURED = ["GB/s", "copy", "speedup", "spread"]


def table_columns(family):
    """The columns of a family's table (dropout, fused, penalty, host): the row's case,
    the measured cells, and the family's last column."""
    size = "params" if family in ("penalty", "host") else "size"
    unit = "us" if family == "host" else "ms"
    last = {"penalty": "rel err", "host": "per tensor us"}.get(family, "kept B/el")
    return [
        "op",
        "dtype",
        size,
        "impl",
        f"median {unit}",
        "GB/s",
        "copy",
        "speedup",
        "spread",
        last,
    ]


def last_cell(family, r):
    """A row's last cell: the penalty's error against float64, the host overhead per
    tensor in microseconds, else the bytes kept for backward per element."""
    if family == "penalty":
        return fmt_err(r.get("rel_err"))
    if family == "host":
        tensors = r.get("tensors")
        return fmt(r["median_ms"] * 1e3 / tensors, ".2f") if tensors else ""
    return fmt(r.get("saved_bytes_per_elem"), ".3f")


def measured_cells(r, scale=1.0):
    """A timed row's cells: median time (times `scale`: 1e3 for microseconds), GB/s, share
    of the copy bandwidth, speedup and its spread."""
    return [
        fmt_ms(r["median_ms"] * scale),
        fmt(r.get("gbps"), ".1f"),
        fmt(r.get("copy_frac"), ".0%"),
        *speedup_cells(r),
    ]


def fmt_err(value):
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:.1e}"


def header_lines(env, settings=None, timer=None):
    lines = [
        f"fastreg bench   {env['device']}   {env['date']}",
        f"torch {env['torch']}   fastreg {env['fastreg']}, {env['backend']}   "
        f"commit {env['commit']}",
    ]
    if env["device_type"] == "cpu":
        lines.append(f"CPU threads: {env['threads']} (torch.get_num_threads(); --threads sets it)")
    if timer is not None:
        lines += timing_lines(timer)
    load = load_line(env)
    if load:
        lines.append(load)
    return lines


def timing_lines(timer):
    """What the timings are: the method, in the table's header."""
    if timer.cuda and timer.l2_flush:
        clock = (
            "CUDA events around each call, L2 flushed before each call (a write of "
            f"{L2_FLUSH_MIN_BYTES // 2**20} MB or 4x the L2, outside the timed region): "
            "inputs come from HBM, launch gaps hidden"
        )
    elif timer.cuda:
        clock = (
            "CUDA events around blocks of back-to-back calls, no L2 flush "
            "(--no-l2-flush): small sizes run from L2, launch overhead included"
        )
    else:
        clock = f"time.{timer.clock.__name__} around each block (timeit.Timer, gc off)"
    return [
        f"timing: {clock}; the impls of each comparison interleaved, >= {timer.repeats} "
        "rounds of one block each, after warm-up"
    ]


SPEEDUP_LINE = (
    "speedup: median over the rounds of baseline time / impl time in the same "
    'round; spread: their interquartile range; "spread too wide" where it holds '
    f"1.0 or is wider than {SPREAD_LIMIT:.0%} of the median"
)


def format_table(rows, env, settings=Settings(), timer=None):
    """The human-readable report: a header, then a table per family."""
    out = header_lines(env, settings, timer)
    out.append(SPEEDUP_LINE)
    out.append(
        "GB/s: bytes the op must move / median time; copy: that as a share of "
        "dst.copy_(src) at the same size and dtype"
    )
    dropout = [r for r in rows if r["op"] in DROPOUT_OPS]
    fused = [r for r in rows if r["op"] in FUSED_OPS]
    penalty = [r for r in rows if r["op"] in PENALTY_OPS]
    host = [r for r in rows if r["op"] in HOST_OPS]
    if dropout:
        out += [
            "",
            f"dropout, p={settings.p}: speedup against F.dropout; kept: bytes autograd "
            "keeps for backward per element",
        ]
        out += _table(dropout, "dropout")
    if fused:
        out += [
            "",
            f"fused, p={settings.p}, forward and backward, bias over a last dimension of "
            f"{FUSED_WIDTH}: speedup against the native composition; GB/s: the fused "
            "op's bytes (same for every impl)",
        ]
        out += _table(fused, "fused")
    if penalty:
        sets = sorted({r["params"] for r in penalty}, key=list(PARAM_SETS).index)
        described = "; ".join(
            f"{s}: {PARAM_SETS[s][0]}, {len(PARAM_SETS[s][1])} tensors, "
            f"{human_size(param_set_numel(s))} elements"
            for s in sets
        )
        out += [
            "",
            f"penalty, l1={settings.l1} l2={settings.l2} ({described}):",
            "speedup against the Python loop; rel err: against float64 (value; grad_: "
            "the gradient's norm)",
        ]
        out += _table(penalty, "penalty")
    if host:
        out += [
            "",
            f"the penalty's host overhead: float32 CPU tensors of {HOST_TENSOR_NUMEL} "
            "elements (tiny148: 148 of them, as GPT-2 small has; tiny1000: 1,000), "
            "time per call in microseconds against the Python loop; fastreg: "
            "penalty(list), penalty_grad_(list), prox_l1_(list); fastreg:Penalty: "
            "Penalty(l1=, l2=)(module); torch.cat: torch.cat(list), torch's own "
            "operator over a tensor list with autograd, for scale",
        ]
        out += _table(host, "host")
    return "\n".join(out)


SPREAD_TOO_WIDE = "spread too wide"


def speedup_cells(r):
    """The speedup and spread cells of a row: "1.42x" and "1.38-1.47", or "spread too
    wide" in place of the speedup when the per-round ratios do not support it."""
    if r["speedup"] is None:
        return "", ""
    spread = (
        ""
        if r["speedup_q1"] is None or r["speedup_q1"] == r["speedup_q3"]
        else f"{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}"
    )
    if r["speedup_clear"] is False:
        return SPREAD_TOO_WIDE, spread
    return f"{r['speedup']:.2f}x", spread


def _table(rows, family):
    """A family's rows aligned, grouped by (op, dtype, size); repeated group cells left
    blank."""
    names = table_columns(family)
    order = {op: i for i, op in enumerate(OPS)}
    impl_order = DROPOUT_IMPLS + PENALTY_IMPLS + HOST_IMPLS["host_penalty"] + (COMPILE_IMPL,)
    impls = {impl: i for i, impl in enumerate(dict.fromkeys(impl_order))}
    rows = sorted(
        rows,
        key=lambda r: (
            order[r["op"]],
            list(DTYPES).index(r["dtype"]),
            r["numel"],
            r["params"] or "",
            impls.get(r["impl"], 99),
        ),
    )
    scale = 1e3 if family == "host" else 1.0
    body, notes, previous = [], [], None
    for r in rows:
        group = (r["op"], r["dtype"], r["numel"], r["params"])
        size = r["params"] or human_size(r["numel"])
        lead = [OP_LABELS[r["op"]], r["dtype"], size] if group != previous else ["", "", ""]
        if group != previous and previous is not None:
            body.append(None)  # a blank line between groups
        previous = group
        if r["median_ms"] is None:
            notes.append(len(body))
            body.append(lead + [r["impl"], r["note"] or "no result"])
            continue
        body.append(lead + [r["impl"], *measured_cells(r, scale), last_cell(family, r)])
    widths = [len(n) for n in names]
    for i, cells in enumerate(body):
        for k, cell in enumerate(cells or ()):
            if not (i in notes and k >= 4):  # a note runs free, past the columns
                widths[k] = max(widths[k], len(cell))

    def line(cells):
        # text columns left-aligned, numbers right-aligned; a note row's note runs free
        parts = [
            c.ljust(widths[k]) if k < 4 else c.rjust(widths[k]) if len(cells) > 5 else c
            for k, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [line(names), line(["-" * w for w in widths])]
    out += ["" if cells is None else line(cells) for cells in body]
    return out


def device_slug(env):
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def json_path(path, env):
    """`path`, or `path`/<device>.json when it is a folder (or ends with a slash)."""
    if path.endswith(os.sep) or path.endswith("/") or os.path.isdir(path):
        return os.path.join(path, device_slug(env) + ".json")
    return path


def report(env, settings, copy_rows, rows, memory=None):
    """The JSON document: device, torch, fastreg, commit, copy_gbps, results."""
    doc = {
        "device": env["device"],
        "torch": env["torch"],
        "fastreg": env["fastreg"],
        "commit": env["commit"],
        "copy_gbps": copy_rows,
        "results": rows,
        "backend": env["backend"],
        "threads": env["threads"],
        "date": env["date"],
        "python": env["python"],
        "settings": dataclasses.asdict(settings),
        "load_before": env.get("load_before"),
        "load_after": env.get("load_after"),
        "load": env.get("load"),
    }
    if memory is not None:
        doc["memory"] = memory
    return doc


def _finite(value):
    """`value` with every inf or nan float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path, doc):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(doc), f, indent=1, allow_nan=False)
        f.write("\n")
    return path


PLOT_MISSING = (
    "--plot needs matplotlib, an optional dependency that is not installed: pip install matplotlib"
)


def require_matplotlib():
    """The pyplot module (Agg backend); ImportError with PLOT_MISSING if absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(PLOT_MISSING) from error
    return plt


def plot(rows, copy_rows, env, path):
    """Bandwidth against size per impl, one panel per (dtype, dropout or fused op), with the
    copy bandwidth dashed; log-log axes. The penalty has one size per parameter set and is
    not drawn."""
    plt = require_matplotlib()
    from matplotlib import ticker

    rows = [r for r in rows if r["op"] in DROPOUT_OPS + FUSED_OPS and r["gbps"]]
    if not rows:
        raise ValueError("nothing to plot: --plot draws the dropout and fused rows, and none ran")
    ops = [op for op in DROPOUT_OPS + FUSED_OPS if any(r["op"] == op for r in rows)]
    dtypes = [dt for dt in DTYPES if any(r["dtype"] == dt for r in rows)]
    impls = [i for i in DROPOUT_IMPLS + (COMPILE_IMPL,) if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(
        len(dtypes),
        len(ops),
        figsize=(max(8.0, 4.2 * len(ops)), 1.0 + 3.2 * len(dtypes)),
        squeeze=False,
        sharex=True,
    )
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, dt in enumerate(dtypes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for impl in impls:
                pts = sorted(
                    (r["numel"], r["gbps"])
                    for r in rows
                    if r["op"] == op and r["dtype"] == dt and r["impl"] == impl
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=impl, color=colors[impl])
            sizes = {r["numel"] for r in rows if r["op"] == op and r["dtype"] == dt}
            cp = sorted(
                (c["numel"], c["gbps"])
                for c in copy_rows
                if c["dtype"] == dt and c["numel"] in sizes
            )
            if cp:
                ax.plot(*zip(*cp), ls="--", marker=".", color="black", lw=1, label="copy_")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # the impls differ by factors, and copy_ sits far above
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"{OP_LABELS[op]}, {dt}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("GB/s")
            if i == len(dtypes) - 1:
                ax.set_xlabel("elements")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(
        f"fastreg dropout: {env['device']}\ntorch {env['torch']}, commit "
        f"{env['commit']}, {env['date']}",
        fontsize=10,
    )
    top = 1 - 1.0 / fig.get_figheight()  # room for the title and the legend
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(labels),
        fontsize=8,
        bbox_to_anchor=(0.5, top + 0.35 / fig.get_figheight()),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, top))
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
