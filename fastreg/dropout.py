"""Dropout: the functional form and its front end (shared with the reference), the
nn.Dropout drop-in, the mask utility and replace_dropout."""

import torch
from torch import nn

from fastreg import _checks, _ops, _regen, _rng, channel, reference
from fastreg._modules import DropoutModule, all_dropped
from fastreg._modules import dropout_apply as _apply


class _DropoutInplace(torch.autograd.Function):
    """fastreg::dropout_fwd_ with autograd told of the mutation (mark_dirty): the custom op
    is mutable, which torch.library.register_autograd does not accept. (forward and
    setup_context apart: the form torch.func accepts.)"""

    @staticmethod
    def forward(input, p, rng_state, mode):
        mask = torch.ops.fastreg.dropout_fwd_(input, p, rng_state, mode)
        return input, mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, p, rng_state, mode = inputs
        mask = output[1]
        ctx.mark_dirty(input)
        ctx.mark_non_differentiable(mask)
        ctx.save_for_backward(mask, rng_state)
        ctx.p, ctx.mode, ctx.stride = p, mode, input.stride()

    @staticmethod
    def backward(ctx, grad, _grad_mask):
        mask, rng_state = ctx.saved_tensors
        grad = _ops.with_strides(grad, ctx.stride)
        return (
            torch.ops.fastreg.dropout_bwd(grad, mask, ctx.p, rng_state, ctx.mode),
            None,
            None,
            None,
        )


def _is_dense(t):
    """Non-overlapping and dense: the elements fill one block of memory, in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _apply_inplace(input, p, rng_state, mask):
    # A non-dense input (a strided view) cannot be its own output: its elements are not
    # one block of memory in the contract's order. The out-of-place kernel plus a copy.
    if not _ops.has_inplace_dropout(input.device) or not _is_dense(input):
        return input.copy_(_apply(input, p, rng_state, mask))
    if torch.is_grad_enabled() and input.requires_grad:
        if input._base is not None or _rng.compiling():
            # The copy path, as above, for a view: autograd lets a Function that modifies
            # a view in place return one tensor only, and _DropoutInplace returns the mask
            # too. And under torch.compile: Dynamo without pytorch/pytorch#184267 (torch
            # 2.11, for one) drops mark_dirty when the Function's output is discarded, as
            # `dropout(h, inplace=True)` used for its effect does, and gave a wrong
            # gradient silently; copy_ into an intermediate it traces correctly.
            return input.copy_(_apply(input, p, rng_state, mask))
        return _DropoutInplace.apply(input, p, rng_state, mask)[0]
    torch.ops.fastreg.dropout_fwd_(input, p, rng_state, mask)
    return input


def dropout_front(apply, input, p, training, inplace, mask, seed, generator, apply_=None):
    """Everything F.dropout does around the kernel: checks, the identity cases, the RNG
    draw and in-place semantics. `apply(input, p, rng_state, mask)` returns the output;
    `apply_`, when given, does the same into `input` for inplace=True (else the output is
    copied into `input`). p = 1 draws nothing and runs no kernel, as torch's
    (fastreg._modules.script_dropout is the same for TorchScript)."""
    p = _checks.check_probability(p)
    _checks.check_dropout_input(input)
    _checks.check_training(training, "dropout")
    _checks.check_mask_mode(mask)
    if not training or p == 0.0:
        return input
    if inplace:
        _checks.check_inplace(input, "dropout")
    if p == 1.0:
        _checks.check_seed(seed, generator)  # checked; nothing is drawn
        if inplace:
            return input.zero_()
        return all_dropped(input)
    state = _rng.rng_state(input.device, seed, generator)
    if inplace:
        if apply_ is not None:
            return apply_(input, p, state, mask)
        return input.copy_(apply(input, p, state, mask))
    return _regen.regenerated(_regen.call_dropout, (input, state), (apply, p, mask), "dropout")


def dropout(input, p=0.5, training=True, inplace=False, *, mask="bits", seed=None, generator=None):
    """Inverted dropout, a drop-in for ``torch.nn.functional.dropout``.

    Each element is zeroed with probability ``p`` and the others are scaled by
    ``1 / (1 - p)``, by one fused kernel that draws the keep-mask from Philox4x32-10
    (see docs/rng-contract.md).

    Args:
        input: a float16, bfloat16, float32 or float64 tensor, any layout.
        p: probability of an element to be zeroed, in [0, 1].
        training: apply dropout if True, else return ``input`` unchanged.
        inplace: write the result into ``input`` and return it. A dense input (any
            strides without gaps) is its own output: no temporary of its size; a strided
            view, or, while autograd records, a view that requires grad or any input that
            requires grad under torch.compile, goes through a temporary that is copied back.
        mask: what is kept for backward: ``"bits"`` (1 bit per element), ``"bool"``
            (1 byte per element, like native CUDA dropout) or ``"recompute"`` (only the
            seed and offset; backward regenerates the mask).
        seed: a 64-bit seed; the mask is then exactly ``dropout_mask(input.shape, p, seed)``
            laid out in the output's memory order. By default the seed and offset are drawn
            from ``generator`` or the device's default generator.
        generator: a ``torch.Generator`` on ``input``'s device.

    Dropped elements are exactly 0, also where ``input`` is NaN or infinite.
    """
    return dropout_front(
        _apply, input, p, training, inplace, mask, seed, generator, apply_=_apply_inplace
    )


def dropout_mask(shape, p, seed, offset=0, *, device=None):
    """The bool keep-mask (True = kept) that ``(seed, offset)`` gives for ``shape``:
    element i of the contiguous result is kept iff the contract keeps element i."""
    if not _ops.has_kernels(device or "cpu"):
        return reference.dropout_mask(shape, p, seed, offset, device=device)
    p = _checks.check_probability(p)
    shape = _checks.check_shape(shape, "dropout_mask")
    state = torch.tensor(
        [_checks.as_int64(seed, "seed"), _checks.as_int64(offset, "offset")],
        dtype=torch.int64,
        device=device,
    )
    return torch.ops.fastreg.dropout_mask(state, shape, p)


class Dropout(DropoutModule, nn.Dropout):
    """Drop-in for ``torch.nn.Dropout`` running :func:`fastreg.dropout`.

    Args:
        p: probability of an element to be zeroed. Default: 0.5
        inplace: do the operation in place. Default: False
        mask: what is kept for backward: ``"bits"`` (default), ``"bool"`` or
            ``"recompute"``; see :func:`fastreg.dropout`.
        generator: the ``torch.Generator`` (on the input's device) the masks are drawn
            from; None (default) draws from the device's default generator. A plain
            attribute, not in the state dict (which stays ``nn.Dropout``'s); ranks of a
            tensor-parallel group that must drop the same elements give their modules
            generators seeded alike (docs/distributed.md).
    """

    _function = staticmethod(dropout)


def replace_dropout(model, *, mask="bits", functional=False, regenerate=False):
    """Replaces every ``nn.Dropout``, ``nn.Dropout1d``, ``nn.Dropout2d`` and ``nn.Dropout3d``
    in ``model`` (in place) by :class:`fastreg.Dropout`, :class:`fastreg.Dropout1d`, ... with
    the same ``p``, ``inplace`` and training mode; returns ``model``, or the new module if
    ``model`` itself is one of them.

    Only dropout that runs as a module call is reached: attention dropout given as a float
    (``nn.MultiheadAttention``; Hugging Face's attention functions, which read the module's
    ``p``) stays torch's, unless ``functional=True``. See docs/dropout.md, "replace_dropout on
    real models".

    With ``functional=True`` the forward of every module of ``model`` also runs inside a
    :class:`fastreg.DropoutMode` (forward hooks), so that the model's calls of
    ``F.dropout``, ``F.dropout1d/2d/3d`` and ``torch.dropout`` run fastreg's dropout in mode
    ``mask`` too (docs/functional-routing.md).

    With ``regenerate=True`` the forward of ``model`` runs inside
    :func:`fastreg.regenerate_dropped` (forward hooks on ``model``, while it is in training
    mode): the ops after a dropout keep no dropped tensor for backward, the backward
    regenerates it. With ``mask="recompute"`` dropout then keeps no activation memory
    beyond the model without dropout (docs/regenerate.md)."""
    _checks.check_module(model, "model", "replace_dropout")
    _checks.check_mask_mode(mask)
    if not isinstance(functional, bool):
        raise TypeError(
            f"replace_dropout(): functional must be a bool, but got {type(functional).__name__}"
        )
    if not isinstance(regenerate, bool):
        raise TypeError(
            f"replace_dropout(): regenerate must be a bool, but got {type(regenerate).__name__}"
        )
    model = _swap_modules(model, mask)
    if functional:
        from fastreg.functional_mode import route_functional

        route_functional(model, mask)
    if regenerate:
        _regen.regenerate_in_forward(model)
    return model


def _swap_modules(model, mask):
    classes = {
        nn.Dropout: Dropout,
        nn.Dropout1d: channel.Dropout1d,
        nn.Dropout2d: channel.Dropout2d,
        nn.Dropout3d: channel.Dropout3d,
    }

    def swap(module):
        new = classes[type(module)](module.p, module.inplace, mask=mask)
        new.train(module.training)
        return new

    if type(model) in classes:
        return swap(model)
    for name, child in list(model.named_children()):
        if type(child) in classes:
            setattr(model, name, swap(child))
        else:
            _swap_modules(child, mask)
    return model
