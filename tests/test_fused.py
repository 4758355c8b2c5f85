"""fastreg.fused: bias_dropout_add and bias_act_dropout against the reference, the RNG
contract and the composition of torch ops over dtypes x mask modes x activations x shape
families; gradients, errors, operator registration, memory kept for backward; channel
dropout's rules against torch's.

Tolerances. Where the element math is only +, *, comparisons and selections (no
activation, relu) the kernels equal the reference and the contract bit for bit. erf, tanh
and exp come from torch (Sleef) in the reference and from libm in the kernels; each is
within a couple of ulps of the true value, so with |act| and |act'| bounded by 1 + |z| the
results differ by a few ulps of (1 + |z|) before the final rounding, which then may flip
one ulp of the dtype. Sums (the bias gradient) are compared within the recursive-summation
bound rows * eps * sum|terms| for each of the two summation orders.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FLOAT_DTYPES,
    MASK_MODES,
    compiled_autograd_enable,
    requires_cuda,
    requires_extension,
)
from torch import nn

import fastreg
from fastreg import _ops, reference

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
EXACT_ACTIVATIONS = (None, "relu")
TORCH_ACT = {
    None: lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}
P, SEED = 0.3, 20240611

# (shape, layout): 2-D rows, 3-D (batch, tokens, features), channels_last 4-D where the
# last dimension (W, the bias's) is not innermost in memory; sizes leave partial tiles.
SHAPE_FAMILIES = {
    "2d": ((37, 24), "contiguous"),
    "3d": ((3, 17, 40), "contiguous"),
    "cl4d": ((2, 6, 5, 7), "channels_last"),
}


def make(shape, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype=dtype, device=device)


def sample(family, dtype, device, with_bias=True):
    shape, layout = SHAPE_FAMILIES[family]
    x = make(shape, layout, dtype, device, 1)
    bias = make((shape[-1],), "contiguous", dtype, device, 2) if with_bias else None
    residual = make(shape, layout, dtype, device, 3)
    grad = make(shape, "contiguous", dtype, device, 4)
    return x, bias, residual, grad


def opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps(dtype):
    return torch.finfo(dtype).eps


def contract_keep(x, p, seed):
    """The contract's keep flags of x's output, in its memory order."""
    return reference.memory_order_view(
        fastreg.dropout_mask(x.numel(), p, seed, device=x.device), torch.empty_like(x)
    )


def z_of(x, bias):
    z = x.to(opmath(x.dtype))
    return z if bias is None else z + bias.to(z.dtype)


def assert_within(actual, expected, bound, what=""):
    """|actual - expected| <= bound elementwise (NaN-free inputs)."""
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    excess = diff - bound.to(torch.float64)
    assert excess.max() <= 0 if excess.numel() else True, (
        f"{what}: max |diff| {diff.max():.3g} exceeds its bound by {excess.max():.3g}"
    )


def act_bound(z, dtype, expected, factor):
    """A few ulps of (1 + |z|) in op-math, times factor, plus one ulp of the dtype."""
    op = opmath(dtype)
    return (
        8 * eps(op) * (1 + z.abs()) * factor
        + eps(dtype) * expected.abs().to(op)
        + torch.finfo(dtype).tiny
    )


def bias_grad_bound(grad_input, expected):
    """Recursive summation bound for two summation orders, plus one ulp of the dtype."""
    op = opmath(grad_input.dtype)
    rows = max(1, grad_input.numel() // max(1, grad_input.shape[-1]))
    dims = tuple(range(grad_input.dim() - 1))
    colsum = grad_input.to(op).abs().sum(dims) if dims else grad_input.to(op).abs()
    return 2 * rows * eps(op) * colsum + eps(grad_input.dtype) * expected.abs().to(op)


# ---- bias_dropout_add ----------------------------------------------------------------


@pytest.mark.parametrize("family", SHAPE_FAMILIES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_dropout_add_matches_reference_contract_and_torch(
    device, family, dtype, mode, with_bias
):
    x, bias, residual, g = sample(family, dtype, device, with_bias)
    leaves = [t.clone().requires_grad_() for t in (x, bias, residual) if t is not None]
    leaves_ref = [t.detach().clone().requires_grad_() for t in leaves]
    unpack = (lambda ts: (ts[0], ts[1], ts[2])) if with_bias else (lambda ts: (ts[0], None, ts[1]))
    y = fastreg.bias_dropout_add(*unpack(leaves), P, mask=mode, seed=SEED)
    y_ref = reference.bias_dropout_add(*unpack(leaves_ref), P, mask=mode, seed=SEED)
    assert torch.equal(y, y_ref)
    assert y.stride() == torch.empty_like(x).stride()

    # The contract, written out: the mask of dropout_mask in the output's memory order, the
    # element math in op-math, one rounding.
    op = opmath(dtype)
    keep = contract_keep(x, P, SEED)
    scale = 1.0 / (1.0 - P)
    z = z_of(x, bias)
    expected = (residual.to(op) + torch.where(keep, z * scale, 0.0)).to(dtype)
    assert torch.equal(y, expected)
    # Eager torch in the dtype rounds after each of its (up to) 3 ops.
    xb = x if bias is None else x + bias
    eager = residual + torch.where(keep, xb * scale, torch.zeros((), dtype=dtype, device=device))
    bound = 2 * eps(dtype) * (z.abs() * scale + residual.to(op).abs())
    assert_within(y, eager, bound, "vs eager composition")

    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, g)
    gx, g_res = grads[0], grads[-1]
    expected_gx = torch.where(
        keep, (g.to(op) * scale).to(dtype), torch.zeros((), dtype=dtype, device=device)
    )
    assert torch.equal(gx, grads_ref[0]) and torch.equal(gx, expected_gx)
    assert gx.stride() == y.stride()
    assert torch.equal(g_res, g)
    if with_bias:
        dims = tuple(range(x.dim() - 1))
        expected_gb = gx.to(op).sum(dims).to(dtype)
        assert_within(grads[1], expected_gb, bias_grad_bound(gx, expected_gb), "bias grad")
        assert_within(grads[1], grads_ref[1], bias_grad_bound(gx, expected_gb), "bias grad vs ref")


@requires_extension
@pytest.mark.parametrize("mode", MASK_MODES)
def test_fused_masks_are_dropouts_masks(device, mode):
    """The mask a fused op keeps is the one dropout keeps for the same (seed, offset)."""
    x, bias, residual, _ = sample("cl4d", torch.float32, device)
    state = torch.tensor([123, 456], device=device)
    ops = torch.ops.fastreg
    _, mask = ops.dropout_fwd(x, P, state, mode)
    assert torch.equal(ops.bias_dropout_add_fwd(x, bias, residual, P, state, mode)[1], mask)
    assert torch.equal(ops.bias_act_dropout_fwd(x, bias, P, "gelu", state, mode)[1], mask)


def test_layouts_mixed_and_non_dense(device):
    """A transposed input, a contiguous residual, an input at an odd storage offset: the
    output has the (dense) input's layout, the residual is read at the same coordinates."""
    base = torch.randn(41, 33, device=device)
    x = base.t()  # dense, transposed
    residual = torch.randn(33, 41, device=device)  # contiguous
    bias = torch.randn(41, device=device)
    y = fastreg.bias_dropout_add(x, bias, residual, P, seed=5)
    assert y.stride() == x.stride()
    assert torch.equal(y, reference.bias_dropout_add(x, bias, residual, P, seed=5))
    strided = torch.randn(20, 66, device=device)[:, ::2]  # not dense
    odd = torch.randn(20 * 33 + 1, device=device)[1:].view(20, 33)  # misaligned
    for x in (strided, odd):
        r = torch.randn(20, 33, device=device)
        b = torch.randn(33, device=device)
        for act in ACTIVATIONS[:2]:
            assert torch.equal(
                fastreg.bias_act_dropout(x, b, P, act, seed=6),
                reference.bias_act_dropout(x, b, P, act, seed=6),
            )
        assert torch.equal(
            fastreg.bias_dropout_add(x, b, r, P, seed=6),
            reference.bias_dropout_add(x, b, r, P, seed=6),
        )


@pytest.mark.parametrize("shape", [(1,), (5,), (4, 1), (300, 64), (2, 40, 6, 9), (0, 5), (3, 0)])
def test_shapes_tails_and_multi_chunk_bias_reduction(device, shape):
    """1-D (the bias gradient is the input gradient), a last dimension of 1, enough rows
    for several reduction chunks, channels_last with runs of one bias value, empty."""
    x = torch.randn(shape, device=device, dtype=torch.float64)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    b = torch.randn(shape[-1], device=device, dtype=torch.float64, requires_grad=True)
    r = torch.randn(shape, device=device, dtype=torch.float64)
    y = fastreg.bias_dropout_add(x, b, r, 0.5, seed=9)
    y_ref = reference.bias_dropout_add(x, b, r, 0.5, seed=9)
    assert torch.equal(y, y_ref)
    g = torch.randn(shape, device=device, dtype=torch.float64)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, b), g)
    assert torch.equal(gx, gx_ref)
    assert gb.shape == b.shape
    assert_within(gb, gb_ref, bias_grad_bound(gx, gb_ref), "bias grad")
    if len(shape) == 1:
        assert torch.equal(gb, gx)


def test_bias_gradient_is_deterministic_and_thread_independent():
    x = torch.randn(513, 96, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    r = torch.randn(513, 96)
    g = torch.randn(513, 96)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            y = fastreg.bias_act_dropout(x, b, 0.2, "gelu", seed=1)
            results.append(torch.autograd.grad(y, b, g)[0])
            y = fastreg.bias_dropout_add(x, b, r, 0.2, seed=1)
            results.append(torch.autograd.grad(y, b, g)[0])
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(results[::2], results[2::2]):
        assert torch.equal(a, c)
    for a, c in zip(results[1::2], results[3::2]):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dropped_nan_and_inf_contribute_exact_zero(device, dtype):
    x = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 1.0] * 64, dtype=dtype, device=device
    )
    r = torch.arange(256, dtype=dtype, device=device)
    keep = fastreg.dropout_mask(256, 0.5, 3, device=device)
    y = fastreg.bias_dropout_add(x, None, r, 0.5, seed=3)
    assert torch.equal(y[~keep], r[~keep])
    h = fastreg.bias_act_dropout(x, None, 0.5, "gelu", seed=3)
    assert torch.all(h[~keep] == 0) and not torch.any(torch.signbit(h[~keep]))


def test_eval_and_p_zero_compute_the_sum_without_drawing(device):
    x, bias, residual, _ = sample("3d", torch.float16, device)
    expected = (residual.float() + (x.float() + bias.float())).half()
    g = torch.Generator(device=device).manual_seed(0)
    before = g.get_state()
    for training, p in ((False, 0.5), (True, 0.0)):
        y = fastreg.bias_dropout_add(x, bias, residual, p, training, generator=g)
        assert torch.equal(y, expected)
        assert torch.equal(y, reference.bias_dropout_add(x, bias, residual, p, training))
    h = fastreg.bias_act_dropout(x, bias, 0.5, "silu", training=False, generator=g)
    assert torch.equal(h, reference.bias_act_dropout(x, bias, 0.5, "silu", training=False))
    assert torch.equal(g.get_state(), before)


def test_every_call_draws_fresh_masks_and_manual_seed_repeats(device):
    x, bias, residual, _ = sample("2d", torch.float32, device)
    torch.manual_seed(0)
    a = fastreg.bias_dropout_add(x, bias, residual, 0.5)
    b = fastreg.bias_dropout_add(x, bias, residual, 0.5)
    torch.manual_seed(0)
    assert torch.equal(a, fastreg.bias_dropout_add(x, bias, residual, 0.5)) and not torch.equal(
        a, b
    )


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_and_one(device, p):
    x, bias, residual, _ = sample("2d", torch.float32, device)
    y = fastreg.bias_dropout_add(x, bias, residual, p, seed=1)
    assert torch.equal(y, residual + (x + bias) if p == 0 else residual)
    h = fastreg.bias_act_dropout(x, bias, p, "relu", seed=1)
    assert torch.equal(h, torch.relu(x + bias) if p == 0 else torch.zeros_like(x))


# ---- bias_act_dropout ----------------------------------------------------------------


@pytest.mark.parametrize("family", SHAPE_FAMILIES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_dropout_matches_reference_contract_and_torch(
    device, family, dtype, mode, activation
):
    with_bias = family != "3d" or activation != "silu"  # one case without a bias
    x, bias, _, g = sample(family, dtype, device, with_bias)
    leaves = [t.clone().requires_grad_() for t in (x, bias) if t is not None]
    leaves_ref = [t.detach().clone().requires_grad_() for t in leaves]

    def args(ts):
        return ts[0], ts[1] if with_bias else None

    y = fastreg.bias_act_dropout(*args(leaves), P, activation, mask=mode, seed=SEED)
    y_ref = reference.bias_act_dropout(*args(leaves_ref), P, activation, mask=mode, seed=SEED)
    assert y.stride() == torch.empty_like(x).stride()

    op = opmath(dtype)
    keep = contract_keep(x, P, SEED)
    scale = 1.0 / (1.0 - P)
    z = z_of(x, bias)
    zero = torch.zeros((), dtype=dtype, device=device)
    # torch's own activation in op-math, one rounding; and eager torch in the dtype.
    composed = torch.where(keep, TORCH_ACT[activation](z) * scale, 0.0).to(dtype)
    xb = x if bias is None else x + bias
    eager = torch.where(keep, TORCH_ACT[activation](xb) * scale, zero)
    if activation in EXACT_ACTIVATIONS:
        assert torch.equal(y, y_ref) and torch.equal(y, composed)
    else:
        assert_within(y, y_ref, act_bound(z, dtype, y_ref, scale), "vs reference")
        assert_within(y, composed, act_bound(z, dtype, composed, scale), "vs torch's activation")
    assert_within(y, eager, 4 * eps(dtype) * (1 + z.abs()) * scale, "vs eager composition")

    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, g)
    explicit, explicit_b = reference.bias_act_dropout_backward(
        g, x, bias, keep, P, activation, with_bias
    )
    gx = grads[0]
    assert gx.stride() == y.stride()
    factor = scale * g.to(op).abs()
    if activation in EXACT_ACTIVATIONS:
        assert torch.equal(gx, explicit) and torch.equal(gx, grads_ref[0])
    else:
        assert_within(gx, explicit, act_bound(z, dtype, explicit, factor), "grad vs formula")
        assert_within(gx, grads_ref[0], act_bound(z, dtype, grads_ref[0], factor), "grad vs ref")
    if with_bias:
        bound = bias_grad_bound(gx, explicit_b) + (
            0
            if activation in EXACT_ACTIVATIONS
            else act_bound(z, dtype, explicit, factor).to(op).sum(tuple(range(x.dim() - 1)))
        )
        assert_within(grads[1], explicit_b, bound, "bias grad")
        assert_within(grads[1], grads_ref[1], bound, "bias grad vs ref")


def test_without_bias_and_activation_it_is_dropout(device):
    x = torch.randn(1000, device=device)
    assert torch.equal(
        fastreg.bias_act_dropout(x, None, P, None, seed=4), fastreg.dropout(x, P, seed=4)
    )


# ---- gradients -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("activation", ["add"] + ACTIVATIONS)
def test_gradcheck(device, mode, activation):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    r = torch.randn(4, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    if activation == "add":

        def f(x, b, r):
            return fastreg.bias_dropout_add(x, b, r, 0.4, mask=mode, seed=11)

        inputs = (x, b, r)
    else:

        def f(x, b):
            return fastreg.bias_act_dropout(x, b, 0.4, activation, mask=mode, seed=11)

        inputs = (x, b)
    assert torch.autograd.gradcheck(f, inputs)
    if mode == "bits":  # double backward runs the formulas as tensor ops
        assert torch.autograd.gradgradcheck(f, inputs)


def fused_call(activation, mode):
    if activation == "add":
        return lambda x, b, r: fastreg.bias_dropout_add(x, b, r, 0.4, mask=mode, seed=11)
    return lambda x, b, r: fastreg.bias_act_dropout(x, b, 0.4, activation, mask=mode, seed=11)


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("activation", ["add"] + ACTIVATIONS)
def test_torch_func_grad(mode, activation):
    # torch.func.grad runs the backward with create_graph: the same bits as autograd.grad
    # with create_graph (the formulas as tensor ops), to second order. It failed while the
    # formulas were registered with torch.library.register_autograd (torch.func refuses
    # that Function).
    x, b, r, w = sample("3d", torch.float32, "cpu")
    f = fused_call(activation, mode)

    def loss(x, b, r):  # squared: the gradient depends on the output (and so on x)
        return (f(x, b, r).square() * w).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(x, b, r)
    leaves = [t.clone().requires_grad_() for t in (x, b, r)]
    expected = torch.autograd.grad(loss(*leaves), leaves, create_graph=True, allow_unused=True)
    for g, e in zip(got, expected):
        if e is None:  # bias_act_dropout does not read the residual
            assert torch.equal(g, torch.zeros_like(g))
        else:
            assert torch.equal(g, e)

    def grad_sum(x):
        return torch.func.grad(loss)(x, b, r).square().sum()

    second = torch.func.grad(grad_sum)(x)
    (leaf,) = leaves[:1]
    (first,) = torch.autograd.grad(loss(leaf, b, r), leaf, create_graph=True)
    (expected_second,) = torch.autograd.grad(first.square().sum(), leaf)
    # the same terms, which the two ways may add in another order: float32 roundings
    torch.testing.assert_close(second, expected_second)
    assert second.abs().sum() > 0


@requires_extension
@pytest.mark.skipif(not hasattr(torch._dynamo, "compiled_autograd"), reason="no compiled autograd")
@pytest.mark.parametrize("activation", ["add", "gelu"])
def test_compiled_autograd_of_an_eager_fused_op(activation):
    torch._dynamo.reset()
    x, b, r, w = (
        t.requires_grad_() if i < 3 else t for i, t in enumerate(sample("2d", torch.float32, "cpu"))
    )
    loss = (fused_call(activation, "bits")(x, b, r) * w).sum()
    expected = torch.autograd.grad(loss, (x, b), retain_graph=True)
    with compiled_autograd_enable(torch.compile(backend="aot_eager")):
        loss.backward()
    assert torch.equal(x.grad, expected[0]) and torch.equal(b.grad, expected[1])


@requires_extension
def test_autograd_without_torchs_private_single_level_function():
    """fastreg/_ops.py's register_autograd falls back to torch.library.register_autograd
    where torch lacks the private names it uses: the gradients, first and second order,
    of the fused ops and of dropout (dropout_bwd's formula) still hold there."""
    import subprocess
    import sys

    code = (
        "import torch._functorch.utils as utils\n"
        "del utils.enable_single_level_autograd_function\n"
        "import torch, fastreg\n"
        "assert fastreg._ops._SingleLevelFunction is None\n"
        "g = torch.Generator().manual_seed(3)\n"
        "x, r = (torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()\n"
        "        for _ in range(2))\n"
        "b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()\n"
        "calls = [(lambda x, b, r: fastreg.bias_dropout_add(x, b, r, 0.4, seed=11), (x, b, r)),\n"
        "         (lambda x, b: fastreg.bias_act_dropout(x, b, 0.4, 'gelu', seed=11), (x, b)),\n"
        "         (lambda x: fastreg.dropout(x, 0.4, seed=11), (x,))]\n"
        "for f, inputs in calls:\n"
        "    assert torch.autograd.gradcheck(f, inputs)\n"
        "    assert torch.autograd.gradgradcheck(f, inputs)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---- errors ----------------------------------------------------------------------


def test_errors_name_the_argument():
    x, b, r = torch.ones(2, 3), torch.ones(3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        fastreg.bias_dropout_add(x, b, r, 1.5)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        fastreg.bias_act_dropout(x, b, -0.1)
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64"):
        fastreg.bias_dropout_add(x.long(), b.long(), r.long(), 0.5)
    with pytest.raises(TypeError, match="argument 'bias' must be Tensor"):
        fastreg.bias_act_dropout(x, [1.0, 2.0, 3.0], 0.5)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(3,\)"):
        fastreg.bias_dropout_add(x, torch.ones(2), r, 0.5)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(3,\)"):
        fastreg.bias_act_dropout(x, torch.ones(1, 3), 0.5)
    with pytest.raises(TypeError, match="bias must be a real tensor"):
        fastreg.bias_act_dropout(x, b.to(torch.complex64), 0.5)
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        fastreg.bias_act_dropout(torch.tensor(1.0), torch.ones(1), 0.5)
    with pytest.raises(RuntimeError, match=r"residual must have shape \(2, 3\)"):
        fastreg.bias_dropout_add(x, b, torch.ones(3), 0.5)
    with pytest.raises(TypeError, match="residual must be a real tensor"):
        fastreg.bias_dropout_add(x, b, r.to(torch.complex64), 0.5)
    with pytest.raises(TypeError, match="argument 'residual' must be Tensor"):
        fastreg.bias_dropout_add(x, b, None, 0.5)
    with pytest.raises(ValueError, match="activation must be one of"):
        fastreg.bias_act_dropout(x, b, 0.5, "tanh")
    with pytest.raises(ValueError, match="mask must be one of"):
        fastreg.bias_dropout_add(x, b, r, 0.5, mask="bytes")
    with pytest.raises(ValueError, match="either seed or generator"):
        fastreg.bias_act_dropout(x, b, 0.5, seed=1, generator=torch.Generator())
    # The reference accepts and rejects the same calls.
    with pytest.raises(TypeError, match="bias must be a real tensor"):
        reference.bias_act_dropout(x, b.to(torch.complex64), 0.5)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.bfloat16, None),
        (torch.float32, None, torch.float64),
        (torch.float32, torch.float32, torch.int64),
    ],
)
def test_mixed_dtypes_promote_like_the_eager_composition(device, dtypes):
    """bias_dropout_add(x, b, r) == the op on the tensors cast to their promoted dtype, bit for
    bit, and the gradients come back in each tensor's own dtype."""
    x_dtype, b_dtype, r_dtype = dtypes
    x = torch.randn(5, 8, device=device).to(x_dtype).requires_grad_()
    b = None if b_dtype is None else torch.randn(8, device=device).to(b_dtype).requires_grad_()
    r = torch.randn(5, 8, device=device).mul(4).to(r_dtype or x_dtype)
    eager = r + F.dropout(x + b if b is not None else x, 0.0)
    out = fastreg.bias_dropout_add(x, b, r, 0.3, seed=5)
    assert out.dtype == eager.dtype
    cast = [t if t is None else t.detach().to(out.dtype) for t in (x, b, r)]
    assert torch.equal(out, fastreg.bias_dropout_add(*cast, 0.3, seed=5))
    out.sum().backward()
    assert x.grad.dtype == x_dtype and (b is None or b.grad.dtype == b_dtype)
    act = fastreg.bias_act_dropout(x, b, 0.3, "gelu", seed=5)
    assert act.dtype == (x + b if b is not None else x).dtype
    cast = [t if t is None else t.detach().to(act.dtype) for t in (x, b)]
    assert torch.equal(act, fastreg.bias_act_dropout(*cast, 0.3, "gelu", seed=5))


@requires_cuda
def test_device_mismatch_raises():
    x, r = torch.ones(2, 3, device="cuda"), torch.ones(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="bias must be on input's device"):
        fastreg.bias_dropout_add(x, torch.ones(3), r, 0.5)
    with pytest.raises(RuntimeError, match="residual must be on input's device"):
        fastreg.bias_dropout_add(x, None, torch.ones(2, 3), 0.5)


# ---- operator registration, compile, memory -------------------------------------


@requires_extension
@pytest.mark.parametrize("mode", MASK_MODES)
def test_opcheck(device, mode):
    ops = torch.ops.fastreg
    state = torch.tensor([5, 9], device=device)
    cases = [
        (make((8, 5), "contiguous", torch.float32, device), True),
        (make((2, 3, 4, 5), "channels_last", torch.float16, device), True),
        (make((6, 10), "contiguous", torch.float64, device)[:, ::2], False),
    ]
    for (x, with_bias), act in zip(cases, ("gelu", "none", "silu")):
        b = torch.randn(x.shape[-1], dtype=x.dtype, device=device) if with_bias else None
        r = torch.randn(x.shape, dtype=x.dtype, device=device)
        req = lambda t: None if t is None else t.clone().requires_grad_()  # noqa: E731
        torch.library.opcheck(ops.bias_dropout_add_fwd, (req(x), req(b), req(r), 0.25, state, mode))
        torch.library.opcheck(ops.bias_act_dropout_fwd, (req(x), req(b), 0.25, act, state, mode))
        out, mask = ops.bias_act_dropout_fwd(x, b, 0.25, act, state, mode)
        xs = _ops.with_strides(x, out.stride())
        torch.library.opcheck(
            ops.bias_act_dropout_bwd,
            (torch.randn_like(out), xs, b, mask, 0.25, act, state, mode, with_bias),
        )


@requires_extension
def test_fake_kernels_match_real_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    b, r, state = torch.randn(5), torch.randn(2, 3, 4, 5), torch.tensor([1, 2])
    ops = torch.ops.fastreg
    real = ops.bias_dropout_add_fwd(x, b, r, 0.5, state, "bool")
    with FakeTensorMode() as fake_mode:
        fake = ops.bias_dropout_add_fwd(
            *(fake_mode.from_tensor(t) for t in (x, b, r)),
            0.5,
            fake_mode.from_tensor(state),
            "bool",
        )
    for a, f in zip(real, fake):
        assert a.shape == f.shape and a.stride() == f.stride() and a.dtype == f.dtype


class Block(nn.Module):
    """A transformer MLP block and a conv layer with the fused ops."""

    def __init__(self, mode):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.up_bias = nn.Parameter(torch.randn(32))
        self.down = nn.Linear(32, 16, bias=False)
        self.down_bias = nn.Parameter(torch.randn(16))
        self.conv = nn.Conv2d(16, 8, 1)
        self.drop2d = fastreg.Dropout2d(0.2, mask=mode)
        self.mode = mode

    def forward(self, x):
        h = fastreg.bias_act_dropout(
            self.up(x), self.up_bias, 0.1, "gelu", self.training, mask=self.mode
        )
        x = fastreg.bias_dropout_add(
            self.down(h), self.down_bias, x, 0.1, self.training, mask=self.mode
        )
        return self.drop2d(self.conv(x.transpose(1, 2).unsqueeze(-1)))


@pytest.mark.parametrize("mode", MASK_MODES)
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    model = Block(mode)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, 16)
    compiled(x).sum().backward()
    assert model.up_bias.grad is not None and model.down_bias.grad is not None
    model.eval()
    assert torch.allclose(compiled(x), model(x))


def test_torch_compile_with_seed_matches_eager():
    torch._dynamo.reset()
    x, b, r, _ = sample("3d", torch.float32, "cpu")

    def f(x, b, r):
        return fastreg.bias_dropout_add(x * 2, b, r, 0.3, seed=42) + fastreg.bias_act_dropout(
            x, b, 0.3, "relu", seed=7
        )

    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x, b, r), f(x, b, r))


def saved_bytes(fn, exclude):
    """Bytes of the storages autograd keeps for backward, less those of `exclude`."""
    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@requires_extension
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("activation", ["add", None, "gelu"])
def test_bytes_kept_for_backward(mode, activation):
    """Beyond the op's own inputs: the mask (1 bit or 1 byte per element, or nothing) and
    the 16-byte (seed, offset) pair."""
    n = 1 << 16
    x = torch.randn(n // 64, 64, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    r = torch.randn(n // 64, 64, requires_grad=True)
    if activation == "add":

        def fn():
            return fastreg.bias_dropout_add(x, b, r, 0.5, mask=mode)
    else:

        def fn():
            return fastreg.bias_act_dropout(x, b, 0.5, activation, mask=mode)

    kept, out = saved_bytes(fn, exclude=(x, b, r))
    assert (kept - 16) / n == {"bits": 0.125, "bool": 1.0, "recompute": 0.0}[mode]
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channel_dropout_keeps_one_byte_per_channel(dtype):
    x = torch.randn(8, 16, 32, 32, dtype=dtype, requires_grad=True)
    kept, out = saved_bytes(lambda: fastreg.dropout2d(x, 0.5), exclude=(x,))
    assert kept == 8 * 16
    out.sum().backward()


# ---- channel dropout ---------------------------------------------------------------


def torch_channel(spatial):
    return {1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}[spatial]


def fastreg_channel(spatial):
    return {1: fastreg.dropout1d, 2: fastreg.dropout2d, 3: fastreg.dropout3d}[spatial]


def outcome(fn, *args, **kwargs):
    """(exception type or None, warning messages, output) of a call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(*args, **kwargs)
            error = None
        except Exception as e:  # noqa: BLE001
            out, error = None, type(e)
    return error, [str(w.message) for w in caught], out


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("rank", [0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("training", [True, False])
def test_channel_rank_rules_and_warnings_follow_torch(spatial, rank, training):
    x = torch.ones((3,) * rank)
    t_error, t_warnings, t_out = outcome(torch_channel(spatial), x, 0.5, training)
    error, warns, out = outcome(fastreg_channel(spatial), x, 0.5, training)
    assert error == t_error and warns == t_warnings
    if out is not None:
        assert out.shape == t_out.shape and out.dtype == t_out.dtype
        # One flag per (batch, channel) after torch's no-batch unsqueeze: each channel is
        # all kept or all dropped.
        batched = rank == 3 if spatial == 1 else True if spatial == 2 else rank == 5
        xb = out if batched else out.unsqueeze(0)
        if xb.dim() > 2:
            dropped = (xb == 0).flatten(2)
            assert torch.all(dropped.all(-1) | (~dropped).all(-1))


@pytest.mark.parametrize(
    "spatial,shape",
    [
        (1, (4, 6, 9)),
        (1, (6, 9)),
        (2, (4, 6, 5, 3)),
        (2, (4, 6, 5)),
        (3, (2, 6, 3, 4, 5)),
        (3, (6, 3, 4, 5)),
    ],
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_channel_mask_is_the_contract_per_batch_and_channel(device, spatial, shape, dtype):
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fastreg_channel(spatial)(x, P, seed=SEED)
        y_ref = getattr(reference, f"dropout{spatial}d")(x, P, seed=SEED)
    assert torch.equal(y, y_ref)
    batched = len(shape) == spatial + 2 or spatial == 2
    xb = x if batched else x.unsqueeze(0)
    n, c = xb.shape[:2]
    keep = fastreg.dropout_mask((n, c), P, SEED, device=device)
    keep = keep.view(n, c, *[1] * (xb.dim() - 2))
    op = opmath(dtype)
    expected = torch.where(keep, xb.detach().to(op) * (1 / (1 - P)), 0.0).to(dtype)
    assert torch.equal(y, expected if batched else expected.squeeze(0))
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    expected_grad = torch.where(keep, torch.ones_like(xb, dtype=op) * (1 / (1 - P)), 0.0)
    expected_grad = expected_grad.to(dtype)
    assert torch.equal(gx, expected_grad if batched else expected_grad.squeeze(0))


def test_channel_dropout_details(device):
    x = torch.randn(2, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    y = fastreg.dropout2d(x, 0.5, seed=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert fastreg.dropout2d(x, 0.5, training=False) is x
    assert torch.equal(fastreg.dropout2d(x, 1.0), torch.zeros_like(x))
    z = x.clone()
    assert fastreg.dropout2d(z, 0.5, inplace=True, seed=1) is z and torch.equal(z, y)
    w = torch.randn(4, 5, device=device)  # no batch: (C, L)
    expected = fastreg.dropout1d(w, 0.5, seed=2)
    assert fastreg.dropout1d(w, 0.5, inplace=True, seed=2) is w and torch.equal(w, expected)
    with pytest.raises(ValueError, match="dropout probability"):
        fastreg.dropout3d(x, 2.0)
    with pytest.raises(TypeError, match="input must be float16"):
        fastreg.dropout2d(x.long(), 0.5)


@pytest.mark.parametrize(
    "cls,torch_cls",
    [
        (fastreg.Dropout1d, nn.Dropout1d),
        (fastreg.Dropout2d, nn.Dropout2d),
        (fastreg.Dropout3d, nn.Dropout3d),
    ],
)
def test_channel_modules_are_drop_ins(cls, torch_cls):
    layer = cls(0.3, mask="recompute")
    assert isinstance(layer, torch_cls)
    assert repr(layer) == f"{torch_cls.__name__}(p=0.3, inplace=False, mask='recompute')"
    assert layer.state_dict() == torch_cls(0.3).state_dict()
    x = (
        torch.randn(2, 3, 4, 4, 4)[:, :, 0, 0]
        if cls is fastreg.Dropout1d
        else torch.randn(2, 3, 4, 4)
        if cls is fastreg.Dropout2d
        else torch.randn(2, 3, 4, 4, 4)
    )
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match="mask must be one of"):
        cls(0.3, mask="nope")
    model = nn.Sequential(torch_cls(0.25, inplace=True), nn.Sequential(torch_cls(0.5)))
    model[1].eval()
    fastreg.replace_dropout(model, mask="bool")
    assert type(model[0]) is cls and model[0].p == 0.25 and model[0].inplace
    assert model[0].mask == "bool" and type(model[1][0]) is cls and not model[1][0].training


@pytest.mark.parametrize(
    "cls,shape",
    [
        (fastreg.Dropout1d, (8, 64, 3)),
        (fastreg.Dropout2d, (8, 64, 3, 2)),
        (fastreg.Dropout3d, (8, 64, 2, 2, 2)),
    ],
)
def test_channel_module_generator(device, cls, shape):
    """As fastreg.Dropout's: equally seeded generators, equal masks; else different."""

    def layer(seed):
        return cls(0.5, generator=torch.Generator(device).manual_seed(seed))

    x = torch.randn(shape, device=device)
    functional = {
        fastreg.Dropout1d: fastreg.dropout1d,
        fastreg.Dropout2d: fastreg.dropout2d,
        fastreg.Dropout3d: fastreg.dropout3d,
    }[cls]
    y = layer(5)(x)
    assert torch.equal(y, layer(5)(x)) and not torch.equal(y, layer(6)(x))
    assert torch.equal(y, functional(x, 0.5, generator=torch.Generator(device).manual_seed(5)))
    assert layer(5).state_dict() == {}
    with pytest.raises(TypeError, match="generator must be a torch.Generator, but got str"):
        cls(0.5, generator="cpu")


# ---- CUDA ------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("activation", ["add"] + ACTIVATIONS)
def test_cuda_equals_cpu(dtype, mode, activation):
    """Same contract on both devices: bit for bit without a transcendental activation."""
    for family in SHAPE_FAMILIES:
        x, bias, residual, g = sample(family, dtype, "cpu")
        results = []
        for device in ("cpu", "cuda"):
            xs = x.detach().to(device).requires_grad_()
            bs = bias.detach().to(device).requires_grad_()
            if activation == "add":
                y = fastreg.bias_dropout_add(xs, bs, residual.to(device), P, mask=mode, seed=SEED)
            else:
                y = fastreg.bias_act_dropout(xs, bs, P, activation, mask=mode, seed=SEED)
            gx, gb = torch.autograd.grad(y, (xs, bs), g.to(device))
            results.append([t.cpu() for t in (y, gx, gb)])
        (y, gx, gb), (y_c, gx_c, gb_c) = results
        z = z_of(x, bias)
        if activation in ("add", None, "relu"):
            assert torch.equal(y, y_c) and torch.equal(gx, gx_c)
        else:
            assert_within(y_c, y, act_bound(z, dtype, y, 1 / (1 - P)), "forward")
            assert_within(gx_c, gx, act_bound(z, dtype, gx, g.float().abs() / (1 - P)), "grad")
        assert_within(gb_c, gb, bias_grad_bound(gx, gb) + bias_grad_bound(gx_c, gb), "bias grad")


@requires_cuda
def test_cuda_large_and_misaligned():
    x = torch.randn(1 << 20 | 3, device="cuda")[3:].view(-1, 1024)
    b = torch.randn(1024, device="cuda")
    r = torch.randn(x.shape, device="cuda")
    assert torch.equal(
        fastreg.bias_dropout_add(x, b, r, 0.1, seed=1),
        fastreg.bias_dropout_add(x.cpu(), b.cpu(), r.cpu(), 0.1, seed=1).cuda(),
    )
