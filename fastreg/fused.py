"""Fused dropout variants, bias + dropout + residual add and bias + activation + dropout,
under dropout's RNG contract (docs/rng-contract.md) and mask modes: the functions and
their front ends (shared with the reference)."""

import torch

from fastreg import _checks, _ops, _regen, _rng, reference

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def check_activation(activation):
    """The activation's name for the operators: one of ACTIVATIONS, or 'none' for None."""
    if activation is None:
        return "none"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str or None, but got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {', '.join(map(repr, ACTIVATIONS))} or None, "
            f"but got {activation!r}"
        )
    return activation


def _check_like(value, name, input, function, shape, what):
    _checks.check_tensor(value, name, function)
    _checks.check_dropout_layout(value, name, function)
    if value.shape != shape:
        raise RuntimeError(
            f"{function}(): {name} must have shape {tuple(shape)} ({what}), "
            f"but got {tuple(value.shape)}"
        )
    if value.is_complex():
        raise TypeError(f"{function}(): {name} must be a real tensor, but got {value.dtype}")
    if value.device != input.device:
        raise RuntimeError(
            f"{function}(): {name} must be on input's device {input.device}, but is "
            f"on {value.device}"
        )


def check_bias(bias, input, function):
    """bias: None, or a real, strided vector of input's last dimension and device
    (RuntimeError)."""
    if bias is None:
        return
    if input.dim() == 0:
        _checks.check_tensor(bias, "bias", function)
        raise RuntimeError(
            f"{function}(): a bias needs an input with at least 1 dimension, "
            "but input is 0-dimensional"
        )
    _check_like(
        bias, "bias", input, function, torch.Size([input.shape[-1]]), "input's last dimension"
    )


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


def bias_dropout_add_front(apply, input, bias, residual, p, training, mask, seed, generator):
    """Checks, eval mode and the RNG draw of bias_dropout_add around
    `apply(input, bias, residual, p, rng_state, mask)`. With training=False or p = 0 the
    sum residual + (input + bias) is still computed by `apply` (p = 0, nothing kept)."""
    function = "bias_dropout_add"
    p = _checks.check_probability(p)
    _checks.check_dropout_input(input, function)
    check_bias(bias, input, function)
    check_residual(residual, input, function)
    _checks.check_training(training, function)
    _checks.check_mask_mode(mask)
    input, bias, residual = promote_fused(input, bias, residual)
    if not training or p == 0.0:
        return apply(input, bias, residual, 0.0, _rng.no_rng_state(input.device), "recompute")
    return apply(input, bias, residual, p, _rng.rng_state(input.device, seed, generator), mask)


def bias_act_dropout_front(apply, input, bias, p, activation, training, mask, seed, generator):
    """The same for bias_act_dropout around `apply(input, bias, p, activation, rng_state,
    mask)`, activation given as the operators' name ('none' for None)."""
    function = "bias_act_dropout"
    p = _checks.check_probability(p)
    _checks.check_dropout_input(input, function)
    check_bias(bias, input, function)
    activation = check_activation(activation)
    _checks.check_training(training, function)
    _checks.check_mask_mode(mask)
    input, bias = promote_fused(input, bias)
    if not training or p == 0.0:
        return apply(input, bias, 0.0, activation, _rng.no_rng_state(input.device), "recompute")
    state = _rng.rng_state(input.device, seed, generator)
    return _regen.regenerated(
        _regen.call_bias_act, (input, bias, state), (apply, p, activation, mask), function
    )


def _bias_dropout_add(input, bias, residual, p, rng_state, mask):
    if not _ops.has_kernels(input.device):
        return reference.bias_dropout_add_apply(input, bias, residual, p, rng_state, mask)
    return torch.ops.fastreg.bias_dropout_add_fwd(input, bias, residual, p, rng_state, mask)[0]


def _bias_act_dropout(input, bias, p, activation, rng_state, mask):
    if not _ops.has_kernels(input.device):
        return reference.bias_act_dropout_apply(input, bias, p, activation, rng_state, mask)
    return torch.ops.fastreg.bias_act_dropout_fwd(input, bias, p, activation, rng_state, mask)[0]


def bias_dropout_add(
    input, bias, residual, p, training=True, *, mask="bits", seed=None, generator=None
):
    """``residual + dropout(input + bias, p, training)`` in one kernel, forward and backward
    (Megatron-LM's and Apex's bias_dropout_add).

    Element i of the dropout contract is the output's i-th memory slot; the output has
    ``input``'s layout when ``input`` is dense (as :func:`fastreg.dropout`), and
    ``residual`` may have any layout. So for a contiguous ``input`` the dropped elements are
    exactly where ``dropout_mask(input.shape, p, seed)`` is False. Per element, in float32
    (float64 for float64 tensors) and rounded once to the dtype::

        out = residual + (keep ? (input + bias[j]) * scale : 0),   scale = 1 / (1 - p)

    where j is the element's index along the last dimension (its logical coordinate, whatever
    the layout: for a channels_last ``(N, C, H, W)`` input the bias runs over W). A dropped
    element contributes exactly 0, also where ``input + bias`` is NaN or infinite.

    Args:
        input: float16, bfloat16, float32 or float64 tensor, any layout (else ``TypeError``).
        bias: ``None`` or a vector of ``input.shape[-1]`` elements on ``input``'s device,
            broadcast over the last dimension (else ``RuntimeError``).
        residual: a tensor with ``input``'s shape and device (else ``RuntimeError``), any
            layout. Dtypes follow torch's type promotion, as the eager composition does: the
            tensors are cast to their promoted dtype (a float16/bfloat16 ``input`` from an
            autocast matmul with float32 ``bias`` and ``residual`` gives float32).
        p: probability of an element of ``input + bias`` to be zeroed, in [0, 1] (else
            ``ValueError``).
        training: apply dropout if True; else return ``residual + input + bias`` (still one
            kernel, one rounding).
        mask: what is kept for backward: ``"bits"`` (1 bit per element), ``"bool"`` (1 byte)
            or ``"recompute"`` (only the seed and offset). Backward needs nothing else: the
            gradient of ``residual`` is the incoming gradient, that of ``input`` is the mask
            rule applied to it, and that of ``bias`` its sum over all but the last dimension.
        seed: a 64-bit seed (offset 0); by default seed and offset are drawn from
            ``generator`` or the device's default generator.
        generator: a ``torch.Generator`` on ``input``'s device.

    The bias gradient is summed in float32 (float64) without atomics, deterministically.
    """
    return bias_dropout_add_front(
        _bias_dropout_add, input, bias, residual, p, training, mask, seed, generator
    )


def bias_act_dropout(
    input, bias, p, activation="gelu", training=True, *, mask="bits", seed=None, generator=None
):
    """``dropout(act(input + bias), p, training)`` in one kernel, forward and backward
    (xformers' fused bias-activation-dropout).

    The contract and layout rules are those of :func:`bias_dropout_add`; per element, in
    float32 (float64 for float64 tensors) and rounded once::

        out = keep ? act(input + bias[j]) * scale : 0

    ``input``, ``bias``, ``p``, ``training``, ``mask``, ``seed`` and ``generator`` are as in
    :func:`bias_dropout_add`.

    Args:
        activation: ``"relu"``, ``"gelu"`` (exact, erf: ``F.gelu(approximate="none")``),
            ``"gelu_tanh"`` (``F.gelu(approximate="tanh")``), ``"silu"`` or ``None`` (else
            ``ValueError``). The formulas are torch's, step by step.

    Besides the mask, backward keeps ``input`` and ``bias`` (the op's own inputs, no new
    memory) when there is an activation: its derivative needs ``act'(input + bias)``.
    With ``training=False`` (or p = 0) the result is ``act(input + bias)``.
    """
    return bias_act_dropout_front(
        _bias_act_dropout, input, bias, p, activation, training, mask, seed, generator
    )
