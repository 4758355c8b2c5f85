"""The benchmark's method (fastreg/bench/): interleaved rounds and per-round ratios with
their spread, the "spread too wide" verdict, the L2 flush between timed CUDA calls (its
order checked with fake events on the CPU), the load monitor and the refusal to publish
JSON from a run that other processes competed with, and the host-overhead rows. Fake
timings and fake loads: no timed assertion."""

import json

import pytest
import torch

import fastreg
from fastreg import bench
from fastreg.__main__ import main

TINY = [
    "bench",
    "--device",
    "cpu",
    "--ops",
    "dropout_fwd",
    "--sizes",
    "2^10",
    "--dtype",
    "float32",
    "--repeats",
    "1",
    "--quick",
    "--no-progress",
    "--threads",
    "1",
]


# ---------------------------------------------------------------- ratios and spread


def test_quartiles_are_inclusive_and_one_value_is_its_own_spread():
    assert bench.quartiles([5, 1, 3, 2, 4]) == (2, 3, 4)
    assert bench.quartiles([0.7]) == (0.7, 0.7, 0.7)


def test_per_round_ratios_median_and_spread():
    base = [2.0, 2.2, 4.0, 2.0, 2.1]  # round 3: the machine was slow for everyone
    impl = [1.0, 1.1, 2.0, 1.0, 1.05]
    s = bench.ratio_summary(base, impl)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["speedup_q1"] == pytest.approx(2.0) and s["speedup_q3"] == pytest.approx(2.0)
    assert s["speedup_min"] == pytest.approx(2.0) and s["speedup_max"] == pytest.approx(2.0)
    assert s["speedup_clear"] is True
    # the ratio of medians would mix rounds; the median of ratios does not
    s = bench.ratio_summary([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.25, 0.5])
    assert s["speedup"] == pytest.approx(2.0) and s["speedup_max"] == pytest.approx(4.0)


def test_a_spread_that_holds_one_does_not_support_a_speedup():
    s = bench.ratio_summary([1.0] * 5, [0.9, 1.1, 0.95, 1.05, 0.97])  # ratios around 1
    assert s["speedup_q1"] < 1.0 < s["speedup_q3"]
    assert s["speedup_clear"] is False


def test_a_spread_wider_than_half_the_median_is_too_wide():
    s = bench.ratio_summary([1.0] * 4, [1 / 1.5, 1 / 3.0, 1 / 1.2, 1 / 4.0])
    assert s["speedup_q1"] > 1.0
    assert s["speedup_q3"] - s["speedup_q1"] > bench.SPREAD_LIMIT * s["speedup"]
    assert s["speedup_clear"] is False
    assert bench.spread_supports(2.0, 1.8, 2.3) is True


def test_rounds_must_pair_up():
    with pytest.raises(ValueError, match="must pair up"):
        bench.ratio_summary([1.0, 1.0], [1.0])


def test_time_measurement_is_torch_benchmark_median():
    case = bench.Case("dropout_fwd", "native", "float32", 1024)
    m = bench.time_measurement([3e-3, 1e-3, 2e-3], 10, case, threads=1)
    assert m.median == pytest.approx(2e-3)
    assert m.number_per_run == 10 and m.task_spec.description == "native"


# ---------------------------------------------------------------- interleaving


class ScriptedTimer(bench.Timer):
    """A Timer whose blocks take scripted times and record their order."""

    def __init__(self, script, repeats=3):
        super().__init__("cpu", repeats=repeats, min_time_s=0.0)
        self.script, self.order = script, []

    def _calibrate(self, fn):
        return 1

    def _block(self, fn, number):
        name = fn()
        self.order.append(name)
        return self.script[name].pop(0)


def test_interleaved_rotates_the_order_and_keeps_rounds_aligned():
    script = {"a": [1.0, 2.0, 3.0], "b": [0.5, 1.0, 1.5], "c": [0.25, 0.5, 0.75]}
    timer = ScriptedTimer(script)
    times, numbers, errors = timer.interleaved({n: (lambda n=n: n) for n in "abc"})
    assert timer.order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times == {"a": [1.0, 2.0, 3.0], "b": [0.5, 1.0, 1.5], "c": [0.25, 0.5, 0.75]}
    assert numbers == {"a": 1, "b": 1, "c": 1} and errors == {}
    assert bench.ratio_summary(times["a"], times["c"])["speedup"] == pytest.approx(4.0)


def test_a_fixed_number_of_calls_per_block_skips_the_sizing_call():
    calls = {"a": 0, "b": 0}

    def counted(name):
        def fn():
            calls[name] += 1

        return fn

    timer = bench.Timer("cpu", repeats=4, min_time_s=0.0, number=3)
    times, numbers, errors = timer.interleaved({n: counted(n) for n in calls})
    assert numbers == {"a": 3, "b": 3} and errors == {}
    assert all(len(t) == 4 for t in times.values())
    assert calls == {"a": 1 + 4 * 3, "b": 1 + 4 * 3}  # one warm-up call, then 4 blocks of 3
    seconds, runs = timer(counted("a"))
    assert runs == 4 * 3 and seconds > 0


def test_the_clock_times_the_cpu_blocks():
    ticks = iter(range(0, 1000, 10))  # every reading 10 "seconds" after the last
    timer = bench.Timer("cpu", number=2, clock=lambda: next(ticks))
    assert timer._block(lambda: None, 2) == pytest.approx(5.0)


def test_interleaved_drops_an_impl_that_fails():
    script = {"a": [1.0] * 3, "b": [1.0] * 3}
    timer = ScriptedTimer(script)

    def broken():
        raise RuntimeError("kernel missing")

    times, _, errors = timer.interleaved({"a": lambda: "a", "b": lambda: "b", "bad": broken})
    assert set(times) == {"a", "b"} and len(times["a"]) == 3
    assert isinstance(errors["bad"], RuntimeError)


def test_run_gives_every_row_its_rounds_and_spread():
    grid = bench.cases("cpu", ops=["dropout_fwd"], dtypes=["float32"], sizes=[1024])
    rows, _ = bench.run(
        grid, "cpu", timer=bench.Timer("cpu", repeats=3, min_time_s=0.0), progress=False
    )
    assert {r["impl"] for r in rows} == set(bench.DROPOUT_IMPLS)
    for r in rows:
        assert r["rounds"] == 3 and r["median_ms"] > 0 and r["iqr_ms"] >= 0
        assert r["speedup_q1"] <= r["speedup"] <= r["speedup_q3"]
        assert r["speedup_min"] <= r["speedup_q1"] and r["speedup_q3"] <= r["speedup_max"]
    native = next(r for r in rows if r["impl"] == "native")
    assert native["speedup"] == 1.0 and native["speedup_clear"] is True


# ---------------------------------------------------------------- the L2 flush


class FakeEvent:
    def __init__(self, log):
        self.log, self.t = log, None

    def record(self):
        self.log.append("record")
        self.t = len(self.log)

    def elapsed_time(self, end):  # milliseconds, from the log positions
        return 0.5

    def synchronize(self):
        self.log.append("sync")


def fake_cuda_timer(monkeypatch, l2_flush):
    timer = bench.Timer("cpu")
    timer.cuda, timer.l2_flush = True, l2_flush
    log = []
    monkeypatch.setattr(timer, "_event", lambda: FakeEvent(log))
    monkeypatch.setattr(timer, "flush", lambda: log.append("flush"))
    monkeypatch.setattr(timer, "sync", lambda: log.append("sync"))
    return timer, log


def test_l2_is_flushed_before_each_timed_call_outside_the_events(monkeypatch):
    timer, log = fake_cuda_timer(monkeypatch, l2_flush=True)
    seconds = timer._block(lambda: log.append("call"), 3)
    assert log == ["flush", "record", "call", "record"] * 3 + ["sync"]
    assert seconds == pytest.approx(0.5e-3)  # each call's own pair of events


def test_without_the_flush_a_block_runs_back_to_back(monkeypatch):
    timer, log = fake_cuda_timer(monkeypatch, l2_flush=False)
    seconds = timer._block(lambda: log.append("call"), 3)
    assert log == ["record", "call", "call", "call", "record", "sync"]
    assert seconds == pytest.approx(0.5e-3 / 3)


def test_interleaved_cuda_rounds_flush_before_every_timed_call(monkeypatch):
    timer, log = fake_cuda_timer(monkeypatch, l2_flush=True)
    timer.repeats, timer.min_time_s = 3, 0.0
    times, numbers, errors = timer.interleaved(
        {name: (lambda name=name: log.append(name)) for name in ("native", "fastreg:bits")}
    )
    assert errors == {} and all(len(t) == 3 for t in times.values())
    timed = 0
    for i, entry in enumerate(log):
        if entry in ("native", "fastreg:bits"):
            if log[i - 1] == "sync":  # a warm-up call, not timed
                continue
            assert log[i - 2 : i] == ["flush", "record"] and log[i + 1] == "record", log[
                i - 2 : i + 2
            ]
            timed += 1
    assert timed == sum(numbers[n] * 3 for n in numbers) + len(numbers)  # + the sizing call


def test_the_flush_buffer_outsizes_l2(monkeypatch):
    class Props:
        L2_cache_size = 60 * 2**20  # an H200

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert bench.l2_flush_bytes("cuda") == 256 * 2**20
    Props.L2_cache_size = 100 * 2**20
    assert bench.l2_flush_bytes("cuda") == 400 * 2**20


def test_only_cuda_timers_flush():
    assert bench.Timer("cpu", l2_flush=True).l2_flush is False
    assert bench.Timer("cpu").l2_flush is False


def test_the_header_says_how_gpu_timings_were_taken(monkeypatch):
    timer, _ = fake_cuda_timer(monkeypatch, l2_flush=True)
    text = "\n".join(bench.timing_lines(timer))
    assert "L2 flushed before each call" in text and "outside the timed region" in text
    timer.l2_flush = False
    assert "no L2 flush" in "\n".join(bench.timing_lines(timer))


# ---------------------------------------------------------------- the table


def _row(impl, speedup, q1, q3, clear):
    row = bench.empty_row(bench.Case("dropout_fwdbwd", impl, "float32", 2**20))
    row.update(
        median_ms=1.0,
        gbps=10.0,
        copy_frac=0.5,
        speedup=speedup,
        speedup_q1=q1,
        speedup_q3=q3,
        speedup_clear=clear,
        saved_bytes_per_elem=0.125,
    )
    return row


def test_table_prints_spread_too_wide_instead_of_a_speedup():
    env = {
        "device": "cpu: test",
        "date": "today",
        "torch": torch.__version__,
        "fastreg": "0",
        "backend": "extension",
        "commit": "abc",
        "device_type": "cpu",
        "threads": 1,
        "cpus": 2,
        "load_before": None,
    }
    rows = [
        _row("native", 1.0, 1.0, 1.0, True),
        _row("fastreg:bits", 1.43, 1.40, 1.47, True),
        _row("fastreg:bool", 1.02, 0.93, 1.11, False),
    ]
    text = bench.format_table(rows, env)
    bits = next(line for line in text.splitlines() if "fastreg:bits" in line)
    assert "1.43x" in bits and "1.40-1.47" in bits
    bool_line = next(line for line in text.splitlines() if "fastreg:bool" in line)
    assert bench.SPREAD_TOO_WIDE in bool_line and "1.02x" not in bool_line
    assert "0.93-1.11" in bool_line
    assert "interquartile range" in text and "interleaved" not in text  # no timer given


# ---------------------------------------------------------------- load


def fake_monitor(busy, own, wall=10.0, cpus=2, loads=(0.1, 0.2)):
    """A LoadMonitor over `wall` seconds in which the machine used `busy` and this run
    `own` CPU seconds."""
    clock = iter([0.0, wall])
    machine = iter([(100.0, cpus), (100.0 + busy if busy is not None else None, cpus)])
    mine = iter([5.0, 5.0 + own])
    load = iter(loads)
    return bench.LoadMonitor(
        own_threads=1,
        interval_s=0,
        clock=lambda: next(clock),
        machine=lambda: next(machine),
        own=lambda: next(mine),
        load=lambda: next(load),
    )


def test_load_monitor_counts_what_others_took():
    result = fake_monitor(busy=12.0, own=2.0).start().stop()  # others: 10 of 20 CPU-s
    assert result["others_cpu_share"] == pytest.approx(0.5)
    assert result["competed"] is True and "50%" in result["why"]
    result = fake_monitor(busy=2.5, own=2.0).start().stop()  # others: 0.5 of 20
    assert result["others_cpu_share"] == pytest.approx(0.025)
    assert result["competed"] is False
    assert (result["load_before"], result["load_after"], result["load_max"]) == (0.1, 0.2, 0.2)


def test_load_monitor_falls_back_on_the_load_average():
    monitor = fake_monitor(busy=None, own=0.0, cpus=16, loads=(1.0, 9.0))
    result = monitor.start().stop()
    assert result["others_cpu_share"] is None
    assert result["competed"] is True and "load average" in result["why"]


def test_load_monitor_samples_during_the_run():
    import time

    with bench.LoadMonitor(interval_s=0.01) as monitor:
        time.sleep(0.1)
    assert monitor.result["load_samples"] >= 1
    assert monitor.result["wall_s"] >= 0.1
    assert monitor.result["others_cpu_share"] is None or monitor.result["others_cpu_share"] >= 0


def test_refusal_only_for_benchmarks_results(tmp_path):
    competed = {"competed": True, "why": "other processes took 50% of the 2 CPUs' time"}
    published = str(tmp_path / "benchmarks" / "results" / "cpu.json")
    message = bench.load_refusal(published, competed)
    assert "not writing" in message and "--allow-load" in message and "50%" in message
    assert bench.load_refusal(str(tmp_path / "out.json"), competed) is None
    assert bench.load_refusal(published, {"competed": False, "why": ""}) is None


@pytest.fixture
def competed(monkeypatch):
    class Competed(bench.LoadMonitor):
        def stop(self):
            super().stop()
            self.result.update(
                competed=True,
                others_cpu_share=0.6,
                why="other processes took 60% of the 2 CPUs' time (fake)",
            )
            return self.result

    monkeypatch.setattr(bench, "LoadMonitor", Competed)


def test_bench_refuses_to_publish_a_competed_run(competed, tmp_path, capsys):
    folder = tmp_path / "benchmarks" / "results"
    with pytest.raises(SystemExit) as exit:
        main(TINY + ["--json", str(folder) + "/"])
    assert "not writing" in str(exit.value.code) and "--allow-load" in str(exit.value.code)
    assert not folder.exists() or not list(folder.iterdir())
    assert "other processes competed" in capsys.readouterr().out  # the table says so too


def test_allow_load_publishes_it_with_the_load(competed, tmp_path):
    folder = tmp_path / "benchmarks" / "results"
    assert main(TINY + ["--json", str(folder) + "/", "--allow-load"]) == 0
    (path,) = folder.glob("*.json")
    doc = json.loads(path.read_text())
    assert doc["load"]["competed"] is True and doc["load"]["others_cpu_share"] == 0.6


def test_a_competed_run_may_write_elsewhere(competed, tmp_path):
    path = tmp_path / "mine.json"
    assert main(TINY + ["--json", str(path)]) == 0
    assert json.loads(path.read_text())["load"]["competed"] is True


# ---------------------------------------------------------------- host overhead rows


def test_host_rows_cover_every_call_on_tiny_cpu_tensors():
    grid = bench.cases("cuda", ops=bench.HOST_OPS)  # CPU tensors whatever the device
    assert {(c.op, c.impl) for c in grid} == {
        (op, impl) for op in bench.HOST_OPS for impl in bench.HOST_IMPLS[op]
    }
    assert {c.params for c in grid} == {"tiny148", "tiny1000"}
    assert {c.params for c in bench.cases("cpu", ops=bench.HOST_OPS, quick=True)} == {"tiny148"}
    assert all(c.numel == bench.HOST_SETS[c.params] * 4 for c in grid)


def test_host_calls_compute_what_the_loop_does():
    for op in ("host_penalty", "host_penalty_step"):
        values = {}
        for case in bench.cases("cpu", ops=[op], quick=True):
            value = bench.prepare(case, "cpu").fn()
            assert value.grad_fn is not None
            if case.impl == "torch.cat":  # for scale: an edge to every tensor's accumulator
                edges = value.grad_fn.next_functions
                assert value.shape == (bench.HOST_SETS[case.params] * bench.HOST_TENSOR_NUMEL,)
                assert len(edges) == bench.HOST_SETS[case.params]
                assert all(type(node).__name__ == "AccumulateGrad" for node, _ in edges)
                continue
            values[case.impl] = float(value.detach())
        assert values["fastreg"] == pytest.approx(values["loop"], rel=1e-5)
        assert values["fastreg:Penalty"] == pytest.approx(values["loop"], rel=1e-5)
    for op in ("host_penalty_grad", "host_prox_l1"):
        for case in bench.cases("cpu", ops=[op], quick=True):
            assert bench.prepare(case, "cpu").fn() is None


def test_host_table_in_microseconds(capsys):
    main(
        [
            "bench",
            "--device",
            "cpu",
            "--ops",
            "host_prox_l1",
            "--quick",
            "--repeats",
            "1",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "the penalty's host overhead" in out and "median us" in out
    assert "prox_l1_" in out and "tiny148" in out and "per tensor us" in out
    assert hasattr(fastreg, "prox_l1_")


def test_every_bench_option_is_in_the_documented_option_table():
    """README's option table (or the docs page it moves to) lists every option of
    `python -m fastreg bench --help`."""
    from pathlib import Path

    from fastreg.__main__ import build_parser

    root = Path(__file__).resolve().parent.parent
    text = "\n".join(p.read_text() for p in [root / "README.md", *(root / "docs").glob("*.md")])
    rows = "\n".join(line for line in text.splitlines() if line.startswith("| `--"))
    bench_parser = build_parser()._subparsers._group_actions[0].choices["bench"]
    options = {
        o
        for a in bench_parser._actions
        for o in a.option_strings
        if o.startswith("--") and o != "--help"
    }
    missing = sorted(o for o in options if f"`{o}" not in rows)  # --layers etc.: the --memory row
    assert not missing, f"options without a row in the option table: {missing}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_timing_path_runs_with_the_flush():
    """On the GPU machine: the real CUDA path (events, the flush buffer) of a tiny grid."""
    timer = bench.Timer("cuda", repeats=2, min_time_s=0.0)
    assert timer.l2_flush
    grid = bench.cases("cuda", ops=["dropout_fwdbwd"], dtypes=["float32"], sizes=[2**16])
    rows, copy_rows = bench.run(grid, "cuda", timer=timer, progress=False)
    assert all(r["median_ms"] > 0 and r["rounds"] == 2 for r in rows), rows
    assert timer._flush_buffer.numel() * 4 >= bench.L2_FLUSH_MIN_BYTES
    assert copy_rows and copy_rows[0]["gbps"] > 0
    back_to_back = bench.Timer("cuda", repeats=2, min_time_s=0.0, l2_flush=False)
    rows, _ = bench.run(grid, "cuda", timer=back_to_back, progress=False)
    assert all(r["median_ms"] > 0 for r in rows) and back_to_back._flush_buffer is None


def test_an_interrupted_run_reports_what_it_timed():
    grid = bench.cases("cpu", ops=["dropout_fwd"], dtypes=["float32"], sizes=[2**10, 2**12])
    calls = []

    class StopsAfterOneComparison(bench.Timer):
        def interleaved(self, fns):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return super().interleaved(fns)

    timer = StopsAfterOneComparison("cpu", repeats=1, min_time_s=0.0)
    rows, _ = bench.run(grid, "cpu", timer=timer, progress=False)
    assert len(rows) == len(grid)
    done = [r for r in rows if r["median_ms"] is not None]
    assert {r["numel"] for r in done} == {2**10}
    rest = [r for r in rows if r["numel"] == 2**12]
    assert rest and all(r["note"] == bench.INTERRUPTED for r in rest)


def test_sigterm_stops_the_bench_but_the_json_is_written(tmp_path):
    import signal
    import subprocess
    import sys

    path = tmp_path / "out.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastreg",
            "bench",
            "--device",
            "cpu",
            "--ops",
            "dropout",
            "--sizes",
            "2^20,2^22,2^24",
            "--threads",
            "1",
            "--json",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:  # the progress lines: the run has started
        if line.startswith("[") and "dropout_fwd" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    doc = json.loads(path.read_text())
    assert any(r["note"] == bench.INTERRUPTED for r in doc["results"])
    assert bench.INTERRUPTED in out
