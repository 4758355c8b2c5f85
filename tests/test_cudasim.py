"""The CUDA kernels on the CUDA simulator (csrc/sim, docs/cuda-simulator.md).

Runs with FASTREG_BACKEND=cudasim (`make test-cudasim`), where every fastreg operator on a
CPU tensor runs the CUDA glue and kernels block by block, each block's threads as fibers in
lockstep. Checks here: the simulator's own semantics (collectives, barrier, shared memory,
block orders, and that planted synchronisation bugs fail the launch), and every CUDA kernel
family bitwise against the reference and bitwise equal across block orders and grid sizes.
The other test modules run on the simulator too, in each block order (the Makefile).
"""

import contextlib

import pytest
import torch
from conftest import FLOAT_DTYPES, MASK_MODES

import fastreg
from fastreg import _ops, reference

pytestmark = pytest.mark.skipif(
    _ops.BACKEND != "cudasim",
    reason="runs on the CUDA simulator: FASTREG_BACKEND=cudasim (make test-cudasim)",
)

sim = _ops._C

# (order, resident blocks): one block (every grid-stride loop iterates), a few, many.
CONFIGS = [("forward", 1), ("reverse", 3), ("random", 3), ("forward", 64), ("random", 64)]
ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu"]


@contextlib.contextmanager
def configured(order, resident_blocks, seed=0):
    before = sim.config()
    sim.configure(order, resident_blocks, seed)
    try:
        yield
    finally:
        sim.configure(*before)


def across_configs(fn):
    """fn()'s results under every configuration; asserts they are bitwise equal and
    returns one of them."""
    results = []
    for order, blocks in CONFIGS:
        with configured(order, blocks, seed=7):
            results.append((order, blocks, fn()))
    first = results[0][2]
    for order, blocks, result in results[1:]:
        for a, b in zip(
            torch.utils._pytree.tree_leaves(first), torch.utils._pytree.tree_leaves(result)
        ):
            assert same_bits(a, b), f"results differ between block orders/grids: {order}, {blocks}"
    return first


def same_bits(a, b):
    """Equal shapes, dtypes and bits, NaN in the same places (of any payload: the
    conversions of NaN to 16-bit types differ between torch's ops and c10's scalar ones)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    a_bits, b_bits = (t.contiguous().view(bits).masked_fill(nan.contiguous(), 0) for t in (a, b))
    return torch.equal(a_bits, b_bits)


def state(seed, offset=0):
    return torch.tensor([seed, offset], dtype=torch.int64)


# ---- The simulator itself ----


def test_collectives_give_cuda_results():
    out = sim.selftest("collectives").view(2, 256, 8)
    lane = torch.arange(256) % 32
    ballot = sum(1 << i for i in range(32) if i % 3 == 0)
    assert torch.equal(out[..., 0], torch.full((2, 256), ballot))
    # shfl_down by 3: lanes 29..31 keep their own value
    assert torch.equal(
        out[..., 1], torch.where(lane + 3 < 32, (lane + 3) * 10, lane * 10).expand(2, -1)
    )
    # shfl_up by 5 within segments of 16
    assert torch.equal(
        out[..., 2], torch.where(lane % 16 >= 5, (lane - 5) * 10, lane * 10).expand(2, -1)
    )
    assert torch.equal(out[..., 3], ((lane ^ 9) * 10).expand(2, -1))
    # shfl of lane 7 of each 8-lane segment, doubles: 2 * (src + 0.5)
    assert torch.equal(out[..., 4], (2 * ((lane // 8) * 8 + 7) + 1).expand(2, -1))
    assert torch.equal(out[..., 5], torch.ones(2, 256, dtype=torch.long))
    assert torch.equal(out[..., 6], torch.zeros(2, 256, dtype=torch.long))
    half = sum(1 << i for i in range(16) if i % 2)
    assert torch.equal(out[..., 7], torch.where(lane < 16, half, -1).expand(2, -1))


def test_shared_memory_and_barrier_per_block():
    out = sim.selftest("shared_sum")
    expected = torch.tensor([sum(range(256)) + 256 * 1000 * b for b in range(3)])
    assert torch.equal(out, expected)


def test_a_missing_syncthreads_gives_a_wrong_sum():
    out = sim.selftest("missing_sync")
    expected = torch.tensor([sum(range(256)) + 256 * 1000 * b for b in range(3)])
    assert not torch.equal(out, expected)


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "deadlock",
            "deadlock in block 0, warp 0: lane 0 waits in __ballot_sync(mask 0xffffffff) "
            "while lane 16 waits at __syncthreads",
        ),
        (
            "different_collectives",
            "lanes of one warp in different collectives: lane 0 in "
            "__ballot_sync(mask 0xffffffff), lane 16 in __shfl_sync",
        ),
        ("exited_lane", "lane 7 of its mask has returned"),
        (
            "mask_without_self",
            "lane 5 calls __ballot_sync(mask 0x1) with a mask that leaves itself out",
        ),
        ("misaligned_vector", "misaligned 16-byte vector load"),
    ],
)
def test_planted_synchronisation_bugs_fail_the_launch(name, message):
    with pytest.raises(
        RuntimeError, match="cudasim: .*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        sim.selftest(name)
    # and the simulator works again afterwards
    assert torch.equal(sim.selftest("shared_sum")[:1], torch.tensor([sum(range(256))]))


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_block_orders(order):
    with configured(order, 64, seed=3):
        out = sim.selftest("block_order")
    assert sorted(out.tolist()) == list(range(64))
    if order == "forward":
        assert out.tolist() == list(range(64))
    elif order == "reverse":
        assert out.tolist() == list(range(63, -1, -1))
    else:
        assert out.tolist() not in (list(range(64)), list(range(63, -1, -1)))
        with configured(order, 64, seed=4):
            assert not torch.equal(sim.selftest("block_order"), out), "the seed picks the order"


def test_configuration_errors():
    with pytest.raises(ValueError, match="block order must be 'forward', 'reverse' or 'random'"):
        sim.configure("sideways", 4, 0)
    with pytest.raises(ValueError, match="resident_blocks must be at least 1"):
        sim.configure("forward", 0, 0)


def test_one_resident_block_makes_the_grid_stride_loops_iterate():
    x = torch.randn(5 * 8192 + 3)
    with configured("forward", 1):
        before = sim.stats()
        fastreg.dropout(x, 0.5, seed=1)
        after = sim.stats()
    assert after["launches"] - before["launches"] == 1
    assert after["blocks"] - before["blocks"] == 1  # one block covered 6 blocks' work


# ---- Every kernel family: bitwise against the reference, equal across orders and grids ----

# Across the 1024-element chunk, a block's 8192 elements, and odd tails.
SIZES = [1, 3, 1023, 1024, 1025, 8191, 8193, 3 * 8192 + 517]
PS = [0.0, 2.0**-32, 0.5, 1 - 2.0**-32, 1.0]


def inputs(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(dtype)
    if n > 10:
        x[1], x[5], x[9] = float("nan"), float("inf"), -float("inf")
    return x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("n", SIZES)
def test_dropout_forward_backward(n, mode, dtype):
    x = inputs(n, dtype)
    g = inputs(n, dtype, seed=1)
    rng = state(2**63 + 12345 - 2**64, 2**40 + 3)  # full 64-bit seed and offset
    out, mask = across_configs(lambda: torch.ops.fastreg.dropout_fwd(x, 0.3, rng, mode))
    assert same_bits(out, reference.dropout_apply(x, 0.3, rng))
    grad = across_configs(lambda: torch.ops.fastreg.dropout_bwd(g, mask, 0.3, rng, mode))
    assert same_bits(grad, reference.dropout_apply(g, 0.3, rng))


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_dropout_probabilities(p, mode):
    x = inputs(3000, torch.float32)
    rng = state(99, 1)
    out, mask = across_configs(lambda: torch.ops.fastreg.dropout_fwd(x, p, rng, mode))
    assert same_bits(out, reference.dropout_apply(x, p, rng))
    grad = torch.ops.fastreg.dropout_bwd(x, mask, p, rng, mode)
    assert same_bits(grad, reference.dropout_apply(x, p, rng))


@pytest.mark.parametrize("layout", ["unaligned", "channels_last", "strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dropout_layouts(layout, dtype):
    base = inputs(4 * 6 * 9 * 11 + 8, dtype)
    if layout == "unaligned":
        x = base[1 : 1 + 4 * 6 * 9 * 11].view(4, 6, 9, 11)
    elif layout == "channels_last":
        x = base[: 4 * 6 * 9 * 11].view(4, 6, 9, 11).contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = base[: 4 * 6 * 9 * 11].view(4, 6, 9, 11)[:, ::2]
    else:
        x = base[: 4 * 6 * 9 * 11].view(4, 6, 99).transpose(0, 2)
    for mode in MASK_MODES:
        y = across_configs(lambda: fastreg.dropout(x, 0.4, mask=mode, seed=5))
        assert same_bits(y, reference.dropout(x, 0.4, mask=mode, seed=5))


def test_dropout_in_place():
    x = inputs(10_000, torch.bfloat16)
    expected = reference.dropout(x, 0.25, seed=8)
    y = x.clone()
    out = fastreg.dropout(y, 0.25, inplace=True, seed=8)
    assert out is y and same_bits(y, expected)


@pytest.mark.parametrize("offset", [0, 7, 2**64 - 1])
def test_dropout_mask(offset):
    for n in [1, 1025, 3 * 8192 + 5]:
        mask = across_configs(lambda: fastreg.dropout_mask((n,), 0.2, 2**64 - 5, offset))
        assert same_bits(mask, reference.dropout_mask((n,), 0.2, 2**64 - 5, offset))


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_backward_reads_a_bool_mask_view_at_an_odd_offset(activation, offset):
    """A bool mask that is a view at an odd offset takes the byte path: an E-byte vector
    load there would fault on a GPU (and fails the launch on the simulator)."""
    n = 4096 + 3
    for dtype in (torch.float16, torch.float32):
        g = inputs(n, dtype)
        x = inputs(n, dtype, seed=2)
        keep = fastreg.dropout_mask((n,), 0.5, 11)
        storage = torch.zeros(n + offset, dtype=torch.bool)
        storage[offset:] = keep
        mask = storage[offset:]
        rng = state(11)
        grad = torch.ops.fastreg.dropout_bwd(g, mask, 0.5, rng, "bool")
        assert same_bits(grad, torch.ops.fastreg.dropout_bwd(g, keep, 0.5, rng, "bool"))
        fused, _ = torch.ops.fastreg.bias_act_dropout_bwd(
            g, x, None, mask, 0.5, activation, rng, "bool", False
        )
        expected, _ = reference.bias_act_dropout_backward(g, x, None, keep, 0.5, activation, False)
        if activation == "none":
            assert same_bits(fused, expected)
        else:
            torch.testing.assert_close(fused, expected, equal_nan=True)


def close_or_equal(actual, expected, activation):
    """Bitwise where the README promises it (no activation, relu); the transcendental
    activations run the host's libm in the simulator: within a few ulps."""
    if activation in ("none", "relu"):
        assert same_bits(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_bias_act_dropout(mode, activation, dtype):
    x = inputs(37 * 300, dtype).view(300, 37)
    bias = inputs(37, dtype, seed=3)
    g = inputs(37 * 300, dtype, seed=4).view(300, 37)
    rng = state(21, 5)
    out, mask = across_configs(
        lambda: torch.ops.fastreg.bias_act_dropout_fwd(x, bias, 0.2, activation, rng, mode)
    )
    close_or_equal(out, reference.bias_act_dropout_apply(x, bias, 0.2, activation, rng), activation)
    grad_input, grad_bias = across_configs(
        lambda: torch.ops.fastreg.bias_act_dropout_bwd(
            g, x, bias, mask, 0.2, activation, rng, mode, True
        )
    )
    keep = reference.keep_from_mask(mask, mode, 0.2, rng, g)
    expected_input, expected_bias = reference.bias_act_dropout_backward(
        g, x, bias, keep, 0.2, activation
    )
    close_or_equal(grad_input, expected_input, activation)
    torch.testing.assert_close(grad_bias, expected_bias, equal_nan=True)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "residual_strided", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bias_dropout_add_layouts(layout, dtype):
    shape = (3, 5, 7, 9)
    x = inputs(3 * 5 * 7 * 9 + 1, dtype)
    x = x[1:].view(shape) if layout == "unaligned" else x[:-1].view(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    residual = inputs(3 * 5 * 7 * 9, dtype, seed=2).view(shape)
    if layout == "residual_strided":
        residual = inputs(3 * 5 * 7 * 18, dtype, seed=2).view(3, 5, 7, 18)[..., ::2]
    bias = inputs(9, dtype, seed=3)
    rng = state(77)
    for mode in MASK_MODES:
        out, _ = across_configs(
            lambda: torch.ops.fastreg.bias_dropout_add_fwd(x, bias, residual, 0.5, rng, mode)
        )
        assert same_bits(out, reference.bias_dropout_add_apply(x, bias, residual, 0.5, rng))


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_channel_dropout(spatial):
    shape = (4, 6) + (5,) * spatial
    x = inputs(int(torch.Size(shape).numel()), torch.float32).view(shape)
    fn = {1: fastreg.dropout1d, 2: fastreg.dropout2d, 3: fastreg.dropout3d}[spatial]
    ref = {1: reference.dropout1d, 2: reference.dropout2d, 3: reference.dropout3d}[spatial]
    y = across_configs(lambda: fn(x, 0.5, seed=4))
    assert same_bits(y, ref(x, 0.5, seed=4))


def penalty_tensors():
    """More tensors than one launch's table holds (96 for the value, 80 elementwise), of
    every dtype, with some past a block's 65536-element chunk."""
    g = torch.Generator().manual_seed(0)
    tensors = []
    for i in range(130):
        n = 70_001 if i % 50 == 3 else int(torch.randint(1, 300, (1,), generator=g))
        tensors.append(torch.randn(n, generator=g).to(FLOAT_DTYPES[i % 4]))
    return tensors


def test_penalty_value_and_backward():
    params = penalty_tensors()
    l1 = [0.01 * (i % 3) for i in range(len(params))]
    l2 = [0.02 * (i % 5) for i in range(len(params))]
    value = across_configs(lambda: torch.ops.fastreg.penalty(params, l1, l2))
    expected = reference.penalty_value(params, l1, l2)
    torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-6, atol=0)
    grad_out = torch.tensor(1.5)
    grads = across_configs(lambda: torch.ops.fastreg.penalty_backward(grad_out, params, l1, l2))
    for got, want in zip(grads, reference.penalty_backward(grad_out, params, l1, l2)):
        assert same_bits(got, want)


def test_penalty_grad_and_prox_in_place():
    params = penalty_tensors()
    l1 = [0.01 * (i % 3) for i in range(len(params))]
    l2 = [0.02 * (i % 5) for i in range(len(params))]
    grads0 = [torch.randn(p.shape).to(p.dtype) for p in params]

    def grad_step():
        grads = [g.clone() for g in grads0]
        torch.ops.fastreg.penalty_grad_(grads, params, l1, l2)
        return grads

    expected = [g.clone() for g in grads0]
    reference.penalty_grad_apply(expected, params, l1, l2)
    for got, want in zip(across_configs(grad_step), expected):
        assert same_bits(got, want)

    def prox_step():
        ws = [p.clone() for p in params]
        torch.ops.fastreg.prox_l1_(ws, l1)
        return ws

    want = [p.clone() for p in params]
    reference.prox_l1_apply(want, l1)
    for got, w in zip(across_configs(prox_step), want):
        assert same_bits(got, w)
