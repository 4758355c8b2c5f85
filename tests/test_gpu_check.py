"""The GPU routine, checked here without a GPU: `.ci/gpu-check --dry-run` (the plan, the
files it needs, every command it calls parses), a broken plan reported, and the
compute-sanitizer driver `.ci/sanitize_cuda.py` run on the CPU kernels, with its check that
every operator with a kernel was called."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_extension

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu-check"
STEPS = ("build", "tests", "sanitize", "bench", "memory")


def gpu_check(*args, root=ROOT, timeout=240, env=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    env.pop("OUT", None)
    if "GPU_SLUG" not in (env or {}):
        env.pop("GPU_SLUG", None)
    return subprocess.run(
        ["bash", str(root / ".ci" / "gpu-check"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=root,
    )


def test_dry_run_passes_and_prints_every_step():
    result = gpu_check("--dry-run", env={"GPU_SLUG": "h100"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "dry run: OK" in out
    for step in STEPS:
        assert f"\n{step}:" in out, step
    assert "bench command lines parse" in out
    assert "--json benchmarks/results/h100.json --plot docs/bench-h100.png" in out
    assert "--json benchmarks/results/h100-small.json" in out
    assert "--json benchmarks/results/h100-compile.json" in out
    assert "--json benchmarks/results/h100-memory.json" in out
    assert "h200" not in out
    assert "compute-sanitizer --tool {memcheck racecheck initcheck synccheck}" in out
    assert "-n 16" in out and "-m 'cuda'" in out


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
        ("Tesla T4", "t4"),
        ("", "gpu"),
    ],
)
def test_results_are_named_after_the_gpu(name, slug):
    result = gpu_check("--slug-of", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == slug


def test_dry_run_names_the_results_after_the_gpu_found():
    import torch

    result = gpu_check("--dry-run", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
    slug = (
        gpu_check("--slug-of", torch.cuda.get_device_name(0)).stdout.strip()
        if torch.cuda.is_available()
        else "gpu"
    )
    assert f"--json benchmarks/results/{slug}.json --plot docs/bench-{slug}.png" in result.stdout


def test_dry_run_of_some_steps_plans_only_those():
    result = gpu_check("--dry-run", "bench", "memory")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\nbench:" in result.stdout and "\nmemory:" in result.stdout
    assert "\ntests:" not in result.stdout and "\nbuild:" not in result.stdout


def test_unknown_step_is_refused():
    result = gpu_check("benchmark")
    assert result.returncode == 2
    assert "unknown step 'benchmark'" in result.stderr


@pytest.fixture
def tree(tmp_path):
    """A copy of what the routine needs, to break."""
    for item in (".ci", "fastreg", "csrc", "benchmarks", "tests", "setup.py", "pyproject.toml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, tmp_path / item)
    return tmp_path


def test_a_missing_file_is_reported(tree):
    (tree / ".ci" / "sanitize_cuda.py").unlink()
    result = gpu_check("--dry-run", root=tree)
    assert result.returncode == 1
    assert "MISSING: .ci/sanitize_cuda.py" in result.stdout
    assert "dry run: FAILED" in result.stdout


def test_a_broken_python_file_is_reported(tree):
    (tree / "fastreg" / "bench" / "memory.py").write_text("def broken(:\n")
    result = gpu_check("--dry-run", root=tree)
    assert result.returncode == 1
    assert "BROKEN: python -m py_compile" in result.stdout


def test_a_bench_line_the_parser_refuses_is_reported(tree):
    script = tree / ".ci" / "gpu-check"
    text = script.read_text()
    assert "BENCH_SMALL=(bench --device cuda --no-progress" in text
    script.write_text(
        text.replace(
            "BENCH_SMALL=(bench --device cuda --no-progress",
            "BENCH_SMALL=(bench --device cuda --no-such-flag",
        )
    )
    result = gpu_check("--dry-run", root=tree)
    assert result.returncode == 1
    assert "BROKEN: python -m fastreg bench --device cuda --no-such-flag" in result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_has_the_target():
    result = subprocess.run(
        ["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert ".ci/gpu-check" in result.stdout


def _driver():
    spec = importlib.util.spec_from_file_location(
        "sanitize_cuda", ROOT / ".ci" / "sanitize_cuda.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_extension
def test_sanitizer_driver_runs_every_family_on_the_cpu():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / ".ci" / "sanitize_cuda.py"),
            "--device",
            "cpu",
            "--dtypes",
            "float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every kernel family ran" in result.stdout
    for op in (
        "dropout_fwd",
        "dropout_bwd",
        "dropout_mask",
        "bias_dropout_add_fwd",
        "bias_act_dropout_fwd",
        "bias_act_dropout_bwd",
        "penalty",
        "penalty_backward",
        "penalty_grad_",
        "prox_l1_",
    ):
        assert f"fastreg::{op}" in result.stdout, op


@requires_extension
def test_sanitizer_driver_fails_when_a_family_is_not_called(monkeypatch, capsys):
    driver = _driver()
    monkeypatch.setattr(driver, "penalty_calls", lambda dev, dtype: None)
    monkeypatch.setattr(driver, "fused_calls", lambda dev, dtype: None)
    with pytest.raises(SystemExit) as exit:
        driver.main(["--device", "cpu", "--dtypes", "float32"])
    message = str(exit.value.code)
    assert "never called" in message
    assert "fastreg::prox_l1_" in message and "fastreg::bias_act_dropout_fwd" in message
    assert "fastreg::dropout_fwd" not in message
