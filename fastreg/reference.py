"""fastreg in plain PyTorch: the correctness reference for every kernel, and the backend
when the compiled extension is missing (or FASTREG_BACKEND=reference).

The functions have the public API's signatures. Philox4x32-10 is written with int64
tensor ops (32-bit words held in int64, products split so nothing overflows), so the
reference runs on any device, draws nothing on the host and needs no synchronisation.
"""

from typing import List, Optional

import torch

from fastreg import _checks

# The front ends (checks, identity cases, the RNG draw) are the public functions' own, so
# that both backends accept and reject the same calls. (These modules import this one:
# fastreg/__init__.py imports it first, and they read its names only when called.)
from fastreg.channel import channel_dropout_front as _channel_dropout_front
from fastreg.dropout import dropout_front as _dropout_front
from fastreg.fused import bias_act_dropout_front as _bias_act_dropout_front
from fastreg.fused import bias_dropout_add_front as _bias_dropout_add_front
from fastreg.penalty import penalty_front as _penalty_front
from fastreg.penalty import penalty_grad_front as _penalty_grad_front
from fastreg.penalty import prox_front as _prox_front

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a, b):
    """(hi, lo) words of the 64-bit product of the constant a and the words b < 2**32."""
    t = a * (b & 0xFFFF)  # < 2**48
    u = a * (b >> 16) + (t >> 16)  # a * b == u * 2**16 + (t & 0xFFFF), u < 2**49
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 over int64 tensors (or ints) holding 32-bit words; returns 4 words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def keep_threshold(p):
    """The contract's t = floor(p * 2**32), computed in double as the kernels do."""
    return int(p * 4294967296.0)


def keep_flat(numel: int, p: float, rng_state: torch.Tensor) -> torch.Tensor:
    """The bool keep flags of elements 0 .. numel-1 (memory order) for the int64
    rng_state tensor (seed, offset)."""
    return torch.ops.fastreg_reference.keep_flat(numel, p, rng_state)


def _keep_flat_ops(numel: int, p: float, rng_state: torch.Tensor) -> torch.Tensor:
    device = rng_state.device
    if p >= 1.0:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    seed, offset = rng_state[0], rng_state[1]
    q = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32_10(
        q & _MASK32,
        q >> 32,
        offset & _MASK32,
        (offset >> 32) & _MASK32,
        seed & _MASK32,
        (seed >> 32) & _MASK32,
    )
    return torch.stack(words, dim=1).reshape(-1)[:numel] >= keep_threshold(p)


# Inductor would inline the ten Philox rounds into one pointwise expression whose
# lowering re-expands shared subexpressions: compiling a model on the reference backend
# then takes many minutes. As an operator the rounds stay opaque to the compiler
# (torch.compile(fullgraph=True) still traces through) and run as the eager ops above.
# Defined with torch.library.Library, not torch.library.custom_op: the output is bool (no
# gradient), and torch 2.4's custom_op wraps every operator in an autograd.Function
# without setup_context, which torch.func's transforms refuse (the recompute mode's
# backward under torch.func.grad failed there).
_LIB = torch.library.Library("fastreg_reference", "DEF")
_LIB.define("keep_flat(SymInt numel, float p, Tensor rng_state) -> Tensor")
_LIB.impl("keep_flat", _keep_flat_ops, "CompositeExplicitAutograd")


@torch.library.register_fake("fastreg_reference::keep_flat")
def _(numel, p, rng_state):
    return rng_state.new_empty((numel,), dtype=torch.bool)


def memory_order_view(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`flat`, given in the memory order of the dense tensor `like`, viewed with like's
    shape: element i of flat lands in like's i-th memory slot. (TorchScript too: the
    dimensions are sorted by decreasing stride, stably, by insertion.)"""
    strides = like.stride()
    order: List[int] = []
    for d in range(like.dim()):
        k = len(order)
        while k > 0 and strides[order[k - 1]] < strides[d]:
            k -= 1
        order.insert(k, d)
    inverse = [0] * len(order)
    for k in range(len(order)):
        inverse[order[k]] = k
    return flat.view([like.shape[d] for d in order]).permute(inverse)


def dropout_apply(
    input: torch.Tensor, p: float, rng_state: torch.Tensor, mask: str = "bits"
) -> torch.Tensor:
    """The dropout forward of the RNG contract for a drawn rng_state. `mask` only matters
    to the kernels' memory use; the reference keeps what autograd keeps. (TorchScript too.)"""
    layout = torch.empty_like(input)  # the output's layout: the input's, when dense
    keep = memory_order_view(keep_flat(input.numel(), p, rng_state), layout)
    opmath = torch.float64 if input.dtype == torch.float64 else torch.float32
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    out = torch.where(keep, input.to(opmath) * scale, 0.0).to(input.dtype)
    return out if out.stride() == layout.stride() else layout.copy_(out)


def dropout(input, p=0.5, training=True, inplace=False, *, mask="bits", seed=None, generator=None):
    """Reference of fastreg.dropout."""
    return _dropout_front(dropout_apply, input, p, training, inplace, mask, seed, generator)


def dropout_mask(shape, p, seed, offset=0, *, device=None):
    """Reference of fastreg.dropout_mask: the bool keep-mask (contiguous) of `shape`."""
    p = _checks.check_probability(p)
    shape = torch.Size(_checks.check_shape(shape, "dropout_mask"))
    state = torch.tensor(
        [_checks.as_int64(seed, "seed"), _checks.as_int64(offset, "offset")],
        dtype=torch.int64,
        device=device,
    )
    return keep_flat(shape.numel(), p, state).view(shape)


# ---- Penalty ----
# The value is accumulated in float64 and rounded once: the oracle the kernels are
# held to. The gradients and the in-place steps run one torch op per operation of the
# kernels' formula in the op-math type (float32, float64 for float64), rounded once
# to the tensor's dtype, so the kernels match them bit for bit (csrc/device/penalty_math.h).


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def penalty_result_dtype(tensors):
    """float32, or float64 when any tensor is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def penalty_value(tensors, l1s, l2s):
    """sum_i l1s[i] * sum|w_i| + l2s[i] * sum w_i**2 in float64, rounded once to the
    result dtype; a zero coefficient's term is left out. Not differentiable."""
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for tensor, l1, l2 in zip(tensors, l1s, l2s):
        x = tensor.detach().to(torch.float64)
        if l1:
            total = total + l1 * x.abs().sum()
        if l2:
            total = total + l2 * x.square().sum()
    return total.to(penalty_result_dtype(tensors))


def penalty_slope(w, l1, l2):
    """l1 * sign(w) + 2 * l2 * w in w's dtype (the op-math type), one rounding per op;
    a zero coefficient's term is left out."""
    if l1 and l2:
        return torch.sign(w) * l1 + w * (2.0 * l2)
    if l1:
        return torch.sign(w) * l1
    if l2:
        return w * (2.0 * l2)
    return torch.zeros_like(w)


def penalty_backward(grad_out, tensors, l1s, l2s):
    """The penalty's gradients: grad_out * slope(w) in the op-math type, rounded once to
    each tensor's dtype; zeros for a tensor whose coefficients are both zero."""
    grads = []
    for tensor, l1, l2 in zip(tensors, l1s, l2s):
        if not l1 and not l2:
            grads.append(torch.zeros_like(tensor))
            continue
        opmath = _opmath(tensor.dtype)
        slope = penalty_slope(tensor.to(opmath), l1, l2)
        grads.append((grad_out.to(opmath) * slope).to(tensor.dtype))
    return grads


class _PenaltyFunction(torch.autograd.Function):
    # forward and setup_context apart: the form torch.func's transforms accept
    @staticmethod
    def forward(l1s, l2s, *tensors):
        return penalty_value(tensors, l1s, l2s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        l1s, l2s, *tensors = inputs
        ctx.l1s, ctx.l2s = l1s, l2s
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads = [None] * len(tensors)
        computed = penalty_backward(
            grad_out,
            [tensors[i] for i in wanted],
            [ctx.l1s[i] for i in wanted],
            [ctx.l2s[i] for i in wanted],
        )
        for i, grad in zip(wanted, computed):
            grads[i] = grad
        return (None, None, *grads)


def penalty_apply(tensors, l1s, l2s):
    """The differentiable penalty of checked tensors with per-tensor coefficients."""
    return _PenaltyFunction.apply(list(l1s), list(l2s), *tensors)


def penalty_grad_apply(grads, tensors, l1s, l2s):
    """grads[i] += slope(tensors[i]) in place, in the op-math type, rounded once."""
    with torch.no_grad():
        for grad, tensor, l1, l2 in zip(grads, tensors, l1s, l2s):
            if tensor.numel() == 0 or (not l1 and not l2):
                continue
            opmath = _opmath(tensor.dtype)
            grad.copy_((grad.to(opmath) + penalty_slope(tensor.to(opmath), l1, l2)).to(grad.dtype))


def prox_l1_apply(tensors, thresholds):
    """w <- w - clamp(w, -t, t) in place (soft thresholding), in the op-math type."""
    with torch.no_grad():
        for tensor, threshold in zip(tensors, thresholds):
            if tensor.numel() == 0 or not threshold:
                continue
            w = tensor.to(_opmath(tensor.dtype))
            tensor.copy_((w - w.clamp(-threshold, threshold)).to(tensor.dtype))


def penalty(params, l1=None, l2=None, *, exclude=None):
    """Reference of fastreg.penalty."""
    return _penalty_front(penalty_apply, "penalty", params, exclude, l1, l2)


def l1_penalty(params, weight=1.0, *, exclude=None):
    """Reference of fastreg.l1_penalty."""
    weight = _checks.check_coefficient(weight, "weight", "l1_penalty")
    return _penalty_front(
        penalty_apply, "l1_penalty", params, exclude, weight, 0.0, group_keys=("l1",)
    )


def l2_penalty(params, weight=1.0, *, exclude=None):
    """Reference of fastreg.l2_penalty."""
    weight = _checks.check_coefficient(weight, "weight", "l2_penalty")
    return _penalty_front(
        penalty_apply, "l2_penalty", params, exclude, 0.0, weight, group_keys=("l2",)
    )


def penalty_grad_(params, l1=None, l2=None, *, exclude=None):
    """Reference of fastreg.penalty_grad_."""
    _penalty_grad_front(penalty_grad_apply, params, l1, l2, exclude)


def prox_l1_(params, threshold, *, exclude=None):
    """Reference of fastreg.prox_l1_."""
    _prox_front(prox_l1_apply, params, threshold, exclude)


# ---- the fused ops ----------------------------------------------------------------
#
# The element math of csrc/device/fused_math.h written with tensor ops in op-math (float32; float64
# for float64), in the same order, rounded once at the end. Where only +, *, comparisons
# and selections are involved (no activation, relu) the kernels match this bit for bit;
# erf, tanh and exp come from torch here and from each platform's libm in the kernels.

_SQRT1_2 = 0.70710678118654752440  # M_SQRT1_2
_INV_SQRT_2PI = 0.39894228040143267794  # M_2_SQRTPI * M_SQRT1_2 / 2
_SQRT_2_OVER_PI = 0.79788456080286535588  # M_SQRT2 * M_2_SQRTPI / 2
_KAPPA = 0.044715


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_scale(p: float) -> float:
    """1 / (1 - p) as a Python float (rounded to the op-math type by the tensor op)."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def activation_forward(z, activation):
    """act(z) for an op-math tensor z, torch's formulas (GeluKernel, SiLU) step by step."""
    if activation in (None, "none"):
        return z
    if activation == "relu":
        return torch.where(z <= 0, 0.0, z)
    if activation == "gelu":
        return z * 0.5 * (1 + torch.erf(z * _SQRT1_2))
    if activation == "gelu_tanh":
        z_cube = z * z * z
        inner = _SQRT_2_OVER_PI * (z + _KAPPA * z_cube)
        return 0.5 * z * (1 + torch.tanh(inner))
    if activation == "silu":
        return z / (1 + torch.exp(-z))
    raise ValueError(f"unknown activation {activation!r}")


def activation_backward(z, v, activation):
    """act'(z) * v, torch's backward formulas step by step."""
    if activation in (None, "none"):
        return v
    if activation == "relu":
        return torch.where(z <= 0, 0.0, v)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * _SQRT1_2))
        pdf = _INV_SQRT_2PI * torch.exp(z * z * -0.5)
        return v * (cdf + z * pdf)
    if activation == "gelu_tanh":
        z_sq = z * z
        z_cube = z_sq * z
        inner = _SQRT_2_OVER_PI * (z + _KAPPA * z_cube)
        tanh_inner = torch.tanh(inner)
        left = 0.5 * z
        right = 1 + tanh_inner
        left_derivative = 0.5 * right
        tanh_derivative = 1 - tanh_inner * tanh_inner
        inner_derivative = _SQRT_2_OVER_PI * (1 + (3 * _KAPPA) * z_sq)
        right_derivative = left * tanh_derivative * inner_derivative
        return v * (left_derivative + right_derivative)
    if activation == "silu":
        sigmoid = 1 / (1 + torch.exp(-z))
        return v * (sigmoid * (1 + z * (1 - sigmoid)))
    raise ValueError(f"unknown activation {activation!r}")


def keep_like(input, p, rng_state):
    """(keep, layout): the contract's keep flags of `input`'s output, whose layout is
    empty_like(input)'s; element i of the contract is the output's i-th memory slot."""
    layout = torch.empty_like(input)
    return memory_order_view(keep_flat(input.numel(), p, rng_state), layout), layout


def keep_from_mask(mask, mode, p, rng_state, like):
    """The keep flags a forward saved (`mask` in mode `mode`), viewed like `like`, a
    tensor with the forward output's shape and strides."""
    numel = like.numel()
    if mode == "bits":
        shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
        flat = ((mask.view(-1, 1) >> shifts) & 1).view(-1)[:numel].bool()
    elif mode == "bool":
        return mask  # laid out like the output already
    else:
        flat = keep_flat(numel, p, rng_state)
    return memory_order_view(flat, like)


def _biased(input, bias):
    """z = input + bias in op-math. The bias is expanded before its conversion, so that its
    gradient is the input gradient's values (rounded to the dtype) summed in op-math, as in
    the kernels and in the eager composition `input + bias`."""
    opmath = opmath_dtype(input.dtype)
    z = input.to(opmath)
    return z if bias is None else z + bias.expand(input.shape).to(opmath)


def _in_layout(out, layout):
    return out if out.stride() == layout.stride() else layout.copy_(out)


def bias_dropout_add_apply(input, bias, residual, p, rng_state, mask="bits"):
    """residual + dropout(input + bias) under the contract, for a drawn rng_state."""
    keep, layout = keep_like(input, p, rng_state)
    z = _biased(input, bias)
    out = residual.to(z.dtype) + torch.where(keep, z * dropout_scale(p), 0.0)
    return _in_layout(out.to(input.dtype), layout)


def bias_act_dropout_apply(input, bias, p, activation, rng_state, mask="bits"):
    """dropout(act(input + bias)) under the contract, for a drawn rng_state."""
    keep, layout = keep_like(input, p, rng_state)
    a = activation_forward(_biased(input, bias), activation)
    out = torch.where(keep, a * dropout_scale(p), 0.0)
    return _in_layout(out.to(input.dtype), layout)


def bias_act_dropout_backward(grad, input, bias, keep, p, activation, bias_grad=True):
    """(grad_input, grad_bias) of bias_act_dropout (of bias_dropout_add with activation
    None: input and bias are then not read) for the forward's keep flags: grad_input =
    keep ? act'(z) * (grad * scale) : 0 rounded to the dtype, grad_bias its sum over all but
    the last dimension in op-math, rounded once. Differentiable: the ops' double backward."""
    opmath = opmath_dtype(grad.dtype)
    v = grad.to(opmath) * dropout_scale(p)
    if activation not in (None, "none"):
        v = activation_backward(_biased(input, bias), v, activation)
    grad_input = torch.where(keep, v, 0.0).to(grad.dtype)
    grad_bias = None
    if bias_grad:
        dims = tuple(range(grad.dim() - 1))
        grad_bias = grad_input.to(opmath).sum(dims) if dims else grad_input.to(opmath)
        grad_bias = grad_bias.to(grad.dtype)
    return grad_input, grad_bias


def bias_dropout_add(
    input, bias, residual, p, training=True, *, mask="bits", seed=None, generator=None
):
    """Reference of fastreg.bias_dropout_add."""
    return _bias_dropout_add_front(
        bias_dropout_add_apply, input, bias, residual, p, training, mask, seed, generator
    )


def bias_act_dropout(
    input, bias, p, activation="gelu", training=True, *, mask="bits", seed=None, generator=None
):
    """Reference of fastreg.bias_act_dropout."""
    return _bias_act_dropout_front(
        bias_act_dropout_apply, input, bias, p, activation, training, mask, seed, generator
    )


# ---- channel dropout ----------------------------------------------------------------


def channel_dropout_apply(
    input: torch.Tensor, p: float, rng_state: torch.Tensor, keep: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Channel dropout of an input (N, C, *) for a drawn rng_state: channel (n, c) is kept
    iff element n * C + c of the contract is (the flags of dropout_mask((N, C), p, S, O)),
    kept channels scaled by 1 / (1 - p) in op-math and rounded once, dropped ones exactly 0.
    `keep`, when given, is that (N, C) bool mask (the kernels draw it). (TorchScript too.)"""
    n, c = input.shape[0], input.shape[1]
    if keep is None:
        keep = keep_flat(n * c, p, rng_state)
    keep = keep.view([n, c] + [1] * (input.dim() - 2))
    opmath = opmath_dtype(input.dtype)
    return torch.where(keep, input.to(opmath) * dropout_scale(p), 0.0).to(input.dtype)


def _channel_dropout(spatial):
    def function(
        input, p=0.5, training=True, inplace=False, *, mask="bits", seed=None, generator=None
    ):
        return _channel_dropout_front(
            lambda x, p_, state: channel_dropout_apply(x, p_, state),
            input,
            p,
            training,
            inplace,
            mask,
            seed,
            generator,
            spatial,
        )

    function.__name__ = function.__qualname__ = f"dropout{spatial}d"
    function.__doc__ = f"Reference of fastreg.dropout{spatial}d."
    return function


dropout1d = _channel_dropout(1)
dropout2d = _channel_dropout(2)
dropout3d = _channel_dropout(3)
