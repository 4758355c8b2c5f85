"""Argument checking and RNG-state drawing, shared by the kernels' front end and the
reference, so both accept and reject exactly the same calls."""

import numbers

import torch

DROPOUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_MODES = ("bits", "bool", "recompute")

_UINT64 = 1 << 64


def check_probability(p, name="p"):
    """p as a float in [0, 1]; the error messages are torch's own."""
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
    if input.dtype not in DROPOUT_DTYPES:
        raise TypeError(f"{function}(): input must be float16, bfloat16, float32 or float64, "
                        f"but got {input.dtype}")


def check_mask_mode(mask):
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {', '.join(map(repr, MASK_MODES))}, but got {mask!r}")


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


def rng_state(device, seed=None, generator=None):
    """The (seed, offset) pair of the RNG contract as an int64 tensor on `device`.

    With `seed`, the pair is (seed, 0). Otherwise both words are drawn from `generator` or
    the device's default generator with a torch random op on that device: the draw stays
    on the device and inside a CUDA graph each replay draws anew, as native dropout does.
    """
    if seed is not None:
        if generator is not None:
            raise ValueError("give either seed or generator, not both")
        return torch.tensor([as_int64(seed, "seed"), 0], dtype=torch.int64, device=device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, but got {type(generator).__name__}")
    # Out of place (torch.compile traces randint, not random_); nearly the full int64 range.
    return torch.randint(-(1 << 63), (1 << 63) - 1, (2,), dtype=torch.int64, device=device,
                         generator=generator)


def dropout_front(apply, input, p, training, inplace, mask, seed, generator):
    """Everything F.dropout does around the kernel: checks, the identity cases, the RNG
    draw and in-place semantics. `apply(input, p, rng_state, mask)` returns the output."""
    p = check_probability(p)
    check_dropout_input(input)
    check_mask_mode(mask)
    if not training or p == 0.0:
        return input
    out = apply(input, p, rng_state(input.device, seed, generator), mask)
    return input.copy_(out) if inplace else out
