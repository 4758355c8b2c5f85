"""fastreg in plain PyTorch: the correctness reference for every kernel, and the backend
when the compiled extension is missing (or FASTREG_BACKEND=reference).

The functions have the public API's signatures. Philox4x32-10 is written with int64
tensor ops (32-bit words held in int64, products split so nothing overflows), so the
reference runs on any device, draws nothing on the host and needs no synchronisation.
"""

import torch

from fastreg import _args

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a, b):
    """(hi, lo) words of the 64-bit product of the constant a and the words b < 2**32."""
    t = a * (b & 0xFFFF)                # < 2**48
    u = a * (b >> 16) + (t >> 16)       # a * b == u * 2**16 + (t & 0xFFFF), u < 2**49
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


def keep_flat(numel, p, rng_state):
    """The bool keep flags of elements 0 .. numel-1 (memory order) for the int64
    rng_state tensor (seed, offset)."""
    device = rng_state.device
    if p >= 1.0:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    seed, offset = rng_state[0], rng_state[1]
    q = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32_10(q & _MASK32, q >> 32, offset & _MASK32, (offset >> 32) & _MASK32,
                          seed & _MASK32, (seed >> 32) & _MASK32)
    return (torch.stack(words, dim=1).reshape(-1)[:numel] >= keep_threshold(p))


def memory_order_view(flat, like):
    """`flat`, given in the memory order of the dense tensor `like`, viewed with like's
    shape: element i of flat lands in like's i-th memory slot."""
    order = sorted(range(like.dim()), key=lambda d: like.stride(d), reverse=True)
    inverse = sorted(range(like.dim()), key=lambda k: order[k])
    return flat.view([like.shape[d] for d in order]).permute(inverse)


def dropout_apply(input, p, rng_state, mask="bits"):
    """The dropout forward of the RNG contract for a drawn rng_state. `mask` only matters
    to the kernels' memory use; the reference keeps what autograd keeps."""
    layout = torch.empty_like(input)  # the output's layout: the input's, when dense
    keep = memory_order_view(keep_flat(input.numel(), p, rng_state), layout)
    opmath = torch.float64 if input.dtype == torch.float64 else torch.float32
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    out = torch.where(keep, input.to(opmath) * scale, 0.0).to(input.dtype)
    return out if out.stride() == layout.stride() else layout.copy_(out)


def dropout(input, p=0.5, training=True, inplace=False, *, mask="bits", seed=None,
            generator=None):
    """Reference of fastreg.dropout."""
    return _args.dropout_front(dropout_apply, input, p, training, inplace, mask, seed, generator)


def dropout_mask(shape, p, seed, offset=0, *, device=None):
    """Reference of fastreg.dropout_mask: the bool keep-mask (contiguous) of `shape`."""
    p = _args.check_probability(p)
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    state = torch.tensor([_args.as_int64(seed, "seed"), _args.as_int64(offset, "offset")],
                         dtype=torch.int64, device=device)
    return keep_flat(shape.numel(), p, state).view(shape)


# ---- Penalty ----
# The value is accumulated in float64 and rounded once: the oracle the kernels are
# held to. The gradients and the in-place steps run one torch op per operation of the
# kernels' formula in the op-math type (float32, float64 for float64), rounded once
# to the tensor's dtype, so the kernels match them bit for bit (csrc/penalty.h).


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
    @staticmethod
    def forward(ctx, l1s, l2s, *tensors):
        ctx.l1s, ctx.l2s = l1s, l2s
        ctx.save_for_backward(*tensors)
        return penalty_value(tensors, l1s, l2s)

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads = [None] * len(tensors)
        computed = penalty_backward(grad_out, [tensors[i] for i in wanted],
                                    [ctx.l1s[i] for i in wanted], [ctx.l2s[i] for i in wanted])
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
            grad.copy_((grad.to(opmath) + penalty_slope(tensor.to(opmath), l1, l2))
                       .to(grad.dtype))


def prox_l1_apply(tensors, thresholds):
    """w <- w - clamp(w, -t, t) in place (soft thresholding), in the op-math type."""
    with torch.no_grad():
        for tensor, threshold in zip(tensors, thresholds):
            if tensor.numel() == 0 or not threshold:
                continue
            w = tensor.to(_opmath(tensor.dtype))
            tensor.copy_((w - w.clamp(-threshold, threshold)).to(tensor.dtype))


def penalty(params, l1=0.0, l2=0.0, *, exclude=None):
    """Reference of fastreg.penalty."""
    return _args.penalty_front(penalty_apply, "penalty", params, exclude, l1, l2)


def l1_penalty(params, weight=1.0, *, exclude=None):
    """Reference of fastreg.l1_penalty."""
    weight = _args.check_coefficient(weight, "weight", "l1_penalty")
    return _args.penalty_front(penalty_apply, "l1_penalty", params, exclude, weight, 0.0,
                               group_keys=("l1",))


def l2_penalty(params, weight=1.0, *, exclude=None):
    """Reference of fastreg.l2_penalty."""
    weight = _args.check_coefficient(weight, "weight", "l2_penalty")
    return _args.penalty_front(penalty_apply, "l2_penalty", params, exclude, 0.0, weight,
                               group_keys=("l2",))


def penalty_grad_(params, l1=0.0, l2=0.0, *, exclude=None):
    """Reference of fastreg.penalty_grad_."""
    _args.penalty_grad_front(penalty_grad_apply, params, l1, l2, exclude)


def prox_l1_(params, threshold, *, exclude=None):
    """Reference of fastreg.prox_l1_."""
    _args.prox_front(prox_l1_apply, params, threshold, exclude)
