"""Property-based tests (hypothesis): the kernels equal fastreg.reference bit for bit,
forward and backward, over drawn shapes, layouts (permuted, strided, storage offsets),
dtypes, p, mask modes, seeds and offsets. Sums whose order differs (the bias gradient)
and activations computed with another libm are held to the bounds of tests/test_fused.py.

`HYPOTHESIS_PROFILE=ci` (set by `make test`) draws the same examples on every run."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from conftest import DEVICES, FLOAT_DTYPES, MASK_MODES, requires_extension  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_fused import act_bound, assert_within, bias_grad_bound, opmath, z_of  # noqa: E402
from test_penalty import U32, VALUE_RTOL  # noqa: E402

import fastreg  # noqa: E402
from fastreg import reference  # noqa: E402

pytestmark = [requires_extension, pytest.mark.parametrize("device", DEVICES)]

INT64 = st.integers(-(2**63), 2**64 - 1)  # seeds and offsets: the full 64-bit range
# 0 and 1, the smallest and largest p that change the threshold, and anything between.
PROBABILITIES = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0**-32, 1 - 2.0**-32, 0.5]), st.floats(0.0, 1.0)
)
LAYOUTS = ("contiguous", "permuted", "strided", "offset", "size_one_strides")


@st.composite
def shapes(draw, min_dims=0, max_dims=4):
    """Small dimensions, and sometimes one long enough to cross the kernels' 32-element
    words, 256-element CPU tiles and 1024-element CUDA chunks."""
    dims = draw(st.lists(st.integers(0, 6), min_size=min_dims, max_size=max_dims))
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = draw(st.integers(7, 1100))
    return tuple(dims)


@st.composite
def tensors(draw, shape, dtype, device, specials=True):
    """A tensor of `shape` in a drawn layout, with NaN, infinities and signed zeros
    sometimes among its values."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    layout = draw(st.sampled_from(LAYOUTS)) if shape else "contiguous"
    wide, step, dim = list(shape), 1, 0
    if layout == "strided":  # every k-th element along one dimension: not dense
        dim, step = draw(st.integers(0, len(shape) - 1)), draw(st.integers(2, 3))
        wide[dim] *= step
    start = draw(st.integers(1, 7)) if layout == "offset" else 0
    values = torch.randn(start + math.prod(wide), generator=g)
    if specials and values.numel() and draw(st.booleans()):
        picks = torch.randint(0, values.numel(), (6,), generator=g)
        values[picks] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30])
    if layout == "permuted":  # dense in another dimension order (transposes, channels_last)
        order = draw(st.permutations(range(len(shape))))
        x = values.view([shape[d] for d in order]).permute(
            [order.index(d) for d in range(len(shape))]
        )
    elif layout == "strided":
        x = values.view(wide)[(slice(None),) * dim + (slice(None, None, step),)]
    elif layout == "offset":  # a view at a storage offset: misaligned for vector access
        x = values[start:].view(shape)
    elif layout == "size_one_strides":  # size-1 dimensions with arbitrary strides
        x = values.as_strided(
            shape, [s if n > 1 else 99 for n, s in zip(shape, values.view(shape).stride())]
        )
    else:
        x = values.view(shape)
    assert x.shape == shape
    return x.to(dtype=dtype, device=device)


def assert_identical(actual, expected):
    """Same bits (NaN equal to NaN), same shape and dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def grads(out, leaves, grad):
    return torch.autograd.grad(out, leaves, grad, allow_unused=True)


@given(
    data=st.data(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    p=PROBABILITIES,
    seed=INT64,
    mode=st.sampled_from(MASK_MODES),
)
def test_dropout(device, data, dtype, p, seed, mode):
    x = data.draw(tensors(data.draw(shapes()), dtype, device)).requires_grad_()
    y = fastreg.dropout(x, p, mask=mode, seed=seed)
    y_ref = reference.dropout(x, p, mask=mode, seed=seed)
    assert_identical(y, y_ref)
    assert y.stride() == y_ref.stride()
    if y.requires_grad:  # p = 0 returns the input itself
        g = torch.randn(y.shape, dtype=torch.float64).to(dtype=dtype, device=device)
        assert_identical(grads(y, [x], g)[0], grads(y_ref, [x], g)[0])


@given(shape=shapes(max_dims=3), p=PROBABILITIES, seed=INT64, offset=INT64)
def test_dropout_mask(device, shape, p, seed, offset):
    assert torch.equal(
        fastreg.dropout_mask(shape, p, seed, offset, device=device),
        reference.dropout_mask(shape, p, seed, offset, device=device),
    )


@given(
    data=st.data(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    p=PROBABILITIES,
    seed=INT64,
    mode=st.sampled_from(MASK_MODES),
    with_bias=st.booleans(),
    training=st.booleans(),
)
def test_bias_dropout_add(device, data, dtype, p, seed, mode, with_bias, training):
    shape = data.draw(shapes(min_dims=1))
    x = data.draw(tensors(shape, dtype, device)).requires_grad_()
    bias = data.draw(tensors(shape[-1:], dtype, device)).requires_grad_() if with_bias else None
    residual = data.draw(tensors(shape, dtype, device)).requires_grad_()
    leaves = [t for t in (x, bias, residual) if t is not None]
    y = fastreg.bias_dropout_add(x, bias, residual, p, training, mask=mode, seed=seed)
    y_ref = reference.bias_dropout_add(x, bias, residual, p, training, mask=mode, seed=seed)
    assert_identical(y, y_ref)
    g = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    got, want = grads(y, leaves, g), grads(y_ref, leaves, g)
    assert_identical(got[0], want[0])
    assert_identical(got[-1], want[-1])  # residual's: the incoming gradient
    if with_bias and torch.isfinite(want[0]).all():
        assert_within(got[1], want[1], bias_grad_bound(want[0], want[1]), "bias grad")


@given(
    data=st.data(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    p=PROBABILITIES,
    seed=INT64,
    mode=st.sampled_from(MASK_MODES),
    with_bias=st.booleans(),
    activation=st.sampled_from([None, "relu", "gelu", "gelu_tanh", "silu"]),
)
def test_bias_act_dropout(device, data, dtype, p, seed, mode, with_bias, activation):
    shape = data.draw(shapes(min_dims=1))
    x = data.draw(tensors(shape, dtype, device)).requires_grad_()
    bias = data.draw(tensors(shape[-1:], dtype, device)).requires_grad_() if with_bias else None
    leaves = [t for t in (x, bias) if t is not None]
    y = fastreg.bias_act_dropout(x, bias, p, activation, mask=mode, seed=seed)
    y_ref = reference.bias_act_dropout(x, bias, p, activation, mask=mode, seed=seed)
    g = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
    got, want = grads(y, leaves, g), grads(y_ref, leaves, g)
    if activation in (None, "relu"):
        assert_identical(y, y_ref)
        assert_identical(got[0], want[0])
    else:  # torch's erf/tanh/exp against the kernels' own: a few ulps, NaN where NaN
        z = z_of(x.detach(), None if bias is None else bias.detach())
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        finite = torch.isfinite(y_ref) & torch.isfinite(z)
        assert torch.equal(torch.isfinite(y), torch.isfinite(y_ref))
        factor = scale * g.to(opmath(dtype)).abs()
        assert_within(y[finite], y_ref[finite], act_bound(z, dtype, y_ref, scale)[finite], "out")
        ok = finite & torch.isfinite(want[0])
        assert_within(got[0][ok], want[0][ok], act_bound(z, dtype, want[0], factor)[ok], "grad")
    if with_bias and torch.isfinite(want[0]).all() and activation in (None, "relu"):
        assert_within(got[1], want[1], bias_grad_bound(want[0], want[1]), "bias grad")


@given(
    data=st.data(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    p=PROBABILITIES,
    seed=INT64,
    mode=st.sampled_from(MASK_MODES),
    spatial=st.sampled_from([1, 2, 3]),
)
def test_channel_dropout(device, data, dtype, p, seed, mode, spatial):
    shape = data.draw(shapes(min_dims=spatial + 2, max_dims=spatial + 2))
    x = data.draw(tensors(shape, dtype, device)).requires_grad_()
    function = f"dropout{spatial}d"
    y = getattr(fastreg, function)(x, p, mask=mode, seed=seed)
    y_ref = getattr(reference, function)(x, p, mask=mode, seed=seed)
    assert_identical(y, y_ref)
    if y.requires_grad and y.grad_fn is not None:
        g = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)
        assert_identical(grads(y, [x], g)[0], grads(y_ref, [x], g)[0])


@given(
    data=st.data(),
    l1=st.sampled_from([0.0, 1e-3, 0.5]),
    l2=st.sampled_from([0.0, 1e-2, 2.0]),
    count=st.integers(1, 5),
)
def test_penalty_gradient_and_in_place_steps(device, data, l1, l2, count):
    """The value within the float32-accumulation bound of the float64 reference; the
    gradient, penalty_grad_ and prox_l1_ bit for bit (one rounding per operation)."""
    params = [
        data.draw(
            tensors(
                data.draw(shapes(max_dims=3)),
                data.draw(st.sampled_from(FLOAT_DTYPES)),
                device,
                specials=False,
            )
        )
        for _ in range(count)
    ]
    leaves = [t.detach().requires_grad_() for t in params]
    value = fastreg.penalty(leaves, l1, l2)
    expected = reference.penalty(leaves, l1, l2)
    assert value.dtype == expected.dtype
    bound = (VALUE_RTOL[device] + U32) * expected.item()
    assert abs(value.item() - expected.item()) <= bound
    g = torch.randn((), dtype=value.dtype)
    assert all(
        torch.equal(a, b)
        for a, b in zip(grads(value, leaves, g), grads(expected, leaves, g))
        if a is not None or b is not None
    )
    kernel, ref = [
        [t.detach().clone(memory_format=torch.preserve_format) for t in params] for _ in range(2)
    ]
    for ts in (kernel, ref):
        for t in ts:
            t.grad = torch.ones_like(t)
    fastreg.penalty_grad_(kernel, l1, l2)
    reference.penalty_grad_(ref, l1, l2)
    fastreg.prox_l1_(kernel, 0.25)
    reference.prox_l1_(ref, 0.25)
    for a, b in zip(kernel, ref):
        assert_identical(a.grad, b.grad)
        assert_identical(a, b)
