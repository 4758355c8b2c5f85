"""fastreg.DropoutMode and replace_dropout(functional=True): torch's functional dropout
calls answered by fastreg, bit-exact against fastreg's own functions, composed with
torch.compile, autocast, grad modes, eval mode, other TorchFunctionModes and tensor
subclasses; on real models every dropout runs fastreg's kernel."""

import copy
import io
import math
import pickle
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import MASK_MODES, TORCH_VERSION, requires_extension
from test_models import bert_case, gpt2_case, output, transformer_encoder_case
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastreg

REDISPATCH = hasattr(torch.overrides, "redispatch_function")  # torch >= 2.14
# Dynamo routes a TorchFunctionMode's calls from torch 2.6; torch 2.4's and 2.5's break the
# graph where the mode is entered, and their graphs hold torch's calls (the outputs are
# still fastreg's)
TRACES_MODES = TORCH_VERSION >= (2, 6)
traces_modes = pytest.mark.skipif(
    not TRACES_MODES, reason="torch < 2.6: Dynamo does not route a TorchFunctionMode's calls"
)
needs_redispatch = pytest.mark.skipif(
    not REDISPATCH,
    reason="torch < 2.14: a mode cannot see the calls inside F.multi_head_attention_forward",
)

TORCH_DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.dropout,
    torch.dropout_,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    F.scaled_dot_product_attention,
}


class CountingMode(TorchFunctionMode):
    """Counts the torch dropout calls that reach it (and sdpa calls with dropout_p > 0)."""

    def __init__(self, inner=False):
        super().__init__()
        self.calls = []
        self.inner = inner  # also the calls inside torch.nn.functional's Python functions

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in TORCH_DROPOUTS:
            dropout_p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if func is not F.scaled_dot_product_attention or dropout_p > 0:
                self.calls.append(func)
            return func(*args, **kwargs)  # one dropout: not what it calls (torch.dropout)
        if self.inner and isinstance(func, types.FunctionType) and func.__module__ == F.__name__:
            with self:
                return torch.overrides.redispatch_function(func, types_, args, kwargs)
        return func(*args, **kwargs)


class KernelCount(TorchDispatchMode):
    """Counts the dropout kernels that run: fastreg's operators and torch's own
    (native_dropout, bernoulli)."""

    FASTREG = (
        "fastreg::dropout_fwd",
        "fastreg::bias_dropout_add_fwd",
        "fastreg::bias_act_dropout_fwd",
    )
    TORCH = ("aten::native_dropout", "aten::bernoulli", "aten::bernoulli_", "aten::_fused_dropout")

    def __init__(self):
        super().__init__()
        self.fastreg = self.torch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.fastreg += name in self.FASTREG
        self.torch += name in self.TORCH
        return func(*args, **(kwargs or {}))


def seeded(fn, seed=0):
    torch.manual_seed(seed)
    return fn()


X = torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(0))

# (torch's call, fastreg's equivalent), as functions of (x, mask)
ROUTES = {
    "F.dropout": (lambda x: F.dropout(x, 0.3), lambda x, m: fastreg.dropout(x, 0.3, mask=m)),
    "F.dropout-kw": (
        lambda x: F.dropout(input=x, p=0.3, training=True),
        lambda x, m: fastreg.dropout(x, 0.3, mask=m),
    ),
    "torch.dropout": (
        lambda x: torch.dropout(x, 0.3, True),
        lambda x, m: fastreg.dropout(x, 0.3, mask=m),
    ),
    "torch.dropout_": (
        lambda x: torch.dropout_(x.clone(), 0.3, True),
        lambda x, m: fastreg.dropout(x, 0.3, mask=m),
    ),
    "F.dropout-inplace": (
        lambda x: F.dropout(x.clone(), 0.3, inplace=True),
        lambda x, m: fastreg.dropout(x, 0.3, mask=m),
    ),
    "F.dropout1d": (
        lambda x: F.dropout1d(x[0], 0.3),
        lambda x, m: fastreg.dropout1d(x[0], 0.3, mask=m),
    ),
    "F.dropout2d": (lambda x: F.dropout2d(x, 0.3), lambda x, m: fastreg.dropout2d(x, 0.3, mask=m)),
    "F.dropout3d": (lambda x: F.dropout3d(x, 0.3), lambda x, m: fastreg.dropout3d(x, 0.3, mask=m)),
}


@pytest.mark.parametrize("mask", MASK_MODES)
@pytest.mark.parametrize("route", list(ROUTES))
def test_each_call_is_fastregs_bit_exact(route, mask):
    call, expected = ROUTES[route]
    with fastreg.DropoutMode(mask=mask) as mode:
        got = seeded(lambda: call(X))
    assert mode.count == 1
    assert torch.equal(got, seeded(lambda: expected(X, mask)))
    assert not torch.equal(got, seeded(lambda: call(X)))  # torch's own draws other masks


@pytest.mark.parametrize("mask", MASK_MODES)
def test_gradient_is_fastregs(mask):
    x = X.clone().requires_grad_()
    with fastreg.DropoutMode(mask=mask):
        out = seeded(lambda: F.dropout(x, 0.4))
    out.backward(torch.ones_like(out))
    keep = seeded(lambda: fastreg.dropout(torch.ones_like(X), 0.4, mask=mask)) != 0
    assert torch.equal(x.grad, keep.to(X.dtype) / 0.6)


def test_training_false_returns_the_input_without_a_draw():
    state = torch.get_rng_state()
    with fastreg.DropoutMode() as mode:
        assert F.dropout(X, 0.5, training=False) is X
        assert torch.dropout(X, 0.5, False) is X
        assert F.dropout2d(X, 0.5, training=False) is X
    assert mode.count == 3
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_grad_modes(grad_mode):
    with grad_mode(), fastreg.DropoutMode():
        got = seeded(lambda: F.dropout(X, 0.5))
    assert torch.equal(got, seeded(lambda: fastreg.dropout(X, 0.5)))


def test_autocast():
    linear = nn.Linear(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = linear(X)
        with fastreg.DropoutMode():
            got = seeded(lambda: F.dropout(h, 0.5))
        expected = seeded(lambda: fastreg.dropout(h, 0.5))
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_calls_it_cannot_serve_stay_torchs():
    q = torch.randn(2, 2, 4, 8)
    calls = {
        "alpha_dropout": lambda: F.alpha_dropout(X, 0.3, training=True),
        "feature_alpha_dropout": lambda: F.feature_alpha_dropout(X, 0.3, training=True),
        "sdpa dropout_p": lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.3),
    }
    for name, call in calls.items():
        with fastreg.DropoutMode() as mode:
            got = seeded(call)
        assert mode.count == 0, name
        assert torch.equal(got, seeded(call)), name


def test_nested_modes():
    expected = seeded(lambda: fastreg.dropout(X, 0.5, mask="bool"))
    outer, inner = fastreg.DropoutMode("bits"), fastreg.DropoutMode("bool")
    with outer, inner:
        assert torch.equal(seeded(lambda: F.dropout(X, 0.5)), expected)
    assert (outer.count, inner.count) == (0, 1)
    mode = fastreg.DropoutMode("bool")  # one instance entered twice
    with mode, mode:
        assert torch.equal(seeded(lambda: F.dropout(X, 0.5)), expected)
    assert mode.count == 1


def test_with_another_torch_function_mode_outside_and_inside():
    expected = seeded(lambda: fastreg.dropout(X, 0.5))
    counter = CountingMode()
    with counter, fastreg.DropoutMode() as mode:  # ours is innermost: it answers first
        assert torch.equal(seeded(lambda: F.dropout(X, 0.5)), expected)
    assert counter.calls == [] and mode.count == 1
    counter = CountingMode()
    with fastreg.DropoutMode() as mode, counter:  # the user's is innermost: it sees the call
        assert torch.equal(seeded(lambda: F.dropout(X, 0.5)), expected)
    assert counter.calls == [F.dropout] and mode.count == 1


class LoggingTensor(torch.Tensor):
    """A subclass with its own __torch_function__ (it records what it is given)."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_subclass_with_its_own_torch_function_gets_the_call():
    LoggingTensor.seen.clear()
    x = X.clone().as_subclass(LoggingTensor)
    with fastreg.DropoutMode() as mode:
        got = seeded(lambda: F.dropout(x, 0.5))
    assert F.dropout in LoggingTensor.seen and mode.count == 0
    assert torch.equal(got.as_subclass(torch.Tensor), seeded(lambda: F.dropout(X, 0.5)))
    param = nn.Parameter(X.clone())  # a Parameter is a plain tensor: served
    with fastreg.DropoutMode() as mode:
        seeded(lambda: F.dropout(param, 0.5))
    assert mode.count == 1


def test_tensor_p():
    for p in (torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), torch.tensor(0)):
        assert torch.equal(
            seeded(lambda: fastreg.dropout(X, p)), seeded(lambda: fastreg.dropout(X, float(p)))
        )
    with fastreg.DropoutMode():
        assert torch.equal(
            seeded(lambda: F.dropout(X, torch.tensor(0.25))),
            seeded(lambda: fastreg.dropout(X, 0.25)),
        )
    with pytest.raises(TypeError, match="p must be a float or a 0-dim real tensor"):
        fastreg.dropout(X, torch.tensor([0.5]))
    with pytest.raises(TypeError, match="p must be a float or a 0-dim real tensor"):
        fastreg.dropout(X, torch.tensor(True))
    with pytest.raises(ValueError, match="has to be between 0 and 1, but got 1.5"):
        fastreg.dropout(X, torch.tensor(1.5))


def test_errors():
    with pytest.raises(ValueError, match="mask must be one of"):
        fastreg.DropoutMode(mask="byte")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastreg.DropoutMode(generator=0)
    with pytest.raises(TypeError, match="functional must be a bool, but got int"):
        fastreg.replace_dropout(nn.Linear(2, 2), functional=1)


# ---- torch.compile ---------------------------------------------------------------------


def three_dropouts(x):
    return F.dropout(x, 0.5) + torch.dropout(x, 0.3, True) + F.dropout2d(x, 0.2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_with_the_mode_outside(backend):
    torch._dynamo.reset()
    compiled = torch.compile(three_dropouts, backend=backend, fullgraph=True)
    with fastreg.DropoutMode():
        got = seeded(lambda: compiled(X))
        expected = seeded(lambda: three_dropouts(X))
    if backend == "aot_eager":  # inductor draws (seed, offset) with its own RNG
        assert torch.equal(got, expected)
    assert got.shape == X.shape and not torch.equal(got, expected * 0)


@requires_extension  # counts fastreg's operators
@traces_modes
def test_compiled_graph_holds_fastregs_operators_only():
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm.code)
        return gm

    torch._dynamo.reset()
    with fastreg.DropoutMode():
        torch.compile(three_dropouts, backend=capture, fullgraph=True)(X)
    assert len(graphs) == 1
    assert graphs[0].count("fastreg") >= 3 and "dropout(" not in graphs[0].replace(
        "fastreg.dropout", ""
    ).replace("dropout_fwd", "")


@traces_modes
def test_compile_fullgraph_with_the_mode_inside():
    def f(x):
        with fastreg.DropoutMode(mask="recompute"):
            return three_dropouts(x)

    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(X).graph_break_count == 0
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(seeded(lambda: compiled(X)), seeded(lambda: f(X)))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(F.dropout(self.linear(x), 0.5, self.training))


def test_replace_dropout_functional_compiles_without_a_graph_break():
    torch.manual_seed(0)
    model = fastreg.replace_dropout(FunctionalNet(), mask="bool", functional=True)
    torch._dynamo.reset()
    if TRACES_MODES:
        assert torch._dynamo.explain(model)(X).graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=TRACES_MODES)
    assert torch.equal(seeded(lambda: compiled(X)), seeded(lambda: model(X)))
    expected = seeded(
        lambda: fastreg.dropout(
            fastreg.dropout(model.linear(X), 0.5, mask="bool"), 0.1, mask="bool"
        )
    )
    assert torch.equal(seeded(lambda: model(X)), expected)


def test_replace_dropout_functional_hooks_leave_no_mode_behind():
    torch.manual_seed(0)
    model = fastreg.replace_dropout(FunctionalNet(), functional=True)
    model(X)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4))  # a forward that raises
    with KernelCount() as kernels:
        F.dropout(X, 0.5)
    assert (kernels.fastreg, kernels.torch) == (0, 1)


@requires_extension  # counts fastreg's operators
def test_replace_dropout_functional_deepcopies_and_pickles():
    torch.manual_seed(0)
    model = fastreg.replace_dropout(FunctionalNet(), functional=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (
        copy.deepcopy(model),
        torch.load(buffer, weights_only=False),
        pickle.loads(pickle.dumps(model)),
    ):
        assert torch.equal(seeded(lambda: clone(X)), seeded(lambda: model(X)))
        with KernelCount() as kernels:
            clone(X)
        assert (kernels.fastreg, kernels.torch) == (2, 0)


# ---- real models -------------------------------------------------------------------------


class AttentionWithWeights(nn.Module):
    """nn.MultiheadAttention asked for its weights: its dropout is an F.dropout call."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=True)
        return out + weights.mean()


def mha_case():
    from test_models import Case

    g = torch.Generator().manual_seed(0)
    return Case(
        AttentionWithWeights,
        {"x": torch.randn(2, 5, 8, generator=g)},
        torch.randn(2, 5, 8, generator=g),
        F.mse_loss,
        {},
    )


MODELS = ["mha-need-weights", "transformer-encoder", "bert-eager", "gpt2-eager"]


@pytest.fixture(params=MODELS)
def model_case(request):
    if request.param == "mha-need-weights":
        return mha_case()
    if request.param == "transformer-encoder":
        return transformer_encoder_case()
    transformers = request.getfixturevalue("transformers")
    if request.param == "bert-eager":
        return bert_case(transformers, "eager")
    return gpt2_case(transformers, "eager")


def torch_dropout_calls(model, case):
    with CountingMode(inner=True) as counter:
        output(model, case)
    return counter.calls


@requires_extension  # counts fastreg's operators
@needs_redispatch
@pytest.mark.parametrize("mask", MASK_MODES)
def test_every_dropout_of_a_model_runs_fastreg(model_case, mask):
    torch.manual_seed(0)
    original = model_case.make()
    calls = torch_dropout_calls(original, model_case)
    # What fastreg cannot serve: the dropout_p of sdpa (nn.TransformerEncoder asks
    # MultiheadAttention for no weights, so its attention dropout is inside sdpa).
    unservable = [f for f in calls if f is F.scaled_dot_product_attention]
    assert len(calls) > len(unservable)
    with KernelCount() as kernels:
        output(original, model_case)
    assert kernels.fastreg == 0 and kernels.torch == len(calls)

    routed = fastreg.replace_dropout(copy.deepcopy(original), mask=mask, functional=True)
    with CountingMode(
        inner=True
    ) as below:  # below fastreg's modes: sees what fastreg leaves to torch
        with KernelCount() as kernels:
            output(routed, model_case)
    assert below.calls == unservable
    assert kernels.fastreg == len(calls) - len(unservable)
    assert kernels.torch == len(unservable)
    # With modules only, the model's own F.dropout calls (attention probabilities) are
    # torch's: what functional=True adds.
    only_modules = fastreg.replace_dropout(copy.deepcopy(original), mask=mask)
    module_calls = []
    for module in only_modules.modules():
        if isinstance(module, fastreg.Dropout):
            module.register_forward_hook(lambda *a: module_calls.append(1))
    with KernelCount() as kernels:
        output(only_modules, model_case)
    assert kernels.fastreg == len(module_calls)
    assert kernels.torch == len(calls) - len(module_calls)


def test_a_routed_model_trains_and_evaluates_as_the_original(model_case):
    torch.manual_seed(0)
    original = model_case.make()
    routed = fastreg.replace_dropout(copy.deepcopy(original), functional=True)
    optimizer = torch.optim.SGD(routed.parameters(), lr=0.05)
    torch.manual_seed(1)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = model_case.loss(output(routed, model_case), model_case.target)
        loss.backward()
        assert math.isfinite(loss.item())
        for name, p in routed.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        optimizer.step()
    # evaluation: bitwise the original's, with the routed weights loaded into both
    original.load_state_dict(routed.state_dict())
    original.eval()
    routed.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(output(routed, model_case), output(original, model_case))
    assert torch.equal(torch.get_rng_state(), state)  # no draw in eval mode
