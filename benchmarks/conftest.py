"""pytest-benchmark suite over the cases of ``python -m fastreg bench`` (fastreg/bench/).

    pytest benchmarks/ --benchmark-only                       # the device's full grid
    pytest benchmarks/ --benchmark-only --fastreg-quick       # the --quick grid
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # then, on another commit:
    pytest benchmarks/ --benchmark-only --benchmark-compare

Test ids are the case names (op-impl-dtype-size), stable across commits, so
``--benchmark-compare`` pairs them; each (op, dtype, size) is one benchmark group. Options
below narrow the grid as the command's flags do. ``make test`` never runs this folder.
"""

import math

import pytest
import torch

from fastreg import bench


def pytest_addoption(parser):
    group = parser.getgroup("fastreg", "fastreg benchmark grid (see python -m fastreg bench)")
    group.addoption(
        "--fastreg-device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when a GPU is visible, else cpu",
    )
    group.addoption("--fastreg-quick", action="store_true", help="the --quick grid")
    group.addoption("--fastreg-dtype", default=None, help="comma-separated dtypes")
    group.addoption("--fastreg-sizes", default=None, help="comma-separated dropout sizes")
    group.addoption("--fastreg-params", default=None, help="penalty parameter sets: mlp, gpt2")
    group.addoption(
        "--fastreg-compile", action="store_true", help="add the torch.compile baselines"
    )
    group.addoption("--fastreg-rounds", type=int, default=10, help="timed rounds per case")


def _device(config):
    return config.getoption("--fastreg-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    family = metafunc.module.FAMILY
    dtype, sizes, params = (
        config.getoption(o) for o in ("--fastreg-dtype", "--fastreg-sizes", "--fastreg-params")
    )
    grid = bench.cases(
        _device(config),
        ops=bench.OP_GROUPS[family],
        dtypes=bench.parse_list(dtype, list(bench.DTYPES), bench.DTYPE_ALIASES) if dtype else None,
        sizes=[bench.parse_size(s) for s in sizes.split(",")] if sizes else None,
        params=bench.parse_list(params, list(bench.PARAM_SETS)) if params else None,
        quick=config.getoption("--fastreg-quick"),
        compile=config.getoption("--fastreg-compile"),
    )
    metafunc.parametrize("case", grid, ids=[c.name for c in grid])


@pytest.fixture(scope="session")
def device(request):
    device = _device(request.config)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--fastreg-device cuda, but torch sees no GPU")
    return device


@pytest.fixture
def run_case(benchmark, device, request):
    """Times one bench.Case with benchmark.pedantic: a warm-up round, then rounds of
    enough calls to last about a millisecond each, a CUDA synchronise inside the timed
    call."""
    rounds = request.config.getoption("--fastreg-rounds")
    timer = bench.Timer(device)

    def run(case):
        prepared = bench.prepare(case, device, bench.Settings())
        if prepared.fn is None:
            pytest.skip(prepared.note)
        fn = prepared.fn

        def timed():
            fn()
            timer.sync()

        timed()
        first = timer._block(fn, 1)
        iterations = max(1, math.ceil(timer.min_block_s / max(first, 1e-9)))
        benchmark.group = f"{case.op} {case.dtype} {case.size_label}"
        benchmark.extra_info.update(
            op=case.op,
            impl=case.impl,
            dtype=case.dtype,
            numel=case.numel,
            bytes=prepared.bytes,
            saved_bytes_per_elem=prepared.saved_per_elem,
            rel_err=prepared.rel_err,
        )
        benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1)
        stats = benchmark.stats.stats if hasattr(benchmark.stats, "stats") else benchmark.stats
        benchmark.extra_info["gbps"] = prepared.bytes / stats.median / 1e9

    return run
