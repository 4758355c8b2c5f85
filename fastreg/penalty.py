"""Public penalty API: L1/L2 weight penalties over a whole model in one fused pass, the
in-place gradient and proximal steps, and the nn.Module forms.

Definitions (Keras' L1L2, no 1/2 factor), for coefficients l1, l2 >= 0:

    penalty = sum over tensors w of  l1 * sum|w| + l2 * sum w**2
    grad    = (l1 * sign(w) + 2 * l2 * w) * incoming gradient,   sign(0) = 0

so l2 = weight_decay / 2 reproduces SGD's ``weight_decay``; AdamW's decoupled decay is
another thing (it does not go through the gradient).

``params``, wherever it appears, is one of

* an ``nn.Module``: its parameters that require grad, a tied (shared) parameter once,
  less those ruled out by ``exclude``. The selection is kept per module and made again
  only when the module's parameters change (replaced, added, removed, requires_grad,
  dtype, device or number of dimensions changed): an ``exclude`` callable is called
  when the selection is made, not on every call, so it must answer from its arguments
  alone (to select anew, pass another callable: a new ``exclude`` is a new selection);
* a tensor, or an iterable of tensors (``model.parameters()``), taken as given. An
  iterator is read once per call: a stored ``model.parameters()`` generator is used up
  by its first call, and a later call raises ValueError (it would be a silent zero);
  pass the module or a list;
* named parameters: a mapping of names to tensors (``dict(model.named_parameters())``)
  or ``(name, tensor)`` pairs (``model.named_parameters()``), taken as given less those
  a callable ``exclude`` rules out;
* optimizer-style groups ``[{"params": [...], "l1": ..., "l2": ...}, ...]``: a group's
  key named like a coefficient argument overrides it for that group (other keys, such
  as "lr" or "weight_decay", are ignored, so ``optimizer.param_groups`` can be passed).

``exclude`` (a Module, or a callable with named parameters): ``None``;
``"bias_and_norm"`` (Module only), which leaves out what Hugging Face's Trainer and timm
keep out of weight decay: every parameter of a normalization layer (BatchNorm*,
InstanceNorm*, SyncBatchNorm, LayerNorm, GroupNorm, RMSNorm, LocalResponseNorm, and any
module whose class name ends in "Norm", such as LlamaRMSNorm), and every parameter of at
most one dimension whose name ends in "bias"; or a callable ``exclude(name, param) ->
bool`` (True leaves the parameter out).

Coefficients: ``penalty``, ``penalty_grad_`` and ``Penalty`` need at least one of ``l1``
and ``l2`` (the one not given is 0; with groups, from the arguments or each group's
keys): with neither, the call raises TypeError rather than return a zero.
``l1_penalty(params)`` and ``l2_penalty(params)`` are the plain sums (weight 1.0), to be
scaled by a tensor. A coefficient is a real number or a 0-dim real tensor that does not
require grad (read with ``.item()`` on every call: a host synchronisation for a CUDA
tensor, a graph break under torch.compile; to vary a coefficient without either,
multiply the penalty by the tensor instead).

Tensors may mix float16, bfloat16, float32 and float64, be empty or non-contiguous, and
must share one device. They may be DTensors (FSDP2's ``fully_shard``, tensor parallelism)
placed by Shard or Replicate: the kernels run on the local shards. For the value, each
rank reduces its shards and the partial sums are all-reduced over the mesh dimensions
where they are sharded (a collective: every rank calls it with the same parameters); the
result is a plain tensor, the same on every rank, and each shard's gradient is exactly
the derivative with respect to that shard. The DTensors of one call share one mesh;
plain tensors among them count as replicated (each rank's own, counted once, as FSDP2's
unsharded parameters between forward and backward are). The in-place steps are
elementwise and work on any mix; a DTensor's gradient must be placed as the DTensor.
See docs/distributed.md. The value is accumulated in float32 (float64 for float64 tensors)
whatever the dtype, in a fixed order: the compiled kernels give the same bits from run to
run (on the CPU, for any number of threads). Gradients are formed in float32 (float64)
and rounded once to each tensor's dtype. Coefficients are plain floats that may change
from call to call; under ``torch.compile`` a new value means a recompilation (see
docs/penalty.md, "torch.compile and CUDA graphs").
"""

import weakref

import torch
from torch import nn

from fastreg import _checks, _distributed, _ops, _params, reference

_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def penalty_front(apply, function, params, exclude, l1, l2, group_keys=("l1", "l2")):
    """The value of a penalty through `apply(tensors, l1s, l2s)`; an empty selection
    gives a float32 zero (on the CPU: it has no device to take)."""
    coefficients = {
        "l1": _checks.check_optional_coefficient(l1, "l1", function),
        "l2": _checks.check_optional_coefficient(l2, "l2", function),
    }
    tensors, values, _ = _params.collect_params(
        function, params, coefficients, exclude, group_keys, one_mesh=True
    )
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    if _distributed.has_dtensors(tensors):
        return _distributed.penalty(apply, tensors, values["l1"], values["l2"])
    return apply(tensors, values["l1"], values["l2"])


def penalty_grad_front(apply, params, l1, l2, exclude):
    """fastreg.penalty_grad_ through `apply(grads, tensors, l1s, l2s)`: a tensor without
    a gradient gets a zero one first; tensors whose coefficients are both zero are left
    alone."""
    function = "penalty_grad_"
    coefficients = {
        "l1": _checks.check_optional_coefficient(l1, "l1", function),
        "l2": _checks.check_optional_coefficient(l2, "l2", function),
    }
    tensors, values, label = _params.collect_params(function, params, coefficients, exclude)
    keep = [i for i in range(len(tensors)) if values["l1"][i] or values["l2"][i]]
    for i in keep:
        grad = tensors[i].grad
        if grad is not None and grad.layout != torch.strided:
            raise TypeError(
                f"{function}(): the gradient of {label(i)} must be strided (dense), "
                f"but got {grad.layout}"
            )
    if not keep:
        return
    with torch.no_grad():
        grads = []
        for i in keep:
            if tensors[i].grad is None:
                tensors[i].grad = torch.zeros_like(tensors[i])
            grads.append(tensors[i].grad)
        tensors = [tensors[i] for i in keep]
        if _distributed.dtensor_type() is not None:  # elementwise: on the local shards
            grads = _distributed.local_grads(function, tensors, grads)
            tensors = [_distributed.local(tensor) for tensor in tensors]
        apply(grads, tensors, [values["l1"][i] for i in keep], [values["l2"][i] for i in keep])


def prox_front(apply, params, threshold, exclude):
    """fastreg.prox_l1_ through `apply(tensors, thresholds)`."""
    function = "prox_l1_"
    coefficients = {"threshold": _checks.check_coefficient(threshold, "threshold", function)}
    tensors, values, _ = _params.collect_params(function, params, coefficients, exclude)
    if tensors:
        with torch.no_grad():
            apply([_distributed.local(tensor) for tensor in tensors], values["threshold"])


def _penalty_apply(tensors, l1s, l2s):
    if _ops.has_kernels(tensors[0].device):
        return torch.ops.fastreg.penalty(tensors, l1s, l2s)
    return reference.penalty_apply(tensors, l1s, l2s)


def _compiles_list_writes():
    """Whether torch.compile can trace an operator that writes a Tensor[] argument
    (penalty_grad_, prox_l1_): torch 2.4's functionalization cannot (a
    BackendCompilerFailed); there, while compiling, they run as the reference's tensor ops
    (the same bits)."""
    if not _ops.HAVE_EXTENSION:
        return True
    try:
        from torch._higher_order_ops.auto_functionalize import can_auto_functionalize
    except ImportError:  # pragma: no cover - a torch that moved it
        return True
    return can_auto_functionalize(torch.ops.fastreg.prox_l1_.default)


_COMPILES_LIST_WRITES = _compiles_list_writes()


def _in_place_kernels(device):
    return _ops.has_kernels(device) and (_COMPILES_LIST_WRITES or not _is_compiling())


def _penalty_grad_apply(grads, tensors, l1s, l2s):
    if _in_place_kernels(tensors[0].device):
        torch.ops.fastreg.penalty_grad_(grads, tensors, l1s, l2s)
    else:
        reference.penalty_grad_apply(grads, tensors, l1s, l2s)


def _prox_l1_apply(tensors, thresholds):
    if _in_place_kernels(tensors[0].device):
        torch.ops.fastreg.prox_l1_(tensors, thresholds)
    else:
        reference.prox_l1_apply(tensors, thresholds)


# ---- The fast path ----
#
# The host work of a call: for a list or tuple of plain tensors, or a Module,
# with float coefficients, the per-tensor checks and the coefficient lists are made in
# C++ (csrc/ops/penalty_front.cpp), which calls the operator through the dispatcher; a
# Module's selection (requires_grad, tied parameters, exclude) is kept per module and
# rebuilt only when the module's key changes. The key (module_key) hashes the module
# tree as named_parameters() walks it: every module, the names and objects in its
# _parameters and _modules, and each parameter's requires_grad, dtype, device and number
# of dimensions; the classes, names and parameters it hashed are kept alive with the
# selection, so their addresses cannot be reused by other objects while it is cached
# (modules are not kept: see csrc/ops/penalty_front.cpp). Anything else (groups, named
# parameters, DTensors and other tensor subclasses, a TorchFunctionMode, a bad argument,
# torch.compile's tracing) takes the general path in fastreg/_params.py, which raises the
# errors with the argument's name. The two paths give the same bits: the same operator
# on the same tensors and coefficients.

_FAST = _ops._C if _ops.HAVE_EXTENSION and hasattr(_ops._C, "penalty_fast") else None


class _Selection:
    __slots__ = ("exclude", "key", "refs", "tensors")


# module -> its last _Selection. Weak keys: an entry goes with its module; it holds the
# module's parameters (no module) until then or a rebuild.
_SELECTIONS = weakref.WeakKeyDictionary()


def _module_tensors(function, module, exclude):
    """The tensors `penalty(module, exclude=exclude)` selects, from the cache while the
    module's key is unchanged; None when the module cannot be keyed."""
    entry = _SELECTIONS.get(module)
    if entry is not None and (entry.exclude is exclude or entry.exclude == exclude):
        if _FAST.module_key(module, None) == entry.key:
            return entry.tensors
    _params.check_exclude(exclude, module, function)
    refs = []
    key = _FAST.module_key(module, refs)
    if key is None:
        return None
    entry = _Selection()
    entry.exclude, entry.key = exclude, key
    entry.refs = refs  # classes, names and parameters: never a module (see module_key)
    entry.tensors = [p for _, p in _params.module_params(module, exclude)]
    _SELECTIONS[module] = entry
    return entry.tensors


def _fast_tensors(function, params, exclude):
    """The tensors of params for the C++ fast path, or None for the general path."""
    if _FAST is None or _is_compiling():
        return None
    kind = type(params)
    if kind is list or kind is tuple:
        return params if exclude is None else None
    if isinstance(params, nn.Module):
        return _module_tensors(function, params, exclude)
    return None


def penalty(params, l1=None, l2=None, *, exclude=None):
    """``l1 * sum|w| + l2 * sum w**2`` over all tensors of ``params``, in one pass.

    Args:
        params: an nn.Module, a tensor, an iterable of tensors, named parameters or
            parameter groups with their own "l1" and "l2" (see the module docstring).
        l1: the L1 coefficient, >= 0; 0 when only ``l2`` is given.
        l2: the L2 coefficient, >= 0 (no 1/2 factor: ``weight_decay / 2`` for SGD's); 0
            when only ``l1`` is given. Giving neither is a TypeError.
        exclude: ``None``, ``"bias_and_norm"`` or a callable ``(name, param) -> bool``;
            only when ``params`` is a Module (or named parameters, for a callable).

    Returns:
        A 0-dim (plain) tensor on the parameters' device, differentiable with respect
        to them (for DTensors: the same value on every rank; see the module docstring):
        float32, or float64 if any tensor is float64. An empty selection gives a float32
        zero on the CPU. A term whose coefficient is zero is left out (not multiplied by
        zero), so ``l1_penalty`` of an infinite weight is inf, not nan.

    Raises:
        TypeError: a non-tensor, or a tensor that is not float16, bfloat16, float32 or
            float64 (or not strided); a DTensor placed other than by Shard or Replicate
            (Partial); a coefficient that is not a real number (or 0-dim real tensor
            that does not require grad); neither ``l1`` nor ``l2`` given.
        ValueError: a negative, infinite or nan coefficient; an unknown ``exclude``, or
            ``exclude`` with params that is not a Module or named parameters; a group
            without "params"; an iterator that yields nothing (used up).
        RuntimeError: tensors on different devices; DTensors on different meshes.
    """
    if l1 is not None or l2 is not None:
        tensors = _fast_tensors("penalty", params, exclude)
        if tensors:
            value = _FAST.penalty_fast(
                tensors, 0.0 if l1 is None else l1, 0.0 if l2 is None else l2
            )
            if value is not None:
                return value
    return penalty_front(_penalty_apply, "penalty", params, exclude, l1, l2)


def l1_penalty(params, weight=1.0, *, exclude=None):
    """``weight * sum|w|`` over all tensors: ``penalty(params, l1=weight)``. A group's
    "l1" key overrides ``weight``."""
    tensors = _fast_tensors("l1_penalty", params, exclude)
    if tensors:
        value = _FAST.penalty_fast(tensors, weight, 0.0)
        if value is not None:
            return value
    weight = _checks.check_coefficient(weight, "weight", "l1_penalty")
    return penalty_front(
        _penalty_apply, "l1_penalty", params, exclude, weight, 0.0, group_keys=("l1",)
    )


def l2_penalty(params, weight=1.0, *, exclude=None):
    """``weight * sum w**2`` over all tensors: ``penalty(params, l2=weight)``. A group's
    "l2" key overrides ``weight``."""
    tensors = _fast_tensors("l2_penalty", params, exclude)
    if tensors:
        value = _FAST.penalty_fast(tensors, 0.0, weight)
        if value is not None:
            return value
    weight = _checks.check_coefficient(weight, "weight", "l2_penalty")
    return penalty_front(
        _penalty_apply, "l2_penalty", params, exclude, 0.0, weight, group_keys=("l2",)
    )


def penalty_grad_(params, l1=None, l2=None, *, exclude=None):
    """Adds the penalty's gradient ``l1 * sign(w) + 2 * l2 * w`` into each ``p.grad`` in
    place, outside autograd, in one multi-tensor pass.

    For training loops that keep the penalty out of the graph: call it between
    ``loss.backward()`` and ``optimizer.step()``. The sum is formed in the op-math type
    (float32, float64 for float64) and rounded once to the gradient's dtype. A tensor
    whose ``grad`` is None gets a zero gradient first; tensors whose coefficients are
    both zero are not touched. Same arguments and errors as :func:`penalty`.
    """
    if l1 is not None or l2 is not None:
        tensors = _fast_tensors("penalty_grad_", params, exclude)
        if tensors and _FAST.penalty_grad_fast(
            tensors, 0.0 if l1 is None else l1, 0.0 if l2 is None else l2
        ):
            return
    penalty_grad_front(_penalty_grad_apply, params, l1, l2, exclude)


def prox_l1_(params, threshold, *, exclude=None):
    """Soft thresholding in place, ``w <- sign(w) * max(|w| - threshold, 0)``: the
    proximal step of ``threshold * sum|w|``, in one multi-tensor pass.

    After ``optimizer.step()`` with learning rate ``lr``, ``prox_l1_(params, lr * l1)``
    is proximal gradient descent for the L1 penalty: weights within the threshold of
    zero become exactly +0 (the subgradient ``l1 * sign(w)`` makes them oscillate around
    zero instead). Computed in the op-math type, rounded once; nan stays nan. A group's
    "threshold" key overrides ``threshold``. Same errors as :func:`penalty`.
    """
    tensors = _fast_tensors("prox_l1_", params, exclude)
    if tensors and _FAST.prox_l1_fast(tensors, threshold):
        return
    prox_front(_prox_l1_apply, params, threshold, exclude)


class Penalty(nn.Module):
    """The penalty as a module: ``Penalty(l1, l2, exclude=...)(model)`` is
    ``penalty(model, l1, l2, exclude=...)``.

    ``l1``, ``l2`` and ``exclude`` are plain attributes: change them between steps
    (a schedule) without rebuilding anything. At least one of ``l1`` and ``l2`` must be
    given by the time it is called (TypeError otherwise, as for :func:`penalty`). The
    model's parameter selection is cached with the model (see the module docstring)
    and made again when its parameters change or ``exclude`` is another object. Calling
    it with parameter groups or a list of tensors works too (``exclude`` must then be
    None), and with named parameters (``exclude`` None or a callable).
    """

    def __init__(self, l1=None, l2=None, *, exclude=None):
        super().__init__()
        self.l1 = _checks.check_optional_coefficient(l1, "l1", type(self).__name__)
        self.l2 = _checks.check_optional_coefficient(l2, "l2", type(self).__name__)
        if exclude is not None:
            _params.check_exclude(exclude, nn.Module(), type(self).__name__)
        self.exclude = exclude

    # Not compiled by TorchScript (it takes a Module or an iterable of tensors, which
    # TorchScript cannot pass): a scripted model may hold a penalty module; calling it from
    # scripted code raises (docs/torchscript.md).
    @torch.jit.unused
    def forward(self, params):
        return penalty(params, self.l1, self.l2, exclude=self.exclude)

    def extra_repr(self):
        return f"l1={self.l1}, l2={self.l2}, exclude={self.exclude!r}"


class L1Penalty(Penalty):
    """``L1Penalty(weight)(model)`` is ``l1_penalty(model, weight)``."""

    def __init__(self, weight, *, exclude=None):
        super().__init__(
            l1=_checks.check_coefficient(weight, "weight", "L1Penalty"), exclude=exclude
        )

    @torch.jit.unused
    def forward(self, params):
        return l1_penalty(params, self.l1, exclude=self.exclude)


class L2Penalty(Penalty):
    """``L2Penalty(weight)(model)`` is ``l2_penalty(model, weight)``."""

    def __init__(self, weight, *, exclude=None):
        super().__init__(
            l2=_checks.check_coefficient(weight, "weight", "L2Penalty"), exclude=exclude
        )

    @torch.jit.unused
    def forward(self, params):
        return l2_penalty(params, self.l2, exclude=self.exclude)
