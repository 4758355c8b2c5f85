"""The parameters a penalty call selects, and their coefficients: from a Module, a
tensor, an iterable of tensors, named parameters or optimizer-style groups."""

from collections.abc import Mapping

import torch

from fastreg import _distributed
from fastreg._checks import DROPOUT_DTYPES, check_coefficient

PENALTY_DTYPES = DROPOUT_DTYPES
EXCLUDE_RULES = ("bias_and_norm",)


def missing_coefficients(function, names, where=""):
    keys = " or ".join(names)
    return TypeError(
        f"{function}() needs a coefficient: give {keys}{where} (0.0 turns a "
        f"term off); a call without one would be a silent zero"
    )


def check_exclude(exclude, params, function, named=False):
    """`exclude` is None, a known rule or a callable, and params can be selected from by
    name: a Module, or (named=True) named parameters, which take a callable only."""
    if exclude is None:
        return
    if isinstance(exclude, str):
        if exclude not in EXCLUDE_RULES:
            raise ValueError(
                f"{function}(): exclude must be None, a callable or one of "
                f"{', '.join(map(repr, EXCLUDE_RULES))}, but got {exclude!r}"
            )
    elif not callable(exclude):
        raise TypeError(
            f"{function}(): exclude must be None, a str or a callable "
            f"(name, param) -> bool, but got {type(exclude).__name__}"
        )
    if isinstance(params, torch.nn.Module):
        return
    if not named:
        raise ValueError(
            f"{function}(): exclude selects parameters by name, so params must "
            f"be an nn.Module, but got {type(params).__name__}; named parameters "
            "(a dict of names to tensors, or model.named_parameters()) take a "
            "callable exclude too"
        )
    if isinstance(exclude, str):
        raise ValueError(
            f"{function}(): exclude={exclude!r} needs the nn.Module, to find its "
            "normalization layers, but got named parameters; pass the module, "
            "or a callable exclude(name, param)"
        )


def _is_pair(item):
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
    )


def _norm_types():
    types = [
        torch.nn.modules.batchnorm._NormBase,
        torch.nn.LayerNorm,
        torch.nn.GroupNorm,
        torch.nn.LocalResponseNorm,
    ]
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
            if name in norm_params or (
                param.dim() <= 1 and name.rsplit(".", 1)[-1].endswith("bias")
            ):
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
        return _collect_named(
            function, list(params.items()), coefficients, exclude, one_mesh, mapping=True
        )
    if isinstance(params, (torch.Tensor, Mapping)):
        items = [params]
    else:
        try:
            one_shot = iter(params) is params
            items = list(params)
        except TypeError:
            raise TypeError(
                f"{function}(): params must be an nn.Module, a tensor, an iterable "
                f"of tensors or of parameter groups, but got "
                f"{type(params).__name__}"
            ) from None
        if one_shot and not items:
            raise ValueError(
                f"{function}(): params is an iterator that yielded nothing: a "
                "generator such as model.parameters() is used up by the first "
                "call that reads it; pass the module itself, or a list "
                "(list(model.parameters())), to use it for every call"
            )
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
            raise TypeError(
                f"{function}(): params mixes parameter groups (dicts) and {type(group).__name__}"
            )
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
        raise missing_coefficients(
            function, list(coefficients), " (as arguments or as keys of the parameter groups)"
        )
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
            raise TypeError(
                f"{function}(): the names of named parameters must be str, but got "
                f"{type(name).__name__}"
            )
    hint = " (a dict without a 'params' key is read as names to tensors)" if mapping else ""
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{function}(): params[{name!r}] must be a Tensor, but got "
                f"{type(tensor).__name__}{hint}"
            )
    named = [
        (name, tensor) for name, tensor in items if exclude is None or not exclude(name, tensor)
    ]
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
            raise TypeError(
                f"{function}(): {label(i)} must be a Tensor, but got {type(tensor).__name__}"
            )
        if tensor.dtype not in PENALTY_DTYPES:
            raise TypeError(
                f"{function}(): {label(i)} must be float16, bfloat16, float32 or "
                f"float64, but got {tensor.dtype}"
            )
        if tensor.layout != torch.strided or tensor.is_nested:
            raise TypeError(
                f"{function}(): {label(i)} must be a strided (dense) tensor, but "
                f"got {'a nested tensor' if tensor.is_nested else tensor.layout}"
            )
        if tensor.device != device:
            raise RuntimeError(
                f"{function}(): all tensors must be on one device, but "
                f"{label(0)} is on {device} and {label(i)} on {tensor.device}"
            )
    _distributed.check(function, tensors, label, one_mesh)
