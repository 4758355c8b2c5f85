"""The penalty API's argument forms and its fast path: the C++ fast
path and the per-module selection cache give the same bits as the general path, the
cache is rebuilt on every kind of change to a module's parameters, and the sharp edges
(a used-up iterator, no coefficient, named parameters, tensor coefficients) raise or
work as documented in fastreg/penalty.py."""

import contextlib
import gc
import importlib
import re
import weakref

import pytest
import torch
from conftest import TORCH_VERSION, compiled_autograd_enable, requires_extension
from torch import nn
from torch.overrides import TorchFunctionMode

import fastreg
from fastreg import reference

fastreg_penalty = importlib.import_module("fastreg.penalty")  # the module, not the function


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(
        a.detach().reshape(-1).contiguous().view(torch.uint8),
        b.detach().reshape(-1).contiguous().view(torch.uint8),
    ), (a, b)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class _NoFast:
    """A context in which fastreg takes only the general (Python) path."""

    def __enter__(self):
        self.saved = fastreg_penalty._FAST
        fastreg_penalty._FAST = None

    def __exit__(self, *exc):
        fastreg_penalty._FAST = self.saved


def value_and_grads(fn, params):
    for p in params:
        p.grad = None
    value = fn()
    value.backward()
    return value.detach(), [p.grad.clone() if p.grad is not None else None for p in params]


# ---- The fast path gives the general path's bits ----


@requires_extension
@pytest.mark.parametrize("form", ["list", "tuple", "module", "module_exclude"])
def test_fast_path_matches_general_path(form):
    net = Net().double() if form == "tuple" else Net()
    params = list(net.parameters())
    args = {
        "list": (params,),
        "tuple": (tuple(params),),
        "module": (net,),
        "module_exclude": (net,),
    }[form]
    kwargs = {"exclude": "bias_and_norm"} if form == "module_exclude" else {}
    for l1, l2 in ((1e-3, 0.0), (0.0, 2e-2), (1e-3, 2e-2)):
        fast = value_and_grads(lambda: fastreg.penalty(*args, l1=l1, l2=l2, **kwargs), params)
        with _NoFast():
            slow = value_and_grads(lambda: fastreg.penalty(*args, l1=l1, l2=l2, **kwargs), params)
        assert_bits_equal(fast[0], slow[0])
        for a, b in zip(fast[1], slow[1]):
            assert (a is None) == (b is None)
            if a is not None:
                assert_bits_equal(a, b)
    reg = fastreg.Penalty(l1=1e-3, l2=2e-2, **kwargs)
    if form.startswith("module"):
        assert_bits_equal(reg(net), fastreg.penalty(net, l1=1e-3, l2=2e-2, **kwargs))


@requires_extension
def test_fast_in_place_steps_match_reference():
    net, twin = Net(), Net()
    x = torch.randn(2, 5)
    for m in (net, twin):
        m(x).square().sum().backward()
        m.fc2.bias.grad = None  # a missing gradient is created (zero) first
    fastreg.penalty_grad_(net, l1=1e-2, l2=3e-2, exclude="bias_and_norm")
    reference.penalty_grad_(twin, l1=1e-2, l2=3e-2, exclude="bias_and_norm")
    fastreg.penalty_grad_(list(net.parameters()), l2=1e-2)
    reference.penalty_grad_(list(twin.parameters()), l2=1e-2)
    fastreg.prox_l1_(net, 0.05, exclude="bias_and_norm")
    reference.prox_l1_(twin, 0.05, exclude="bias_and_norm")
    fastreg.prox_l1_(list(net.parameters()), 0.01)
    reference.prox_l1_(list(twin.parameters()), 0.01)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert_bits_equal(a.detach(), b.detach())
        assert_bits_equal(a.grad, b.grad)


@pytest.mark.parametrize("path", ["fast", "general"])
def test_penalty_grad_of_a_non_leaf_warns_as_p_grad_does(path):
    # The fast path reads gradients from the TensorImpl (no is_leaf call a tensor) and a
    # missing one through Tensor.grad, whose warning about a non-leaf it then gives.
    x = torch.randn(5, requires_grad=True)
    y, with_grad = x * 2.0, x * 3.0
    with_grad.grad = torch.ones(5)
    with _NoFast() if path == "general" else contextlib.nullcontext():
        with pytest.warns(UserWarning, match="not a leaf Tensor is being accessed"):
            fastreg.penalty_grad_([y, with_grad], l2=0.5)
    assert torch.equal(y.grad, y.detach())  # created as zeros, then + 2 * 0.5 * y
    assert torch.equal(with_grad.grad, 1.0 + with_grad.detach())


@pytest.mark.parametrize("path", ["fast", "general"])
def test_in_place_steps_bump_version_counters(path):
    # As torch's in-place ops do: a backward that would read a weight written since it
    # was saved is refused, not silently wrong (it used the thresholded weights).
    net = Net()
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    loss = sum((p * p).sum() for p in params)  # saves every parameter
    grad_versions = [p.grad._version for p in params]
    versions = [p._version for p in params]
    with _NoFast() if path == "general" else contextlib.nullcontext():
        fastreg.penalty_grad_(params, l1=1e-2, l2=1e-2)
        assert all(p.grad._version > v for p, v in zip(params, grad_versions))
        fastreg.prox_l1_(params, 1e-3)
    assert all(p._version > v for p, v in zip(params, versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@requires_extension
def test_in_place_operators_refuse_tensors_that_require_grad():
    w = torch.randn(6, requires_grad=True)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match=r"fastreg::prox_l1_: params\[0\] requires grad"):
        torch.ops.fastreg.prox_l1_([w], [0.1])
    assert torch.equal(w.detach(), before)
    g = torch.zeros(6).requires_grad_()
    with pytest.raises(RuntimeError, match=r"fastreg::penalty_grad_: grads\[1\] requires grad"):
        torch.ops.fastreg.penalty_grad_(
            [torch.zeros(6), g], [before, before], [0.1, 0.1], [0.0, 0.0]
        )
    assert torch.equal(g.detach(), torch.zeros(6))
    with torch.no_grad():  # outside autograd, as fastreg.prox_l1_ calls it
        torch.ops.fastreg.prox_l1_([w], [0.1])
    assert torch.allclose(
        w.detach(), torch.sign(before) * (before.abs() - 0.1).clamp_min(0), rtol=0, atol=1e-7
    )


@requires_extension
def test_fast_path_leaves_what_it_does_not_take_to_the_general_path():
    x = torch.randn(4, requires_grad=True)
    expected = fastreg.penalty([x], l1=0.5)

    class Recording(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    with Recording() as mode:  # a TorchFunctionMode sees the call (through torch.ops)
        got = fastreg.penalty([x], l1=0.5)
    assert mode.calls > 0
    assert_bits_equal(got, expected)
    # a coefficient as a 0-dim tensor, an int, a bad element: the general path
    assert_bits_equal(fastreg.penalty([x], l1=torch.tensor(0.5)), expected)
    assert_bits_equal(fastreg.penalty([x], l1=1), fastreg.penalty([x], l1=1.0))
    with pytest.raises(TypeError, match=r"penalty\(\): params\[1\] must be a Tensor"):
        fastreg.penalty([x, 3.0], l1=0.5)


# ---- The module selection cache ----


def cached(net):
    return fastreg_penalty._SELECTIONS.get(net)


def fresh_value(net, **kwargs):
    with _NoFast():
        return fastreg.penalty(net, **kwargs)


CHANGES = {
    "parameter replaced": lambda n: setattr(n.fc1, "weight", nn.Parameter(torch.randn(7, 5))),
    "submodule replaced": lambda n: setattr(n, "fc2", nn.Linear(7, 3)),
    "parameter added": lambda n: n.fc1.register_parameter("extra", nn.Parameter(torch.ones(3))),
    "submodule added": lambda n: setattr(n, "head", nn.Linear(3, 2)),
    "parameter removed": lambda n: delattr(n.fc2, "bias"),
    "parameter set to None": lambda n: setattr(n.fc2, "bias", None),
    "submodule removed": lambda n: delattr(n, "norm"),
    "requires_grad off": lambda n: n.fc1.weight.requires_grad_(False),
    "dtype (.double())": lambda n: n.double(),
    "dtype (.half())": lambda n: n.half(),
    "device (.to('meta'))": lambda n: n.to("meta"),
    "tied": lambda n: setattr(n.fc2, "weight", n.fc1.weight),
}


@requires_extension
@pytest.mark.parametrize("change", list(CHANGES))
def test_selection_is_rebuilt_when_the_module_changes(change):
    net = Net()
    kwargs = {"l1": 1e-3, "l2": 1e-2}
    assert_bits_equal(fastreg.penalty(net, **kwargs), fresh_value(net, **kwargs))
    entry = cached(net)
    assert entry is not None
    assert_bits_equal(fastreg.penalty(net, **kwargs), fresh_value(net, **kwargs))
    assert cached(net) is entry  # unchanged: the cached selection is used
    CHANGES[change](net)
    got = fastreg.penalty(net, **kwargs)
    assert cached(net) is not entry  # rebuilt
    expected = fresh_value(net, **kwargs)
    assert got.device == expected.device and got.dtype == expected.dtype
    if got.device.type != "meta":
        assert_bits_equal(got, expected)
    # the tensors now selected are the module's, as named_parameters gives them
    selected = cached(net).tensors
    assert [id(p) for p in selected] == [id(p) for p in net.parameters() if p.requires_grad]


class _ParametersOf(nn.Module):
    """A proxy whose _parameters attribute is another module's, through __getattribute__
    (named_parameters() reads it that way, so the key must too)."""

    def __init__(self, inner):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a registered submodule

    def __getattribute__(self, name):
        if name == "_parameters":
            return object.__getattribute__(self, "inner")._parameters
        return super().__getattribute__(name)


def test_module_key_honours_a_getattribute_override():
    torch.manual_seed(0)
    inner = nn.Linear(3, 2)
    proxy = _ParametersOf(inner)
    first = fastreg.penalty(proxy, l2=1.0)
    assert torch.equal(first, fastreg.penalty(list(inner.parameters()), l2=1.0))
    inner.weight = nn.Parameter(inner.weight.detach() * 2)  # the cached selection is stale
    second = fastreg.penalty(proxy, l2=1.0)
    assert torch.equal(second, fastreg.penalty(list(inner.parameters()), l2=1.0))
    assert not torch.equal(first, second)


class _Plain(nn.Module):
    def __init__(self, inner):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a registered submodule
        self.own = nn.Parameter(torch.ones(3))


@requires_extension
def test_module_key_follows_a_data_descriptor_added_to_the_class():
    # module_key reads _parameters from the instance dict while the class has no data
    # descriptor of that name, remembering the class by its version tag: a property
    # added later (the tag renewed) is followed, as named_parameters() follows it.
    class Plain(_Plain):
        pass

    torch.manual_seed(0)
    inner = nn.Linear(3, 2)
    module = Plain(inner)
    own = fastreg.penalty(module, l2=1.0)
    assert_bits_equal(own, fastreg.penalty([module.own], l2=1.0))
    assert_bits_equal(fastreg.penalty(module, l2=1.0), own)  # cached, same class state
    Plain._parameters = property(lambda self: self.inner._parameters)
    expected = fastreg.penalty(list(inner.parameters()), l2=1.0)
    assert [id(p) for p in module.parameters()] == [id(p) for p in inner.parameters()]
    assert_bits_equal(fastreg.penalty(module, l2=1.0), expected)
    inner.weight = nn.Parameter(inner.weight.detach() * 2)  # through the property
    assert_bits_equal(
        fastreg.penalty(module, l2=1.0), fastreg.penalty(list(inner.parameters()), l2=1.0)
    )
    del Plain._parameters  # the instance dict's own again
    assert_bits_equal(fastreg.penalty(module, l2=1.0), own)


@requires_extension
def test_requires_grad_toggled_back_and_exclude_changes():
    net = Net()
    everything = fastreg.penalty(net, l2=1.0)
    net.fc1.weight.requires_grad_(False)
    without = fastreg.penalty(net, l2=1.0)
    assert without < everything
    net.fc1.weight.requires_grad_(True)
    assert_bits_equal(fastreg.penalty(net, l2=1.0), everything)
    # another exclude is another selection; the same callable object keeps it
    rule = lambda name, p: name.startswith("fc1")  # noqa: E731
    assert_bits_equal(
        fastreg.penalty(net, l2=1.0, exclude=rule),
        fastreg.penalty([net.norm.weight, net.norm.bias, net.fc2.weight, net.fc2.bias], l2=1.0),
    )
    entry = cached(net)
    fastreg.penalty(net, l2=1.0, exclude=rule)
    assert cached(net) is entry
    fastreg.penalty(net, l2=1.0, exclude="bias_and_norm")
    assert cached(net) is not entry


@requires_extension
def test_cache_does_not_keep_the_module_alive():
    net = Net()
    fastreg.penalty(net, l2=1.0)
    weak = weakref.ref(net)
    weak_param = weakref.ref(net.fc1.weight)
    del net
    gc.collect()
    assert weak() is None and weak_param() is None


# ---- Sharp edges ----


@pytest.mark.parametrize("api", [fastreg, reference], ids=["public", "reference"])
def test_used_up_iterator_raises(api):
    net = Net()
    params = net.parameters()
    first = api.penalty(params, l2=1.0)
    assert first.item() > 0
    with pytest.raises(
        ValueError,
        match=r"penalty\(\): params is an iterator that yielded "
        r"nothing.*pass the module itself, or a list",
    ):
        api.penalty(params, l2=1.0)
    # a fresh generator on every call is fine
    assert_bits_equal(api.penalty(net.parameters(), l2=1.0), first)
    with pytest.raises(ValueError, match="iterator that yielded nothing"):
        api.penalty_grad_(iter([]), l2=1.0)
    assert api.penalty([], l2=1.0).item() == 0.0  # an empty list is an empty selection


@pytest.mark.parametrize("api", [fastreg, reference], ids=["public", "reference"])
def test_a_coefficient_is_required(api):
    net = Net()
    for call in (
        lambda: api.penalty(net),
        lambda: api.penalty([net.fc1.weight]),
        lambda: api.penalty_grad_(net),
    ):
        with pytest.raises(TypeError, match=r"needs a coefficient: give l1 or l2"):
            call()
    with pytest.raises(TypeError, match=r"penalty\(\) needs a coefficient"):
        fastreg.Penalty()(net)
    with pytest.raises(
        TypeError,
        match=r"needs a coefficient: give l1 or l2 \(as arguments "
        r"or as keys of the parameter groups\)",
    ):
        api.penalty([{"params": [net.fc1.weight]}, {"params": [net.fc2.weight], "lr": 0.1}])
    # a group without a key of its own takes the arguments', or 0 when they are not given
    assert_bits_equal(
        api.penalty([{"params": [net.fc1.weight], "l2": 1.0}, {"params": [net.fc2.weight]}]),
        api.penalty([net.fc1.weight], l2=1.0),
    )
    # one given: the other is 0; groups may give them; 0.0 given is a zero
    assert_bits_equal(api.penalty(net, l2=0.5), api.penalty(net, l1=0.0, l2=0.5))
    assert_bits_equal(
        api.penalty([{"params": net.parameters(), "l2": 0.5}]), api.penalty(net, l2=0.5)
    )
    assert api.penalty(net, l1=0.0, l2=0.0).item() == 0.0
    # the single-weight forms are the plain sums
    assert_bits_equal(api.l1_penalty(net), api.penalty(net, l1=1.0))
    assert_bits_equal(api.l2_penalty(net), api.penalty(net, l2=1.0))


@pytest.mark.parametrize("api", [fastreg, reference], ids=["public", "reference"])
def test_named_parameters(api):
    net = Net()
    params = list(net.parameters())
    expected = api.penalty(params, l1=1e-3, l2=1e-2)
    assert_bits_equal(api.penalty(dict(net.named_parameters()), l1=1e-3, l2=1e-2), expected)
    assert_bits_equal(api.penalty(net.named_parameters(), l1=1e-3, l2=1e-2), expected)
    assert_bits_equal(api.penalty(list(net.named_parameters()), l1=1e-3, l2=1e-2), expected)
    # exclude by name works on named parameters as on the module
    no_bias = lambda name, p: name.endswith("bias")  # noqa: E731
    assert_bits_equal(
        api.penalty(dict(net.named_parameters()), l2=1e-2, exclude=no_bias),
        api.penalty(net, l2=1e-2, exclude=no_bias),
    )
    assert_bits_equal(
        api.penalty(net.named_parameters(), l2=1e-2, exclude=no_bias),
        api.penalty(net, l2=1e-2, exclude=no_bias),
    )
    with pytest.raises(ValueError, match="exclude='bias_and_norm' needs the nn.Module"):
        api.penalty(dict(net.named_parameters()), l2=1.0, exclude="bias_and_norm")
    with pytest.raises(
        TypeError,
        match=r"params\['weights'\] must be a Tensor, but got list "
        r"\(a dict without a 'params' key",
    ):
        api.penalty({"weights": [net.fc1.weight]}, l2=1.0)
    with pytest.raises(
        ValueError,
        match="exclude selects parameters by name, so params must "
        "be an nn.Module, but got list; named parameters",
    ):
        api.penalty(params, l2=1.0, exclude=no_bias)
    # in-place steps too
    bias = net.fc1.bias.detach().clone()
    api.prox_l1_(dict(net.named_parameters()), 10.0, exclude=no_bias)
    assert (net.fc1.weight == 0).all() and torch.equal(net.fc1.bias.detach(), bias)


@pytest.mark.parametrize("api", [fastreg, reference], ids=["public", "reference"])
def test_tensor_coefficients(api):
    net = Net()
    for fn, name in (
        (lambda c: api.penalty(net, l1=c), "l1"),
        (lambda c: api.penalty(net, l2=c), "l2"),
        (lambda c: api.l2_penalty(net, c), "weight"),
    ):
        assert_bits_equal(fn(torch.tensor(0.25)), fn(0.25))
        assert_bits_equal(fn(torch.tensor(0.25, dtype=torch.float64)), fn(0.25))
        with pytest.raises(TypeError, match=f"{name} is a tensor that requires grad"):
            fn(torch.tensor(0.25, requires_grad=True))
        with pytest.raises(TypeError, match=f"{name} must be a float or a 0-dim real tensor"):
            fn(torch.tensor([0.25]))
        with pytest.raises(TypeError, match=f"{name} must be a float or a 0-dim real tensor"):
            fn(torch.tensor(True))
        with pytest.raises(ValueError, match=f"{name} must be a non-negative finite float"):
            fn(torch.tensor(-1.0))
    before = net.fc1.weight.detach().clone()
    api.prox_l1_(net, torch.tensor(0.1))
    expected = before - before.clamp(-0.1, 0.1)
    assert_bits_equal(net.fc1.weight.detach(), expected)
    assert_bits_equal(fastreg.Penalty(l2=torch.tensor(0.5))(net), fastreg.penalty(net, l2=0.5))


@requires_extension
def test_grad_fn_name():
    x = torch.randn(3, requires_grad=True)
    value = fastreg.penalty([x], l1=0.5)
    assert value.grad_fn.name() == "PenaltyBackward0"
    assert "grad_fn=<PenaltyBackward0>" in repr(value)


@requires_extension
def test_backward_node_edges_and_frozen_tensors():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2)  # no grad: no edge to it, no gradient
    c = torch.randn(4, dtype=torch.float64, requires_grad=True)
    value = fastreg.penalty([a, b, c], l1=0.5, l2=0.25)
    ga, gc_ = torch.autograd.grad(value, [a, c], retain_graph=True)
    assert_bits_equal(ga, reference.penalty_slope(a.detach(), 0.5, 0.25))
    assert_bits_equal(gc_, reference.penalty_slope(c.detach(), 0.5, 0.25))
    assert value.grad_fn.next_functions[1] == (None, 0)
    with pytest.raises(RuntimeError, match="second time"):
        value.backward()
        value.backward()


def _backward_error(loss):
    """The error of loss.backward() up to its hint, the node's name left out: the words
    torch's own message has in every supported version (2.14 names the node and words
    the hint differently from 2.4)."""
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    return re.sub(
        r"output (\d+) of \w+,", r"output \1 of <node>,", str(info.value).split(" Hint:")[0]
    )


@requires_extension
@pytest.mark.parametrize("leaf", [True, False])
def test_modified_parameter_refused_as_torch_refuses_it(leaf):
    # The node keeps its parameters as plain tensors and checks their versions itself:
    # the same error as torch's own ops (which keep SavedVariables).
    base = torch.randn(3, 2, requires_grad=True)
    w = base if leaf else base * 2
    penalty, product = fastreg.penalty([w], l1=0.5, l2=0.25), (w * w).sum()
    with torch.no_grad():
        w.add_(1.0)
    expected = _backward_error(product)
    assert "modified by an inplace operation" in expected
    assert _backward_error(penalty) == expected
    # a version check, not a flag set once: a kept graph runs again until the change
    v = torch.randn(4, requires_grad=True)
    penalty = fastreg.penalty([v], l2=0.5)
    penalty.backward(retain_graph=True)
    penalty.backward(retain_graph=True)
    assert_bits_equal(v.grad, 2 * reference.penalty_slope(v.detach(), 0.0, 0.5))
    v.data.mul_(1.0)  # .data: no version bump, as for torch's ops
    penalty.backward(retain_graph=True)
    with torch.no_grad():
        v.mul_(1.0)
    with pytest.raises(RuntimeError, match="is at version 1; expected version 0"):
        penalty.backward()


@requires_extension
def test_saved_tensor_hooks_run_on_the_parameters():
    # While saved-tensor hooks are active the node keeps what the pack hook returned and
    # differentiates at what the unpack hook gives back: a pack hook that doubles each
    # tensor doubles the L2 gradient. No hooks (after the context): the parameters.
    a = torch.randn(3, requires_grad=True)
    frozen = torch.randn(2)
    b = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return t.detach() * 2

    def unpack(t):
        unpacked.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        value = fastreg.penalty([a, frozen, b], l2=0.5)
    assert [t is a for t in packed] == [True, False] and packed[1] is b
    ga, gb = torch.autograd.grad(value, [a, b])
    assert len(unpacked) == 2
    assert_bits_equal(ga, reference.penalty_slope(a.detach() * 2, 0.0, 0.5))
    assert_bits_equal(gb, reference.penalty_slope(b.detach() * 2, 0.0, 0.5))
    value = fastreg.penalty([a, frozen, b], l2=0.5)
    ga, gb = torch.autograd.grad(value, [a, b])
    assert len(packed) == 2
    assert_bits_equal(ga, reference.penalty_slope(a.detach(), 0.0, 0.5))
    # save_on_cpu (a pair of hooks torch ships) on a CPU model: the same gradients
    with torch.autograd.graph.save_on_cpu():
        value = fastreg.penalty([a, frozen, b], l1=0.1, l2=0.5)
    ga2, gb2 = torch.autograd.grad(value, [a, b])
    assert_bits_equal(ga2, reference.penalty_slope(a.detach(), 0.1, 0.5))
    assert_bits_equal(gb2, reference.penalty_slope(b.detach(), 0.1, 0.5))


@requires_extension
@pytest.mark.skipif(not hasattr(torch._dynamo, "compiled_autograd"), reason="no compiled autograd")
def test_compiled_autograd_of_an_eager_penalty():
    if TORCH_VERSION < (2, 8):
        pytest.skip("the node supports compiled autograd from torch 2.8")
    net = Net()
    x = torch.randn(2, 5)
    loss = net(x).sum() + fastreg.penalty(net, l1=0.1, l2=0.2)
    expected = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    for p in net.parameters():
        p.grad = None
    with compiled_autograd_enable(torch.compile(backend="aot_eager")):
        loss.backward()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    # Compiled autograd traces the node with a 2-d placeholder gradient (dropout's node
    # failed on it for every output that was not 2-d): parameters of every rank, layout
    # and dtype, bit for bit against eager.
    torch._dynamo.reset()
    params = [
        torch.randn(3, 4, 5),
        torch.randn(()),
        torch.randn(7),
        torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1),
        torch.randn(0, 3),
        torch.randn(4, 6)[:, ::2],
        torch.randn(5, dtype=torch.float64),
        torch.randn(6).half(),
    ]
    params = [p.requires_grad_() for p in params]
    loss = fastreg.penalty(params, l1=0.1, l2=0.2) * 3.0
    expected = torch.autograd.grad(loss, params, retain_graph=True)
    with compiled_autograd_enable(torch.compile(backend="aot_eager")):
        loss.backward()
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e) and p.grad.stride() == e.stride()
    # the node's kept parameters: their versions checked, saved-tensor hooks run
    v = torch.randn(4, requires_grad=True)
    loss = fastreg.penalty([v], l2=0.5) * 3.0
    with torch.no_grad():
        v.mul_(1.0)
    with pytest.raises(RuntimeError, match="is at version 1; expected version 0"):
        with compiled_autograd_enable(torch.compile(backend="aot_eager")):
            loss.backward()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach() * 2, lambda t: t):
        loss = fastreg.penalty([v], l2=0.5) * 3.0
    with compiled_autograd_enable(torch.compile(backend="aot_eager")):
        loss.backward()
    torch.testing.assert_close(v.grad, 3.0 * reference.penalty_slope(v.detach() * 2, 0.0, 0.5))


@requires_extension
def test_fast_path_layouts():
    """Lists (the fast path) with a gradient in another layout than its parameter, a
    non-dense parameter and an empty one: as the general path (groups) does them."""

    def make():
        torch.manual_seed(3)
        p = torch.randn(6, 5).requires_grad_()
        p.grad = torch.randn(5, 6).t()  # another layout than p's
        q = torch.randn(6, 10)[:, ::2].detach().requires_grad_()  # not dense
        q.grad = torch.ones(6, 5)
        e = torch.empty(0, 3, requires_grad=True)
        return [p, q, e]

    fast, slow = make(), make()
    grad_p = fast[0].grad
    fastreg.penalty_grad_(fast, l1=0.5, l2=0.25)
    fastreg.penalty_grad_([{"params": slow}], l1=0.5, l2=0.25)
    assert fast[0].grad is grad_p  # in place
    for a, b in zip(fast, slow):
        assert_bits_equal(a.grad, b.grad)
    assert_bits_equal(
        fastreg.penalty(fast, l1=0.5, l2=0.25), fastreg.penalty([{"params": slow}], l1=0.5, l2=0.25)
    )
    fastreg.prox_l1_(fast, 0.3)
    fastreg.prox_l1_([{"params": slow}], 0.3)
    for a, b in zip(fast, slow):
        assert_bits_equal(a.detach(), b.detach())


@requires_extension
def test_cache_holds_no_module():
    """A submodule that refers back to the model (a hook's closure, say) must not keep
    the model alive through the cache."""
    net = Net()
    net.fc1.register_forward_hook(lambda module, args, out, root=net: None)
    fastreg.penalty(net, l2=1.0)
    weak = weakref.ref(net)
    del net
    gc.collect()
    assert weak() is None
