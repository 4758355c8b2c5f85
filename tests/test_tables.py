"""The result tables of README.md and docs/*.md are generated from benchmarks/results/
(fastreg/bench/tables.py, `make tables`): every table between markers must be what its
JSON gives, and the generator renders what a JSON holds, no more."""

import json
import pathlib

import pytest

from fastreg.bench import tables

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_tables_match_their_json(capsys):
    """The generator in check mode over README.md and docs/*.md: a table edited by hand,
    or a JSON changed without `make tables`, fails here with the difference."""
    stale = tables.run(check=True)
    assert not stale, (
        f"tables out of date in {stale}: run `make tables`\n" + capsys.readouterr().out
    )


def test_the_result_tables_are_generated():
    readme = (ROOT / "README.md").read_text()
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    assert tables.count_tables(readme) >= 1
    assert tables.count_tables(bench) >= 1
    assert "<!-- table: results source=benchmarks/results/" in readme


# ---- the generator on synthetic runs --------------------------------------------------


def row(
    op,
    impl,
    numel,
    median_ms,
    speedup=None,
    q=(None, None),
    kept=None,
    params=None,
    dtype="float32",
    tensors=None,
    clear=True,
):
    return {
        "op": op,
        "impl": impl,
        "dtype": dtype,
        "numel": numel,
        "params": params,
        "tensors": tensors,
        "median_ms": median_ms,
        "gbps": 1.0,
        "copy_frac": 0.5,
        "speedup": speedup,
        "speedup_q1": q[0],
        "speedup_q3": q[1],
        "speedup_clear": clear,
        "saved_bytes_per_elem": kept,
        "rel_err": None,
        "note": None,
    }


def run_doc(**overrides):
    rows = []
    for op in ("dropout_fwdbwd", "bias_dropout_add"):
        for n in (2**20, 2**24):
            rows.append(row(op, "native", n, 20.0, 1.0, (1.0, 1.0), 4.0))
            rows.append(row(op, "fastreg:bits", n, 2.0, 10.04, (9.26, 11.5), 0.125244))
    rows.append(
        row("penalty_fwdbwd", "loop", 3289600, 17.6, 1.0, (1.0, 1.0), params="mlp", tensors=100)
    )
    rows.append(
        row(
            "penalty_fwdbwd",
            "fastreg",
            3289600,
            2.89,
            5.82,
            (5.51, 7.32),
            params="mlp",
            tensors=100,
        )
    )
    doc = {
        "device": "cpu: Test CPU",
        "torch": "2.14.1",
        "fastreg": "0.1.0",
        "commit": "abc1234",
        "date": "2026-12-01 07:52 UTC",
        "threads": 2,
        "settings": {"p": 0.5, "l1": 1e-5, "l2": 1e-4},
        "results": rows,
        "load": {
            "others_cpu_share": 0.01,
            "cpus": 2,
            "load_before": 0.5,
            "load_max": 1.0,
            "competed": False,
        },
    }
    doc.update(overrides)
    return doc


def write(tmp_path, name, doc):
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(doc))
    return f"benchmarks/results/{name}"


def page(tmp_path, marker):
    path = tmp_path / "page.md"
    path.write_text(f"# Results\n\n{marker}\nold table\n<!-- /table -->\n\nprose\n")
    return path


def test_results_table_and_check(tmp_path):
    source = write(tmp_path, "run.json", run_doc())
    path = page(tmp_path, f"<!-- table: results source={source} -->")
    assert tables.run([str(path)], root=str(tmp_path), check=True) == ["page.md"]
    assert "old table" in path.read_text()  # check mode changes nothing
    assert tables.run([str(path)], root=str(tmp_path)) == ["page.md"]
    text = path.read_text()
    assert (
        "| dropout, p = 0.5 | 2^20 | 20.0 ms | 2.00 ms (`bits`) | 10.0x [9.3-11.5] | 4, 0.125 |"
        in text
    )
    assert "| `bias_dropout_add`, p = 0.5 | 2^24 (16384 x 1024) |" in text
    assert "| penalty, 100 tensors | 3.29M | 17.6 ms (loop) | 2.89 ms | 5.8x [5.5-7.3] |" in text
    assert (
        "cpu: Test CPU, 2 threads; torch 2.14.1; fastreg 0.1.0, commit abc1234; "
        "2026-12-01 07:52 UTC; load: other processes 1% of the 2 CPUs"
    ) in text
    assert text.endswith("<!-- /table -->\n\nprose\n")
    assert tables.run([str(path)], root=str(tmp_path), check=True) == []
    # a changed measurement makes the committed table stale
    doc = run_doc()
    doc["results"][1]["median_ms"] = 2.5
    write(tmp_path, "run.json", doc)
    assert tables.run([str(path)], root=str(tmp_path), check=True) == ["page.md"]


def test_missing_fields_render_unknown(tmp_path):
    doc = run_doc()
    for key in ("load", "commit", "torch"):
        del doc[key]
    source = write(tmp_path, "old.json", doc)
    text = tables.regenerate(
        f"<!-- table: results source={source} -->\n<!-- /table -->", str(tmp_path)
    )
    assert "torch unknown" in text and "commit unknown" in text and "load: unknown" in text


def test_spread_too_wide_is_said(tmp_path):
    doc = run_doc()
    doc["results"][1]["speedup_clear"] = False
    source = write(tmp_path, "wide.json", doc)
    text = tables.regenerate(
        f"<!-- table: results source={source} params=none -->\n<!-- /table -->", str(tmp_path)
    )
    assert "spread too wide [9.3-11.5]" in text and "penalty" not in text


def test_bench_tables_by_family(tmp_path):
    source = write(tmp_path, "run.json", run_doc())
    text = tables.regenerate(
        f"<!-- table: bench source={source} -->\n<!-- /table -->", str(tmp_path)
    )
    assert "*dropout: speedup against `F.dropout`*" in text and "*penalty" in text
    assert "| fwd+bwd | float32 | 2^20 | `native` | 20.0 | 1.0 | 50% | 1.00x |  | 4.000 |" in text
    assert "|  |  |  | `fastreg:bits` | 2.00 | 1.0 | 50% | 10.04x | 9.26-11.50 | 0.125 |" in text
    narrow = tables.regenerate(
        f"<!-- table: bench source={source} ops=fused sizes=2^24 -->\n<!-- /table -->",
        str(tmp_path),
    )
    assert "bias+dropout+add" in narrow and "fwd+bwd" not in narrow and "2^20" not in narrow


@pytest.mark.parametrize(
    "marker,message",
    [
        ("<!-- table: pie source=benchmarks/results/run.json -->", "unknown table kind"),
        ("<!-- table: results -->", "no source"),
        ("<!-- table: results source=benchmarks/results/none.json -->", "cannot read"),
        (
            "<!-- table: results source=benchmarks/results/run.json colour=red -->",
            "unknown options",
        ),
        (
            "<!-- table: results source=benchmarks/results/run.json sizes=2^12 -->",
            "no dropout_fwdbwd rows",
        ),
        ("<!-- table: memory source=benchmarks/results/run.json -->", "no `memory` object"),
    ],
)
def test_bad_markers_are_errors(tmp_path, marker, message):
    write(tmp_path, "run.json", run_doc())
    with pytest.raises(tables.TableError, match=message):
        tables.regenerate(f"{marker}\n<!-- /table -->", str(tmp_path))


def test_unclosed_marker_is_an_error(tmp_path):
    with pytest.raises(tables.TableError, match="no <!-- /table -->"):
        tables.regenerate("<!-- table: results source=x.json -->\nrow\n", str(tmp_path), "p.md")


def memory_row(variant, layer=None, kept=1 << 20, **extra):
    return {"variant": variant, "kept_bytes": kept, "layer_bytes": layer, **extra}


def memory_doc():
    """The shape `bench --memory --json` writes, plus a model section and a variant that
    the generator has never heard of (a later bench's LoRA models, `regenerated`)."""
    mib = 1 << 20
    return run_doc(
        results=[],
        memory={
            "config": {"layers": 2, "width": 128},
            "dtype": "float32",
            "steps": 5,
            "rows": [
                memory_row("nn.Dropout", kept=16 * mib, kept_vs_native=1.0),
                memory_row("fastreg:bits", kept=12 * mib, kept_vs_native=0.75),
            ],
            "gpt2": {
                "config": {"layers": 2, "width": 64},
                "korthikanti_layer_bytes": [1, 2],
                "rows": [
                    memory_row("nn.Dropout", 10 * mib, mask_bytes=2 * mib, masks_removed=0.0),
                    memory_row(
                        "fastreg:recompute+functional", 7.5 * mib, mask_bytes=0, masks_removed=1.0
                    ),
                ],
            },
            "llama-lora": {
                "config": {"layers": 2, "r": 8},
                "rows": [memory_row("nn.Dropout", 4 * mib), memory_row("regenerated", 3 * mib)],
            },
        },
    )


def test_memory_renders_every_model_and_variant(tmp_path):
    source = write(tmp_path, "memory.json", memory_doc())
    text = tables.regenerate(
        f"<!-- table: memory source={source} -->\n<!-- /table -->", str(tmp_path)
    )
    assert "| model | variant | per layer MiB |" in text
    assert "| own | nn.Dropout |  |" in text
    assert "| gpt2 | nn.Dropout | 10.0 |" in text
    assert "|  | fastreg:recompute+functional | 7.5 |" in text and "| 100% |" in text
    assert "| llama-lora | nn.Dropout | 4.0 |" in text and "|  | regenerated | 3.0 |" in text
    assert "llama-lora: layers 2, r 8" in text
    only = tables.regenerate(
        f"<!-- table: memory source={source} models=gpt2 "
        "columns=layer_bytes,mask_bytes,masks_removed -->\n<!-- /table -->",
        str(tmp_path),
    )
    assert "| variant | per layer MiB | masks MiB | masks removed |" in only
    assert "| nn.Dropout | 10.0 | 2.0 | 0% |" in only and "llama" not in only


def test_memory_rows_naming_their_model(tmp_path):
    doc = memory_doc()
    doc["memory"] = {
        "models": [
            {
                "name": "peft",
                "config": {},
                "rows": [
                    memory_row("nn.Dropout", 2 << 20, model="t5"),
                    memory_row("nn.Dropout", 1 << 20, model="bert"),
                ],
            }
        ]
    }
    source = write(tmp_path, "memory.json", doc)
    text = tables.regenerate(
        f"<!-- table: memory source={source} -->\n<!-- /table -->", str(tmp_path)
    )
    assert "| t5 | nn.Dropout | 2.0 |" in text and "| bert | nn.Dropout | 1.0 |" in text


def test_cli_check_exit_status(tmp_path, capsys):
    source = write(tmp_path, "run.json", run_doc())
    path = page(tmp_path, f"<!-- table: results source={source} -->")
    root = ["--root", str(tmp_path)]
    assert tables.main(root + ["--check", str(path)]) == 1
    assert "+| dropout, p = 0.5 | 2^20 |" in capsys.readouterr().out
    assert tables.main(root + [str(path)]) == 0
    assert tables.main(root + ["--check", str(path)]) == 0
    (tmp_path / "bad.md").write_text("<!-- table: results -->\n<!-- /table -->\n")
    assert tables.main(root + ["--check", str(tmp_path / "bad.md")]) == 2
