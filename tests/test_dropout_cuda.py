"""CUDA-only dropout checks: CPU == CUDA for the same (seed, offset), CUDA graphs, and
tensors past 2^31 elements. Skipped without a GPU."""

import pytest
import torch
from conftest import FLOAT_DTYPES, MASK_MODES, requires_cuda
from philox_scalar import keep_list

import fastreg

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("shape", [(1,), (33,), (1000, 37), (4, 3, 16, 16)])
def test_cpu_and_cuda_agree_bit_for_bit(dtype, mode, shape):
    x = torch.randn(shape).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    y_cpu = fastreg.dropout(x_cpu, 0.35, mask=mode, seed=2**40 + 11)
    y_gpu = fastreg.dropout(x_gpu, 0.35, mask=mode, seed=2**40 + 11)
    assert torch.equal(y_cpu, y_gpu.cpu())
    g = torch.randn(shape).to(dtype)
    (gx_cpu,) = torch.autograd.grad(y_cpu, x_cpu, g)
    (gx_gpu,) = torch.autograd.grad(y_gpu, x_gpu, g.cuda())
    assert torch.equal(gx_cpu, gx_gpu.cpu())


@pytest.mark.parametrize("offset", [0, 5, 2**32 + 1])
def test_cuda_mask_equals_cpu_mask(offset):
    for numel in [1, 1023, 1024, 1025, 100_003]:
        cpu = fastreg.dropout_mask(numel, 0.2, 77, offset)
        gpu = fastreg.dropout_mask(numel, 0.2, 77, offset, device="cuda")
        assert torch.equal(cpu, gpu.cpu())


def test_misaligned_views_take_the_scalar_path():
    base = torch.randn(4097, device="cuda")
    for start in (1, 2, 3):
        x = base[start : start + 4000]
        assert torch.equal(
            fastreg.dropout(x, 0.5, seed=1).cpu(), fastreg.dropout(x.cpu(), 0.5, seed=1)
        )


def _capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("mode", MASK_MODES)
def test_cuda_graph_replays_draw_fresh_masks(mode):
    x = torch.randn(1 << 16, device="cuda", requires_grad=True)

    def step():
        y = fastreg.dropout(x, 0.5, mask=mode)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        return y, gx

    graph, (y, gx) = _capture(step)
    graph.replay()
    y1, g1 = y.clone(), gx.clone()
    graph.replay()
    y2, g2 = y.clone(), gx.clone()
    assert not torch.equal(y1, y2), "each replay must draw a fresh mask"
    assert torch.equal(g1 != 0, y1 != 0) and torch.equal(g2 != 0, y2 != 0)
    n = x.numel()
    assert abs(int((y2 != 0).sum()) - n / 2) <= 6 * (n * 0.25) ** 0.5


def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.skipif(
    not torch.cuda.is_available() or _free_gpu_bytes() < 24 * 2**30,
    reason="needs 24 GiB of free GPU memory",
)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_more_than_2_pow_31_elements(mode):
    n = 2**31 + 1000
    x = torch.ones(n, dtype=torch.float16, device="cuda", requires_grad=True)
    y = fastreg.dropout(x, 0.5, mask=mode, seed=9)
    tail = 4096
    expected = torch.tensor(keep_list(tail, 0.5, 9, start=n - tail))
    assert torch.equal((y[-tail:] != 0).cpu(), expected)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal((gx[-tail:] != 0).cpu(), expected)
