"""python -m fastreg bench --memory: the GPT-2 part (per-layer bytes, masks against the
count of Korthikanti et al.) and the interleaved step times."""

import json

import pytest
from conftest import requires_extension

from fastreg.__main__ import main
from fastreg.bench import memory

TINY = [
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
    "2",
    "--no-progress",
    "--threads",
    "1",
]


def test_korthikanti_count():
    cfg = memory.ModelConfig(layers=1, width=768, heads=12, batch=1, seq=1024)
    s, b, h, a = 1024, 1, 768, 12
    assert memory.korthikanti(cfg) == (
        34 * s * b * h + 5 * a * s * s * b,
        2 * s * b * h + a * s * s * b,
    )


@requires_extension  # measures what the kernels keep
def test_gpt2_report_routed_masks_vanish(tmp_path, capsys):
    pytest.importorskip("transformers")
    if memory._transformers() is None:
        pytest.skip("transformers disables this torch")
    path = tmp_path / "m.json"
    main(["bench", "--memory", "--device", "cpu", "--model", "gpt2", *TINY, "--json", str(path)])
    out = capsys.readouterr().out
    assert "Hugging Face GPT-2" in out and "Korthikanti" in out
    doc = json.loads(path.read_text())["memory"]
    assert doc["rows"] is None
    rows = {r["variant"]: r for r in doc["gpt2"]["rows"]}
    assert set(rows) == set(memory.GPT2_VARIANTS)
    layer = {v: r["layer_bytes"] for v, r in rows.items()}
    assert (
        layer["no dropout"]
        < layer[memory.MASKLESS]
        <= layer["fastreg:bits+functional"]
        < layer["fastreg:bool+functional"]
        < layer["fastreg:bool"]
        < layer["nn.Dropout"]
    )
    # routing the functional calls removes the attention-probability masks: with
    # recompute+functional nothing is left but the 16-byte (seed, offset) pairs (the
    # reference point), with bits 1 bit per element
    cfg = memory.ModelConfig(**doc["gpt2"]["config"])
    _, mask_elements = memory.korthikanti(cfg)
    native_mask = layer["nn.Dropout"] - layer[memory.MASKLESS]
    # torch's CPU dropout keeps a float32 mask; fastreg 16 bytes per call (3 per layer)
    assert native_mask == mask_elements * 4 - 3 * 16
    bits = layer["fastreg:bits+functional"] - layer[memory.MASKLESS]
    words = lambda n: (n + 31) // 32 * 4  # noqa: E731
    attn = cfg.heads * cfg.seq * cfg.seq * cfg.batch
    resid = cfg.seq * cfg.batch * cfg.width
    assert bits == words(attn) + 2 * words(resid)
    for r in rows.values():  # the op bench's statistic: median and interquartile range
        assert r["step_ms_q1"] <= r["step_ms"] <= r["step_ms_q3"]
        assert (
            r["speedup_min"]
            <= r["speedup_q1"]
            <= r["speedup"]
            <= r["speedup_q3"]
            <= r["speedup_max"]
        )
        assert isinstance(r["speedup_clear"], bool)
    assert rows["nn.Dropout"]["speedup"] == 1.0


def test_without_transformers_the_report_says_so(monkeypatch, capsys):
    monkeypatch.setattr(memory, "_transformers", lambda: None)
    assert memory.run_gpt2(memory.GPT2_DEFAULTS["cpu"], "cpu") is None
    assert "transformers is not installed" in memory.format_gpt2_table(None, None, "float32", 1)


def test_steps_are_timed_by_the_bench_timer_in_rotated_rounds():
    order = []

    class Fake:
        def __init__(self, name):
            self.variant, self.times, self.peaks = name, [], []
            self.device = "cpu"

        def step(self):
            order.append(self.variant)
            self.peaks.append(len(order))

    trainees = [Fake(n) for n in "abc"]
    memory.time_steps(trainees, 3)
    # one warm-up step each, then 3 rounds of one step per variant, the order rotated
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    for t in trainees:
        assert len(t.times) == 3 and all(s > 0 for s in t.times)
        assert len(t.peaks) == 3 and order[t.peaks[0] - 1] == t.variant  # warm-up left out
        assert t.peaks[0] > 3


def test_step_time_spread_is_the_interquartile_range_of_the_rounds():
    class Done:
        def __init__(self, times):
            self.times, self.peaks, self.loss = times, [], 1.0

    base = Done([2.0, 2.0, 2.0, 2.0, 8.0])  # one slow round for everyone
    fast = Done([1.0, 1.0, 1.0, 1.0, 4.0])
    row = {}
    memory._timing(row, fast, base)
    assert row["step_ms"] == pytest.approx(1e3)
    assert (row["step_ms_q1"], row["step_ms_q3"]) == (pytest.approx(1e3), pytest.approx(1e3))
    assert row["speedup"] == pytest.approx(2.0) and row["speedup_clear"] is True
    cells = memory._time_cells(row)
    assert cells[2] == "2.00x" and cells[1] == "1000.0-1000.0"
    noisy = Done([1.0, 3.0, 1.0, 3.0, 2.0])  # ratios 2, 2/3, 2, 2/3, 4: both sides of 1
    memory._timing(row, noisy, base)
    assert row["speedup_q1"] < 1.0 < row["speedup_q3"] and row["speedup_clear"] is False
    assert memory._time_cells(row)[2] == "spread too wide"


# ---- the Hugging Face models that show the dropped tensor regenerated ---------------------


@requires_extension  # measures what the kernels keep
def test_hf_report_regenerated_is_within_16_bytes_per_call_of_the_floor(tmp_path, capsys):
    pytest.importorskip("transformers")
    if memory._transformers() is None:
        pytest.skip("transformers disables this torch")
    path = tmp_path / "m.json"
    main(["bench", "--memory", "--device", "cpu", "--model", "hf", *TINY, "--json", str(path)])
    out = capsys.readouterr().out
    assert "Hugging Face T5" in out and "Hugging Face BERT" in out
    doc = json.loads(path.read_text())["memory"]
    assert doc["rows"] is None and doc["gpt2"] is None
    models = doc["hf"]["models"]
    assert set(models) == set(memory.HF_MODELS)
    try:
        import peft  # noqa: F401
    except ImportError:
        assert models["llama-lora"] == memory.HF_MISSING["peft"]
        del models["llama-lora"]
    expected_calls = {"llama-lora": 7, "bert": 3, "t5": 5}  # T5: (4 encoder + 6 decoder) / 2
    for name, rows in models.items():
        rows = {r["variant"]: r for r in rows}
        assert set(rows) == set(memory.HF_VARIANTS)
        layer = {v: r["layer_bytes"] for v, r in rows.items()}
        calls = rows["nn.Dropout"]["dropout_calls_per_layer"]
        assert calls == expected_calls[name]
        # the goal: within 16 bytes per dropout call of the floor (the (seed, offset) pair)
        assert layer[memory.REGENERATED] - layer["no dropout"] <= 16 * calls, name
        assert (
            layer[memory.REGENERATED]
            < layer["fastreg:recompute"]
            <= layer["fastreg:bits"]
            < layer["nn.Dropout"]
        ), name
        regen = rows[memory.REGENERATED]
        assert regen["bf16_gpu_bytes_per_element"] == pytest.approx(
            16 * calls / regen["dropped_elements_per_layer"] / 2
        )
        implied = {v: r["bf16_gpu_bytes_per_element"] for v, r in rows.items()}
        assert implied["nn.Dropout"] > implied["fastreg:bits"] > implied[memory.REGENERATED]
        assert "slowdown" in regen["vs_recompute"]


def test_implied_bfloat16_bytes_per_element_are_computed_from_the_parts():
    # torch's CPU dropout in float32: a 4-byte copy and a 4-byte mask -> 2 + 1 on a GPU
    assert memory.implied_bf16_gpu("nn.Dropout", 8.0, 4) == pytest.approx(3.0)
    assert memory.implied_bf16_gpu("fastreg:bits", 4.125, 4) == pytest.approx(2.125)
    assert memory.implied_bf16_gpu(memory.REGENERATED, 0.0, 4) == 0.0
    assert memory.implied_bf16_gpu("no dropout", 0.0, 4) is None


def test_without_peft_the_lora_model_says_so(monkeypatch):
    monkeypatch.setattr(memory, "_peft", lambda: None)
    monkeypatch.setattr(memory, "_transformers", lambda: None)
    result = memory.run_hf(memory.HF_DEFAULTS["cpu"], "cpu", models=("llama-lora",))
    assert result == {"llama-lora": memory.HF_MISSING["transformers"]}
    assert "not installed" in memory.format_hf_tables(
        result, memory.HF_DEFAULTS["cpu"], "float32", 1
    )
