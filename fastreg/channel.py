"""Channel dropout, drop-ins for F.dropout1d/2d/3d and nn.Dropout1d/2d/3d: whole channels
zeroed under dropout's RNG contract (docs/rng-contract.md)."""

from torch import nn

from fastreg import _checks, _regen, _rng
from fastreg._modules import DropoutModule, all_dropped, channel_rank_rules
from fastreg._modules import channel_apply as _channel_apply


def channel_dropout_front(apply, input, p, training, inplace, mask, seed, generator, spatial):
    """Everything F.dropout1d/2d/3d do around the noise: checks, rank rules and warnings,
    the no-batch case, the identity cases, the RNG draw and in-place semantics.
    `apply(batched_input, p, rng_state)` returns the output of an input of at least 2
    dimensions, with one keep flag per (batch, channel)."""
    function = f"dropout{spatial}d"
    p = _checks.check_probability(p)
    _checks.check_dropout_input(input, function)
    _checks.check_training(training, function)
    _checks.check_mask_mode(mask)
    batched = channel_rank_rules(input, spatial, stacklevel=4)
    # As torch's feature dropout: the identity cases first, then p = 1 (zeros, with no
    # rank check), then at least 2 dimensions are needed.
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if inplace:
        _checks.check_inplace(input, function)
    x = input if batched else input.unsqueeze(0)
    if p == 1.0:
        _checks.check_seed(seed, generator)  # checked; nothing is drawn
        out = all_dropped(x)
    elif x.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    else:
        state = _rng.rng_state(input.device, seed, generator)
        if inplace:
            out = apply(x, p, state)
        else:  # the batched output, not a view of it, is what can be regenerated
            out = _regen.regenerated(_regen.call_channel, (x, state), (apply, p), function)
    if not batched:
        out = out.squeeze(0)
    return input.copy_(out) if inplace else out


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
    def function(
        input, p=0.5, training=True, inplace=False, *, mask="bits", seed=None, generator=None
    ):
        return channel_dropout_front(
            _channel_apply, input, p, training, inplace, mask, seed, generator, spatial
        )

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
