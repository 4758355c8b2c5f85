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
