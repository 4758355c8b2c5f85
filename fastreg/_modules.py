"""The fastreg half of the nn.Dropout drop-ins (Dropout, Dropout1d/2d/3d), and the code
their forward runs under TorchScript.

Eager, the forward calls the public function (fastreg.dropout, dropout1d/2d/3d). Under
``torch.jit.script`` it runs ``script_dropout`` or ``script_channel_dropout`` below: the same
steps as fastreg/_args.py's fronts for arguments the module has already checked, through
the same kernels (``torch.ops.fastreg.*``) or the same reference code, with the (seed,
offset) pair drawn by the same ``torch.randint``. So after ``torch.manual_seed(s)`` a
scripted model draws the very masks of the eager one. TorchScript cannot see module
globals, so the backend is chosen here, at import, by choosing which functions exist.
"""

from typing import List, Optional

import torch

from fastreg import _args, _ops, reference


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
    def dropout_apply(input: torch.Tensor, p: float, rng_state: torch.Tensor,
                      mask: str) -> torch.Tensor:
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
    def dropout_apply(input: torch.Tensor, p: float, rng_state: torch.Tensor,
                      mask: str) -> torch.Tensor:
        """The dropout of a drawn rng_state (reference backend)."""
        return reference.dropout_apply(input, p, rng_state, mask)

    def channel_apply(input: torch.Tensor, p: float, rng_state: torch.Tensor) -> torch.Tensor:
        """Channel dropout of a batched input (N, C, *) (reference backend)."""
        return reference.channel_dropout_apply(input, p, rng_state, None)


# ---- TorchScript's forward ------------------------------------------------------------

def script_dropout(input: torch.Tensor, p: float, training: bool, inplace: bool, mask: str,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """_args.dropout_front with apply=dropout_apply, for a module's arguments (no seed)."""
    _args.check_probability_value(p)
    _args.check_dropout_layout(input, "input", "dropout")
    _args.check_dropout_dtype(input, "dropout")
    _args.check_mask_value(mask)
    if not training or p == 0.0:
        return input
    if inplace:
        _args.check_inplace_leaf(input, "dropout")  # a view of a leaf: copy_ raises
    if p == 1.0:
        out = _args.all_dropped(input)
    else:
        out = dropout_apply(input, p, _args.draw_rng_state(input.device, generator), mask)
    return input.copy_(out) if inplace else out


def script_channel_dropout(input: torch.Tensor, p: float, training: bool, inplace: bool,
                           mask: str, generator: Optional[torch.Generator],
                           spatial: int) -> torch.Tensor:
    """_args.channel_dropout_front with apply=channel_apply, for a module's arguments."""
    function = f"dropout{spatial}d"
    _args.check_probability_value(p)
    _args.check_dropout_layout(input, "input", function)
    _args.check_dropout_dtype(input, function)
    _args.check_mask_value(mask)
    batched = _args.channel_rank_rules(input, spatial, 2)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if inplace:
        _args.check_inplace_leaf(input, function)
    x = input if batched else input.unsqueeze(0)
    if p == 1.0:
        out = _args.all_dropped(x)
    elif x.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    else:
        out = channel_apply(x, p, _args.draw_rng_state(input.device, generator))
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
        super().__init__(_args.check_probability(p), inplace)  # also rejects NaN
        _args.check_mask_mode(mask)
        self.mask = mask
        self.generator = _args.check_generator(generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self._spatial == 0:
                return script_dropout(input, self.p, self.training, self.inplace, self.mask,
                                      self.generator)
            return script_channel_dropout(input, self.p, self.training, self.inplace,
                                          self.mask, self.generator, self._spatial)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input: torch.Tensor) -> torch.Tensor:
        return type(self)._function(input, self.p, self.training, self.inplace, mask=self.mask,
                                    generator=self.generator)

    def extra_repr(self):
        return f"{super().extra_repr()}, mask={self.mask!r}"
