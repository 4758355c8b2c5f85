"""Argument checks shared by every op and by the reference, so both backends accept and
reject exactly the same calls, with torch's error types and messages that name the
argument."""

import numbers

import torch

DROPOUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_MODES = ("bits", "bool", "recompute")

_UINT64 = 1 << 64


def check_probability(p, name="p"):
    """p as a float in [0, 1]; the error messages are torch's own. A 0-dim real tensor is
    read as its value, as F.dropout does (a graph break under torch.compile: the value
    decides the code path)."""
    if isinstance(p, torch.Tensor):
        if p.dim() != 0 or p.is_complex() or p.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a float or a 0-dim real tensor, but got a tensor "
                f"of shape {tuple(p.shape)} and dtype {p.dtype}"
            )
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float, but got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p


def check_tensor(value, name, function):
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{function}(): argument '{name}' must be Tensor, not {type(value).__name__}"
        )


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
    names = [
        (torch.int8, "torch.int8"),
        (torch.uint8, "torch.uint8"),
        (torch.int16, "torch.int16"),
        (torch.int32, "torch.int32"),
        (torch.int64, "torch.int64"),
        (torch.bool, "torch.bool"),
        (torch.complex64, "torch.complex64"),
        (torch.complex128, "torch.complex128"),
    ]
    for candidate, name in names:
        if dtype == candidate:
            return name
    return f"dtype {dtype}"


def check_dropout_layout(input: torch.Tensor, name: str, function: str) -> None:
    """A strided tensor. Nested tensors, which torch's dropout takes, are a feature not
    there (NotImplementedError); sparse layouts, which it refuses too, a TypeError."""
    if input.is_nested:
        raise NotImplementedError(
            f"{function}(): {name} is a nested tensor, which fastreg "
            "does not support (dropout its values tensor instead)"
        )
    if input.layout != torch.strided:
        got = str(input.layout)
        if torch.jit.is_scripting():  # TorchScript holds a layout as an int
            got = "a sparse layout"
        raise TypeError(f"{function}(): {name} must be a strided (dense) tensor, but got {got}")


def check_dropout_dtype(input: torch.Tensor, function: str) -> None:
    dtype = input.dtype
    if not (
        dtype == torch.float16
        or dtype == torch.bfloat16
        or dtype == torch.float32
        or dtype == torch.float64
    ):
        raise TypeError(
            f"{function}(): input must be float16, bfloat16, float32 or float64, "
            f"but got {dtype_name(dtype)}"
        )


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
        raise TypeError(
            f"{function}(): argument 'training' must be bool, not {type(training).__name__}"
        )


def check_inplace_leaf(input: torch.Tensor, function: str) -> None:
    """torch's rule for an in-place op on a leaf that requires grad (see check_inplace)."""
    if input.requires_grad and torch.is_grad_enabled() and input.is_leaf:
        raise RuntimeError(
            f"{function}(): a leaf Variable that requires grad is being used in an "
            "in-place operation (inplace=True on input)"
        )


def check_mask_mode(mask):
    if not isinstance(mask, str):
        raise TypeError(
            f"mask must be a str, one of {', '.join(map(repr, MASK_MODES))}, but got "
            f"{type(mask).__name__}"
        )
    if mask not in MASK_MODES:
        raise ValueError(
            f"mask must be one of {', '.join(map(repr, MASK_MODES))}, but got {mask!r}"
        )


def check_shape(shape, function):
    """A shape given as an int or a sequence of ints, as a list: TypeError for anything else,
    RuntimeError for a negative size (as torch.empty)."""
    sizes = [shape] if isinstance(shape, numbers.Integral) else shape
    try:
        sizes = list(sizes)
    except TypeError:
        sizes = None
    if (
        sizes is None
        or isinstance(shape, (str, bytes))
        or any(isinstance(size, bool) or not isinstance(size, numbers.Integral) for size in sizes)
    ):
        raise TypeError(
            f"{function}(): shape must be an int or a sequence of ints, but got {shape!r}"
        )
    sizes = [int(size) for size in sizes]
    if any(not 0 <= size < (1 << 63) for size in sizes):
        raise RuntimeError(f"{function}(): shape must have sizes in [0, 2**63), but got {sizes}")
    return sizes


def check_module(value, name, function):
    if not isinstance(value, torch.nn.Module):
        raise TypeError(
            f"{function}(): {name} must be an nn.Module, but got {type(value).__name__}"
        )


def check_inplace(input, function):
    """torch's rule for an in-place op under autograd, checked before the kernel runs so that
    the message names the argument (torch's own comes from the final copy_)."""
    if not (input.requires_grad and torch.is_grad_enabled()):
        return
    check_inplace_leaf(input, function)
    if input._base is not None and input._base.is_leaf:  # dynamo traces _base, not _is_view()
        raise RuntimeError(
            f"{function}(): a view of a leaf Variable that requires grad is being "
            "used in an in-place operation (inplace=True on input)"
        )


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


def check_coefficient(value, name, function):
    """A penalty coefficient or threshold as a float >= 0 (finite): a real number, or a
    0-dim real tensor that does not require grad (read with .item(), so a host
    synchronisation for a CUDA tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(
                f"{function}(): {name} must be a float or a 0-dim real tensor, but "
                f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        if value.requires_grad:
            raise TypeError(
                f"{function}(): {name} is a tensor that requires grad, but it is "
                "read as a float and would get no gradient: multiply the penalty "
                f"by it instead ({name} * fastreg.l1_penalty(params), say)"
            )
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{function}(): {name} must be a float, but got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):  # also rejects nan
        raise ValueError(
            f"{function}(): {name} must be a non-negative finite float, but got {value}"
        )
    return value


def check_optional_coefficient(value, name, function):
    """check_coefficient, or None for an argument not given."""
    return None if value is None else check_coefficient(value, name, function)
