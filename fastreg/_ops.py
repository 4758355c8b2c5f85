"""Loading the compiled extension, choosing the backend, and the Python halves of the
operators: fake (meta) kernels and autograd formulas, registered with torch.library (the
formulas through register_autograd below, in a form torch.func accepts).

The operators themselves are declared in csrc/ops/schema.cpp. FASTREG_BACKEND=reference
skips the extension; FASTREG_BACKEND=cudasim loads the CUDA simulator instead (the CUDA
kernels, run on the CPU for CPU tensors: fastreg/_cudasim.py); otherwise a missing or
broken extension falls back to fastreg.reference with one warning.
"""

import importlib
import os
import warnings

import torch

from fastreg import _build

BACKEND_ENV = "FASTREG_BACKEND"
# (major, minor) of the running torch, for behaviour that differs by release
TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])


def _load_cached_build(error):
    """(module or None, why not): fastreg._C is not installed (`error`), so the kernels
    that `python -m fastreg build` compiled for this torch and these sources, from the
    cache (fastreg/_build.py); with FASTREG_BUILD_ON_IMPORT=1, built first if missing."""
    if isinstance(error, ModuleNotFoundError) and error.name == "fastreg._C":
        why = "the compiled extension fastreg._C is not installed"
    else:
        why = f"the compiled extension fastreg._C could not be loaded ({error})"
    try:
        path = _build.find_cached()
        if path is None and os.environ.get(_build.BUILD_ON_IMPORT_ENV, "0") == "1":
            path = _build.build_in_subprocess()
        if path is None:
            return None, f"{why} and no cached build for it was found in {_build.cache_root()}"
        return _build.import_module(path), None
    except (ImportError, OSError, RuntimeError) as cached_error:
        return None, f"{why}, nor the cached build ({cached_error})"


def _load_extension():
    """(module or None, why not)"""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "extension", "reference", "cudasim"):
        raise ValueError(
            f"{BACKEND_ENV} must be 'auto', 'extension', 'reference' or 'cudasim', "
            f"but got {choice!r}"
        )
    if choice == "reference":
        return None, f"{BACKEND_ENV}=reference"
    if choice == "cudasim":
        from fastreg import _cudasim

        return _cudasim.load(), None
    try:
        _C = importlib.import_module("fastreg._C")
    except (ImportError, OSError) as error:
        _C, why = _load_cached_build(error)
        if _C is None:
            if choice == "extension":
                raise ImportError(why) from error
            warnings.warn(
                f"fastreg: {why}; running torch {torch.__version__}. Falling back "
                "to the pure-PyTorch reference (slower, same results). Build the "
                f"kernels with `{_build.BUILD_COMMAND}`.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None, why
    if _C.built_with_torch.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"fastreg: extension built for torch {_C.built_with_torch}, running torch "
            f"{torch.__version__}; rebuild it if operators misbehave.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _C, None


_C, WHY_REFERENCE = _load_extension()
HAVE_EXTENSION = _C is not None
# "extension", "reference", or "cudasim" (the simulated CUDA kernels serve CPU tensors).
BACKEND = (
    "reference"
    if _C is None
    else "cudasim"
    if getattr(_C, "cuda_simulator", False)
    else "extension"
)


def has_kernels(device):
    """Whether compiled kernels serve tensors on `device` (else the reference does)."""
    if _C is None:
        return False
    kind = torch.device(device).type
    return kind in ("cpu", "meta") or (kind == "cuda" and _C.cuda_kernels)


def has_inplace_dropout(device):
    """Whether the in-place dropout operator (fastreg::dropout_fwd_) has a kernel for
    `device` (a build whose CUDA side predates it has none on CUDA)."""
    if not has_kernels(device):
        return False
    kind = torch.device(device).type
    if kind in ("cpu", "meta"):
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastreg::dropout_fwd_", kind.upper())


def with_strides(tensor, stride):
    """`tensor`, copied into the dense layout `stride` unless it has it already."""
    if tensor.stride() == tuple(stride):
        return tensor
    return torch.empty_strided(
        tensor.shape, stride, dtype=tensor.dtype, device=tensor.device
    ).copy_(tensor)


# The Python autograd formulas below (dropout_bwd's, grad_with_strides', the fused ops')
# are the operators' Autograd kernels through register_autograd, not torch.library's:
# the autograd.Function torch.library.register_autograd makes is refused by torch.func's
# transforms (pytorch/pytorch#168393), so torch.func.grad through a fused op, or of a
# dropout's gradient, failed. Inside an operator's Autograd kernel the transform has
# already reached the operator (its tensors are the transform's level's), so the formulas
# are applied there the way torch.func applies a Function at one level, as a
# _SingleLevelFunction allowed by enable_single_level_autograd_function: a node made at
# that level, as a C++ autograd kernel makes one. Both are private torch names (torch 2.0
# and later); without them, torch.library.register_autograd, as before.
try:
    from torch._functorch.utils import enable_single_level_autograd_function
    from torch.autograd.function import _SingleLevelFunction
except ImportError:  # pragma: no cover - torch without them
    _SingleLevelFunction = None

_AUTOGRAD_LIB = None  # the Library that holds the Autograd kernels (alive with the module)


def register_autograd(name, backward, setup_context):
    """fastreg::<name>'s autograd: `setup_context(ctx, inputs, output)` and `backward(ctx,
    *grads)` as for torch.library.register_autograd (tensor and scalar arguments only)."""
    global _AUTOGRAD_LIB
    if _SingleLevelFunction is None:
        torch.library.register_autograd(f"fastreg::{name}", backward, setup_context=setup_context)
        return
    op = getattr(torch.ops.fastreg, name).default

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def forward(*args):
        # apply() turns grad mode off; on again, as torch.func's own single-level forward
        # does, so that an outer torch.func.grad level records the operator too (without
        # it a second derivative through the output was silently zero)
        with torch.enable_grad():
            return below_autograd(*args)

    function = type(
        "".join(part.title() for part in name.split("_")),
        (_SingleLevelFunction,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            # compiled autograd's key for the node, as torch.autograd.Function gives it
            "_compiled_autograd_key": staticmethod(lambda ctx: (ctx._autograd_function_id,)),
        },
    )

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            with enable_single_level_autograd_function():
                return function.apply(*args)
        return below_autograd(*args)

    if _AUTOGRAD_LIB is None:
        _AUTOGRAD_LIB = torch.library.Library("fastreg", "IMPL")
    _AUTOGRAD_LIB.impl(name, autograd_kernel, "Autograd")


def _register_dropout():
    ops = torch.ops.fastreg

    @torch.library.register_fake("fastreg::dropout_fwd")
    def _(input, p, rng_state, mode):
        out = torch.empty_like(input)
        return out, fake_mask(out, mode)

    # In place: the input is the output; the mask has the layout that dropout_fwd's output
    # would have (the input's, when it is dense).
    @torch.library.register_fake("fastreg::dropout_fwd_")
    def _(input, p, rng_state, mask_mode):
        return fake_mask(torch.empty_like(input), mask_mode)

    @torch.library.register_fake("fastreg::dropout_bwd")
    def _(grad, mask, p, rng_state, mode):
        return torch.empty_like(grad)

    @torch.library.register_fake("fastreg::dropout_mask")
    def _(rng_state, size, p):
        return rng_state.new_empty(size, dtype=torch.bool)

    # dropout_fwd's autograd is in C++ (csrc/ops/dropout_autograd.cpp: register_autograd's
    # wrapper cost about 30 us a call). dropout_bwd's, the double backward, is here:
    # dropout_bwd is linear in grad with the same mask, so its backward is itself. It
    # keeps the mask, the rng_state and the output's strides; the gradient is given those
    # strides before the mask is applied, since mask bit i belongs to the i-th memory slot.
    def setup_bwd_context(ctx, inputs, output):
        grad, mask, p, rng_state, mode = inputs
        ctx.save_for_backward(mask, rng_state)
        ctx.p, ctx.mode, ctx.stride = p, mode, output.stride()

    def dropout_bwd_backward(ctx, grad_grad):
        mask, rng_state = ctx.saved_tensors
        grad = ops.dropout_bwd(
            with_strides(grad_grad, ctx.stride), mask, ctx.p, rng_state, ctx.mode
        )
        return grad, None, None, None, None

    register_autograd("dropout_bwd", dropout_bwd_backward, setup_bwd_context)

    # grad_with_strides (the C++ node's layout copy under compiled autograd) is a copy:
    # its gradient is the incoming one (create_graph through compiled autograd).
    def grad_with_strides_backward(ctx, grad):
        return grad, None

    register_autograd(
        "grad_with_strides", grad_with_strides_backward, lambda ctx, inputs, output: None
    )


def _register_penalty():
    @torch.library.register_fake("fastreg::penalty")
    def _(params, l1, l2):
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        return params[0].new_empty((), dtype=dtype)

    @torch.library.register_fake("fastreg::penalty_backward")
    def _(grad_out, params, l1, l2):
        return [torch.empty_like(p) for p in params]

    @torch.library.register_fake("fastreg::penalty_grad_")
    def _(grads, params, l1, l2):
        return None

    @torch.library.register_fake("fastreg::prox_l1_")
    def _(params, threshold):
        return None

    # The autograd of fastreg::penalty and of penalty_backward (the double backward) is
    # in C++ (csrc/ops/penalty_autograd.cpp): register_autograd's wrapper would flatten
    # the Tensor[] through pytree on every call, some microseconds per tensor, and
    # torch.func's transforms refuse the autograd.Function it makes.


def fake_mask(out, mode):
    """What a forward with output `out` keeps in mode `mode` (as the kernels allocate it)."""
    if mode == "bits":
        return out.new_empty(((out.numel() + 31) // 32,), dtype=torch.int32)
    if mode == "bool":
        return torch.empty_like(out, dtype=torch.bool)
    return out.new_empty((0,), dtype=torch.int32)


def _register_fused():
    from fastreg import reference

    ops = torch.ops.fastreg

    @torch.library.register_fake("fastreg::bias_dropout_add_fwd")
    def _(input, bias, residual, p, rng_state, mode):
        out = torch.empty_like(input)
        return out, fake_mask(out, mode)

    @torch.library.register_fake("fastreg::bias_act_dropout_fwd")
    def _(input, bias, p, activation, rng_state, mode):
        out = torch.empty_like(input)
        return out, fake_mask(out, mode)

    @torch.library.register_fake("fastreg::bias_act_dropout_bwd")
    def _(grad, input, bias, mask, p, activation, rng_state, mode, bias_grad):
        return torch.empty_like(grad), grad.new_empty((grad.shape[-1] if bias_grad else 0,))

    # Both forwards keep the mask (nothing in recompute mode), the rng_state and the
    # output's strides; bias_act_dropout also keeps its input and bias (op inputs, no new
    # memory), which an activation's derivative needs. Backward gives the gradient (and the
    # input) the output's strides, since mask bit i belongs to the output's i-th memory
    # slot, and runs bias_act_dropout_bwd: the input gradient and, in the same pass, the
    # bias gradient. With create_graph (double backward) the same formulas run as
    # differentiable tensor ops (reference.bias_act_dropout_backward) instead.
    def fused_backward(ctx, grad_out, need_input, need_bias):
        mask, rng_state, input, bias = ctx.saved_tensors
        grad = with_strides(grad_out, ctx.stride)
        if input is not None:
            input = with_strides(input, ctx.stride)
        if torch.is_grad_enabled():
            keep = reference.keep_from_mask(mask, ctx.mode, ctx.p, rng_state, grad)
            return reference.bias_act_dropout_backward(
                grad, input, bias, keep, ctx.p, ctx.activation, need_bias
            )
        return ops.bias_act_dropout_bwd(
            grad, input, bias, mask, ctx.p, ctx.activation, rng_state, ctx.mode, need_bias
        )

    def setup_fused_context(ctx, mask, rng_state, p, mode, out, input, bias, activation):
        keeps_input = activation != "none"
        ctx.save_for_backward(
            mask, rng_state, input if keeps_input else None, bias if keeps_input else None
        )
        ctx.p, ctx.mode, ctx.stride, ctx.activation = p, mode, out.stride(), activation

    def setup_bias_dropout_add(ctx, inputs, output):
        input, bias, residual, p, rng_state, mode = inputs
        setup_fused_context(ctx, output[1], rng_state, p, mode, output[0], input, bias, "none")

    def bias_dropout_add_backward(ctx, grad_out, _grad_mask):
        need_input, need_bias, need_residual = ctx.needs_input_grad[:3]
        grad_input = grad_bias = None
        if need_input or need_bias:
            grad_input, grad_bias = fused_backward(ctx, grad_out, need_input, need_bias)
        return (
            grad_input if need_input else None,
            grad_bias if need_bias else None,
            grad_out if need_residual else None,
            None,
            None,
            None,
        )

    def setup_bias_act_dropout(ctx, inputs, output):
        input, bias, p, activation, rng_state, mode = inputs
        setup_fused_context(ctx, output[1], rng_state, p, mode, output[0], input, bias, activation)

    def bias_act_dropout_backward(ctx, grad_out, _grad_mask):
        need_input, need_bias = ctx.needs_input_grad[:2]
        grad_input = grad_bias = None
        if need_input or need_bias:
            grad_input, grad_bias = fused_backward(ctx, grad_out, need_input, need_bias)
        return (
            grad_input if need_input else None,
            grad_bias if need_bias else None,
            None,
            None,
            None,
            None,
        )

    register_autograd("bias_dropout_add_fwd", bias_dropout_add_backward, setup_bias_dropout_add)
    register_autograd("bias_act_dropout_fwd", bias_act_dropout_backward, setup_bias_act_dropout)


if HAVE_EXTENSION:
    _register_dropout()
    _register_penalty()
    _register_fused()
