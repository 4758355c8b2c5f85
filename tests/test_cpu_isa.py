"""The CPU kernels' instruction-set paths: which clone and which Philox path this CPU
runs, and every Philox path this CPU can run (hand-written AVX-512 and AVX2, the portable
loop) bit for bit against the reference's Philox."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FLOAT_DTYPES, MASK_MODES, requires_extension

import fastreg
from fastreg import _ops, reference

pytestmark = requires_extension

PATHS = ["portable", "avx2", "avx512"]


def runnable_paths():
    C = _ops._C
    here = C.philox_isa()
    found = []
    for name in PATHS:
        try:
            C.set_philox_isa(name)
            found.append(name)
        except ValueError:
            pass
    C.set_philox_isa(here)
    return found


@pytest.fixture(params=PATHS)
def philox_path(request):
    C = _ops._C
    here = C.philox_isa()
    if request.param not in runnable_paths():
        pytest.skip(f"this CPU does not run the {request.param} Philox path")
    C.set_philox_isa(request.param)
    yield request.param
    C.set_philox_isa(here)


def test_selection_reports_the_cpu():
    C = _ops._C
    assert C.cpu_clone in ("x86-64-v4", "x86-64-v3", "x86-64", "portable")
    assert C.philox_isa() in PATHS
    # the default is the widest path this CPU runs
    assert C.philox_isa() == runnable_paths()[-1] or "FASTREG_CPU_PHILOX" in os.environ
    with pytest.raises(ValueError, match="not a Philox path"):
        C.set_philox_isa("sse9")


@pytest.mark.parametrize("name", PATHS)
def test_environment_variable_forces_a_path(name):
    code = "import fastreg._C as C; print(C.philox_isa())"
    env = dict(os.environ, FASTREG_CPU_PHILOX=name)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert out == (name if name in runnable_paths() else _ops._C.philox_isa())


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("seed, offset", [(0, 0), (2**64 - 1, 2**63 + 5), (12345, 2**32 - 1)])
def test_mask_is_the_reference(philox_path, p, seed, offset):
    n = 3 * 4096 + 77  # several chunks and a partial tile
    got = fastreg.dropout_mask(n, p, seed, offset)
    want = reference.dropout_mask(n, p, seed, offset)
    assert torch.equal(got, want), philox_path


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_dropout_and_fused_are_the_reference(philox_path, dtype, mode):
    x = torch.randn(5, 1000, dtype=dtype, requires_grad=True)
    out = fastreg.dropout(x, 0.3, seed=7, mask=mode)
    assert torch.equal(out, reference.dropout(x, 0.3, seed=7))
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(reference.dropout(x, 0.3, seed=7), x, g)
    assert torch.equal(gx, gx_ref)
    bias = torch.randn(1000, dtype=dtype)
    fused = fastreg.bias_act_dropout(x.detach(), bias, 0.2, "relu", seed=3, mask=mode)
    assert torch.equal(fused, reference.bias_act_dropout(x.detach(), bias, 0.2, "relu", seed=3))


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_cpu_math_is_inlined_into_the_loops():
    # exp_cpu, erf_cpu and tanh_cpu (csrc/device/fused_math.h) exist so that gcc can
    # vectorize the fused ops' activation loops. The loops are target_clones functions,
    # into which gcc does not inline a plain inline function: called out of line, exp_cpu
    # kept the gelu and silu loops scalar (about 7x slower). No out-of-line copy of them
    # may be left in the library.
    symbols = subprocess.run(
        ["nm", "-C", "--defined-only", _ops._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    assert "apply_keep" in symbols  # nm read the symbols
    for name in ("exp_cpu", "erf_cpu", "tanh_cpu"):
        assert f"fastreg::{name}(" not in symbols, f"{name} is called out of line"
