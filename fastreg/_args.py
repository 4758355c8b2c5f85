"""Argument checking and RNG-state drawing, shared by the kernels' front end and the
reference, so both accept and reject exactly the same calls."""

import numbers
import warnings
from collections.abc import Mapping
from typing import Optional

import torch

from fastreg import _distributed

# (major, minor) of the running torch, for behaviour that differs by release
TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])
DROPOUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_MODES = ("bits", "bool", "recompute")

_UINT64 = 1 << 64


def check_probability(p, name="p"):
    """p as a float in [0, 1]; the error messages are torch's own. A 0-dim real tensor is
    read as its value, as F.dropout does (a graph break under torch.compile: the value
    decides the code path)."""
    if isinstance(p, torch.Tensor):
        if p.dim() != 0 or p.is_complex() or p.dtype == torch.bool:
            raise TypeError(f"{name} must be a float or a 0-dim real tensor, but got a tensor "
                            f"of shape {tuple(p.shape)} and dtype {p.dtype}")
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float, but got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p


def check_tensor(value, name, function):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{function}(): argument '{name}' must be Tensor, not {type(value).__name__}")


def check_dropout_input(input, function="dropout"):
    check_tensor(input, "input", function)
    check_dropout_layout(input, "input", function)
    check_dropout_dtype(input, function)


# The functions annotated with types below run in TorchScript too: the scripted forward of
# the dropout modules (fastreg/_modules.py) shares them with the eager functions.

def dtype_name(dtype: torch.dtype) -> str:
    """str(dtype); TorchScript holds dtypes as ints, so there the common ones are named."""
    if not torch.jit.is_scripting():
        return str(dtype)
    names = [(torch.int8, "torch.int8"), (torch.uint8, "torch.uint8"), (torch.int16, "torch.int16"),
             (torch.int32, "torch.int32"), (torch.int64, "torch.int64"), (torch.bool, "torch.bool"),
             (torch.complex64, "torch.complex64"), (torch.complex128, "torch.complex128")]
    for candidate, name in names:
        if dtype == candidate:
            return name
    return f"dtype {dtype}"


def check_dropout_layout(input: torch.Tensor, name: str, function: str) -> None:
    """A strided tensor. Nested tensors, which torch's dropout takes, are a feature not
    there (NotImplementedError); sparse layouts, which it refuses too, a TypeError."""
    if input.is_nested:
        raise NotImplementedError(f"{function}(): {name} is a nested tensor, which fastreg "
                                  "does not support (dropout its values tensor instead)")
    if input.layout != torch.strided:
        got = str(input.layout)
        if torch.jit.is_scripting():  # TorchScript holds a layout as an int
            got = "a sparse layout"
        raise TypeError(f"{function}(): {name} must be a strided (dense) tensor, but got {got}")


def check_dropout_dtype(input: torch.Tensor, function: str) -> None:
    dtype = input.dtype
    if not (dtype == torch.float16 or dtype == torch.bfloat16 or dtype == torch.float32
            or dtype == torch.float64):
        raise TypeError(f"{function}(): input must be float16, bfloat16, float32 or float64, "
                        f"but got {dtype_name(dtype)}")


def check_probability_value(p: float) -> None:
    """p in [0, 1] (NaN fails), torch's message: for a p already known to be a float."""
    if not (p >= 0.0 and p <= 1.0):
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def check_mask_value(mask: str) -> None:
    if mask != "bits" and mask != "bool" and mask != "recompute":
        raise ValueError(f"mask must be one of 'bits', 'bool', 'recompute', but got '{mask}'")


def check_training(training, function):
    """`training` must be a bool, as torch's F.dropout has it (an int, a float, None or a
    tensor raise TypeError there too)."""
    if not isinstance(training, bool):
        raise TypeError(f"{function}(): argument 'training' must be bool, not "
                        f"{type(training).__name__}")


def check_inplace_leaf(input: torch.Tensor, function: str) -> None:
    """torch's rule for an in-place op on a leaf that requires grad (see check_inplace)."""
    if input.requires_grad and torch.is_grad_enabled() and input.is_leaf:
        raise RuntimeError(f"{function}(): a leaf Variable that requires grad is being used in an "
                           "in-place operation (inplace=True on input)")


def draw_rng_state(device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The (seed, offset) pair drawn from `generator` or the device's default generator by
    a torch random op on `device` (out of place: torch.compile traces randint, not
    random_), over nearly the full int64 range."""
    return torch.randint(-9223372036854775807 - 1, 9223372036854775807, [2], dtype=torch.int64,
                         device=device, generator=generator)


class _AllDropped(torch.autograd.Function):
    """zeros_like(input) (written, not read: as fast as a memset) with a zero gradient in
    the output's layout; nothing saved for backward."""

    @staticmethod
    def forward(ctx, input):
        out = torch.zeros_like(input)  # empty_like's layout: a kernel's output layout
        ctx.layout = out.shape, out.stride()
        return out

    @staticmethod
    def backward(ctx, grad):
        shape, stride = ctx.layout
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).zero_()


@torch.jit.unused
def _all_dropped_eager(input: torch.Tensor) -> torch.Tensor:
    return _AllDropped.apply(input)


def all_dropped(input: torch.Tensor) -> torch.Tensor:
    """The output of p = 1 without drawing anything or running a kernel: exactly +0
    everywhere (also where `input` is NaN or infinite), in the layout a kernel's output
    would have (empty_like's), connected to autograd with a zero gradient, as torch's
    p = 1; nothing is kept for backward, whatever the mask mode. (TorchScript, which has
    no autograd.Function, selects with torch.where, reading the input.)"""
    if not torch.jit.is_scripting():
        return _all_dropped_eager(input)
    out = torch.where(torch.zeros((), dtype=torch.bool, device=input.device), input, 0.0)
    if out.stride() == input.stride():  # a dense input: empty_like keeps its strides
        return out
    layout = torch.empty_like(input)
    return out if out.stride() == layout.stride() else layout.copy_(out)


def check_mask_mode(mask):
    if not isinstance(mask, str):
        raise TypeError(f"mask must be a str, one of {', '.join(map(repr, MASK_MODES))}, but got "
                        f"{type(mask).__name__}")
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {', '.join(map(repr, MASK_MODES))}, but got {mask!r}")


def check_shape(shape, function):
    """A shape given as an int or a sequence of ints, as a list: TypeError for anything else,
    RuntimeError for a negative size (as torch.empty)."""
    sizes = [shape] if isinstance(shape, numbers.Integral) else shape
    try:
        sizes = list(sizes)
    except TypeError:
        sizes = None
    if sizes is None or isinstance(shape, (str, bytes)) or any(
            isinstance(size, bool) or not isinstance(size, numbers.Integral) for size in sizes):
        raise TypeError(f"{function}(): shape must be an int or a sequence of ints, "
                        f"but got {shape!r}")
    sizes = [int(size) for size in sizes]
    if any(not 0 <= size < (1 << 63) for size in sizes):
        raise RuntimeError(f"{function}(): shape must have sizes in [0, 2**63), but got {sizes}")
    return sizes


def check_module(value, name, function):
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{function}(): {name} must be an nn.Module, "
                        f"but got {type(value).__name__}")


def check_inplace(input, function):
    """torch's rule for an in-place op under autograd, checked before the kernel runs so that
    the message names the argument (torch's own comes from the final copy_)."""
    if not (input.requires_grad and torch.is_grad_enabled()):
        return
    check_inplace_leaf(input, function)
    if input._base is not None and input._base.is_leaf:  # dynamo traces _base, not _is_view()
        raise RuntimeError(f"{function}(): a view of a leaf Variable that requires grad is being "
                           "used in an in-place operation (inplace=True on input)")


def as_int64(value, name):
    """A 64-bit seed or offset given as a Python int in [-2**63, 2**64), stored as the
    int64 with the same bits (as torch.manual_seed does with negative seeds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, but got {type(value).__name__}")
    value = int(value)
    if not -(1 << 63) <= value < _UINT64:
        raise ValueError(f"{name} must be in [-2**63, 2**64), but got {value}")
    value %= _UINT64
    return value - _UINT64 if value >= (1 << 63) else value


def check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, but got {type(generator).__name__}")
    return generator


def check_seed(seed, generator):
    """The seed as an int64 (None when not given); rejects a seed given with a generator
    and a generator that is not one."""
    if seed is not None:
        if generator is not None:
            raise ValueError("give either seed or generator, not both")
        return as_int64(seed, "seed")
    check_generator(generator)
    return None


def rng_state(device, seed=None, generator=None):
    """The (seed, offset) pair of the RNG contract as an int64 tensor on `device`.

    With `seed`, the pair is (seed, 0). Otherwise both words are drawn from `generator` or
    the device's default generator with a torch random op on that device: the draw stays
    on the device and inside a CUDA graph each replay draws anew, as native dropout does.
    """
    seed = check_seed(seed, generator)
    if seed is not None:
        return torch.tensor([seed, 0], dtype=torch.int64, device=device)
    if generator is not None:
        check_not_recomputing()
    elif _compiling():
        return _saved_draw(device)
    return draw_rng_state(device, generator)


def _compiling():
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


# ---- one mask under recomputation (docs/recomputation.md) ----
#
# The mask is a pure function of (input's shape, p, rng_state), so forward and backward
# apply one mask exactly when a recomputed forward sees the rng_state the forward drew.
# Eager: torch.utils.checkpoint (reentrant or not, selective or not) restores the default
# generators before it re-runs a forward (preserve_rng_state=True, its default), so the
# draw repeats bit for bit; an explicit generator is not restored, which is detected.
# Compiled: the partitioner may recompute any node in the backward graph, a random one
# too once activation_memory_budget < 1 (where native dropout goes wrong), and a redrawn
# rng_state gives another mask. So under torch.compile the draw runs inside a selective-
# checkpoint region whose policy is MUST_SAVE: its node is tagged so, and the partitioner
# never recomputes a MUST_SAVE node (it saves the 16 bytes instead). Where torch has no
# selective checkpointing (2.4) or its partitioner still recomputed the node (2.5, 2.6),
# a budget below 1 is refused.

def _must_save(ctx, op, *args, **kwargs):
    return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE


def _must_save_contexts():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_must_save)


# The first torch whose partitioner, under a memory budget, was seen to keep the tagged
# draw: torch 2.5.1 and 2.6.0 recomputed it (another mask in the backward, silently),
# 2.8.0 did not (2.7 was not tried).
BUDGET_KEEPS_THE_DRAW_FROM = (2, 8)


def _have_selective_checkpointing():
    import torch.utils.checkpoint  # noqa: F401  (the submodule, for torch.utils.checkpoint.*)

    return hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts")


def memory_budget_refusal():
    """Why this torch cannot keep the partitioner from recomputing the draw under
    activation_memory_budget < 1 (a clause of fastreg's error), or None where it can."""
    if not _have_selective_checkpointing():  # torch < 2.5
        return "has no selective activation checkpointing to tag the draw with"
    if TORCH_VERSION < BUDGET_KEEPS_THE_DRAW_FROM:
        return "has a partitioner that recomputes a MUST_SAVE node (seen on 2.5, 2.6)"
    return None


def _saved_draw(device):
    """The draw, as a node the partitioner must save (see above)."""
    check_no_memory_budget()
    if not _have_selective_checkpointing():
        return draw_rng_state(device, None)
    return torch.utils.checkpoint.checkpoint(draw_rng_state, device, None, use_reentrant=False,
                                             context_fn=_must_save_contexts)


def check_no_memory_budget():
    """Refuses activation_memory_budget < 1 where this torch would recompute the draw."""
    budget = getattr(torch._functorch.config, "activation_memory_budget", 1.0)
    refusal = memory_budget_refusal() if budget < 1.0 else None
    if refusal is not None:
        first = ".".join(map(str, BUDGET_KEEPS_THE_DRAW_FROM))
        raise RuntimeError(
            f"dropout(): torch._functorch.config.activation_memory_budget is {budget}, and "
            f"this torch ({torch.__version__}) {refusal}: the backward pass would recompute "
            "the dropout's random draw and apply another mask. Use a budget of 1.0 or "
            f"torch >= {first}.")


def _graph_task_running():
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def check_not_recomputing():
    """A draw from an explicit generator must not run in a forward that the backward pass
    re-runs (activation checkpointing): torch.utils.checkpoint restores the default
    generators only, so the re-run would draw another mask than the forward applied."""
    if _compiling() or not torch.is_grad_enabled() or not _graph_task_running():
        return
    raise RuntimeError(
        "dropout(): a forward with an explicit generator is being re-run in the backward pass "
        "(activation checkpointing): torch.utils.checkpoint restores the default generators "
        "only, so the recomputed mask would differ from the forward's. Draw from the default "
        "generator (generator=None) or pass seed= inside checkpointed regions.")


def dropout_front(apply, input, p, training, inplace, mask, seed, generator, apply_=None):
    """Everything F.dropout does around the kernel: checks, the identity cases, the RNG
    draw and in-place semantics. `apply(input, p, rng_state, mask)` returns the output;
    `apply_`, when given, does the same into `input` for inplace=True (else the output is
    copied into `input`). p = 1 draws nothing and runs no kernel, as torch's
    (fastreg._modules.script_dropout is the same for TorchScript)."""
    p = check_probability(p)
    check_dropout_input(input)
    check_training(training, "dropout")
    check_mask_mode(mask)
    if not training or p == 0.0:
        return input
    if inplace:
        check_inplace(input, "dropout")
    if p == 1.0:
        check_seed(seed, generator)  # checked; nothing is drawn
        if inplace:
            return input.zero_()
        return all_dropped(input)
    state = rng_state(input.device, seed, generator)
    if inplace and apply_ is not None:
        return apply_(input, p, state, mask)
    out = apply(input, p, state, mask)
    return input.copy_(out) if inplace else out


# ---- Penalty: coefficients and the parameters of a Module, an iterable or groups ----

PENALTY_DTYPES = DROPOUT_DTYPES
EXCLUDE_RULES = ("bias_and_norm",)


def check_coefficient(value, name, function):
    """A penalty coefficient or threshold as a float >= 0 (finite): a real number, or a
    0-dim real tensor that does not require grad (read with .item(), so a host
    synchronisation for a CUDA tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{function}(): {name} must be a float or a 0-dim real tensor, but "
                            f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise TypeError(f"{function}(): {name} is a tensor that requires grad, but it is "
                            "read as a float and would get no gradient: multiply the penalty "
                            f"by it instead ({name} * fastreg.l1_penalty(params), say)")
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{function}(): {name} must be a float, but got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):  # also rejects nan
        raise ValueError(f"{function}(): {name} must be a non-negative finite float, "
                         f"but got {value}")
    return value


def check_optional_coefficient(value, name, function):
    """check_coefficient, or None for an argument not given."""
    return None if value is None else check_coefficient(value, name, function)


def missing_coefficients(function, names, where=""):
    keys = " or ".join(names)
    return TypeError(f"{function}() needs a coefficient: give {keys}{where} (0.0 turns a "
                     f"term off); a call without one would be a silent zero")


def check_exclude(exclude, params, function, named=False):
    """`exclude` is None, a known rule or a callable, and params can be selected from by
    name: a Module, or (named=True) named parameters, which take a callable only."""
    if exclude is None:
        return
    if isinstance(exclude, str):
        if exclude not in EXCLUDE_RULES:
            raise ValueError(f"{function}(): exclude must be None, a callable or one of "
                             f"{', '.join(map(repr, EXCLUDE_RULES))}, but got {exclude!r}")
    elif not callable(exclude):
        raise TypeError(f"{function}(): exclude must be None, a str or a callable "
                        f"(name, param) -> bool, but got {type(exclude).__name__}")
    if isinstance(params, torch.nn.Module):
        return
    if not named:
        raise ValueError(f"{function}(): exclude selects parameters by name, so params must "
                         f"be an nn.Module, but got {type(params).__name__}; named parameters "
                         "(a dict of names to tensors, or model.named_parameters()) take a "
                         "callable exclude too")
    if isinstance(exclude, str):
        raise ValueError(f"{function}(): exclude={exclude!r} needs the nn.Module, to find its "
                         "normalization layers, but got named parameters; pass the module, "
                         "or a callable exclude(name, param)")


def _is_pair(item):
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor))


def _norm_types():
    types = [torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
             torch.nn.LocalResponseNorm]
    if hasattr(torch.nn, "RMSNorm"):  # torch >= 2.4
        types.append(torch.nn.RMSNorm)
    return tuple(types)


NORM_TYPES = _norm_types()


def is_norm_module(module):
    """A normalization layer: torch's (BatchNorm*, InstanceNorm*, SyncBatchNorm, LayerNorm,
    GroupNorm, LocalResponseNorm, RMSNorm) or any module whose class name ends in "Norm"
    (LlamaRMSNorm, T5LayerNorm, apex's FusedLayerNorm, ...)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def module_params(module, exclude):
    """(name, parameter) pairs of `module` that require grad, tied parameters once, less
    those that `exclude` rules out."""
    norm_params = set()
    if exclude == "bias_and_norm":
        for prefix, child in module.named_modules():
            if is_norm_module(child):
                # a loop, not set.update(generator): Dynamo in torch 2.4 takes that for
                # a dict update and fails to trace it
                for name, _ in child.named_parameters(recurse=False):
                    norm_params.add(f"{prefix}.{name}" if prefix else name)
    selected = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if exclude == "bias_and_norm":
            if name in norm_params or (param.dim() <= 1 and
                                       name.rsplit(".", 1)[-1].endswith("bias")):
                continue
        elif exclude is not None and exclude(name, param):
            continue
        selected.append((name, param))
    return selected


def _group_tensors(group_params):
    if isinstance(group_params, torch.Tensor):
        return [group_params]
    return list(group_params)


def _resolve(function, coefficients, where=""):
    """The coefficients with None (not given) as 0.0; TypeError when none is given."""
    if coefficients and all(value is None for value in coefficients.values()):
        raise missing_coefficients(function, list(coefficients), where)
    return {key: 0.0 if value is None else value for key, value in coefficients.items()}


def collect_params(function, params, coefficients, exclude=None, group_keys=None, one_mesh=False):
    """The tensors of `params` and their coefficients: (tensors, {key: [value per tensor]},
    label), label(i) naming tensors[i] in errors.

    `coefficients` maps each coefficient's name to its (checked) value, or None where
    the argument was not given; a parameter group may override those named in
    `group_keys` (default: all) with a key of that name. A call in which no coefficient
    is given at all (neither as an argument nor as a group key) is a TypeError (it would
    be a silent zero); None then counts as 0.0. Tied parameters of a Module count once;
    a tensor listed twice counts twice, as a Python loop over the list would. `params`
    is an nn.Module (its parameters that require grad, after `exclude`), a tensor, an
    iterable of tensors, named parameters (a mapping of names to tensors without a
    "params" key, or (name, tensor) pairs: taken as given, after `exclude`), or an
    iterable of groups (dicts with a "params" key; other keys, such as an optimizer's
    "lr" or "weight_decay", are ignored). An iterator that yields nothing (a stored
    model.parameters() generator, used up by an earlier call) is a ValueError, not an
    empty selection. Checks dtypes, layouts and devices, and DTensors' placements (and
    that they share one mesh, with `one_mesh`).
    """
    group_keys = coefficients.keys() if group_keys is None else group_keys
    if isinstance(params, torch.nn.Module):
        check_exclude(exclude, params, function)
        coefficients = _resolve(function, coefficients)
        named = module_params(params, exclude)
        tensors = [p for _, p in named]
        values = {key: [value] * len(tensors) for key, value in coefficients.items()}
        label = lambda i: f"parameter {named[i][0]!r} of params"  # noqa: E731
        check_tensors(function, tensors, label, one_mesh)
        return tensors, values, label
    if isinstance(params, Mapping) and "params" not in params:
        return _collect_named(function, list(params.items()), coefficients, exclude,
                              one_mesh, mapping=True)
    if isinstance(params, (torch.Tensor, Mapping)):
        items = [params]
    else:
        try:
            one_shot = iter(params) is params
            items = list(params)
        except TypeError:
            raise TypeError(f"{function}(): params must be an nn.Module, a tensor, an iterable "
                            f"of tensors or of parameter groups, but got "
                            f"{type(params).__name__}") from None
        if one_shot and not items:
            raise ValueError(f"{function}(): params is an iterator that yielded nothing: a "
                             "generator such as model.parameters() is used up by the first "
                             "call that reads it; pass the module itself, or a list "
                             "(list(model.parameters())), to use it for every call")
        if items and all(_is_pair(item) for item in items):
            return _collect_named(function, items, coefficients, exclude, one_mesh)
    check_exclude(exclude, params, function)
    if not any(isinstance(item, dict) for item in items):
        coefficients = _resolve(function, coefficients)
        values = {key: [value] * len(items) for key, value in coefficients.items()}
        label = lambda i: f"params[{i}]"  # noqa: E731
        check_tensors(function, items, label, one_mesh)
        return items, values, label
    tensors, values, where = [], {key: [] for key in coefficients}, []
    given_any = any(value is not None for value in coefficients.values())
    for g, group in enumerate(items):
        if not isinstance(group, dict):
            raise TypeError(f"{function}(): params mixes parameter groups (dicts) and "
                            f"{type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"{function}(): parameter group {g} has no 'params' key")
        group_tensors = _group_tensors(group["params"])
        for key, value in coefficients.items():
            if key in group_keys and key in group:
                value = check_coefficient(group[key], f"group {g}'s {key!r}", function)
                given_any = True
            values[key] += [value] * len(group_tensors)
        where += [(g, i) for i in range(len(group_tensors))]
        tensors += group_tensors
    if not given_any:
        raise missing_coefficients(function, list(coefficients),
                                   " (as arguments or as keys of the parameter groups)")
    values = {key: [0.0 if v is None else v for v in vs] for key, vs in values.items()}
    label = lambda k: "params[{}]['params'][{}]".format(*where[k])  # noqa: E731
    check_tensors(function, tensors, label, one_mesh)
    return tensors, values, label


def _collect_named(function, items, coefficients, exclude, one_mesh, mapping=False):
    """collect_params of named parameters: (name, tensor) pairs, taken as given (no
    requires_grad filter, a tensor named twice counts twice) less those `exclude` (a
    callable) rules out."""
    check_exclude(exclude, items, function, named=True)
    coefficients = _resolve(function, coefficients)
    for name, _ in items:
        if not isinstance(name, str):
            raise TypeError(f"{function}(): the names of named parameters must be str, but got "
                            f"{type(name).__name__}")
    hint = " (a dict without a 'params' key is read as names to tensors)" if mapping else ""
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{function}(): params[{name!r}] must be a Tensor, but got "
                            f"{type(tensor).__name__}{hint}")
    named = [(name, tensor) for name, tensor in items
             if exclude is None or not exclude(name, tensor)]
    tensors = [tensor for _, tensor in named]
    values = {key: [value] * len(tensors) for key, value in coefficients.items()}
    label = lambda i: f"params[{named[i][0]!r}]"  # noqa: E731
    check_tensors(function, tensors, label, one_mesh)
    return tensors, values, label


def check_tensors(function, tensors, label, one_mesh=False):
    """Floating, strided tensors on one device, DTensors placed by Shard or Replicate (on
    one mesh with `one_mesh`); label(i) names tensors[i] in errors (it is only called on
    an error, to keep the common path cheap)."""
    device = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{function}(): {label(i)} must be a Tensor, but got "
                            f"{type(tensor).__name__}")
        if tensor.dtype not in PENALTY_DTYPES:
            raise TypeError(f"{function}(): {label(i)} must be float16, bfloat16, float32 or "
                            f"float64, but got {tensor.dtype}")
        if tensor.layout != torch.strided or tensor.is_nested:
            raise TypeError(f"{function}(): {label(i)} must be a strided (dense) tensor, but "
                            f"got {'a nested tensor' if tensor.is_nested else tensor.layout}")
        if tensor.device != device:
            raise RuntimeError(f"{function}(): all tensors must be on one device, but "
                               f"{label(0)} is on {device} and {label(i)} on {tensor.device}")
    _distributed.check(function, tensors, label, one_mesh)


def penalty_front(apply, function, params, exclude, l1, l2, group_keys=("l1", "l2")):
    """The value of a penalty through `apply(tensors, l1s, l2s)`; an empty selection
    gives a float32 zero (on the CPU: it has no device to take)."""
    coefficients = {"l1": check_optional_coefficient(l1, "l1", function),
                    "l2": check_optional_coefficient(l2, "l2", function)}
    tensors, values, _ = collect_params(function, params, coefficients, exclude, group_keys,
                                        one_mesh=True)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    if _distributed.has_dtensors(tensors):
        return _distributed.penalty(apply, tensors, values["l1"], values["l2"])
    return apply(tensors, values["l1"], values["l2"])


def penalty_grad_front(apply, params, l1, l2, exclude):
    """fastreg.penalty_grad_ through `apply(grads, tensors, l1s, l2s)`: a tensor without
    a gradient gets a zero one first; tensors whose coefficients are both zero are left
    alone."""
    function = "penalty_grad_"
    coefficients = {"l1": check_optional_coefficient(l1, "l1", function),
                    "l2": check_optional_coefficient(l2, "l2", function)}
    tensors, values, label = collect_params(function, params, coefficients, exclude)
    keep = [i for i in range(len(tensors)) if values["l1"][i] or values["l2"][i]]
    for i in keep:
        grad = tensors[i].grad
        if grad is not None and grad.layout != torch.strided:
            raise TypeError(f"{function}(): the gradient of {label(i)} must be strided (dense), "
                            f"but got {grad.layout}")
    if not keep:
        return
    with torch.no_grad():
        grads = []
        for i in keep:
            if tensors[i].grad is None:
                tensors[i].grad = torch.zeros_like(tensors[i])
            grads.append(tensors[i].grad)
        tensors = [tensors[i] for i in keep]
        if _distributed.dtensor_type() is not None:  # elementwise: on the local shards
            grads = _distributed.local_grads(function, tensors, grads)
            tensors = [_distributed.local(tensor) for tensor in tensors]
        apply(grads, tensors, [values["l1"][i] for i in keep], [values["l2"][i] for i in keep])


def prox_front(apply, params, threshold, exclude):
    """fastreg.prox_l1_ through `apply(tensors, thresholds)`."""
    function = "prox_l1_"
    coefficients = {"threshold": check_coefficient(threshold, "threshold", function)}
    tensors, values, _ = collect_params(function, params, coefficients, exclude)
    if tensors:
        with torch.no_grad():
            apply([_distributed.local(tensor) for tensor in tensors], values["threshold"])
# ---- the fused ops ----------------------------------------------------------------

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def check_activation(activation):
    """The activation's name for the operators: one of ACTIVATIONS, or 'none' for None."""
    if activation is None:
        return "none"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str or None, but got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))} or None, "
                         f"but got {activation!r}")
    return activation


def _check_like(value, name, input, function, shape, what):
    check_tensor(value, name, function)
    check_dropout_layout(value, name, function)
    if value.shape != shape:
        raise RuntimeError(f"{function}(): {name} must have shape {tuple(shape)} ({what}), "
                           f"but got {tuple(value.shape)}")
    if value.is_complex():
        raise TypeError(f"{function}(): {name} must be a real tensor, but got {value.dtype}")
    if value.device != input.device:
        raise RuntimeError(f"{function}(): {name} must be on input's device {input.device}, but is "
                           f"on {value.device}")


def check_bias(bias, input, function):
    """bias: None, or a real, strided vector of input's last dimension and device
    (RuntimeError)."""
    if bias is None:
        return
    if input.dim() == 0:
        check_tensor(bias, "bias", function)
        raise RuntimeError(f"{function}(): a bias needs an input with at least 1 dimension, "
                           "but input is 0-dimensional")
    _check_like(bias, "bias", input, function, torch.Size([input.shape[-1]]),
                "input's last dimension")


def check_residual(residual, input, function):
    """residual: a real, strided tensor of input's shape and device (RuntimeError); any
    strides."""
    _check_like(residual, "residual", input, function, input.shape, "input's shape")


def promote_fused(*tensors):
    """The tensors (None passes) cast to their promoted dtype, the dtype of the eager
    composition `residual + dropout(input + bias)`: under autocast a bfloat16 activation
    with a float32 bias and residual gives float32, as it does eagerly. The upcasts are
    exact, so the fused op still rounds once."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) == 1:  # the common case calls nothing (nothing lands in traced graphs)
        return tensors
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def no_rng_state(device):
    """The state passed when nothing is dropped (eval mode, p = 0): never read."""
    return torch.zeros(2, dtype=torch.int64, device=device)


def bias_dropout_add_front(apply, input, bias, residual, p, training, mask, seed, generator):
    """Checks, eval mode and the RNG draw of bias_dropout_add around
    `apply(input, bias, residual, p, rng_state, mask)`. With training=False or p = 0 the
    sum residual + (input + bias) is still computed by `apply` (p = 0, nothing kept)."""
    function = "bias_dropout_add"
    p = check_probability(p)
    check_dropout_input(input, function)
    check_bias(bias, input, function)
    check_residual(residual, input, function)
    check_training(training, function)
    check_mask_mode(mask)
    input, bias, residual = promote_fused(input, bias, residual)
    if not training or p == 0.0:
        return apply(input, bias, residual, 0.0, no_rng_state(input.device), "recompute")
    return apply(input, bias, residual, p, rng_state(input.device, seed, generator), mask)


def bias_act_dropout_front(apply, input, bias, p, activation, training, mask, seed, generator):
    """The same for bias_act_dropout around `apply(input, bias, p, activation, rng_state,
    mask)`, activation given as the operators' name ('none' for None)."""
    function = "bias_act_dropout"
    p = check_probability(p)
    check_dropout_input(input, function)
    check_bias(bias, input, function)
    activation = check_activation(activation)
    check_training(training, function)
    check_mask_mode(mask)
    input, bias = promote_fused(input, bias)
    if not training or p == 0.0:
        return apply(input, bias, 0.0, activation, no_rng_state(input.device), "recompute")
    return apply(input, bias, p, activation, rng_state(input.device, seed, generator), mask)


# ---- channel dropout ----------------------------------------------------------------

def channel_rank_rules(input: torch.Tensor, spatial: int, stacklevel: int) -> bool:
    """torch's rank rules for dropout{spatial}d (torch/nn/functional.py): returns whether
    input has a batch dimension; raises or warns with torch's messages. (TorchScript too.)"""
    name, dim = f"dropout{spatial}d", input.dim()
    if spatial == 1:
        if dim not in (2, 3):
            raise RuntimeError(
                f"dropout1d: Expected 2D or 3D input, but received a {dim}D input. "
                "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
                "spatial dimension, a channel dimension, and an optional batch dimension "
                "(i.e. 2D or 3D inputs).")
        return dim == 3
    batched_dims = (spatial + 1, spatial + 2)
    if dim not in batched_dims:
        warnings.warn(
            f"{name}: Received a {dim}-D input to {name}, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            f"and silence this warning, please use dropout instead. Note that {name} "
            f"exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. "
            f"{batched_dims[0]}D or {batched_dims[1]}D inputs).", stacklevel=stacklevel)
    if spatial == 2:
        # torch reads a 3-D input as batched 1-D channels (N, C, L), with a warning
        # (pytorch/pytorch#77081), and never adds a batch dimension.
        if dim == 3:
            warnings.warn(
                "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
                "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
                "is the channel dim. This behavior will change in a future release to interpret the "
                "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
                "channel-wise dropout behavior, please switch to using dropout1d instead.",
                stacklevel=stacklevel)
        return True
    return dim == 5


def channel_dropout_front(apply, input, p, training, inplace, mask, seed, generator, spatial):
    """Everything F.dropout1d/2d/3d do around the noise: checks, rank rules and warnings,
    the no-batch case, the identity cases, the RNG draw and in-place semantics.
    `apply(batched_input, p, rng_state)` returns the output of an input of at least 2
    dimensions, with one keep flag per (batch, channel)."""
    function = f"dropout{spatial}d"
    p = check_probability(p)
    check_dropout_input(input, function)
    check_training(training, function)
    check_mask_mode(mask)
    batched = channel_rank_rules(input, spatial, stacklevel=4)
    # As torch's feature dropout: the identity cases first, then p = 1 (zeros, with no
    # rank check), then at least 2 dimensions are needed.
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if inplace:
        check_inplace(input, function)
    x = input if batched else input.unsqueeze(0)
    if p == 1.0:
        check_seed(seed, generator)  # checked; nothing is drawn
        out = all_dropped(x)
    elif x.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    else:
        out = apply(x, p, rng_state(input.device, seed, generator))
    if not batched:
        out = out.squeeze(0)
    return input.copy_(out) if inplace else out
