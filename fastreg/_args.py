"""Argument checking and RNG-state drawing, shared by the kernels' front end and the
reference, so both accept and reject exactly the same calls."""

import numbers
import warnings

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


# ---- the fused ops ----------------------------------------------------------------

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def check_activation(activation):
    """The activation's name for the operators: one of ACTIVATIONS, or 'none' for None."""
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))} or None, "
                         f"but got {activation!r}")
    return activation


def _check_like(value, name, input, function, shape, what):
    check_tensor(value, name, function)
    if value.shape != shape:
        raise RuntimeError(f"{function}(): {name} must have shape {tuple(shape)} ({what}), "
                           f"but got {tuple(value.shape)}")
    if value.dtype != input.dtype:
        raise RuntimeError(f"{function}(): {name} must have input's dtype {input.dtype}, but got "
                           f"{value.dtype}")
    if value.device != input.device:
        raise RuntimeError(f"{function}(): {name} must be on input's device {input.device}, but is "
                           f"on {value.device}")


def check_bias(bias, input, function):
    """bias: None, or a vector of input's last dimension, dtype and device (RuntimeError)."""
    if bias is None:
        return
    if input.dim() == 0:
        check_tensor(bias, "bias", function)
        raise RuntimeError(f"{function}(): a bias needs an input with at least 1 dimension, "
                           "but input is 0-dimensional")
    _check_like(bias, "bias", input, function, torch.Size([input.shape[-1]]),
                "input's last dimension")


def check_residual(residual, input, function):
    """residual: input's shape, dtype and device (RuntimeError); any layout."""
    _check_like(residual, "residual", input, function, input.shape, "input's shape")


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
    check_mask_mode(mask)
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
    check_mask_mode(mask)
    if not training or p == 0.0:
        return apply(input, bias, 0.0, activation, no_rng_state(input.device), "recompute")
    return apply(input, bias, p, activation, rng_state(input.device, seed, generator), mask)


# ---- channel dropout ----------------------------------------------------------------

def _channel_rank_rules(input, spatial, stacklevel):
    """torch's rank rules for dropout{spatial}d (torch/nn/functional.py): returns whether
    input has a batch dimension; raises or warns with torch's messages."""
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
    check_mask_mode(mask)
    batched = _channel_rank_rules(input, spatial, stacklevel=4)
    # As torch's feature dropout: the identity cases first, then p = 1 (zeros, with no
    # rank check), then at least 2 dimensions are needed.
    if not training or p == 0.0 or input.numel() == 0:
        return input
    x = input if batched else input.unsqueeze(0)
    if p == 1.0:
        out = torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x, 0.0)
    elif x.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    else:
        out = apply(x, p, rng_state(input.device, seed, generator))
    if not batched:
        out = out.squeeze(0)
    return input.copy_(out) if inplace else out
