"""fastreg.penalty and friends against the pure-PyTorch reference (fastreg.reference):
values within the float32 accumulation bound of the float64 oracle, gradients and
in-place steps bit for bit, on the CPU and (when there is one) the GPU."""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_extension
from torch import nn

import fastreg
from fastreg import _ops, _params, reference

fastreg_penalty = importlib.import_module("fastreg.penalty")  # the module, not the function

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
U32 = 2.0**-24  # float32 unit roundoff

# Worst-case relative error of a float32-accumulated value (all terms >= 0): the longest
# chain of float32 roundings one element goes through, times the unit roundoff. CPU: 128
# lane additions per 4096-element chunk, 5 tree levels, the square and the final rounding
# to float32. CUDA: 256 additions per thread per 65536-element chunk, 8 tree levels, the
# square and the final rounding. Partials are combined in float64.
VALUE_RTOL = {"cpu": (128 + 5 + 2) * U32, "cuda": (256 + 8 + 2) * U32}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.cuda])]


# ---- Sample lists ----


def sample(shape, dtype, layout="contiguous", *, seed=0, device="cpu", zeros_every=7):
    """A tensor of `shape` with some exact zeros; "transposed" is dense but not
    contiguous, "strided" is not dense (every other element of a buffer)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(2 * n if layout == "strided" else n, generator=g, dtype=torch.float64)
    if zeros_every:
        x[::zeros_every] = 0.0
    x = x.to(dtype).to(device)
    if layout == "strided":
        return x[::2].view(shape)
    if layout == "transposed":
        dims = list(range(len(shape)))[::-1]
        return x.view(shape[::-1]).permute(dims)
    return x.view(shape)


def sample_list(name, device="cpu", requires_grad=False):
    if name == "one":
        specs = [((37,), torch.float32, "contiguous")]
    elif name == "mixed":
        specs = [
            ((1,), torch.float32, "contiguous"),
            ((3, 5), torch.float16, "transposed"),
            ((0,), torch.float32, "contiguous"),
            ((257,), torch.bfloat16, "strided"),
            ((64, 65), torch.float64, "contiguous"),
            ((3, 0), torch.bfloat16, "contiguous"),
            ((4099,), torch.float32, "strided"),
            ((9, 7, 5), torch.float32, "transposed"),
            ((1000,), torch.float16, "contiguous"),
        ]
    elif name == "chunks":  # crosses the CPU chunks (4096) and the CUDA ones (65536)
        specs = [
            ((4095,), torch.float32, "contiguous"),
            ((4097,), torch.float32, "contiguous"),
            ((70001,), torch.bfloat16, "contiguous"),
            ((131073,), torch.float32, "contiguous"),
        ]
    elif name == "many":  # 2000 small tensors of every dtype, some empty
        g = torch.Generator().manual_seed(1)
        sizes = torch.randint(0, 60, (2000,), generator=g).tolist()
        kinds = torch.randint(0, 4, (2000,), generator=g).tolist()
        specs = [((s,), DTYPES[k], "contiguous") for s, k in zip(sizes, kinds)]
    elif name == "float32_model":
        specs = [((48, 33), torch.float32, "contiguous"), ((48,), torch.float32, "contiguous")] * 5
    else:
        raise ValueError(name)
    tensors = [
        sample(shape, dtype, layout, seed=i, device=device)
        for i, (shape, dtype, layout) in enumerate(specs)
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


LISTS = ["one", "mixed", "chunks", "many", "float32_model"]


def coefficients(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    l1 = (torch.rand(n, generator=g, dtype=torch.float64) * 1e-2).tolist()
    l2 = (torch.rand(n, generator=g, dtype=torch.float64) * 1e-1).tolist()
    return l1, l2


def float64_value(tensors, l1s, l2s):
    """The penalty summed in float64, independently of fastreg.reference."""
    total = 0.0
    for t, a, b in zip(tensors, l1s, l2s):
        x = t.detach().double().cpu()
        total += a * x.abs().sum().item() + b * x.square().sum().item()
    return total


def assert_bits_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def grads_of(value, tensors):
    for t in tensors:
        t.grad = None
    value.backward()
    return [t.grad for t in tensors]


def kernel_penalty(tensors, l1s, l2s):
    """The public path with per-tensor coefficients (one group per tensor)."""
    groups = [{"params": [t], "l1": a, "l2": b} for t, a, b in zip(tensors, l1s, l2s)]
    return fastreg.penalty(groups)


# ---- Value ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", LISTS)
def test_value_against_float64(name, device):
    tensors = sample_list(name, device)
    l1s, l2s = coefficients(len(tensors))
    value = kernel_penalty(tensors, l1s, l2s)
    expected = float64_value(tensors, l1s, l2s)
    any64 = any(t.dtype == torch.float64 for t in tensors)
    assert value.dtype == (torch.float64 if any64 else torch.float32)
    assert value.shape == () and value.device.type == device
    assert abs(value.item() - expected) <= VALUE_RTOL[device] * expected
    oracle = reference.penalty_apply(tensors, l1s, l2s)
    assert abs(oracle.item() - expected) <= U32 * expected  # float64, rounded once


def test_value_accuracy_on_mlp_list():
    """The issue's benchmark list (50 Linear(256, 256): 100 tensors, 3.3M elements):
    relative error at most 1e-7 against float64, where torch's loop is further off."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(50)])
    params = list(model.parameters())
    l1, l2 = 1e-5, 5e-4
    exact = float64_value(params, [l1] * 100, [l2] * 100)
    value = fastreg.penalty(params, l1=l1, l2=l2).item()
    assert abs(value - exact) / exact <= 1e-7
    with torch.no_grad():
        loop = sum(
            l1 * torch.sum(torch.abs(p)) + l2 * torch.sum(torch.pow(p, 2)) for p in params
        ).item()
    assert abs(value - exact) <= abs(loop - exact)


def test_bfloat16_value_is_not_rounded_to_bfloat16():
    x = sample((10000,), torch.bfloat16, zeros_every=0) + 3  # sum far beyond bf16's 8 bits
    exact = float64_value([x], [1.0], [0.0])
    value = fastreg.l1_penalty([x])
    assert value.dtype == torch.float32
    assert abs(value.item() - exact) <= VALUE_RTOL["cpu"] * exact
    assert torch.sum(torch.abs(x)).item() != value.item()  # the loop's bf16 sum is rounded


@requires_extension  # torch's own sums (the reference backend) depend on the thread count
@pytest.mark.parametrize("device", DEVICES)
def test_value_is_bitwise_repeatable_and_thread_independent(device):
    tensors = sample_list("chunks", device) + sample_list("mixed", device)
    l1s, l2s = coefficients(len(tensors))
    threads = torch.get_num_threads()
    try:
        values = []
        for n in (1, 2, 3, 1, 2):
            torch.set_num_threads(n)
            values.append(kernel_penalty(tensors, l1s, l2s))
    finally:
        torch.set_num_threads(threads)
    for v in values[1:]:
        assert_bits_equal(v, values[0])


@pytest.mark.skipif(_ops.BACKEND != "extension", reason="the CPU kernels' summation order")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_short_tensor_sums_follow_the_lane_tree(dtype):
    # The CPU kernel sums element i of a tensor into lane i % L (L = 32 float32, 16 float64
    # lanes) and combines the lanes by a pairwise tree; below L elements the tree starts at
    # the first power of two >= n. That shortcut must give the full tree's bits.
    lanes = 32 if dtype == torch.float32 else 16
    g = torch.Generator().manual_seed(3)
    for n in range(1, 2 * lanes + 2):
        # magnitudes over 12 decades, so that the order of additions shows in the bits
        x = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
            -6, 6, (n,), generator=g
        )
        x = x.to(dtype)
        a = torch.zeros(lanes, dtype=dtype)
        q = torch.zeros(lanes, dtype=dtype)
        for i in range(n):
            a[i % lanes] += x[i].abs()
            q[i % lanes] += x[i] * x[i]
        width = lanes // 2
        while width:
            a[:width] += a[width : 2 * width].clone()
            q[:width] += q[width : 2 * width].clone()
            width //= 2
        for l1, l2, tree in ((1.0, 0.0, a[0]), (0.0, 1.0, q[0])):
            expected = torch.tensor(
                tree.item(), dtype=torch.float32 if dtype == torch.float32 else torch.float64
            )
            assert_bits_equal(torch.ops.fastreg.penalty([x], [l1], [l2]), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_selections_give_zero(device):
    zero = fastreg.penalty([], l1=1.0, l2=1.0)
    assert zero.dtype == torch.float32 and zero.item() == 0.0 and zero.device.type == "cpu"
    empties = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    assert fastreg.penalty(empties, l1=1.0, l2=1.0).item() == 0.0
    only_bias = nn.Linear(3, 1, bias=False).to(device)
    only_bias.weight.requires_grad_(False)
    assert fastreg.penalty(only_bias, l2=1.0).item() == 0.0
    x = sample((5,), torch.float32, device=device)
    assert fastreg.penalty([x], l1=0.0, l2=0.0).item() == 0.0  # given as zero: a zero


@pytest.mark.parametrize("device", DEVICES)
def test_zero_coefficient_terms_are_left_out(device):
    x = torch.tensor([1.0, -math.inf, 2.0], device=device, requires_grad=True)
    assert fastreg.l1_penalty([x]).item() == math.inf  # not 0 * inf = nan from the l2 term
    assert fastreg.l2_penalty([x]).item() == math.inf
    (grad,) = grads_of(fastreg.l1_penalty([x], 0.5), [x])
    assert grad.tolist() == [0.5, -0.5, 0.5]
    y = torch.tensor([math.nan, 1.0], device=device)
    assert math.isnan(fastreg.penalty([y], l1=1.0).item())


# ---- Gradients ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", LISTS)
def test_gradients_match_reference_bitwise(name, device):
    tensors = sample_list(name, device, requires_grad=True)
    l1s, l2s = coefficients(len(tensors), seed=2)
    grads = grads_of(3.0 * kernel_penalty(tensors, l1s, l2s), tensors)
    expected = grads_of(3.0 * reference.penalty_apply(tensors, l1s, l2s), tensors)
    for t, grad, exp in zip(tensors, grads, expected):
        assert_bits_equal(grad, exp)
        assert grad.shape == t.shape
    # and against the float64 formula: sign(w) and w agree, so nothing cancels; five
    # op-math roundings and one to the dtype stay within 4 eps (relative), plus the
    # dtype's subnormal spacing
    for t, grad, a, b in zip(tensors, grads, l1s, l2s):
        w = t.detach().double()
        exact = 3.0 * (a * torch.sign(w) + 2 * b * w)
        info = torch.finfo(t.dtype)
        bound = 4 * info.eps * exact.abs() + info.tiny * info.eps
        assert ((grad.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_zero_and_frozen_tensors(device):
    frozen = sample((4,), torch.float32, device=device)
    live = sample((7,), torch.float32, device=device).requires_grad_()
    value = fastreg.penalty([frozen, live], l1=0.25)
    value.backward()
    assert frozen.grad is None
    w = live.detach()
    assert torch.equal(live.grad, 0.25 * torch.sign(w))
    assert (live.grad[w == 0] == 0).all()  # sign(0) = 0
    groups = [{"params": [live], "l1": 0.0, "l2": 0.0}, {"params": [frozen], "l2": 1.0}]
    live.grad = None
    fastreg.penalty(groups).backward()
    assert torch.equal(live.grad, torch.zeros_like(live))


def test_gradcheck_float64():
    tensors = [torch.randn(n, dtype=torch.float64) for n in (5, 12, 1)]
    for t in tensors:
        t[t.abs() < 1e-2] = 0.5  # keep |w| off the kink of |w| (gradcheck's eps is 1e-6)
        t.requires_grad_()

    def fn(*ts):
        return fastreg.penalty(
            [
                {"params": [ts[0]], "l1": 0.3, "l2": 0.7},
                {"params": list(ts[1:]), "l1": 0.1, "l2": 0.0},
            ]
        )

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize("terms", [(0.01, 0.0), (0.0, 0.1), (0.01, 0.1), (0.0, 0.0)])
def test_torch_func_grad(terms):
    # torch.func.grad runs the backward with create_graph, through penalty_backward's
    # autograd: the same bits as autograd.grad and the reference (a Python formula in a
    # register_autograd Function failed there: torch.func refuses that Function)
    l1, l2 = terms
    tensors = sample_list("mixed")
    n = len(tensors)
    l1s, l2s = [l1] * n, [l2] * n

    def loss(*ws):
        return fastreg.penalty([{"params": list(ws), "l1": l1, "l2": l2}])

    got = torch.func.grad(loss, argnums=tuple(range(n)))(*tensors)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    eager = torch.autograd.grad(loss(*leaves), leaves, allow_unused=True)
    expected = reference.penalty_backward(torch.tensor(1.0), tensors, l1s, l2s)
    for g, e, r in zip(got, eager, expected):
        assert_bits_equal(g, r)
        if e is not None:
            assert_bits_equal(g, e)


def test_torch_func_second_derivative():
    # d/dw of sum(grad) for l1 * |w| + l2 * w**2 is 2 * l2 (sign' = 0), through
    # torch.func.grad twice and through create_graph
    w = torch.randn(6, dtype=torch.float64)
    inner = torch.func.grad(lambda u: fastreg.penalty([u], l1=0.2, l2=0.3))
    outer = torch.func.grad(lambda v: inner(v).sum())(w)
    assert torch.equal(outer, torch.full_like(w, 0.6))
    leaf = w.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fastreg.penalty([leaf], l1=0.2, l2=0.3), leaf, create_graph=True)
    (again,) = torch.autograd.grad(grad.sum(), leaf)
    assert torch.equal(again, torch.full_like(w, 0.6))


@requires_extension
def test_penalty_backward_differentiable_checks_arguments():
    # with an input that requires grad the gradients are tensor operations: the
    # operator's argument checks still hold there
    ops = torch.ops.fastreg
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="grad_out must hold one element"):
        ops.penalty_backward(torch.ones(2), [x], [0.1], [0.0])
    with pytest.raises(ValueError, match="l1 must give one value per tensor"):
        ops.penalty_backward(torch.ones(()), [x], [0.1, 0.2], [0.0])
    with pytest.raises(TypeError, match=r"params\[0\] must be float16"):
        ops.penalty_backward(torch.ones((), requires_grad=True), [torch.arange(3)], [0.1], [0.0])


# ---- Selection: modules, groups, exclusion ----


class LlamaStyleRMSNorm(nn.Module):  # a custom norm, as in Hugging Face models
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.weight


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.custom_norm = LlamaStyleRMSNorm(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.embed.weight  # tied
        self.scale = nn.Parameter(torch.ones(8))  # 1-D, not a bias: kept
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        if hasattr(nn, "RMSNorm"):
            self.rms = nn.RMSNorm(8)


DECAYED = [
    "embed.weight",
    "conv.weight",
    "fc.weight",
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "scale",
]


def test_exclude_bias_and_norm_on_real_modules():
    net = Net()
    names = [name for name, _ in _params.module_params(net, "bias_and_norm")]
    assert sorted(names) == sorted(DECAYED)
    everything = [name for name, _ in _params.module_params(net, None)]
    assert "head.weight" not in everything and "embed.weight" in everything  # tied: once
    assert "frozen" not in everything and "bn.weight" in everything and "fc.bias" in everything
    params = dict(net.named_parameters())
    value = fastreg.penalty(net, l1=1e-3, l2=1e-2, exclude="bias_and_norm")
    expected = fastreg.penalty([params[n] for n in DECAYED], l1=1e-3, l2=1e-2)
    assert_bits_equal(value, expected)


def test_exclude_callable_and_module_classes():
    net = Net()
    value = fastreg.penalty(net, l2=1.0, exclude=lambda name, p: not name.startswith("fc."))
    fc = net.fc
    assert_bits_equal(value, fastreg.penalty([fc.weight, fc.bias], l2=1.0))
    reg = fastreg.Penalty(l1=1e-3, l2=1e-2, exclude="bias_and_norm")
    assert_bits_equal(reg(net), fastreg.penalty(net, 1e-3, 1e-2, exclude="bias_and_norm"))
    reg.l2 = 0.5  # coefficients are plain attributes
    assert_bits_equal(reg(net), fastreg.penalty(net, 1e-3, 0.5, exclude="bias_and_norm"))
    assert "exclude='bias_and_norm'" in repr(reg)
    assert_bits_equal(fastreg.L1Penalty(1e-4)(net), fastreg.l1_penalty(net, 1e-4))
    assert_bits_equal(fastreg.L2Penalty(1e-4)(net), fastreg.l2_penalty(net, 1e-4))
    assert_bits_equal(fastreg.l1_penalty(net, 2.0), fastreg.penalty(net, l1=2.0))


def test_groups_and_optimizer_param_groups():
    a = sample_list("mixed")
    b = sample_list("float32_model")
    groups = [
        {"params": a, "l1": 1e-3, "l2": 0.0, "lr": 0.1},
        {"params": b, "l2": 2e-2, "weight_decay": 0.5},
    ]
    value = fastreg.penalty(groups, l1=5e-3)  # group b takes l1 from the argument
    expected = float64_value(
        a + b, [1e-3] * len(a) + [5e-3] * len(b), [0.0] * len(a) + [2e-2] * len(b)
    )
    assert abs(value.item() - expected) <= VALUE_RTOL["cpu"] * expected
    params = [torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    opt = torch.optim.SGD([{"params": params[:1], "l2": 1.0}, {"params": params[1:]}], lr=0.1)
    assert_bits_equal(fastreg.penalty(opt.param_groups, l2=0.0), fastreg.l2_penalty(params[:1]))
    # l1_penalty and l2_penalty read only their own key
    assert_bits_equal(
        fastreg.l1_penalty([{"params": params, "l1": 3.0, "l2": 5.0}]),
        fastreg.penalty(params, l1=3.0),
    )
    single = params[0]
    assert_bits_equal(fastreg.penalty(single, l2=1.0), fastreg.penalty([single], l2=1.0))
    gen = (p for p in params)
    assert_bits_equal(fastreg.penalty(gen, l2=1.0), fastreg.penalty(params, l2=1.0))


# ---- In-place steps ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mixed", "many", "chunks"])
def test_penalty_grad_matches_reference_and_autograd(name, device):
    tensors = sample_list(name, device, requires_grad=True)
    l1s, l2s = coefficients(len(tensors), seed=3)
    groups = [{"params": [t], "l1": a, "l2": b} for t, a, b in zip(tensors, l1s, l2s)]
    start = [
        sample(tuple(t.shape), t.dtype, seed=100 + i, device=device) for i, t in enumerate(tensors)
    ]
    for t, s in zip(tensors, start):
        t.grad = s.clone()
    fastreg.penalty_grad_(groups)
    got = [t.grad.clone() for t in tensors]
    for t, s in zip(tensors, start):
        t.grad = s.clone()
    reference.penalty_grad_(groups)
    for g, t in zip(got, tensors):
        assert_bits_equal(g, t.grad)
    # from no gradient, it is the gradient autograd gives
    for t in tensors:
        t.grad = None
    fastreg.penalty_grad_(groups)
    in_place = [t.grad for t in tensors]
    for g, exp in zip(in_place, grads_of(fastreg.penalty(groups), tensors)):
        assert torch.equal(g, exp)


def test_penalty_grad_layouts_and_untouched_tensors():
    p = sample((6, 5), torch.float32).requires_grad_()
    grad_t = sample((5, 6), torch.float32, seed=9).t()  # another layout than p's
    p.grad = grad_t
    q = sample((6, 5), torch.float32, layout="strided").requires_grad_()  # not dense
    q.grad = torch.ones(6, 5)
    skip = torch.zeros(3, requires_grad=True)
    fastreg.penalty_grad_([{"params": [p, q], "l1": 0.5, "l2": 0.25}, {"params": [skip]}])
    assert p.grad is grad_t  # in place
    assert skip.grad is None  # both coefficients zero: not touched
    for t, before in ((p, sample((5, 6), torch.float32, seed=9).t()), (q, torch.ones(6, 5))):
        w = t.detach()
        assert torch.equal(t.grad, before + (torch.sign(w) * 0.5 + w * 0.5))


def test_penalty_grad_reproduces_sgd_weight_decay():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 16)
    wd = 0.1
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5, weight_decay=wd)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().sum().backward()
            if model is b:
                fastreg.penalty_grad_(model, l2=wd / 2)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        # torch adds alpha * p in one fused step, fastreg rounds the product first
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_prox_l1_matches_reference_and_gives_true_zeros(device):
    tensors = sample_list("mixed", device) + sample_list("many", device)
    tensors.append(
        torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.3, -0.3, 0.05, -0.05], device=device)
    )
    copies = [t.clone() for t in tensors]
    fastreg.prox_l1_([{"params": tensors[:5], "threshold": 0.0}, {"params": tensors[5:]}], 0.1)
    reference.prox_l1_([{"params": copies[:5], "threshold": 0.0}, {"params": copies[5:]}], 0.1)
    for t, c in zip(tensors, copies):
        assert_bits_equal(t, c)
    special = tensors[-1].tolist()
    assert math.isnan(special[0]) and special[1:3] == [math.inf, -math.inf]
    assert special[3:] == pytest.approx([0.0, 0.2, -0.2, 0.0, 0.0])
    assert not tensors[-1][3:].signbit().logical_and(tensors[-1][3:] == 0).any()  # +0
    x = sample((1000,), torch.float32, device=device)
    before = x.clone()
    fastreg.prox_l1_([x], 0.5)
    assert torch.equal(x == 0, before.abs() <= 0.5)
    assert torch.equal(x[x != 0], (before - 0.5 * torch.sign(before))[x != 0])


def float16_edge_values(n, seed):
    """n float16 values: the special ones (nan, infinities, both zeros, the extremes, a
    subnormal, values at and around the thresholds used below) among random ones."""
    special = [
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        0.0,
        65504.0,
        -65504.0,
        2.0**-24,
        -(2.0**-24),
        0.1,
        -0.1,
        0.25,
        -0.25,
        0.2500001,
        1.0,
        -1.0,
    ]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    at = torch.randperm(n, generator=g)[: min(n, len(special))]
    x[at] = torch.tensor(special[: len(at)], dtype=torch.float64)
    return x.to(torch.float16)


def assert_float16_bits_equal(actual, expected):
    """Every bit, zeros' signs included; any nan matches any nan (torch's float16
    rounding writes its own nan payload)."""
    assert torch.equal(actual.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(actual[keep].view(torch.int16), expected[keep].view(torch.int16))


# The float16 loops have their own vectors (F16C, 8 elements) and a scalar tail: lengths
# below, at and above one vector, and a tensor that a chunk boundary (4096) cuts mid-vector.
F16_LENGTHS = [1, 7, 8, 9, 31, 4096 + 4099]


@pytest.mark.parametrize("terms", [(0.5, 0.0), (0.0, 10.0), (0.03, 0.25), (0.0, 0.0)])
def test_float16_gradient_loops_match_reference_bit_for_bit(terms):
    l1, l2 = terms
    tensors = [float16_edge_values(n, seed=i).requires_grad_() for i, n in enumerate(F16_LENGTHS)]
    starts = [float16_edge_values(n, seed=50 + i) for i, n in enumerate(F16_LENGTHS)]
    for t, s in zip(tensors, starts):
        t.grad = s.clone()
    fastreg.penalty_grad_(tensors, l1=l1, l2=l2)
    got = [t.grad.clone() for t in tensors]
    for t, s in zip(tensors, starts):
        t.grad = s.clone()
    reference.penalty_grad_(tensors, l1=l1, l2=l2)
    for g, t in zip(got, tensors):
        assert_float16_bits_equal(g, t.grad)
    if l1 == 0.0 and l2 == 0.0:
        return  # no penalty to differentiate
    expected = grads_of(reference.penalty(tensors, l1=l1, l2=l2) * 3.0, tensors)
    for g, exp in zip(grads_of(fastreg.penalty(tensors, l1=l1, l2=l2) * 3.0, tensors), expected):
        assert_float16_bits_equal(g, exp)


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.25, 1e5])
def test_float16_prox_l1_matches_reference_bit_for_bit(threshold):
    tensors = [float16_edge_values(n, seed=i) for i, n in enumerate(F16_LENGTHS)]
    copies = [t.clone() for t in tensors]
    fastreg.prox_l1_(tensors, threshold)
    reference.prox_l1_(copies, threshold)
    for t, c in zip(tensors, copies):
        assert_float16_bits_equal(t, c)


def test_prox_l1_on_modules_in_place():
    net = Net()
    weight = net.fc.weight
    before = weight.detach().clone()
    bias_before = net.fc.bias.detach().clone()
    fastreg.prox_l1_(net, 0.2, exclude="bias_and_norm")
    assert net.fc.weight is weight and weight.requires_grad
    assert torch.equal(weight.detach(), before - before.clamp(-0.2, 0.2))
    assert torch.equal(net.fc.bias.detach(), bias_before)


# ---- Errors (both backends) ----

BACKENDS = [pytest.param(fastreg, id="public"), pytest.param(reference, id="reference")]


@pytest.mark.parametrize("api", BACKENDS)
def test_errors(api):
    x = torch.randn(3)
    for fn in (
        lambda p, **k: api.penalty(p, l1=0.1, **k),
        lambda p, **k: api.l2_penalty(p, **k),
        lambda p, **k: api.penalty_grad_(p, l1=0.1, **k),
        lambda p, **k: api.prox_l1_(p, 0.1, **k),
    ):
        with pytest.raises(TypeError, match=r"params\[1\] must be float16, bfloat16"):
            fn([x, torch.arange(3)])
        with pytest.raises(TypeError, match="must be float16"):
            fn([torch.ones(2, dtype=torch.complex64)])
        with pytest.raises(TypeError, match=r"params\[0\] must be a Tensor, but got float"):
            fn([1.0])
        with pytest.raises(TypeError, match="params must be an nn.Module, a tensor"):
            fn(3)
        with pytest.raises(TypeError, match="strided"):
            fn([torch.eye(3).to_sparse()])
        with pytest.raises(RuntimeError, match="one device, but params\\[0\\] is on cpu"):
            fn([x, torch.empty(3, device="meta")])
        with pytest.raises(ValueError, match="exclude selects parameters by name"):
            fn([x], exclude="bias_and_norm")
        with pytest.raises(ValueError, match="exclude must be None, a callable or one of"):
            fn(nn.Linear(2, 2), exclude="biases")
        with pytest.raises(TypeError, match="exclude must be None, a str or a callable"):
            fn(nn.Linear(2, 2), exclude=3)
        with pytest.raises(ValueError, match="group 0 has no 'params' key"):
            fn([{"weights": [x]}])
        with pytest.raises(TypeError, match="mixes parameter groups"):
            fn([{"params": [x]}, x])
    for bad, error in (
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("0.1", TypeError),
        (True, TypeError),
    ):
        with pytest.raises(error, match="l1 must be"):
            api.penalty([x], l1=bad)
        with pytest.raises(error, match="l2 must be"):
            api.penalty([x], l2=bad)
        with pytest.raises(error, match="weight must be"):
            api.l1_penalty([x], bad)
        with pytest.raises(error, match="threshold must be"):
            api.prox_l1_([x], bad)
        with pytest.raises(error, match="l1 must be"):
            api.penalty_grad_([x], l1=bad)
        with pytest.raises(error, match="group 0's 'l2' must be"):
            api.penalty([{"params": [x], "l2": bad}])
    y = torch.randn(3, requires_grad=True)
    y.grad = torch.zeros(3).to_sparse()
    with pytest.raises(TypeError, match=r"the gradient of params\[0\] must be strided"):
        api.penalty_grad_([y], l2=1.0)


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="l2 must be a non-negative"):
        fastreg.Penalty(l2=-1.0)
    with pytest.raises(ValueError, match=r"L1Penalty\(\): weight must be a non-negative"):
        fastreg.L1Penalty(-1.0)
    with pytest.raises(ValueError, match="exclude must be None, a callable or one of"):
        fastreg.Penalty(l2=1.0, exclude="norm")
    with pytest.raises(ValueError, match="exclude selects parameters by name"):
        fastreg.Penalty(l2=1.0, exclude="bias_and_norm")([torch.randn(2)])


@requires_extension
def test_op_level_checks():
    ops = torch.ops.fastreg
    x = torch.randn(3)
    with pytest.raises(ValueError, match="l1 must give one value per tensor"):
        ops.penalty([x], [0.1, 0.2], [0.0])
    with pytest.raises(ValueError, match="l2 must be non-negative"):
        ops.penalty([x], [0.1], [-1.0])
    with pytest.raises(TypeError, match=r"params\[0\] must be float16"):
        ops.penalty([torch.arange(3)], [0.1], [0.0])
    with pytest.raises(RuntimeError, match="grads\\[0\\] must have the shape"):
        ops.penalty_grad_([torch.zeros(4)], [x], [0.1], [0.0])
    with pytest.raises(ValueError, match="grads and params must have the same length"):
        ops.penalty_grad_([], [x], [0.1], [0.0])
    with pytest.raises(RuntimeError, match="grad_out must hold one element"):
        ops.penalty_backward(torch.ones(2), [x], [0.1], [0.0])


# ---- The dispatcher: opcheck, torch.compile, meta ----


def opcheck_samples(requires_grad):
    tensors = sample_list("mixed", requires_grad=requires_grad)
    l1s, l2s = coefficients(len(tensors))
    return tensors, l1s, l2s


@requires_extension
def test_opcheck_every_op():
    ops = torch.ops.fastreg
    for requires_grad in (False, True):
        tensors, l1s, l2s = opcheck_samples(requires_grad)
        torch.library.opcheck(ops.penalty.default, (tensors, l1s, l2s))
        grad_out = torch.tensor(2.0, dtype=torch.float64, requires_grad=requires_grad)
        torch.library.opcheck(ops.penalty_backward.default, (grad_out, tensors, l1s, l2s))
    tensors, l1s, l2s = opcheck_samples(False)
    grads = [torch.randn_like(t) for t in tensors]
    # torch 2.4 cannot functionalize an operator that writes a Tensor[] (compiled code
    # runs the reference's ops instead): opcheck's aot_dispatch tests are left out there
    utils = (
        {}
        if fastreg_penalty._COMPILES_LIST_WRITES
        else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    )
    torch.library.opcheck(ops.penalty_grad_.default, (grads, tensors, l1s, l2s), **utils)
    torch.library.opcheck(ops.prox_l1_.default, (tensors, [0.1] * len(tensors)), **utils)


@requires_extension
def test_meta_tensors():
    tensors = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta", dtype=torch.float64)]
    value = fastreg.penalty(tensors, l2=1.0)
    assert value.device.type == "meta" and value.dtype == torch.float64 and value.shape == ()


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))


def test_torch_compile_fullgraph():
    model = small_model()
    x, y = torch.randn(4, 8), torch.randn(4, 2)

    def loss_fn(model, x, y, l2):
        return F.mse_loss(model(x), y) + fastreg.penalty(
            model, l1=1e-3, l2=l2, exclude="bias_and_norm"
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for l2 in (1e-2, 3e-2):  # a new coefficient gives the new value (it recompiles)
        eager = loss_fn(model, x, y, l2)
        eager_grads = grads_of(eager, list(model.parameters()))
        got = compiled(model, x, y, l2)
        got_grads = grads_of(got, list(model.parameters()))
        torch.testing.assert_close(got, eager)  # aot_eager may decompose mse_loss
        for g, e in zip(got_grads, eager_grads):
            torch.testing.assert_close(g, e)


def test_torch_compile_tensor_coefficient_does_not_recompile():
    """The documented way to vary a coefficient under torch.compile: scale a fixed
    penalty by a tensor (a float coefficient is baked into the graph)."""
    model = small_model()
    l2 = torch.tensor(5e-4)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def loss_fn(x):
        return model(x).sum() + l2 * fastreg.l2_penalty(model)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=counting_backend)
    x = torch.randn(2, 8)
    for value in (1e-4, 2e-4, 3e-4):
        l2.fill_(value)
        torch.testing.assert_close(compiled(x), loss_fn(x))
    assert len(graphs) == 1


@pytest.mark.parametrize("list_writes", [True, False])
def test_torch_compile_in_place_steps(list_writes, monkeypatch):
    # list_writes=False: a torch that cannot compile an operator writing a Tensor[] (2.4)
    # gets the reference's tensor ops in the graph, with the same bits
    if not list_writes:
        monkeypatch.setattr(fastreg_penalty, "_COMPILES_LIST_WRITES", False)
    elif not fastreg_penalty._COMPILES_LIST_WRITES:
        pytest.skip("this torch cannot compile an operator that writes a Tensor[]")
    model, twin = small_model(), small_model()
    x = torch.randn(4, 8)

    def after_backward(model):
        fastreg.penalty_grad_(model, l1=1e-2, l2=1e-2, exclude="bias_and_norm")
        fastreg.prox_l1_(model, 0.01, exclude="bias_and_norm")

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(after_backward, fullgraph=True, backend=backend)
    for m, step in ((model, compiled), (twin, after_backward)):
        m(x).square().sum().backward()
        step(m)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_bits_equal(a.detach(), b.detach())
        assert_bits_equal(a.grad, b.grad)
    uses_kernels = list_writes and _ops.HAVE_EXTENSION
    assert [("fastreg.penalty_grad_" in g, "fastreg.prox_l1_" in g) for g in graphs] == [
        (uses_kernels, uses_kernels)
    ]


def test_torch_compile_inductor_module():
    model = small_model()
    reg = fastreg.Penalty(l2=1e-2, exclude="bias_and_norm")
    x = torch.randn(4, 8)

    def loss_fn(x):
        return model(x).square().mean() + reg(model)

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(x)
    got_grads = grads_of(got, list(model.parameters()))
    eager = loss_fn(x)
    for g, e in zip(got_grads, grads_of(eager, list(model.parameters()))):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(got, eager)


# ---- Reference backend through the public API ----


def test_reference_functions_mirror_public_ones():
    net = Net()
    for name in ("penalty", "l1_penalty", "l2_penalty", "penalty_grad_", "prox_l1_"):
        assert hasattr(reference, name)
    torch.testing.assert_close(
        reference.penalty(net, 1e-3, 1e-2, exclude="bias_and_norm"),
        fastreg.penalty(net, 1e-3, 1e-2, exclude="bias_and_norm"),
        rtol=VALUE_RTOL["cpu"],
        atol=0,
    )
    torch.testing.assert_close(
        reference.l1_penalty(net, 0.5), fastreg.l1_penalty(net, 0.5), rtol=VALUE_RTOL["cpu"], atol=0
    )
    torch.testing.assert_close(
        reference.l2_penalty(net, 0.5), fastreg.l2_penalty(net, 0.5), rtol=VALUE_RTOL["cpu"], atol=0
    )
    assert reference.penalty([], l1=1.0).item() == 0.0


def test_public_api_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(_ops, "has_kernels", lambda device: False)
    monkeypatch.setattr(fastreg_penalty, "_FAST", None)  # the C++ fast path knows no patch
    tensors = sample_list("mixed", requires_grad=True)
    value = fastreg.penalty(tensors, l1=1e-3, l2=1e-2)
    assert value.grad_fn is not None and "fastreg_penalty" not in type(value.grad_fn).__name__
    expected = reference.penalty(tensors, l1=1e-3, l2=1e-2)
    assert_bits_equal(value, expected)
    x = sample((50,), torch.float32)
    y = x.clone()
    fastreg.prox_l1_([x], 0.3)
    reference.prox_l1_([y], 0.3)
    assert_bits_equal(x, y)


# ---- Big tensors (opt-in: 4 GiB of memory) ----


@pytest.mark.skipif(
    os.environ.get("FASTREG_TEST_BIG") != "1",
    reason="set FASTREG_TEST_BIG=1 (needs 4.3 GB of memory, some seconds)",
)
def test_tensor_larger_than_2_pow_31():
    n = 2**31 + 5
    x = torch.ones(n, dtype=torch.bfloat16)
    x[-1] = 2.0**20  # beyond 2**31: missed or counted twice, it shows in float32

    def as_float32(value):
        return torch.tensor(value, dtype=torch.float64).float().item()

    # The chunk partials are exact sums of integers, combined exactly in float64 and
    # rounded once: the value must be the exact sum rounded to float32.
    value = fastreg.l1_penalty([x], 1.0)
    assert value.dtype == torch.float32
    assert value.item() == as_float32((n - 1) + 2.0**20)
    assert fastreg.penalty([x[:8], x], l2=1.0).item() == as_float32(8 + (n - 1) + 2.0**40)
    fastreg.prox_l1_([x], 0.75)  # the elementwise kernels index with 64 bits too
    assert x[0].item() == 0.25 and x[2**31 + 3].item() == 0.25 and x[-1].item() == 2.0**20


# ---- CUDA ----


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", LISTS)
def test_cpu_and_cuda_agree(name):
    tensors = sample_list(name)
    l1s, l2s = coefficients(len(tensors))
    cpu = kernel_penalty(tensors, l1s, l2s)
    gpu = kernel_penalty([t.cuda() for t in tensors], l1s, l2s)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=VALUE_RTOL["cpu"] + VALUE_RTOL["cuda"], atol=0)
    cpu_grads = torch.ops.fastreg.penalty_backward(
        torch.tensor(1.5, dtype=cpu.dtype), tensors, l1s, l2s
    )
    gpu_grads = torch.ops.fastreg.penalty_backward(
        torch.tensor(1.5, dtype=cpu.dtype).cuda(), [t.cuda() for t in tensors], l1s, l2s
    )
    for c, g in zip(cpu_grads, gpu_grads):
        assert_bits_equal(g.cpu(), c)


@cuda
@pytest.mark.cuda
def test_cuda_graph_capture():
    torch.manual_seed(0)
    params = [
        torch.randn(300, 70, device="cuda", requires_grad=True),
        torch.randn(70, device="cuda", dtype=torch.bfloat16, requires_grad=True),
    ]

    def step():
        value = fastreg.penalty(params, l1=1e-3, l2=1e-2)
        value.backward()
        return value

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_value = step()
    with torch.no_grad():
        for p in params:
            p.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expected_grads = [
        g.clone()
        for g in torch.ops.fastreg.penalty_backward(
            torch.tensor(1.0, device="cuda"), params, [1e-3] * 2, [1e-2] * 2
        )
    ]
    assert_bits_equal(static_value, fastreg.penalty(params, l1=1e-3, l2=1e-2).detach())
    for p, e in zip(params, expected_grads):
        assert_bits_equal(p.grad, e)


@cuda
@pytest.mark.cuda
def test_cuda_compile_reduce_overhead():
    model = small_model().cuda()
    x = torch.randn(4, 8, device="cuda")

    def loss_fn(x):
        return model(x).square().mean() + fastreg.penalty(model, l2=1e-2)

    compiled = torch.compile(loss_fn, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        got = compiled(x)
    torch.testing.assert_close(got, loss_fn(x))
