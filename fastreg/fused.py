"""Fused dropout variants: bias + dropout + residual add, bias + activation + dropout, and
channel dropout (Dropout1d/2d/3d), all under dropout's RNG contract
(docs/rng-contract.md) and mask modes."""

import torch
from torch import nn

from fastreg import _args, _ops, reference
from fastreg._modules import DropoutModule, channel_apply as _channel_apply


def _bias_dropout_add(input, bias, residual, p, rng_state, mask):
    if not _ops.has_kernels(input.device):
        return reference.bias_dropout_add_apply(input, bias, residual, p, rng_state, mask)
    return torch.ops.fastreg.bias_dropout_add_fwd(input, bias, residual, p, rng_state, mask)[0]


def _bias_act_dropout(input, bias, p, activation, rng_state, mask):
    if not _ops.has_kernels(input.device):
        return reference.bias_act_dropout_apply(input, bias, p, activation, rng_state, mask)
    return torch.ops.fastreg.bias_act_dropout_fwd(input, bias, p, activation, rng_state, mask)[0]


def bias_dropout_add(input, bias, residual, p, training=True, *, mask="bits", seed=None,
                     generator=None):
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
    return _args.bias_dropout_add_front(_bias_dropout_add, input, bias, residual, p, training,
                                        mask, seed, generator)


def bias_act_dropout(input, bias, p, activation="gelu", training=True, *, mask="bits",
                     seed=None, generator=None):
    """``dropout(act(input + bias), p, training)`` in one kernel, forward and backward
    (xformers' fused bias-activation-dropout).

    The contract and layout rules are those of :func:`bias_dropout_add`; per element, in
    float32 (float64 for float64 tensors) and rounded once::

        out = keep ? act(input + bias[j]) * scale : 0

    Args:
        input, bias, p, training, mask, seed, generator: as in :func:`bias_dropout_add`.
        activation: ``"relu"``, ``"gelu"`` (exact, erf: ``F.gelu(approximate="none")``),
            ``"gelu_tanh"`` (``F.gelu(approximate="tanh")``), ``"silu"`` or ``None`` (else
            ``ValueError``). The formulas are torch's, step by step.

    Besides the mask, backward keeps ``input`` and ``bias`` (the op's own inputs, no new
    memory) when there is an activation: its derivative needs ``act'(input + bias)``.
    With ``training=False`` (or p = 0) the result is ``act(input + bias)``.
    """
    return _args.bias_act_dropout_front(_bias_act_dropout, input, bias, p, activation, training,
                                        mask, seed, generator)


# ---- channel dropout ----------------------------------------------------------------

def _channel_doc(spatial):
    batched = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[spatial]
    return f"""Channel dropout, a drop-in for ``torch.nn.functional.dropout{spatial}d``: every
    channel of an input {batched} is zeroed with probability ``p`` as a whole, the others
    scaled by ``1 / (1 - p)``.

    Channel (n, c) is kept iff element ``n * C + c`` of the RNG contract is, i.e. the keep
    flags are ``dropout_mask((N, C), p, seed)`` for a given seed; kept values are computed
    in float32 (float64) and rounded once, dropped ones are exactly 0. Input ranks,
    no-batch inputs, warnings and errors follow torch's rules; ``inplace=True`` writes into
    the input. Backward keeps one flag per (batch, channel) whatever ``mask`` says (it is
    accepted for uniformity with :func:`fastreg.dropout`).
    """


def _channel_dropout(spatial):
    def function(input, p=0.5, training=True, inplace=False, *, mask="bits", seed=None,
                 generator=None):
        return _args.channel_dropout_front(_channel_apply, input, p, training, inplace, mask,
                                           seed, generator, spatial)
    function.__name__ = function.__qualname__ = f"dropout{spatial}d"
    function.__doc__ = _channel_doc(spatial)
    return function


dropout1d = _channel_dropout(1)
dropout2d = _channel_dropout(2)
dropout3d = _channel_dropout(3)


class Dropout1d(DropoutModule, nn.Dropout1d):
    """Drop-in for ``torch.nn.Dropout1d`` running :func:`fastreg.dropout1d`;
    ``Dropout1d(p=0.5, inplace=False, *, mask="bits", generator=None)``, ``mask`` and
    ``generator`` as in :class:`fastreg.Dropout`."""

    _function = staticmethod(dropout1d)
    _spatial = 1


class Dropout2d(DropoutModule, nn.Dropout2d):
    """Drop-in for ``torch.nn.Dropout2d`` running :func:`fastreg.dropout2d`;
    ``Dropout2d(p=0.5, inplace=False, *, mask="bits", generator=None)``, ``mask`` and
    ``generator`` as in :class:`fastreg.Dropout`."""

    _function = staticmethod(dropout2d)
    _spatial = 2


class Dropout3d(DropoutModule, nn.Dropout3d):
    """Drop-in for ``torch.nn.Dropout3d`` running :func:`fastreg.dropout3d`;
    ``Dropout3d(p=0.5, inplace=False, *, mask="bits", generator=None)``, ``mask`` and
    ``generator`` as in :class:`fastreg.Dropout`."""

    _function = staticmethod(dropout3d)
    _spatial = 3
