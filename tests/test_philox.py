"""Philox4x32-10 against Random123's known-answer vectors, in each implementation."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from philox_scalar import keep_list, philox4x32_10

import fastreg
from fastreg import reference

M = 0xFFFFFFFF
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ctr,key,expected", KNOWN_ANSWERS)
def test_scalar_implementation_known_answers(ctr, key, expected):
    assert philox4x32_10(ctr, key) == expected


@pytest.mark.parametrize("ctr,key,expected", KNOWN_ANSWERS)
def test_reference_known_answers(ctr, key, expected):
    words = reference.philox4x32_10(*[torch.tensor([v], dtype=torch.int64) for v in ctr + key])
    assert tuple(int(w) for w in words) == expected


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_header_known_answers(tmp_path):
    """csrc/device/philox.h, compiled as host code, gives the known answers."""
    source = tmp_path / "kat.cpp"
    lines = ['#include "device/philox.h"', "#include <cstdio>", "int main() {", "  int bad = 0;"]
    for ctr, key, expected in KNOWN_ANSWERS:
        args = ", ".join(f"{v}u" for v in ctr + key)
        lines.append(f"  {{ auto r = fastreg::philox4x32_10({args});")
        for i, e in enumerate(expected):
            lines.append(f"    bad += r.v[{i}] != {e}u;")
        lines.append("  }")
    lines += ['  std::printf("%d\\n", bad);', "  return bad;", "}"]
    source.write_text("\n".join(lines))
    binary = tmp_path / "kat"
    subprocess.run(
        ["c++", "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)],
        check=True,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, f"{result.stdout.strip()} known-answer words differ"


@pytest.mark.parametrize(
    "seed,offset", [(0, 0), (1234, 0), (2**64 - 1, 2**32 + 7), (2**40 + 3, 2**63)]
)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999, 1.0])
def test_mask_stream_matches_scalar_contract(seed, offset, p):
    numel = 1001  # not a multiple of 4 or 32: partial Philox blocks and mask words
    expected = torch.tensor(keep_list(numel, p, seed, offset))
    assert torch.equal(fastreg.dropout_mask(numel, p, seed, offset), expected)
    assert torch.equal(reference.dropout_mask(numel, p, seed, offset), expected)


def test_negative_seed_means_its_64_bit_pattern():
    a = fastreg.dropout_mask(64, 0.5, -1)
    b = fastreg.dropout_mask(64, 0.5, 2**64 - 1)
    assert torch.equal(a, b)
