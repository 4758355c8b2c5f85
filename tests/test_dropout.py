"""fastreg.dropout: kernels against the reference and the RNG contract, drop-in behaviour
of nn.Dropout / F.dropout, gradients, errors and operator registration."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FLOAT_DTYPES,
    MASK_MODES,
    TORCH_VERSION,
    OpLog,
    compiled_autograd_enable,
    requires_extension,
)
from torch import nn

import fastreg
from fastreg import _ops, reference


def make_input(shape, dtype, device, layout="contiguous", seed=0):
    """Inputs of each layout family the kernels must handle."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(shape, generator=g)
    elif layout == "channels_last":
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = (
            torch.randn(shape[::-1], generator=g).t()
            if len(shape) == 2
            else torch.randn(shape, generator=g).transpose(0, -1)
        )
    elif layout == "strided":  # every other column: not dense
        x = torch.randn(shape[:-1] + (2 * shape[-1],), generator=g)[..., ::2]
    elif layout == "offset":  # storage offset 1: misaligned for vector loads
        x = torch.randn(math.prod(shape) + 1, generator=g)[1:].view(shape)
    return x.to(dtype=dtype, device=device)


def contract_output(x, p, seed):
    """The RNG contract written out: the mask of seed, in the output's memory order."""
    layout = torch.empty_like(x)
    keep = reference.memory_order_view(
        fastreg.dropout_mask(x.numel(), p, seed, device=x.device), layout
    )
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = (
        torch.tensor(1.0 / (1.0 - p), dtype=opmath) if p < 1 else torch.tensor(0.0, dtype=opmath)
    )
    kept = (x.to(opmath) * scale.to(x.device)).to(x.dtype)
    return torch.where(keep, kept, torch.zeros((), dtype=x.dtype, device=x.device))


SHAPES_LAYOUTS = [
    ((1,), "contiguous"),
    ((7,), "contiguous"),
    ((1000, 33), "contiguous"),
    ((3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((4, 8, 6, 3), "channels_last"),
    ((33, 65), "transposed"),
    ((17, 31), "strided"),
    ((5, 257), "offset"),
]


@pytest.mark.parametrize("shape,layout", SHAPES_LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_forward_and_backward_bit_exact_with_reference(device, shape, layout, dtype, mode):
    p, seed = 0.3, 987654321
    x = make_input(shape, dtype, device, layout).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = fastreg.dropout(x, p, mask=mode, seed=seed)
    y_ref = reference.dropout(x_ref, p, mask=mode, seed=seed)
    assert torch.equal(y, y_ref)
    assert torch.equal(y, contract_output(x.detach(), p, seed))
    assert y.stride() == torch.empty_like(x).stride()
    g = make_input(shape, dtype, device, "contiguous", seed=1)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    assert torch.equal(gx, gx_ref)
    assert gx.stride() == y.stride()
    # Backward is the forward's rule applied to the gradient, element by element.
    keep = reference.memory_order_view(
        fastreg.dropout_mask(x.numel(), p, seed, device=device), torch.empty_like(x)
    )
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.where(
        keep,
        (g.to(opmath) * (1.0 / (1.0 - p))).to(dtype),
        torch.zeros((), dtype=dtype, device=device),
    )
    assert torch.equal(gx, expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("numel", [1, 31, 32, 33, 1023, 1024, 1025, 4099])
def test_tails_and_sizes(device, p, numel):
    x = torch.randn(numel, device=device)
    for mode in MASK_MODES:
        assert torch.equal(
            fastreg.dropout(x, p, mask=mode, seed=numel),
            reference.dropout(x, p, mask=mode, seed=numel),
        )


@requires_extension
@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("numel", [2 * 4096 + 5, 8 * 4096 + 300])
def test_cpu_bits_do_not_depend_on_the_thread_count(threads, numel):
    # The CPU kernels split their 4096-element chunks into one share per thread, each
    # share claimed chunk by chunk, then what is left of the others' (csrc/cpu/
    # parallel_claim.h). Three chunks and five threads: fewer workers than threads;
    # nine chunks and three or five threads: uneven shares.
    x = torch.randn(numel, requires_grad=True)
    g = torch.randn(numel)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for mode in MASK_MODES:
            y = fastreg.dropout(x, 0.4, mask=mode, seed=numel)
            y_ref = reference.dropout(x, 0.4, mask=mode, seed=numel)
            assert torch.equal(y, y_ref)
            assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
        assert torch.equal(
            fastreg.dropout_mask(numel, 0.4, 7), reference.dropout_mask(numel, 0.4, 7)
        )
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_within_binomial_bounds(device, p):
    n = 1 << 20
    kept = int(fastreg.dropout(torch.ones(n, device=device), p).count_nonzero())
    mean, sd = n * (1 - p), math.sqrt(n * p * (1 - p))
    assert abs(kept - mean) <= 6 * sd, f"kept {kept}, expected {mean:.0f} +- 6 * {sd:.1f}"


def test_every_call_draws_fresh_masks_and_manual_seed_repeats(device):
    x = torch.ones(4096, device=device)
    torch.manual_seed(0)
    a, b = fastreg.dropout(x, 0.5), fastreg.dropout(x, 0.5)
    torch.manual_seed(0)
    a2, b2 = fastreg.dropout(x, 0.5), fastreg.dropout(x, 0.5)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_explicit_generator(device):
    x = torch.ones(4096, device=device)
    g1 = torch.Generator(device=device).manual_seed(7)
    g2 = torch.Generator(device=device).manual_seed(7)
    assert torch.equal(fastreg.dropout(x, 0.5, generator=g1), fastreg.dropout(x, 0.5, generator=g2))
    torch.manual_seed(7)
    before = torch.random.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    fastreg.dropout(x, 0.5, generator=g1)
    after = torch.random.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    assert torch.equal(before, after), "an explicit generator must leave the default one alone"


def test_recompute_saves_the_drawn_state_not_the_generator(device):
    """Backward in recompute mode regenerates the forward's mask even when the default
    generator moved on in between."""
    x = torch.randn(5000, device=device, requires_grad=True)
    y = fastreg.dropout(x, 0.4, mask="recompute")
    fastreg.dropout(x.detach(), 0.4)  # advance the generator
    torch.manual_seed(123)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx != 0, y != 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_and_inf_dropped_to_exact_zero(device, dtype):
    x = torch.tensor([float("nan"), float("inf"), -float("inf")] * 100, dtype=dtype, device=device)
    y = fastreg.dropout(x, 0.5, seed=3)
    keep = fastreg.dropout_mask(x.numel(), 0.5, 3, device=device)
    assert torch.all(y[~keep] == 0) and not torch.any(torch.signbit(y[~keep]))
    assert torch.equal(y[keep].isnan(), x[keep].isnan())


# ---- drop-in behaviour -------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan")])
def test_p_outside_unit_interval_raises_like_torch(p):
    x = torch.ones(3)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        fastreg.dropout(x, p)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        fastreg.Dropout(p)
    if not math.isnan(p):
        with pytest.raises(ValueError):
            F.dropout(x, p)


def test_argument_errors_name_the_argument():
    x = torch.ones(3)
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64"):
        fastreg.dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="argument 'input' must be Tensor"):
        fastreg.dropout([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="p must be a float"):
        fastreg.dropout(x, "0.5")
    with pytest.raises(ValueError, match="mask must be one of"):
        fastreg.dropout(x, 0.5, mask="bytes")
    with pytest.raises(ValueError, match="mask must be one of"):
        fastreg.Dropout(0.5, mask="packed")
    with pytest.raises(ValueError, match="either seed or generator"):
        fastreg.dropout(x, 0.5, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed must be an int"):
        fastreg.dropout(x, 0.5, seed=1.5)
    with pytest.raises(ValueError, match="seed must be in"):
        fastreg.dropout(x, 0.5, seed=2**64)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastreg.dropout(x, 0.5, generator=5)
    with pytest.raises(TypeError, match="offset must be an int"):
        fastreg.dropout_mask(3, 0.5, 1, offset="1")


def test_eval_and_training_false_return_the_input(device):
    x = torch.randn(10, device=device)
    assert fastreg.dropout(x, 0.5, training=False) is x
    layer = fastreg.Dropout(0.5).eval()
    assert layer(x) is x


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_and_one_match_torch(device, p):
    x = torch.randn(100, device=device, requires_grad=True)
    x_t = x.detach().clone().requires_grad_()
    y, y_t = fastreg.dropout(x, p), F.dropout(x_t, p)
    assert torch.equal(y, y_t)
    g = torch.randn(100, device=device)
    y.backward(g)
    y_t.backward(g)
    assert torch.equal(x.grad, x_t.grad)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_inplace(device, mode):
    x = torch.randn(1000, device=device)
    expected = fastreg.dropout(x, 0.3, seed=5, mask=mode)
    y = fastreg.dropout(x, 0.3, inplace=True, seed=5, mask=mode)
    assert y is x and torch.equal(x, expected)
    # with autograd, on a non-leaf, like torch
    w = torch.randn(1000, device=device, requires_grad=True)
    h = w * 2
    out = fastreg.Dropout(0.3, inplace=True, mask=mode)(h)
    assert out is h
    out.sum().backward()
    assert torch.equal(w.grad != 0, out.detach() != 0)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2)])
def test_empty_and_zero_dim(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = fastreg.dropout(x, 0.5, seed=1)
    assert y.shape == x.shape
    assert torch.equal(y, reference.dropout(x.detach(), 0.5, seed=1))
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("mode", MASK_MODES)
def test_channels_last_output_and_gradient(device, mode):
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = fastreg.dropout(x, 0.5, mask=mode)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (gx,) = torch.autograd.grad(y, x, torch.randn(2, 3, 4, 5, device=device))  # contiguous grad
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gx != 0, y.detach() != 0)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_gradcheck_and_gradgradcheck(device, mode):
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    f = lambda t: fastreg.dropout(t, 0.4, mask=mode, seed=11)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_double_backward_values(device):
    """The gradient is the mask rule applied to the incoming gradient v, so its
    derivative with respect to v is the rule applied to ones: keep * scale."""
    x = torch.randn(300, dtype=torch.float64, device=device, requires_grad=True)
    y = fastreg.dropout(x, 0.5, seed=2)
    v = torch.ones_like(y, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
    (gv,) = torch.autograd.grad(gx.sum(), v)
    keep = fastreg.dropout_mask(300, 0.5, 2, device=device)
    assert torch.equal(gv, keep.double() * 2.0)


def test_no_grad_and_inference_mode(device):
    x = torch.randn(100, device=device, requires_grad=True)
    with torch.no_grad():
        y = fastreg.dropout(x, 0.5, seed=4)
    assert not y.requires_grad
    with torch.inference_mode():
        z = fastreg.dropout(torch.randn(100, device=device), 0.5, seed=4)
    assert z.is_inference()


@pytest.mark.parametrize("mode", MASK_MODES)
def test_bytes_kept_for_backward(mode):
    n = 1 << 16
    x = torch.randn(n, requires_grad=True)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fastreg.dropout(x, 0.5, mask=mode)
    per_element = (sum(storages.values()) - 16) / n  # minus the (seed, offset) pair
    if not _ops.has_kernels("cpu"):
        pytest.skip("the reference keeps what autograd keeps")
    assert per_element == {"bits": 0.125, "bool": 1.0, "recompute": 0.0}[mode]
    y.sum().backward()


@requires_extension
@pytest.mark.parametrize("mode", MASK_MODES)
def test_backward_is_the_backward_operator_alone(mode):
    """The mask output has no gradient and autograd is told not to make one: a backward
    runs dropout_bwd and nothing else (it used to fill a zero tensor of the mask's size,
    a byte per element in bool mode, in every backward)."""
    x = torch.randn(1 << 12, requires_grad=True)
    y = fastreg.dropout(x, 0.5, seed=3, mask=mode)
    g = torch.randn_like(y)
    with OpLog() as log:
        (gx,) = torch.autograd.grad(y, x, g)
    assert log.names == ["fastreg.dropout_bwd"], log.names
    assert torch.equal(gx, fastreg.dropout(g, 0.5, seed=3, mask=mode))


@requires_extension
def test_grad_fn_is_the_native_node():
    """dropout_fwd's autograd is a C++ node (csrc/ops/dropout_autograd.cpp), with the
    input's gradient edge; the mask output is not differentiable."""
    x = torch.randn(6, 5, requires_grad=True)
    y = fastreg.dropout(x, 0.5, seed=3)
    assert y.grad_fn.name() == "DropoutBackward0"
    assert "grad_fn=<DropoutBackward0>" in repr(y)
    assert len(y.grad_fn.next_functions) == 1
    assert y.grad_fn.next_functions[0][0].variable is x  # x's AccumulateGrad
    _, mask = torch.ops.fastreg.dropout_fwd(x, 0.5, torch.tensor([1, 2]), "bool")
    assert not mask.requires_grad


@requires_extension
@pytest.mark.parametrize("mode", MASK_MODES)
def test_backward_gives_the_gradient_the_output_layout(mode):
    """The incoming gradient is copied into the output's exact strides (mask bit i is the
    output's i-th memory slot; a bool mask wants the strides too), whatever its own: here
    size-1 and size-0 dimensions with strides no contiguous tensor has."""
    base = torch.randn(64)
    for x in (
        base[:40].as_strided((5, 1, 8), (8, 3, 1)),
        base[:6].as_strided((6, 1), (1, 9)),
        base.as_strided((0,), (2,)),
        base[:24].view(4, 6).t(),
    ):
        x = x.detach().requires_grad_()
        y = fastreg.dropout(x, 0.5, seed=7, mask=mode)
        g = torch.randn(y.shape)
        (gx,) = torch.autograd.grad(y, x, g)
        (expected,) = torch.autograd.grad(reference.dropout(x, 0.5, seed=7, mask=mode), x, g)
        assert torch.equal(gx, expected)


@requires_extension
def test_forward_mode_ad_is_refused():
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(10), torch.ones(10))
        with pytest.raises(
            RuntimeError, match="fastreg::dropout_fwd: input has a forward-mode tangent"
        ):
            fastreg.dropout(dual, 0.5, seed=1)
        with pytest.raises(
            RuntimeError,
            match=r"fastreg::penalty: params\[1\] has a "
            "forward-mode tangent",
        ):
            fastreg.penalty([torch.randn(3), dual], l2=1.0)


# Inputs whose dropout output is 1-d, 2-d transposed, 3-d with a size-1 dimension whose
# stride is not the contiguous one, 3-d permuted, 4-d channels-last, and not dense.
COMPILED_AUTOGRAD_INPUTS = {
    "1d": lambda base: base[:24],
    "2d transposed": lambda base: base[:128].view(8, 16).t(),
    "3d size-1 stride": lambda base: base.as_strided((4, 1, 6), (6, 100, 1)),
    "3d permuted": lambda base: base[:48].view(2, 4, 6).transpose(0, 1),
    "4d channels_last": lambda base: (
        base[:120].view(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    ),
    "not dense": lambda base: base[:48].view(4, 12)[:, ::2],
}


@requires_extension
@pytest.mark.skipif(not hasattr(torch._dynamo, "compiled_autograd"), reason="no compiled autograd")
@pytest.mark.parametrize("layout", list(COMPILED_AUTOGRAD_INPUTS))
@pytest.mark.parametrize("mode", MASK_MODES)
def test_compiled_autograd_of_an_eager_dropout(mode, layout):
    # Compiled autograd traces the node with a 2-d placeholder gradient: until the layout
    # copy became an operator (grad_with_strides), every output that was not 2-d failed.
    if TORCH_VERSION < (2, 8):
        pytest.skip("the node supports compiled autograd from torch 2.8")
    torch._dynamo.reset()
    base = torch.randn(400, requires_grad=True)
    y = fastreg.dropout(COMPILED_AUTOGRAD_INPUTS[layout](base), 0.5, seed=5, mask=mode)
    weights = torch.arange(y.numel(), dtype=y.dtype).view(y.shape)  # every element its own
    loss = (y * y * weights).sum()
    (expected,) = torch.autograd.grad(loss, base, retain_graph=True)
    with compiled_autograd_enable(torch.compile(backend="aot_eager")):
        loss.backward()
    assert torch.equal(base.grad, expected)


@requires_extension
def test_grad_with_strides_operator():
    ops = torch.ops.fastreg
    g = torch.randn(4, 6).t()  # strides (1, 6)
    for stride in ([1, 6], [4, 1]):
        out = ops.grad_with_strides(g, stride)
        assert out.stride() == tuple(stride) and torch.equal(out, g)
        assert out.data_ptr() != g.data_ptr()  # a new tensor, as the schema says
        torch.library.opcheck(ops.grad_with_strides, (g.clone().requires_grad_(), stride))
    # compiled autograd's placeholder (another rank, no elements) is copied as it is
    placeholder = torch.zeros([0, 123456789])
    assert ops.grad_with_strides(placeholder, [1, 1, 1]).shape == placeholder.shape
    with pytest.raises(RuntimeError, match="grad has 2 dimensions, but stride has 3"):
        ops.grad_with_strides(g, [24, 6, 1])
    with pytest.raises(RuntimeError, match="is not a dense, non-overlapping layout"):
        ops.grad_with_strides(g, [1, 4])


def test_module_is_a_drop_in(device):
    layer = fastreg.Dropout(0.2, inplace=False, mask="recompute")
    assert isinstance(layer, nn.Dropout)
    assert repr(layer) == "Dropout(p=0.2, inplace=False, mask='recompute')"
    assert layer.state_dict() == nn.Dropout(0.2).state_dict()
    x = torch.randn(64, device=device)
    assert torch.equal(layer.eval()(x), x)


def test_module_generator(device):
    """Modules whose generators are seeded alike drop the same elements, differently
    seeded ones not; each draws what fastreg.dropout draws from its generator."""

    def layer(seed):
        return fastreg.Dropout(0.5, generator=torch.Generator(device).manual_seed(seed))

    x = torch.randn(4096, device=device)
    a, b, c = layer(7), layer(7), layer(8)
    ya = a(x)
    assert torch.equal(ya, b(x)) and not torch.equal(ya, c(x))
    g = torch.Generator(device).manual_seed(7)
    assert torch.equal(ya, fastreg.dropout(x, 0.5, generator=g))
    assert not torch.equal(a(x), ya)  # the generator moves on, as the default one does
    assert a.state_dict() == nn.Dropout(0.5).state_dict() == {}
    assert repr(a) == "Dropout(p=0.5, inplace=False, mask='bits')"
    assert fastreg.Dropout(0.5).generator is None
    with pytest.raises(TypeError, match="generator must be a torch.Generator, but got int"):
        fastreg.Dropout(0.5, generator=7)


def test_module_generator_under_torch_compile():
    """dynamo does not trace a Generator argument: fullgraph=True may refuse it, but must
    never bake one draw into the graph; without fullgraph the draw runs eagerly."""
    torch._dynamo.reset()
    x = torch.randn(4096)
    eager = fastreg.Dropout(0.5, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(
        fastreg.Dropout(0.5, generator=torch.Generator().manual_seed(3)), backend="eager"
    )
    for _ in range(2):
        assert torch.equal(compiled(x), eager(x))
    torch._dynamo.reset()
    eager = fastreg.Dropout(0.5, generator=torch.Generator().manual_seed(3))
    full = torch.compile(
        fastreg.Dropout(0.5, generator=torch.Generator().manual_seed(3)),
        fullgraph=True,
        backend="eager",
    )
    try:
        outputs = [full(x) for _ in range(2)]
    except torch._dynamo.exc.Unsupported:
        return
    assert all(torch.equal(y, eager(x)) for y in outputs)


def test_replace_dropout_swaps_every_dropout_keeping_settings():
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.Dropout(0.1),
        nn.Sequential(nn.Dropout(0.7, inplace=True)),
        nn.Dropout2d(0.5),
    )
    model[2].eval()
    returned = fastreg.replace_dropout(model, mask="bool")
    assert returned is model
    assert type(model[1]) is fastreg.Dropout and model[1].p == 0.1 and model[1].mask == "bool"
    assert model[2][0].p == 0.7 and model[2][0].inplace and not model[2][0].training
    assert type(model[3]) is fastreg.Dropout2d and model[3].p == 0.5 and model[3].mask == "bool"
    assert type(fastreg.replace_dropout(nn.Dropout(0.3))) is fastreg.Dropout


# ---- operator registration --------------------------------------------------------


@requires_extension
@pytest.mark.parametrize("mode", MASK_MODES)
def test_opcheck(device, mode):
    ops = torch.ops.fastreg
    for x in [
        make_input((8, 5), torch.float32, device),
        make_input((2, 3, 4, 5), torch.float16, device, "channels_last"),
        make_input((5, 6), torch.float64, device, "strided"),
    ]:
        state = torch.tensor([5, 9], device=device)
        torch.library.opcheck(ops.dropout_fwd, (x.requires_grad_(), 0.25, state, mode))
        out, mask = ops.dropout_fwd(x.detach(), 0.25, state, mode)
        torch.library.opcheck(
            ops.dropout_bwd, (out.clone().requires_grad_(), mask, 0.25, state, mode)
        )
    torch.library.opcheck(ops.dropout_mask, (torch.tensor([1, 2], device=device), [3, 7], 0.5))


def test_fake_kernels_match_real_layouts():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    state = torch.tensor([1, 2])
    if not _ops.HAVE_EXTENSION:
        pytest.skip("extension not loaded")
    real = torch.ops.fastreg.dropout_fwd(x, 0.5, state, "bool")
    with FakeTensorMode() as mode:
        fake = torch.ops.fastreg.dropout_fwd(
            mode.from_tensor(x), 0.5, mode.from_tensor(state), "bool"
        )
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


@pytest.mark.parametrize("mode", MASK_MODES)
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), fastreg.Dropout(0.5, mask=mode), nn.Linear(32, 4)
    )
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 16)
    out = compiled(x)
    out.sum().backward()
    assert model[0].weight.grad is not None
    model.eval()
    assert torch.allclose(compiled(x), model(x))


def test_torch_compile_with_seed_matches_eager():
    torch._dynamo.reset()
    f = lambda t: fastreg.dropout(t * 2, 0.3, seed=42)  # noqa: E731
    x = torch.randn(1000)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_reference_backend_in_a_fresh_process():
    import os
    import subprocess
    import sys

    code = (
        "import fastreg, torch; assert fastreg.info()['backend'] == 'reference'; "
        "x = torch.randn(100); y = fastreg.dropout(x, 0.5, seed=1); "
        "assert torch.equal(y, fastreg.reference.dropout(x, 0.5, seed=1)); print('ok')"
    )
    env = dict(os.environ, FASTREG_BACKEND="reference")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_missing_extension_warns_once_and_falls_back():
    import subprocess
    import sys

    code = (
        "import sys, warnings; sys.modules['fastreg._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastreg, torch\n"
        "    fastreg.dropout(torch.ones(8), 0.5)\n"
        "msgs = [str(x.message) for x in w if 'fastreg' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'reference' in msgs[0], msgs\n"
        "assert fastreg.info()['backend'] == 'reference'\n"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTREG_BACKEND"}  # the auto choice
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_torch_compile_inductor_trains():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 32), fastreg.Dropout(0.5), nn.Linear(32, 4))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 16)
    compiled(x).sum().backward()
    hidden = model[1](model[0](x))
    assert model[0].weight.grad is not None and torch.any(hidden == 0)


# ---- torch.func ----


@pytest.mark.parametrize("mask", MASK_MODES)
def test_torch_func_grad_and_vjp(mask):
    # torch.func.grad runs the backward with create_graph: the same bits as autograd.grad
    x = make_input((6, 33), torch.float32, "cpu", "transposed")
    weight = torch.randn(6, 33)

    def loss(v):
        return (fastreg.dropout(v, 0.3, mask=mask, seed=5) * weight).sum()

    got = torch.func.grad(loss)(x)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    assert torch.equal(got, expected)
    out, vjp = torch.func.vjp(lambda v: fastreg.dropout(v, 0.3, mask=mask, seed=5), x)
    assert torch.equal(vjp(weight)[0], expected)
    assert torch.equal(out, fastreg.dropout(x, 0.3, mask=mask, seed=5))


@pytest.mark.parametrize("mask", MASK_MODES)
def test_torch_func_grad_in_place_and_of_the_gradient(mask):
    # in place on an intermediate (its autograd.Function in the form torch.func accepts),
    # and the gradient of a gradient (dropout_bwd's formula): as autograd.grad gives them
    x = make_input((5, 40), torch.float32, "cpu")
    weight = torch.randn(5, 40)

    def loss(v):
        return (fastreg.dropout(v * 2, 0.3, inplace=True, mask=mask, seed=9) * weight).sum()

    def loss_on_view(v):  # in place on a dense view of the intermediate
        h = v * 2
        fastreg.dropout(h[1:], 0.3, inplace=True, mask=mask, seed=9)
        return (h * weight).sum()

    leaf = x.clone().requires_grad_()
    for f in (loss, loss_on_view):
        got = torch.func.grad(f)(x)
        (expected,) = torch.autograd.grad(f(leaf), leaf)
        assert torch.equal(got, expected)

    def squared(v):
        return fastreg.dropout(v, 0.3, mask=mask, seed=9).square().sum()

    second = torch.func.grad(lambda v: torch.func.grad(squared)(v).mul(weight).sum())(x)
    (first,) = torch.autograd.grad(squared(leaf), leaf, create_graph=True)
    (expected_second,) = torch.autograd.grad(first.mul(weight).sum(), leaf)
    assert torch.equal(second, expected_second)


def test_vmap_randomness_as_torch():
    # as F.dropout: refused in vmap's default randomness="error"; "different" draws each
    # row's own mask, "same" one mask for all rows
    x = torch.ones(8, 64)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda v: fastreg.dropout(v, 0.5))(x)
    different = torch.func.vmap(lambda v: fastreg.dropout(v, 0.5), randomness="different")(x)
    same = torch.func.vmap(lambda v: fastreg.dropout(v, 0.5), randomness="same")(x)
    for y in (different, same):
        assert ((y == 0) | (y == 2)).all()
    # 8 rows of 64 fair draws: all equal to the first with probability 2**-448
    assert not all(torch.equal(different[0], row) for row in different[1:])
    assert all(torch.equal(same[0], row) for row in same[1:])
