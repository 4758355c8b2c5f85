"""Argument types as torch has them (fastreg/_checks.py), and p = 1's shortcut: zeros, no
draw, no kernel, with backward right in every mask mode."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, MASK_MODES

import fastreg
from fastreg import reference

APIS = [fastreg, reference]

# (function, call with training=value): the dropout functions that take `training`.
TRAINING_CALLS = {
    "dropout": lambda api, t: api.dropout(torch.randn(64), 0.5, t),
    "dropout1d": lambda api, t: api.dropout1d(torch.randn(2, 32, 4), 0.5, t),
    "dropout2d": lambda api, t: api.dropout2d(torch.randn(2, 32, 2, 2), 0.5, t),
    "dropout3d": lambda api, t: api.dropout3d(torch.randn(2, 32, 1, 2, 2), 0.5, t),
    "bias_dropout_add": lambda api, t: api.bias_dropout_add(
        torch.randn(8, 8), torch.randn(8), torch.randn(8, 8), 0.5, t
    ),
    "bias_act_dropout": lambda api, t: api.bias_act_dropout(
        torch.randn(8, 8), torch.randn(8), 0.5, "relu", t
    ),
}
# The same calls with nothing dropped, drawing their inputs in the same order.
NO_DROPOUT = {
    "dropout": lambda: torch.randn(64),
    "dropout1d": lambda: torch.randn(2, 32, 4),
    "dropout2d": lambda: torch.randn(2, 32, 2, 2),
    "dropout3d": lambda: torch.randn(2, 32, 1, 2, 2),
    "bias_dropout_add": lambda: (lambda x, b, r: r + (x + b))(
        torch.randn(8, 8), torch.randn(8), torch.randn(8, 8)
    ),
    "bias_act_dropout": lambda: torch.relu(torch.randn(8, 8) + torch.randn(8)),
}
NOT_BOOLS = [0.5, 1, 0, None, "yes", torch.tensor(True)]


@pytest.mark.parametrize("value", NOT_BOOLS, ids=repr)
def test_training_that_is_not_a_bool_raises_as_torch(value):
    """F.dropout(x, 0.5, 0.5) raises TypeError ("argument 'train' (position 3) must be
    bool, not float"), as do an int, None, a str and a tensor: so does fastreg, naming
    its argument 'training'."""
    with pytest.raises(TypeError, match="must be bool"):
        F.dropout(torch.randn(4), 0.5, value)
    for name, call in TRAINING_CALLS.items():
        for api in APIS:
            with pytest.raises(TypeError) as info:
                call(api, value)
            assert str(info.value) == (
                f"{name}(): argument 'training' must be bool, not {type(value).__name__}"
            )


@pytest.mark.parametrize("name", TRAINING_CALLS)
def test_training_bools_work(name):
    """training=False gives the result with nothing dropped; training=True drops (with
    p = 0.5 over 64 elements or channels, that none is dropped has chance 2**-64)."""
    for api in APIS:
        torch.manual_seed(0)
        dropped = TRAINING_CALLS[name](api, True)
        torch.manual_seed(0)
        kept = TRAINING_CALLS[name](api, False)
        torch.manual_seed(0)
        assert torch.equal(kept, NO_DROPOUT[name]())
        assert not torch.equal(dropped, kept)


def test_inplace_is_read_for_truth_as_torch_reads_it():
    """torch accepts any value for inplace (nn.Dropout(0.5, 1), F.dropout(x, 0.5, True,
    0)) and reads its truth; so does fastreg."""
    for api in APIS:
        x = torch.ones(64)
        assert api.dropout(x, 0.5, True, 1, seed=3) is x
        y = torch.ones(64)
        assert api.dropout(y, 0.5, True, 0, seed=3) is not y and torch.equal(y, torch.ones(64))


# ---- p = 1 ------------------------------------------------------------------------


def _input(dtype, layout):
    x = torch.tensor([1.5, -2.0, math.nan, math.inf, -math.inf, -0.0] * 20, dtype=torch.float64).to(
        dtype
    )
    if layout == "channels_last":
        return x[:96].view(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return x.view(12, 10)[:, ::2]
    return x.view(12, 10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_p_one_gives_plus_zeros_and_zero_gradients(mode, dtype, layout):
    for api in APIS:
        x = _input(dtype, layout).requires_grad_()
        before = torch.random.get_rng_state()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = api.dropout(x, 1.0, mask=mode)
        assert torch.equal(torch.random.get_rng_state(), before), "p = 1 draws nothing"
        assert saved == [], "p = 1 keeps nothing for backward"
        assert out.dtype == dtype and out.shape == x.shape
        assert out.stride() == torch.empty_like(x).stride()
        assert torch.equal(out, torch.zeros_like(out)) and not out.signbit().any()
        assert out.requires_grad
        (grad,) = torch.autograd.grad(out, x, torch.full_like(out, 3.0), create_graph=True)
        assert torch.equal(grad, torch.zeros_like(x))
        assert grad.stride() == out.stride()
        (grad,) = torch.autograd.grad(
            api.dropout(x, 1.0, mask=mode), x, torch.ones(x.shape, dtype=dtype)
        )  # a contiguous one
        assert torch.equal(grad, torch.zeros_like(x)) and grad.stride() == out.stride()
        # the same as the contract's rule for p = 1 (every element dropped) and as torch
        assert torch.equal(out, api.dropout(x.detach(), 1.0, mask=mode, seed=5))
        assert torch.equal(out, F.dropout(x.detach().nan_to_num(), 1.0))


def test_p_one_gradcheck_and_module():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for mode in MASK_MODES:
        assert torch.autograd.gradcheck(lambda t: fastreg.dropout(t, 1.0, mask=mode), (x,))
        assert torch.autograd.gradgradcheck(lambda t: fastreg.dropout(t, 1.0, mask=mode), (x,))
        layer = fastreg.Dropout(1.0, mask=mode)
        assert torch.equal(layer(x), torch.zeros(3, 4, dtype=torch.float64))


def test_p_one_inplace_and_checks():
    for api in APIS:
        h = torch.randn(8, requires_grad=True) * 1.0  # not a leaf
        out = api.dropout(h, 1.0, inplace=True)
        assert out is h and torch.equal(h.detach(), torch.zeros(8))
        leaf = torch.randn(8, requires_grad=True)
        with pytest.raises(RuntimeError, match="leaf Variable"):
            api.dropout(leaf, 1.0, inplace=True)
        # seed and generator are still checked, though nothing is drawn from them
        with pytest.raises(TypeError, match="seed must be an int"):
            api.dropout(torch.ones(3), 1.0, seed=1.5)
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            api.dropout(torch.ones(3), 1.0, generator=3)
        g = torch.Generator().manual_seed(1)
        state = g.get_state()
        api.dropout(torch.ones(3), 1.0, generator=g)
        assert torch.equal(g.get_state(), state)


def test_p_one_under_compile():
    x = torch.randn(16, requires_grad=True)
    compiled = torch.compile(lambda t: fastreg.dropout(t, 1.0), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert torch.equal(out, torch.zeros(16))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(16))
