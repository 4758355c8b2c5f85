"""fastreg: fused dropout and L1/L2 penalties for PyTorch, in C++ and CUDA."""

import torch

from fastreg import _ops, reference
from fastreg._regen import regenerate_dropped
from fastreg.channel import Dropout1d, Dropout2d, Dropout3d, dropout1d, dropout2d, dropout3d
from fastreg.dropout import Dropout, dropout, dropout_mask, replace_dropout
from fastreg.functional_mode import DropoutMode
from fastreg.fused import bias_act_dropout, bias_dropout_add
from fastreg.penalty import (
    L1Penalty,
    L2Penalty,
    Penalty,
    l1_penalty,
    l2_penalty,
    penalty,
    penalty_grad_,
    prox_l1_,
)

__version__ = "0.1.0"


def info():
    """What runs: version, backend ("extension", "reference" or "cudasim", the CUDA
    simulator), kernels built, torch."""
    ext = _ops._C
    return {
        "version": __version__,
        "backend": _ops.BACKEND,
        "reason": _ops.WHY_REFERENCE,
        "cpu_kernels": ext is not None,
        "cuda_kernels": bool(ext is not None and ext.cuda_kernels),
        "built_with_torch": ext.built_with_torch if ext is not None else None,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = [
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutMode",
    "L1Penalty",
    "L2Penalty",
    "Penalty",
    "bias_act_dropout",
    "bias_dropout_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_mask",
    "info",
    "l1_penalty",
    "l2_penalty",
    "penalty",
    "penalty_grad_",
    "prox_l1_",
    "reference",
    "regenerate_dropped",
    "replace_dropout",
]
