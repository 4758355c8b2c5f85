"""In-place dropout (fastreg.dropout(..., inplace=True)): the in-place operator
fastreg::dropout_fwd_ writes into the input, bit for bit as the out-of-place forward,
with no temporary of the input's size, autograd told of the mutation, torch.compile."""

import pytest
import torch
from conftest import FLOAT_DTYPES, MASK_MODES, OpLog, requires_extension

import fastreg

pytestmark = requires_extension

LAYOUTS = ["contiguous", "channels_last", "transposed", "offset", "strided"]


def make_input(layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if layout == "contiguous":
        return randn(4, 3, 5, 7)
    if layout == "channels_last":
        return randn(4, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return randn(7, 5, 3, 4).permute(3, 2, 1, 0)
    if layout == "offset":  # storage offset 1
        return randn(421)[1:].view(4, 105)
    return randn(4, 3, 5, 14)[..., ::2]  # every other column: not dense


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", MASK_MODES)
def test_inplace_is_bit_exact(layout, dtype, mode):
    x = make_input(layout, dtype)
    expected = fastreg.dropout(x, 0.3, seed=11, mask=mode)
    base = x._base if x._base is not None else x
    before = base.clone()
    y = fastreg.dropout(x, 0.3, inplace=True, seed=11, mask=mode)
    assert y is x
    assert torch.equal(x, expected)
    if layout == "strided":  # the other columns of the user's storage are untouched
        assert torch.equal(base[..., 1::2], before[..., 1::2])


@pytest.mark.parametrize("mode", MASK_MODES)
def test_op_returns_the_forward_mask(mode):
    x = torch.randn(1000)
    state = torch.tensor([123, 456], dtype=torch.int64)
    out, mask = torch.ops.fastreg.dropout_fwd(x, 0.4, state, mode)
    y = x.clone()
    mask_ = torch.ops.fastreg.dropout_fwd_(y, 0.4, state, mode)
    assert torch.equal(y, out) and torch.equal(mask_, mask)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_dense_input_runs_the_inplace_operator_alone(mode):
    """No copy_ and no allocation of the input's size (today's out-of-place kernel plus
    copy_ shows both): the operators seen, and the profiler's memory record."""
    x = torch.randn(1 << 16)
    with OpLog() as log:
        fastreg.dropout(x, 0.5, inplace=True, seed=3, mask=mode)
    assert "fastreg.dropout_fwd_" in log.names, log.names
    assert not {"aten.copy_", "aten.empty_like", "fastreg.dropout_fwd"} & set(log.names), log.names

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fastreg.dropout(x, 0.5, inplace=True, seed=3, mask=mode)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    # the mask: n / 8 bytes (bits), n bytes (bool), nothing (recompute)
    assert biggest < x.nbytes, f"an allocation of {biggest} bytes, input {x.nbytes}"


def test_memory_check_sees_the_out_of_place_output():
    """The profiler check above would catch a temporary: it sees the out-of-place output."""
    x = torch.randn(1 << 16)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fastreg.dropout(x, 0.5, seed=3)
    assert max(e.cpu_memory_usage for e in prof.events()) >= x.nbytes


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("view", [None, "columns", "rows", "reshaped"])
def test_inplace_gradients(mode, view):
    """On the tensor, on a strided view of it, and on dense views ("rows", "reshaped"):
    autograd refused those, a Function that modifies a view in place returning two
    tensors."""
    w = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 40, dtype=torch.float64)
    h = w * 2
    target = {None: h, "columns": h[:, 8:], "rows": h[2:], "reshaped": h.view(3, 80)}[view]
    region = {
        None: (slice(None), slice(None)),
        "columns": (slice(None), slice(8, None)),
        "rows": (slice(2, None), slice(None)),
        "reshaped": (slice(None), slice(None)),
    }[view]
    out = fastreg.dropout(target, 0.3, inplace=True, seed=9, mask=mode)
    assert out is target
    grad = torch.autograd.grad((h * g).sum(), w)[0]
    # the region dropped out is target's, in target's shape; the rest of h passes through
    expected = 2 * g
    dropped = fastreg.dropout(w[region].reshape(target.shape) * 2, 0.3, seed=9, mask=mode)
    expected[region] = torch.autograd.grad((dropped * g[region].reshape(target.shape)).sum(), w)[0][
        region
    ]
    assert torch.equal(grad, expected)


def test_inplace_double_backward():
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)
    h = w * w
    fastreg.dropout(h, 0.5, inplace=True, seed=4)
    (gw,) = torch.autograd.grad(h.sum(), w, create_graph=True)
    (ggw,) = torch.autograd.grad(gw.sum(), w)
    keep = fastreg.dropout_mask(50, 0.5, 4)
    assert torch.equal(ggw, torch.where(keep, torch.full_like(w, 4.0), 0.0))


def test_inplace_leaf_is_refused_untouched():
    leaf = torch.randn(10, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable"):
        fastreg.dropout(leaf, 0.5, inplace=True)
    assert torch.equal(leaf.detach(), before)


def test_inplace_bumps_the_version_counter_as_native_does():
    # A tensor saved for backward and then dropped out in place (no_grad) must make the
    # backward fail, as after torch's own in-place dropout, not use the changed values.
    for drop in (fastreg.dropout, torch.nn.functional.dropout):
        w = torch.randn(64, requires_grad=True)
        x = torch.randn(64)
        loss = (w * x).sum()  # saves x for w's gradient
        with torch.no_grad():
            version = x._version
            drop(x, 0.5, inplace=True)
        assert x._version > version, drop
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_inplace_operator_refuses_an_input_that_requires_grad():
    x = torch.randn(40, requires_grad=True) * 1  # not a leaf
    before = x.detach().clone()
    state = torch.tensor([5, 6], dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"fastreg::dropout_fwd_: input requires grad"):
        torch.ops.fastreg.dropout_fwd_(x, 0.3, state, "bits")
    assert torch.equal(x.detach(), before)
    with torch.no_grad():
        torch.ops.fastreg.dropout_fwd_(x, 0.3, state, "bits")
    assert not torch.equal(x.detach(), before)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_opcheck_inplace_operator(mode):
    state = torch.tensor([5, 6], dtype=torch.int64)
    for x in (
        torch.randn(3, 70),
        torch.randn(70, 3).t(),
        torch.randn(3, 140)[:, ::2],
        torch.randn(33, dtype=torch.float16),
    ):
        torch.library.opcheck(torch.ops.fastreg.dropout_fwd_, (x, 0.3, state, mode))


@pytest.mark.parametrize("view", [False, True])
def test_compile_fullgraph_inplace(view):
    def f(w):
        h = w * 2
        fastreg.dropout(h[10:] if view else h, 0.4, inplace=True, seed=21)
        return (h * h).sum()

    w = torch.randn(300, requires_grad=True)
    eager_out = f(w)
    (eager_grad,) = torch.autograd.grad(eager_out, w)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(w)
    (grad,) = torch.autograd.grad(out, w)
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)


def test_compile_fullgraph_inplace_module_no_grad():
    layer = fastreg.Dropout(0.25, inplace=True)
    compiled = torch.compile(lambda x: layer(x * 1), fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    x = torch.randn(1000)
    y = compiled(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert 0.15 < 1 - kept.float().mean().item() < 0.35
