"""Bad inputs: the table of docs/errors.md run row by row against the public API and
the reference, and edge inputs that are not errors, which must work (and not crash) in
both backends alike."""

import inspect
import pathlib
import re
import warnings

import pytest
import torch

import fastreg
from fastreg import reference

ERRORS_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ERRORS = {
    "TypeError": TypeError,
    "ValueError": ValueError,
    "RuntimeError": RuntimeError,
    "NotImplementedError": NotImplementedError,
}


def errors_page():
    """(setup code, rows): the page's python block and its table rows as
    (call, argument, error, message) with the backticks removed."""
    section = ERRORS_PAGE.read_text()
    setup = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and all(len(c) > 2 and c[0] == c[-1] == "`" for c in cells):
            rows.append(tuple(cell[1:-1] for cell in cells))
    return setup, rows


SETUP, ROWS = errors_page()


def function_of(call):
    return re.match(r"fastreg\.(\w+)\(", call).group(1)


def names_argument(message, argument):
    # torch's own message for p, which fastreg keeps, calls it the dropout probability.
    return re.search(rf"\b{re.escape(argument)}\b", message) is not None or (
        argument == "p" and "dropout probability" in message
    )


def test_table_is_read_and_covers_the_public_api():
    assert len(ROWS) >= 70
    assert {row[2] for row in ROWS} == set(ERRORS)
    public = {name for name in fastreg.__all__ if callable(getattr(fastreg, name))} - {"info"}
    assert public - {function_of(row[0]) for row in ROWS} == set()


@pytest.mark.parametrize("call,argument,error,message", ROWS, ids=[row[0] for row in ROWS])
def test_readme_row(call, argument, error, message):
    name = function_of(call)
    assert argument in inspect.signature(getattr(fastreg, name)).parameters
    assert names_argument(message, argument), f"{message!r} does not name {argument}"
    backends = [fastreg] + ([reference] if hasattr(reference, name) else [])
    for api in backends:
        namespace = {}
        exec(SETUP, namespace)
        namespace["fastreg"] = api
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropout2d's warning about the rank
            with pytest.raises(Exception) as info:
                eval(call, namespace)
        assert type(info.value) is ERRORS[error], f"{api.__name__}: {info.value!r}"
        assert message in str(info.value), f"{api.__name__}: {info.value}"


def test_bad_inplace_leaves_the_input_alone():
    leaf = torch.randn(3, requires_grad=True)
    before = leaf.detach().clone()
    for api in (fastreg, reference):
        with pytest.raises(RuntimeError):
            api.dropout(leaf, 0.5, inplace=True)
        assert torch.equal(leaf.detach(), before)
    # As torch: in-place on a leaf is fine outside autograd and where nothing is dropped.
    assert fastreg.dropout(leaf, 0.0, inplace=True) is leaf
    assert fastreg.dropout(leaf, 0.5, training=False, inplace=True) is leaf
    with torch.no_grad():
        assert fastreg.dropout(leaf, 1.0, inplace=True) is leaf
    assert torch.equal(leaf.detach(), torch.zeros(3))


# ---- meta tensors: accepted all together, so they can stand for another device ----

META_CALLS = {
    "dropout": lambda api, m: api.dropout(m(2, 3), 0.5),
    "dropout2d": lambda api, m: api.dropout2d(m(2, 3, 4, 5), 0.5),
    "bias_dropout_add": lambda api, m: api.bias_dropout_add(m(2, 3), m(3), m(2, 3), 0.5),
    "bias_act_dropout": lambda api, m: api.bias_act_dropout(m(2, 3), m(3), 0.5),
    "penalty": lambda api, m: api.penalty([m(2, 3), m(3)], l1=0.1, l2=0.1),
}


@pytest.mark.parametrize("name", META_CALLS)
@pytest.mark.parametrize("api", [fastreg, reference], ids=["public", "reference"])
def test_all_meta_inputs_are_accepted(api, name):
    out = META_CALLS[name](api, lambda *shape: torch.randn(shape, device="meta"))
    expected = META_CALLS[name](api, lambda *shape: torch.randn(shape))
    assert out.device.type == "meta"
    assert (out.shape, out.dtype) == (expected.shape, expected.dtype)


# ---- edge inputs that are not errors -------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


EDGES = {
    "p a hair below 1": lambda api: api.dropout(_x(1000), 1 - 2**-53, seed=7),
    "p with t = 2**32 - 1": lambda api: api.dropout(_x(1000), 1 - 2**-32, seed=7),
    "smallest p": lambda api: api.dropout(_x(1000), 5e-324, seed=7),
    "float16 scaled to inf": lambda api: api.dropout(
        _x(1000, dtype=torch.float16) * 100, 0.999, seed=3
    ),
    "empty with a huge dimension": lambda api: api.dropout(torch.empty(0, 2**40), 0.5, seed=1),
    "0-dim": lambda api: api.dropout(torch.tensor(1.5), 0.5, seed=4),
    "expanded input": lambda api: api.dropout(_x(1).expand(9), 0.5, seed=2),
    "empty mask of a huge shape": lambda api: api.dropout_mask((2**62, 0), 0.5, 1),
    "channels of size 0": lambda api: api.dropout2d(_x(2, 3, 0, 4), 0.5, seed=1),
    "batch of size 0": lambda api: api.dropout2d(_x(0, 3, 2, 4), 0.5, seed=1),
    "channel p = 1": lambda api: api.dropout3d(_x(1, 2, 3, 4, 5), 1.0),
    "fused, p a hair below 1": lambda api: api.bias_act_dropout(
        _x(4, 8), _x(8), 1 - 2**-53, "relu", seed=1
    ),
    "fused, 0-dim without bias": lambda api: api.bias_dropout_add(
        torch.tensor(1.0), None, torch.tensor(2.0), 0.5, seed=1
    ),
    "fused, empty last dimension": lambda api: api.bias_act_dropout(
        torch.empty(2, 0), torch.empty(0), 0.5, seed=1
    ),
    "fused, expanded operands": lambda api: api.bias_dropout_add(
        _x(3, 1).expand(3, 4), _x(1).expand(4), _x(1, 4).expand(3, 4), 0.5, seed=5
    ),
    "penalty of an empty tensor": lambda api: api.penalty([torch.empty(0)], l1=0.1),
    "penalty of a 0-dim tensor": lambda api: api.penalty([torch.tensor(2.0)], l1=0.5, l2=0.25),
    "penalty of an expanded tensor": lambda api: api.penalty([torch.ones(1).expand(4)], l2=0.5),
}


@pytest.mark.parametrize("name", EDGES)
def test_edge_inputs_work_and_match_the_reference(name):
    out = EDGES[name](fastreg)
    assert torch.equal(out, EDGES[name](reference))
    if name == "smallest p":
        assert torch.equal(out, _x(1000))  # nothing dropped, scale 1
    if name.endswith("a hair below 1"):
        assert out.count_nonzero() == 0  # t = 2**32 - 1: keeping needs a word of all ones
    if name == "penalty of a 0-dim tensor":
        assert out.item() == 2.0  # 0.5 * 2 + 0.25 * 4


@pytest.mark.parametrize("api", [fastreg, reference], ids=["public", "reference"])
def test_gradients_of_empty_fused_inputs(api):
    x = torch.empty(0, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = api.bias_dropout_add(x, b, torch.empty(0, 3), 0.5, seed=1)
    gx, gb = torch.autograd.grad(out.sum(), (x, b))
    assert gx.shape == (0, 3) and torch.equal(gb, torch.zeros(3))


@pytest.mark.parametrize("api", [fastreg, reference], ids=["public", "reference"])
def test_errors_torch_raises_inside_an_operation(api):
    expanded = torch.ones(1).expand(4)
    with pytest.raises(RuntimeError, match="single memory location"):
        api.dropout(expanded, 0.5, inplace=True)
    assert torch.equal(expanded, torch.ones(4))
    with pytest.raises(RuntimeError, match="single memory location"):
        api.prox_l1_([torch.ones(1).expand(3)], 0.1)
    with pytest.raises(RuntimeError):  # 2**62 bytes: the allocator refuses
        api.dropout_mask((2**31, 2**31), 0.5, 1)


def test_nested_and_sparse_inputs_are_refused_by_name():
    """A strided-layout nested tensor has layout torch.strided: the penalty's fast path
    and checks, which look at the layout, must see it is nested (it reached a kernel the
    dispatcher has no NestedTensor entry for); the dropout modules, scripted too, refuse
    nested and sparse inputs naming input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the strided nested layout is a prototype
        nested = torch.nested.nested_tensor([torch.randn(3), torch.randn(2)])
    assert nested.layout == torch.strided and nested.is_nested
    model = torch.nn.Linear(2, 2)
    for api in (fastreg, reference):
        for call in (
            lambda: api.penalty([nested], l1=0.1),
            lambda: api.prox_l1_([nested], 0.1),
            lambda: api.penalty_grad_([torch.randn(2), nested], l2=0.1),
        ):
            with pytest.raises(
                TypeError,
                match=r"params\[\d\] must be a strided \(dense\) "
                r"tensor, but got a nested tensor",
            ):
                call()
    assert fastreg.penalty(model, l1=0.1).dim() == 0  # the fast path still taken
    layers = [fastreg.Dropout(0.5), fastreg.Dropout2d(0.5)]
    scripted = [torch.jit.script(layer) for layer in layers]
    for layer in layers + scripted:
        # TorchScript raises torch.jit.Error, naming the Python error in its message
        script = layer in scripted
        with pytest.raises(
            torch.jit.Error if script else NotImplementedError,
            match="NotImplementedError: dropout.?.?\\(\\): input is a nested"
            if script
            else "input is a nested tensor",
        ):
            layer(nested)
        with pytest.raises(
            torch.jit.Error if script else TypeError, match="input must be a strided"
        ):
            layer(torch.randn(2, 3, 4).to_sparse())
