"""benchmarks/compile_times.py: the per-unit compile times read from a ninja log."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import compile_times  # noqa: E402

LOG = """# ninja log v5
1\t50909\t1796108452444586181\t/x/build/temp.linux-x86_64-cpython-311/csrc/cpu/dropout_cpu.o\tde09
1\t74925\t1796108476416586181\t/x/build/temp.linux-x86_64-cpython-311/csrc/cuda/dropout_cuda.o\t6177
50910\t61000\t1796108486416586181\t/x/build/temp.linux-x86_64-cpython-311/csrc/cpu/dropout_cpu.o\tab12
"""


def test_reads_each_unit_once_the_last_build_winning(tmp_path):
    log = tmp_path / ".ninja_log"
    log.write_text(LOG)
    times = compile_times.read_log(str(log))
    # the sources exist in this tree, so the suffix is found
    assert times == {"csrc/cpu/dropout_cpu.cpp": 10.09, "csrc/cuda/dropout_cuda.cu": 74.924}


def test_prints_a_markdown_table(tmp_path, capsys):
    log = tmp_path / ".ninja_log"
    log.write_text(LOG)
    assert compile_times.main([str(log), "--markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        "| translation unit | seconds |",
        "| --- | --- |",
        "| `csrc/cuda/dropout_cuda.cu` | 75 |",
        "| `csrc/cpu/dropout_cpu.cpp` | 10 |",
    ]
    assert out[4] == "2 units, 85 s in all (one core each)"
