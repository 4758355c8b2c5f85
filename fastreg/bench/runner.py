"""The run of ``python -m fastreg bench``: the cases grouped into comparisons (the impls
of one op, dtype and size), each timed interleaved by the :class:`~fastreg.bench.timing.Timer`,
rows with per-round ratios against the baseline, and the copy bandwidth beside them."""

import contextlib
import math
import sys
import time

import torch

from fastreg.bench.baselines import copy_case, forget_params, prepare
from fastreg.bench.grid import BASELINE, Settings, param_set_tensors
from fastreg.bench.timing import Timer, ratio_summary, time_measurement

INTERRUPTED = "not timed: the run was interrupted"


class Progress:
    """One updating line on a terminal, plain lines otherwise (both on stderr)."""

    def __init__(self, total, stream=None, enabled=True):
        self.total, self.count, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label):
        self.count += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        text = f"[{self.count:>{len(str(self.total))}}/{self.total}] {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + text[:200])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self):
        if self.tty:
            self.stream.write("\r\033[K")
        if self.enabled:
            self.stream.write(
                f"bench: {self.count} cases in {time.perf_counter() - self.start:.0f}s\n"
            )
            self.stream.flush()


def comparisons(case_list):
    """The cases grouped by (op, dtype, size, parameter set), in their order: each group
    is timed round by round."""
    groups = {}
    for case in case_list:
        groups.setdefault((case.op, case.dtype, case.numel, case.params), []).append(case)
    return list(groups.values())


def run(case_list, device, settings=Settings(), timer=None, progress=True):
    """Times every comparison (the impls of one op, dtype and size, interleaved round by
    round), and the copy bandwidth at each (dtype, numel) the dropout and fused cases use.

    Returns (rows, copy rows). A case that cannot run gives a row with a note; when the
    run is interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM under the command line),
    the cases not yet timed get the note INTERRUPTED and the rows so far are returned."""
    timer = timer or Timer(device)
    host_timer = Timer("cpu", repeats=timer.repeats, min_time_s=timer.min_time_s)
    copy = {}
    rows = []
    bar = Progress(len(case_list), enabled=progress)
    groups = comparisons(case_list)
    for done, group in enumerate(groups):
        first = group[0]
        key = (first.dtype, first.numel)
        try:
            if first.family in ("dropout", "fused", "penalty") and key not in copy:
                copy_prep = copy_case(first.numel, first.dtype, device)
                seconds, _ = timer(copy_prep.fn)
                copy[key] = copy_prep.bytes / seconds / 1e9
                del copy_prep
            for case in group:
                bar.step(f"{case.op} {case.impl} {case.dtype} {case.size_label}")
            rows += _time_comparison(
                group, device, settings, host_timer if first.family == "host" else timer
            )
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (a time limit): report what ran
            for case in (c for g in groups[done:] for c in g):
                rows.append({**empty_row(case), "note": INTERRUPTED})
            break
    bar.done()
    forget_params()
    _fill_ratios(rows, copy)
    copy_rows = [{"dtype": dt, "numel": n, "gbps": gbps} for (dt, n), gbps in copy.items()]
    return rows, copy_rows


def empty_row(case):
    return {
        "op": case.op,
        "impl": case.impl,
        "dtype": case.dtype,
        "numel": case.numel,
        "params": case.params,
        "tensors": param_set_tensors(case.params) if case.params else None,
        "device": "cpu" if case.family == "host" else None,
        "median_ms": None,
        "iqr_ms": None,
        "runs": 0,
        "rounds": 0,
        "gbps": None,
        "copy_frac": None,
        "speedup": None,
        "speedup_q1": None,
        "speedup_q3": None,
        "speedup_min": None,
        "speedup_max": None,
        "speedup_clear": None,
        "saved_bytes_per_elem": None,
        "rel_err": None,
        "note": None,
    }


def _failed(error):
    message = (str(error).strip().splitlines() or [""])[0][:120]
    return f"failed: {type(error).__name__}: {message}"


def _time_comparison(group, device, settings, timer):
    """Rows of one comparison: prepares every impl, times them interleaved, and sets each
    row's speedup from the per-round ratios against the baseline."""
    rows = {case.impl: empty_row(case) for case in group}
    prepared = {}
    for case in group:
        try:
            prep = prepare(case, device, settings)
        except Exception as error:  # one broken case must not lose the whole run
            rows[case.impl]["note"] = _failed(error)
            continue
        if prep.fn is None:
            rows[case.impl]["note"] = prep.note
        else:
            prepared[case.impl] = prep
    times, numbers, errors = timer.interleaved({impl: p.fn for impl, p in prepared.items()})
    for impl, error in errors.items():
        rows[impl]["note"] = _failed(error)
    cases = {case.impl: case for case in group}
    base = BASELINE[group[0].family]
    threads = 1 if timer.cuda else torch.get_num_threads()
    for impl, per_round in times.items():
        row, prep = rows[impl], prepared[impl]
        m = time_measurement(per_round, numbers[impl], cases[impl], threads)
        row.update(
            median_ms=m.median * 1e3,
            iqr_ms=m.iqr * 1e3,
            runs=len(per_round) * numbers[impl],
            rounds=len(per_round),
            gbps=prep.bytes / m.median / 1e9 if prep.bytes else None,
            saved_bytes_per_elem=prep.saved_per_elem,
            rel_err=prep.rel_err,
        )
        if row["rel_err"] is not None and not math.isfinite(row["rel_err"]):
            row["note"] = f"the value is not finite: it overflows {cases[impl].dtype}"
        if base in times and impl != base:
            row.update(ratio_summary(times[base], per_round))
        elif impl == base:
            row.update(
                speedup=1.0,
                speedup_q1=1.0,
                speedup_q3=1.0,
                speedup_min=1.0,
                speedup_max=1.0,
                speedup_clear=True,
            )
    return [rows[case.impl] for case in group]


def _fill_ratios(rows, copy):
    """Each row's GB/s as a share of the copy bandwidth at its dtype and size."""
    for r in rows:
        bandwidth = copy.get((r["dtype"], r["numel"]))
        r["copy_frac"] = r["gbps"] / bandwidth if bandwidth and r["gbps"] else None


@contextlib.contextmanager
def num_threads(n):
    """torch.set_num_threads(n) inside, restored after (n None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
