"""Dropout that keeps no dropped tensor for backward (docs/regenerate.md).

The op after a dropout (a Linear, a matmul) keeps the dropped tensor for its own backward:
a second full-size copy of the activation, besides the dropout's input that the layer
before keeps anyway. Inside :func:`regenerate_dropped` fastreg's dropout functions note on
their output what computes it again bit for bit (the dropout's input, p, the 16-byte
(seed, offset) pair, the mask mode), and saved-tensor hooks
(``torch.autograd.graph.saved_tensors_hooks``) replace that output, or any view of it,
wherever an op saves it, by a small record holding the input; the backward regenerates
the tensor with the same kernel when the consumer's backward reads it. Nothing needs to
know the consuming op.

Under ``torch.compile`` nothing is noted on tensors (the graph is traced, the partitioner
decides what is saved): the dropout's operator runs inside a selective-checkpoint region
whose policy is ``MUST_RECOMPUTE``, so that the partitioner recomputes it in the backward
graph from its input and the saved (seed, offset) rather than saving its output (the draw
itself stays ``MUST_SAVE``: fastreg/_rng.py).
"""

import threading
import weakref

import torch

from fastreg import _rng

_local = threading.local()
_ATTR = "_fastreg_regen"


# Contexts entered and not yet left in all threads, and whether there is one: Dynamo
# guards on a module global that traced code reads (a thread-local it reads unguarded,
# and a graph compiled outside the context ran unchanged inside it). So a graph traced
# while any thread is inside a context recomputes its dropouts: a cost, never a wrong
# gradient (the operator is a pure function of its inputs).
_ENTERED = 0
_ANY = False


def active():
    """Whether fastreg's dropout functions note how to regenerate their outputs (on this
    thread), or, while compiling, tag their operators MUST_RECOMPUTE."""
    if _rng.compiling():
        return _ANY
    return _local.__dict__.get("depth", 0) > 0


def _count(step):
    global _ENTERED, _ANY
    _ENTERED += step
    _ANY = _ENTERED > 0


class _Recipe:
    """fn(*tensors, *args) computes `out` again, bitwise: what `out` carries. The
    tensors are detached aliases (they share the version counters of the originals)."""

    __slots__ = ("fn", "tensors", "args", "versions", "out_version", "layout", "name")

    def __init__(self, out, fn, tensors, args, name):
        self.fn, self.args, self.name = fn, args, name
        self.tensors = tuple(t.detach() if t is not None else None for t in tensors)
        self.versions = tuple(t._version if t is not None else 0 for t in self.tensors)
        self.out_version = out._version
        self.layout = (out.shape, out.stride(), out.dtype)

    def inputs_unchanged(self):
        return all(t is None or t._version == v for t, v in zip(self.tensors, self.versions))

    def without_tensors(self):
        bare = _Recipe.__new__(_Recipe)
        for name in self.__slots__:
            setattr(bare, name, getattr(self, name))
        bare.tensors = None
        return bare

    def regenerate(self, tensors=None):
        """The output again, from the recipe's own tensors (their versions checked) or from
        `tensors` (what outer hooks gave back for them)."""
        if tensors is None:
            tensors = self.tensors
            if not self.inputs_unchanged():
                now = ", ".join(str(t._version) for t in tensors if t is not None)
                then = ", ".join(str(v) for t, v in zip(tensors, self.versions) if t is not None)
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified "
                    f"by an inplace operation: the input of fastreg's {self.name}, from which "
                    "the backward regenerates its output (fastreg.regenerate_dropped), is at "
                    f"version {now}; expected version {then} instead. Hint: do not modify a "
                    "dropout's input in place before the backward, or run that dropout "
                    "outside regenerate_dropped()."
                )
        with torch.no_grad():
            out = self.fn(*tensors, *self.args)
        shape, stride, dtype = self.layout
        if out.shape != shape or out.stride() != stride or out.dtype != dtype:
            raise RuntimeError(  # an internal error: never expected
                f"fastreg.regenerate_dropped: the regenerated output of {self.name} has shape "
                f"{tuple(out.shape)}, strides {out.stride()}, {out.dtype}; the forward's had "
                f"{tuple(shape)}, {stride}, {dtype}"
            )
        return out


def record(out, fn, tensors, args, name):
    """Notes on `out`, a fresh (non-view) tensor the caller has just computed as
    fn(*tensors, *args), how to compute it again, where regeneration is on and autograd
    records (a consumer may save `out` even when it does not require grad: a LoRA A
    projection saves its input for its weight's gradient). Returns `out`."""
    if active() and torch.is_grad_enabled() and not _rng.compiling():
        setattr(out, _ATTR, _Recipe(out, fn, tensors, args, name))
    return out


class _Packed:
    """What a consumer keeps instead of a fastreg dropout's output (or a view of it): the
    recipe (its tensors, or what the outer hooks made of them), the view's geometry, and
    a weak reference to the output with its version, to refuse an output modified in
    place after it was saved, as autograd does."""

    __slots__ = ("recipe", "inputs", "view", "output", "version")

    def __init__(self, recipe, inputs, view, output):
        self.recipe, self.inputs, self.view = recipe, inputs, view
        self.output, self.version = weakref.ref(output), output._version


def _modified(t, then):
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
        f"expected version {then} instead. Hint: inside fastreg.regenerate_dropped the "
        "saved tensors are checked by its hooks; find the operation with "
        "torch.autograd.set_detect_anomaly(True), or run it outside the context."
    )


class _Hooks:
    """The pack and unpack hooks of one regenerate_dropped context. `outer`: the
    saved-tensor hooks that were active when it was entered (torch.utils.checkpoint's,
    save_on_cpu, a memory probe), or None. Every tensor that is kept, the dropout's input
    in place of its output included, goes through the outer hooks, so that they still
    decide how it is kept; without them a kept tensor is kept with its version, and
    checked, since autograd does not check the tensors that hooks pack."""

    def __init__(self, outer):
        self.outer = outer

    def pack(self, t):
        base = t._base
        owner = t if base is None else base
        recipe = getattr(owner, _ATTR, None)
        if (
            recipe is None
            or owner._version != recipe.out_version
            or t.dtype != owner.dtype
            or not recipe.inputs_unchanged()
        ):
            # not a fastreg dropout's output, or it (or its input) was modified in place
            # since the dropout: the tensor itself is kept. (detached: a saved output must
            # not hold its own grad_fn, torch.autograd.graph.saved_tensors_hooks' rule)
            if self.outer is not None:
                return self.outer[0](t)
            return t.detach(), t._version
        view = None
        if base is not None:
            view = (t.shape, t.stride(), t.storage_offset() - owner.storage_offset())
        if self.outer is None:
            return _Packed(recipe, None, view, owner)
        # the outer hooks keep the inputs as they keep any tensor (a checkpoint region
        # recomputes them), and the recipe is not held: its tensors would stay alive
        inputs = tuple(None if x is None else self.outer[0](x) for x in recipe.tensors)
        return _Packed(recipe.without_tensors(), inputs, view, owner)

    def unpack(self, packed):
        if not isinstance(packed, _Packed):
            if self.outer is not None:
                return self.outer[1](packed)
            t, version = packed
            if t._version != version:
                raise _modified(t, version)
            return t
        output = packed.output()
        if output is not None and output._version != packed.version:
            raise _modified(output, packed.version)
        recipe = packed.recipe
        if packed.inputs is None:
            out = recipe.regenerate()
        else:
            inputs = tuple(None if x is None else self.outer[1](x) for x in packed.inputs)
            out = recipe.regenerate(inputs)
        if packed.view is not None:
            size, stride, offset = packed.view
            out = out.as_strided(size, stride, out.storage_offset() + offset)
        return out


def _top_hooks():
    """The saved-tensor hooks active now, or None (also where torch cannot tell)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)  # the argument: ignore_is_tracing
    except TypeError:  # a torch whose function takes none
        return top()


class regenerate_dropped:
    """Context manager: inside it, a tensor that fastreg's dropout returns is not kept for
    backward by the ops that use it; autograd keeps the dropout's input and the 16-byte
    (seed, offset) instead, and the backward regenerates the dropped tensor, bit for bit,
    when an op's backward needs it. See docs/regenerate.md.

    Covers :func:`fastreg.dropout`, :func:`fastreg.dropout1d`/``2d``/``3d``,
    :func:`fastreg.bias_act_dropout` and what runs them (:class:`fastreg.Dropout`,
    :class:`fastreg.DropoutMode`, ``replace_dropout``); not ``inplace=True`` (the input is
    then the output) and not :func:`fastreg.bias_dropout_add` (its output holds the
    residual). With ``mask="recompute"`` the dropout itself keeps nothing either, so
    dropout then costs no activation memory beyond the model without dropout; the price
    is one dropout pass in the backward per op that saved the output.

    Saved-tensor hooks already active when it is entered (a ``torch.utils.checkpoint``
    region's, ``save_on_cpu``) still see every tensor that is kept, the dropout's input
    in place of its output included (where torch cannot tell the active hooks, this
    context's hooks replace them while it is active). Under ``torch.compile`` the
    partitioner is told to recompute the dropout instead of saving its output (torch >=
    2.8; before, the output is kept).

    ``enabled=False`` makes it do nothing (a switch for a training loop)."""

    def __init__(self, enabled=True):
        if not isinstance(enabled, bool):
            raise TypeError(
                f"regenerate_dropped(): enabled must be a bool, but got {type(enabled).__name__}"
            )
        self.enabled = enabled
        self._entered = []

    def __enter__(self):
        hooks = False
        if self.enabled:
            hooks = None
            if not _rng.compiling():  # traced graphs keep what the partitioner decides
                pair = _Hooks(_top_hooks())
                hooks = torch.autograd.graph.saved_tensors_hooks(pair.pack, pair.unpack)
                hooks.__enter__()
            _local.depth = _local.__dict__.get("depth", 0) + 1
            _count(1)
        self._entered.append(hooks)
        return self

    def __exit__(self, *exc):
        hooks = self._entered.pop()
        if hooks is not False:
            _local.depth -= 1
            _count(-1)
            if hooks is not None:
                hooks.__exit__(*exc)
        return False


# ---- replace_dropout(..., regenerate=True): the context around the model's forward ----


class _ForwardHooks:
    """A forward pre-hook and an always-called forward hook on the model that run its
    forward in training mode inside a regenerate_dropped context; picklable (not a
    closure), so that the model keeps deep-copying and pickling."""

    def pre(self, module, args):
        context = regenerate_dropped(module.training)
        context.__enter__()
        stack = _local.__dict__.setdefault("forwards", [])
        stack.append(context)

    def post(self, module, args, output):
        stack = _local.__dict__.get("forwards")
        if stack:
            stack.pop().__exit__(None, None, None)


def regenerate_in_forward(model):
    hooks = _ForwardHooks()
    model.register_forward_pre_hook(hooks.pre)
    model.register_forward_hook(hooks.post, always_call=True)
    return model


# ---- torch.compile: the dropout's operator tagged MUST_RECOMPUTE ----------------------


def _must_recompute(ctx, op, *args, **kwargs):
    return torch.utils.checkpoint.CheckpointPolicy.MUST_RECOMPUTE


def _must_recompute_contexts():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_must_recompute)


def call_dropout(input, rng_state, apply, p, mask):
    return apply(input, p, rng_state, mask)


def call_channel(input, rng_state, apply, p):
    return apply(input, p, rng_state)


def call_bias_act(input, bias, rng_state, apply, p, activation, mask):
    return apply(input, bias, p, activation, rng_state, mask)


def regenerated(fn, tensors, args, name):
    """fn(*tensors, *args), noted for regeneration (eager) or run in a selective-checkpoint
    region that the partitioner must recompute (compiled), where regeneration is on."""
    if not active():
        return fn(*tensors, *args)
    if _rng.compiling():
        if _rng.memory_budget_refusal() is not None:
            # torch < 2.8: no selective checkpointing (2.4), or a partitioner seen to get
            # its tags wrong (2.5, 2.6; fastreg/_rng.py): the graph keeps the output
            return fn(*tensors, *args)
        return torch.utils.checkpoint.checkpoint(
            fn, *tensors, *args, use_reentrant=False, context_fn=_must_recompute_contexts
        )
    return record(fn(*tensors, *args), fn, tensors, args, name)
