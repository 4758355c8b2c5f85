"""Routing torch's functional dropout calls to fastreg with a TorchFunctionMode.

``torch.nn.functional.dropout`` (and ``dropout1d/2d/3d``, ``torch.dropout``,
``torch.dropout_``) consult the active ``torch.overrides.TorchFunctionMode`` before they
run; :class:`DropoutMode` answers those calls with :func:`fastreg.dropout` (or
``fastreg.dropout1d/2d/3d``) in its mask mode and hands every other call on unchanged.
Nothing of torch is patched: leaving the mode restores torch's behaviour, and
``torch.compile`` traces the mode like any other (no graph break).

See docs/functional-routing.md.
"""

import threading
import types as types_

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastreg import _checks, _ops

_local = threading.local()
_redispatch = getattr(torch.overrides, "redispatch_function", None)  # torch >= 2.14
# Dynamo in torch 2.5 traces entering a TorchFunctionMode but not the mode's handling of
# F.dropout: a mode entered inside a compiled function silently left torch's dropout in
# the graph. (2.4 breaks the graph there; 2.6 and later route the calls.)
_DYNAMO_DROPS_THE_MODE = (2, 5) <= _ops.TORCH_VERSION < (2, 6)


def _plain_type(cls):
    """A tensor type that keeps torch's __torch_function__ (Tensor, Parameter, ...)."""
    if cls in (torch.Tensor, torch.nn.Parameter):
        return True
    tf = getattr(cls, "__torch_function__", None)
    return getattr(tf, "__func__", tf) in (
        torch.Tensor.__torch_function__.__func__,
        torch._C._disabled_torch_function_impl,
    )


def _plain(tensor):
    """Whether fastreg may serve `tensor`: a Tensor (or Parameter, or a subclass that keeps
    torch's __torch_function__). A subclass with its own __torch_function__ is owed the call
    of torch's function, so it gets it (and torch's dropout)."""
    return isinstance(tensor, torch.Tensor) and _plain_type(type(tensor))


def _bind(names, defaults, args, kwargs):
    """The arguments of a call as a dict, by torch's signature `names` with `defaults`."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


_DROPOUT_ARGS = (
    ("input", "p", "training", "inplace"),
    {"p": 0.5, "training": True, "inplace": False},
)
_TORCH_DROPOUT_ARGS = (("input", "p", "train"), {})


def _handlers():
    from fastreg import channel
    from fastreg.dropout import dropout

    def functional(fn):
        def serve(mode, args, kwargs):
            a = _bind(*_DROPOUT_ARGS, args, kwargs)
            return fn(
                a["input"],
                a["p"],
                a["training"],
                a["inplace"],
                mask=mode.mask,
                generator=mode.generator,
            )

        return serve

    def torch_dropout(inplace):
        def serve(mode, args, kwargs):
            a = _bind(*_TORCH_DROPOUT_ARGS, args, kwargs)
            return dropout(
                a["input"], a["p"], a["train"], inplace, mask=mode.mask, generator=mode.generator
            )

        return serve

    return {
        F.dropout: functional(dropout),
        F.dropout1d: functional(channel.dropout1d),
        F.dropout2d: functional(channel.dropout2d),
        F.dropout3d: functional(channel.dropout3d),
        torch.dropout: torch_dropout(False),
        torch.dropout_: torch_dropout(True),
    }


_HANDLERS = {}

#: The calls :class:`DropoutMode` serves; every other call (``F.alpha_dropout``,
#: ``F.feature_alpha_dropout``, ``torch.feature_dropout``, ``torch.native_dropout``, the
#: ``dropout_p`` of ``F.scaled_dot_product_attention``) stays torch's.
ROUTED = (
    "torch.nn.functional.dropout",
    "torch.nn.functional.dropout1d",
    "torch.nn.functional.dropout2d",
    "torch.nn.functional.dropout3d",
    "torch.dropout",
    "torch.dropout_",
)


class DropoutMode(TorchFunctionMode):
    """While active, torch's functional dropout calls run fastreg's dropout.

    ``F.dropout``, ``F.dropout1d/2d/3d``, ``torch.dropout`` and ``torch.dropout_`` called on a
    tensor are answered by :func:`fastreg.dropout` (:func:`fastreg.dropout1d`, ...) with the
    same ``p``, ``training`` and ``inplace``, in mask mode ``mask``, drawing from
    ``generator`` (None: the device's default generator). ``training=False`` returns the input
    without a draw, as torch's does. Every other call goes on unchanged, to the modes below
    this one and to torch. Use it as a context manager around a forward or a training step::

        with fastreg.DropoutMode(mask="bits"):
            loss = model(x).sum()
        loss.backward()

    Args:
        mask: ``"bits"`` (default), ``"bool"`` or ``"recompute"``; see :func:`fastreg.dropout`.
        generator: a ``torch.Generator`` to draw from, or None.

    ``count`` is the number of calls served since the mode was made.
    """

    def __init__(self, mask="bits", generator=None):
        if _DYNAMO_DROPS_THE_MODE and torch.compiler.is_compiling():
            # a graph break (fullgraph=True: an error): the mode then runs eagerly
            raise RuntimeError(
                "DropoutMode: torch 2.5's Dynamo does not route the dropout "
                "calls of a mode entered inside a compiled function; enter it "
                "around the compiled call, or use torch >= 2.6"
            )
        super().__init__()
        _checks.check_mask_mode(mask)
        self.mask = mask
        self.generator = _checks.check_generator(generator)
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _HANDLERS:
            _HANDLERS.update(_handlers())
        serve = _HANDLERS.get(func)
        if serve is not None:
            input = args[0] if args else kwargs.get("input")
            if not _plain(input):
                return func(*args, **kwargs)
            self.count += 1
            return serve(self, args, kwargs)
        return self.redispatch(func, types, args, kwargs)

    def redispatch(self, func, types, args, kwargs):
        """Runs a call that this mode does not serve, inside this mode when it is a Python
        function (F.multi_head_attention_forward, ...): the dropout it calls is served too.
        torch < 2.14 has no way to do that (torch.overrides.redispatch_function): there the
        calls inside another overridable Python function stay torch's. So do those of a
        call given a tensor subclass with its own __torch_function__, which is owed the
        outer call."""
        if (
            _redispatch is not None
            and isinstance(func, types_.FunctionType)
            and getattr(func, "__module__", None) == "torch.nn.functional"
            and all(_plain_type(t) for t in types)
        ):
            with self:
                return _redispatch(func, types, args, kwargs)
        return func(*args, **kwargs)

    def __repr__(self):
        return f"DropoutMode(mask={self.mask!r})"


# ---- replace_dropout(..., functional=True): the mode around every module's forward ----


class _ForwardHooks:
    """Forward pre- and post-hooks that run a module's forward inside a DropoutMode; a
    picklable object (not a closure), so that a model keeps deep-copying and pickling.

    The hooks go on every module of the model, so that a submodule's forward re-run by
    activation checkpointing in the backward pass is covered as the forward was. A forward
    inside another's keeps the outer mode (one mode per thread at a time). A module in eval
    mode runs without one: it drops nothing, and torch's fast paths that any active
    TorchFunctionMode turns off (nn.TransformerEncoderLayer's, nn.MultiheadAttention's)
    stay on, so evaluation is bitwise the original model's."""

    def __init__(self, mask):
        self.mask = mask

    def pre(self, module, args):
        depth = getattr(_local, "depth", 0)
        if depth == 0:
            if not module.training:
                return
            mode = DropoutMode(self.mask)
            mode.__enter__()
            _local.mode = mode
        _local.depth = depth + 1

    def post(self, module, args, output):
        depth = getattr(_local, "depth", 0)
        if depth == 0:  # its pre-hook entered no mode (eval mode)
            return
        _local.depth = depth - 1
        if depth == 1:
            mode, _local.mode = _local.mode, None
            mode.__exit__(None, None, None)


def route_functional(model, mask):
    """Registers the hooks of :class:`_ForwardHooks` on every module of `model`."""
    hooks = _ForwardHooks(mask)
    for module in model.modules():
        module.register_forward_pre_hook(hooks.pre)
        module.register_forward_hook(hooks.post, always_call=True)
    return model
