"""The command line: python -m fastreg bench / demo. Fast checks only, no timed assertions
(the timings themselves are the benchmark's business, not the tests')."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import requires_extension

import fastreg
from fastreg import bench, demo
from fastreg.__main__ import build_parser, main
from fastreg.bench import memory

QUICK = [
    "bench",
    "--quick",
    "--sizes",
    "65536",
    "--dtype",
    "float32",
    "--repeats",
    "1",
    "--no-progress",
    "--device",
    "cpu",
    "--threads",
    "1",
]
ROW_KEYS = {
    "op",
    "impl",
    "dtype",
    "numel",
    "median_ms",
    "gbps",
    "copy_frac",
    "speedup",
    "saved_bytes_per_elem",
    "rel_err",
    "note",
}


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m fastreg" in out
    if argv[0] == "bench":
        for option in (
            "--device",
            "--quick",
            "--dtype",
            "--sizes",
            "--ops",
            "--compile",
            "--json",
            "--plot",
            "--memory",
            "--layers",
            "--seq",
        ):
            assert option in out


def test_no_command_prints_the_help_and_succeeds(capsys):
    """As git: `python -m fastreg` alone prints the help (both commands) and exits 0."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fastreg") and "bench" in out and "demo" in out
    result = subprocess.run(
        [sys.executable, "-m", "fastreg"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m fastreg" in result.stdout and "demo" in result.stdout


def test_unknown_command_still_fails(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["benchmark"])
    assert exit.value.code == 2
    assert "invalid choice: 'benchmark'" in capsys.readouterr().err


def test_module_runs_as_script():
    result = subprocess.run(
        [sys.executable, "-m", "fastreg", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "bench" in result.stdout and "demo" in result.stdout


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    """One run of bench --quick at 2^16 float32 with --json, shared by the checks."""
    path = tmp_path_factory.mktemp("bench") / "out.json"
    assert main(QUICK + ["--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_bench_json_has_the_documented_keys(quick_json):
    doc = quick_json
    assert {"device", "torch", "fastreg", "commit", "copy_gbps", "results"} <= set(doc)
    assert doc["device"].startswith("cpu: ")
    assert doc["torch"] == torch.__version__
    assert doc["copy_gbps"] and all(c["gbps"] > 0 for c in doc["copy_gbps"])
    for row in doc["results"]:
        assert ROW_KEYS <= set(row)
        assert row["dtype"] == "float32"


def test_bench_json_rows_cover_the_grid(quick_json):
    rows = quick_json["results"]
    dropout = [r for r in rows if r["op"] in bench.DROPOUT_OPS]
    assert {(r["op"], r["impl"]) for r in dropout} == {
        (op, impl) for op in bench.DROPOUT_OPS for impl in bench.DROPOUT_IMPLS
    }
    assert all(r["numel"] == 65536 and r["median_ms"] > 0 and r["gbps"] > 0 for r in dropout)
    fused = [r for r in rows if r["op"] in bench.FUSED_OPS]
    assert {(r["op"], r["impl"]) for r in fused} == {
        (op, impl) for op in bench.FUSED_OPS for impl in bench.FUSED_IMPLS
    }
    for r in fused:
        if r["impl"] != "native" and not hasattr(fastreg, "bias_dropout_add"):
            assert r["note"] == bench.FUSED_UNAVAILABLE and r["median_ms"] is None
        else:
            assert r["median_ms"] > 0 and r["saved_bytes_per_elem"] is not None, r
    penalty = [r for r in rows if r["op"].startswith("penalty")]
    assert {(r["op"], r["impl"]) for r in penalty} == {
        (op, impl) for op in bench.PENALTY_OPS for impl in bench.PENALTY_IMPLS
    }
    for r in penalty:
        if r["impl"] == "fastreg" and bench.penalty_api() is None:
            assert r["note"] == bench.PENALTY_UNAVAILABLE and r["median_ms"] is None
        else:
            assert r["median_ms"] > 0 and r["rel_err"] is not None, r
    # the speedup is relative to the baseline of the same op, dtype and size
    assert all(r["speedup"] == pytest.approx(1.0) for r in rows if r["impl"] in ("native", "loop"))


@requires_extension  # measures what the kernels keep
def test_bench_measures_what_each_mask_mode_keeps(quick_json):
    kept = {
        r["impl"]: r["saved_bytes_per_elem"]
        for r in quick_json["results"]
        if r["op"] == "dropout_fwd"
    }
    constant = 64 / 65536  # the (seed, offset) pair, and some slack
    assert 0.125 <= kept["fastreg:bits"] <= 0.125 + constant
    assert 1 <= kept["fastreg:bool"] <= 1 + constant
    assert kept["fastreg:recompute"] <= constant
    assert kept["native"] >= 1  # F.dropout keeps a full-width mask on the CPU


@requires_extension  # measures what the fused kernels keep
def test_bench_measures_what_each_fused_mask_mode_keeps(quick_json):
    constant = 64 / 65536  # the (seed, offset) pair, and some slack
    for op in bench.FUSED_OPS:
        kept = {
            r["impl"]: r["saved_bytes_per_elem"]
            for r in quick_json["results"]
            if r["op"] == op and r["numel"] == 65536
        }
        assert 0.125 <= kept["fastreg:bits"] <= 0.125 + constant, (op, kept)
        assert 1 <= kept["fastreg:bool"] <= 1 + constant, (op, kept)
        assert kept["fastreg:recompute"] <= constant, (op, kept)
        assert kept["native"] >= 4, (op, kept)  # a float32 mask (and gelu's input)


def test_bench_prints_a_table(capsys):
    main([a for a in QUICK if a != "--no-progress"] + ["--ops", "dropout_fwd,penalty_value"])
    captured = capsys.readouterr()
    out = captured.out
    assert "fastreg bench" in out and "CPU threads:" in out and "commit" in out
    assert "fastreg:bits" in out and "kept B/el" in out
    assert "2^16" in out and "x" in out
    assert ("penalty: not available in this build" in out) == (bench.penalty_api() is None)
    assert "cases in" in captured.err  # the progress display's last line


def test_json_to_a_folder_is_named_after_the_device(tmp_path, capsys):
    main(QUICK + ["--ops", "dropout_fwd", "--json", str(tmp_path) + "/"])
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["cpu-" + files[0].name[4:]]


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit) as exit:
        main(QUICK + ["--plot", str(tmp_path / "p.png")])
    assert "pip install matplotlib" in str(exit.value.code)
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--plot", str(tmp_path / "d.png")])
    assert "pip install matplotlib" in str(exit.value.code)
    assert not list(tmp_path.iterdir())


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    main(QUICK + ["--ops", "dropout_fwd", "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--dtype", "float64"], "unknown dtype"),
        (["bench", "--ops", "dropout_fw"], "unknown op"),
        (["bench", "--sizes", "2^x"], "cannot read size"),
        (["bench", "--params", "resnet"], "unknown parameter set"),
        (["bench", "--p", "1.5"], "dropout probability"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_arguments_parse():
    args = build_parser().parse_args(
        [
            "bench",
            "--dtype",
            "bf16,float32",
            "--sizes",
            "2^16,64k,1M",
            "--ops",
            "dropout",
            "--params",
            "gpt2",
            "--compile",
            "--threads",
            "1",
        ]
    )
    assert args.dtype == ["bfloat16", "float32"]
    assert args.sizes == [65536, 65536, 2**20]
    assert args.ops == list(bench.DROPOUT_OPS)
    assert build_parser().parse_args(["bench", "--ops", "fused"]).ops == list(bench.FUSED_OPS)
    assert args.params == ["gpt2"] and args.compile and args.threads == 1
    args = build_parser().parse_args(["demo", "--plot", "d.png", "--seed", "3", "--no-digits"])
    assert (args.plot, args.seed, args.no_digits) == ("d.png", 3, True)
    assert args.func.__name__ == "run_demo"


def test_cases_grid():
    full = bench.cases("cpu")
    assert {c.numel for c in full if c.family == "dropout"} == {2**k for k in range(16, 25, 2)}
    assert {c.dtype for c in full} == set(bench.DTYPES)
    gpu = bench.cases("cuda", ops=["dropout_fwd"])
    assert max(c.numel for c in gpu) == 2**28
    assert len({c.name for c in full}) == len(full)  # ids unique: --benchmark-compare pairs by them
    compiled = bench.cases("cpu", ops=["penalty_value"], quick=True, compile=True)
    assert [c.impl for c in compiled] == list(bench.PENALTY_IMPLS) + ["compile"]


def test_param_sets_are_the_documented_sizes():
    mlp = bench.PARAM_SETS["mlp"][1]
    assert len(mlp) == 100 and bench.param_set_numel("mlp") == 3_289_600
    gpt2 = bench.PARAM_SETS["gpt2"][1]
    assert len(gpt2) == 148 and bench.param_set_numel("gpt2") == pytest.approx(124.4e6, rel=1e-3)


def test_sizes_read_and_print():
    assert [bench.parse_size(s) for s in ("65536", "2^20", "2**10", "16M", "1k")] == [
        65536,
        2**20,
        1024,
        2**24,
        1024,
    ]
    assert bench.human_size(2**24) == "2^24" and bench.human_size(3_289_600) == "3.29M"


@requires_extension  # measures what the kernels keep
def test_memory_report_runs_and_bits_keep_less(tmp_path, capsys):
    path = tmp_path / "m.json"
    main(
        [
            "bench",
            "--memory",
            "--device",
            "cpu",
            "--layers",
            "1",
            "--width",
            "32",
            "--heads",
            "2",
            "--batch",
            "2",
            "--seq",
            "16",
            "--vocab",
            "64",
            "--steps",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert "nn.Dropout" in out and "fastreg:recompute" in out and "kept MiB" in out
    rows = {r["variant"]: r for r in json.loads(path.read_text())["memory"]["rows"]}
    assert set(rows) == set(memory.VARIANTS)
    kept = {v: r["kept_bytes"] for v, r in rows.items()}
    assert (
        kept["no dropout"]
        < kept["fastreg:recompute"]
        < kept["fastreg:bits"]
        < kept["fastreg:bool"]
        < kept["nn.Dropout"]
    )


def test_demo_penalty_matches_the_definition():
    penalty, _ = demo.penalty_fn()
    weights = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    assert float(penalty(weights, l1=0.5)) == pytest.approx(0.5 * 6)
    assert float(penalty(weights, l2=0.25)) == pytest.approx(0.25 * 14)


def test_demo_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    lines = []
    demo.digits(out=lines.append)
    assert lines == ["2. " + demo.SKLEARN_MISSING]
    assert "pip install scikit-learn" in demo.SKLEARN_MISSING


def test_demo_curve_part_runs(monkeypatch):
    monkeypatch.setattr(demo, "STEPS", 3)
    lines = []
    with bench.num_threads(1):  # as demo.main runs it
        demo.curves(out=lines.append)
    assert sum("train MSE" in line for line in lines) == 1
    assert any(line.strip().startswith("fastreg.Dropout(0.5)") for line in lines)
