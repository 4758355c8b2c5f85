"""The fastreg half of the nn.Dropout drop-ins (Dropout, Dropout1d/2d/3d), and the code
their forward runs under TorchScript, which the eager functions share: the choice of
kernels or reference per device, p = 1's output, channel dropout's rank rules.

Eager, the forward calls the public function (fastreg.dropout, dropout1d/2d/3d). Under
``torch.jit.script`` it runs ``script_dropout`` or ``script_channel_dropout`` below: the same
steps as the eager fronts (fastreg/dropout.py, fastreg/channel.py) for arguments the
module has already checked, through
the same kernels (``torch.ops.fastreg.*``) or the same reference code, with the (seed,
offset) pair drawn by the same ``torch.randint``. So after ``torch.manual_seed(s)`` a
scripted model draws the very masks of the eager one. TorchScript cannot see module
globals, so the backend is chosen here, at import, by choosing which functions exist.
"""

import warnings
from typing import List, Optional

import torch

from fastreg import _checks, _ops, _rng, reference

# ---- the kernels or the reference, per device (eager and TorchScript) ----------------


def _kernels_none(device: torch.device) -> bool:
    return False


def _kernels_cpu(device: torch.device) -> bool:
    return device.type == "cpu" or device.type == "meta"


def _kernels_cpu_cuda(device: torch.device) -> bool:
    return device.type == "cpu" or device.type == "meta" or device.type == "cuda"


if not _ops.HAVE_EXTENSION:
    has_kernels = _kernels_none
elif _ops._C.cuda_kernels:
    has_kernels = _kernels_cpu_cuda
else:
    has_kernels = _kernels_cpu

if _ops.HAVE_EXTENSION:

    def dropout_apply(
        input: torch.Tensor, p: float, rng_state: torch.Tensor, mask: str
    ) -> torch.Tensor:
        """The dropout of a drawn rng_state: the kernel where there is one, else the
        reference."""
        if has_kernels(input.device):
            return torch.ops.fastreg.dropout_fwd(input, p, rng_state, mask)[0]
        return reference.dropout_apply(input, p, rng_state, mask)

    def channel_apply(input: torch.Tensor, p: float, rng_state: torch.Tensor) -> torch.Tensor:
        """Channel dropout of a batched input (N, C, *) for a drawn rng_state; the kernel
        draws the (N, C) keep flags where there is one."""
        keep: Optional[torch.Tensor] = None
        if has_kernels(input.device):
            size: List[int] = [input.shape[0], input.shape[1]]
            keep = torch.ops.fastreg.dropout_mask(rng_state, size, p)
        return reference.channel_dropout_apply(input, p, rng_state, keep)
else:  # the reference backend: torch.ops.fastreg does not exist, TorchScript must not see it

    def dropout_apply(
        input: torch.Tensor, p: float, rng_state: torch.Tensor, mask: str
    ) -> torch.Tensor:
        """The dropout of a drawn rng_state (reference backend)."""
        return reference.dropout_apply(input, p, rng_state, mask)

    def channel_apply(input: torch.Tensor, p: float, rng_state: torch.Tensor) -> torch.Tensor:
        """Channel dropout of a batched input (N, C, *) (reference backend)."""
        return reference.channel_dropout_apply(input, p, rng_state, None)


# ---- p = 1, and channel dropout's rank rules (eager and TorchScript) -----------------


class _AllDropped(torch.autograd.Function):
    """zeros_like(input) (written, not read: as fast as a memset) with a zero gradient in
    the output's layout; nothing saved for backward."""

    @staticmethod
    def forward(ctx, input):
        out = torch.zeros_like(input)  # empty_like's layout: a kernel's output layout
        ctx.layout = out.shape, out.stride()
        return out

    @staticmethod
    def backward(ctx, grad):
        shape, stride = ctx.layout
        return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).zero_()


@torch.jit.unused
def _all_dropped_eager(input: torch.Tensor) -> torch.Tensor:
    return _AllDropped.apply(input)


def all_dropped(input: torch.Tensor) -> torch.Tensor:
    """The output of p = 1 without drawing anything or running a kernel: exactly +0
    everywhere (also where `input` is NaN or infinite), in the layout a kernel's output
    would have (empty_like's), connected to autograd with a zero gradient, as torch's
    p = 1; nothing is kept for backward, whatever the mask mode. (TorchScript, which has
    no autograd.Function, selects with torch.where, reading the input.)"""
    if not torch.jit.is_scripting():
        return _all_dropped_eager(input)
    out = torch.where(torch.zeros((), dtype=torch.bool, device=input.device), input, 0.0)
    if out.stride() == input.stride():  # a dense input: empty_like keeps its strides
        return out
    layout = torch.empty_like(input)
    return out if out.stride() == layout.stride() else layout.copy_(out)


def channel_rank_rules(input: torch.Tensor, spatial: int, stacklevel: int) -> bool:
    """torch's rank rules for dropout{spatial}d (torch/nn/functional.py): returns whether
    input has a batch dimension; raises or warns with torch's messages. (TorchScript too.)"""
    name, dim = f"dropout{spatial}d", input.dim()
    if spatial == 1:
        if dim not in (2, 3):
            raise RuntimeError(
                f"dropout1d: Expected 2D or 3D input, but received a {dim}D input. "
                "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
                "spatial dimension, a channel dimension, and an optional batch dimension "
                "(i.e. 2D or 3D inputs)."
            )
        return dim == 3
    batched_dims = (spatial + 1, spatial + 2)
    if dim not in batched_dims:
        warnings.warn(
            f"{name}: Received a {dim}-D input to {name}, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            f"and silence this warning, please use dropout instead. Note that {name} "
            f"exists to provide channel-wise dropout on inputs with {spatial} spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. "
            f"{batched_dims[0]}D or {batched_dims[1]}D inputs).",
            stacklevel=stacklevel,
        )
    if spatial == 2:
        # torch reads a 3-D input as batched 1-D channels (N, C, L), with a warning
        # (pytorch/pytorch#77081), and never adds a batch dimension.
        if dim == 3:
            warnings.warn(
                "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
                "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
                "is the channel dim. This behavior will change in a future release to interpret "
                "the "
                "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
                "channel-wise dropout behavior, please switch to using dropout1d instead.",
                stacklevel=stacklevel,
            )
        return True
    return dim == 5


# ---- TorchScript's forward ------------------------------------------------------------


def script_dropout(
    input: torch.Tensor,
    p: float,
    training: bool,
    inplace: bool,
    mask: str,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """fastreg.dropout.dropout_front with apply=dropout_apply, for a module's arguments (no
    seed)."""
    _checks.check_probability_value(p)
    _checks.check_dropout_layout(input, "input", "dropout")
    _checks.check_dropout_dtype(input, "dropout")
    _checks.check_mask_value(mask)
    if not training or p == 0.0:
        return input
    if inplace:
        _checks.check_inplace_leaf(input, "dropout")  # a view of a leaf: copy_ raises
    if p == 1.0:
        out = all_dropped(input)
    else:
        out = dropout_apply(input, p, _rng.draw_rng_state(input.device, generator), mask)
    return input.copy_(out) if inplace else out


def script_channel_dropout(
    input: torch.Tensor,
    p: float,
    training: bool,
    inplace: bool,
    mask: str,
    generator: Optional[torch.Generator],
    spatial: int,
) -> torch.Tensor:
    """fastreg.channel.channel_dropout_front with apply=channel_apply, for a module's arguments."""
    function = f"dropout{spatial}d"
    _checks.check_probability_value(p)
    _checks.check_dropout_layout(input, "input", function)
    _checks.check_dropout_dtype(input, function)
    _checks.check_mask_value(mask)
    batched = channel_rank_rules(input, spatial, 2)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if inplace:
        _checks.check_inplace_leaf(input, function)
    x = input if batched else input.unsqueeze(0)
    if p == 1.0:
        out = all_dropped(x)
    elif x.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    else:
        out = channel_apply(x, p, _rng.draw_rng_state(input.device, generator))
    if not batched:
        out = out.squeeze(0)
    return input.copy_(out) if inplace else out


# ---- the mixin ------------------------------------------------------------------------


class DropoutModule:
    """Mixed in before nn.Dropout or nn.Dropout1d/2d/3d, whose p and inplace it keeps: the
    mask mode and the generator (plain attributes, so the state dict stays torch's), and a
    forward through the class's functional form, ``_function`` (``_spatial`` = 0 for
    element dropout, 1, 2 or 3 for channel dropout, for TorchScript's forward)."""

    _function = None
    _spatial = 0
    __constants__ = ["p", "inplace", "_spatial"]  # nn.Dropout's, and ours

    def __init__(self, p=0.5, inplace=False, *, mask="bits", generator=None):
        super().__init__(_checks.check_probability(p), inplace)  # also rejects NaN
        _checks.check_mask_mode(mask)
        self.mask = mask
        self.generator = _checks.check_generator(generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self._spatial == 0:
                return script_dropout(
                    input, self.p, self.training, self.inplace, self.mask, self.generator
                )
            return script_channel_dropout(
                input, self.p, self.training, self.inplace, self.mask, self.generator, self._spatial
            )
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        return type(self)._function(
            input, self.p, self.training, self.inplace, mask=self.mask, generator=self.generator
        )

    def extra_repr(self):
        return f"{super().extra_repr()}, mask={self.mask!r}"
