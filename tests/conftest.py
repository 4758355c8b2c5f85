import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastreg import _ops
from fastreg._ops import TORCH_VERSION  # noqa: F401  (major, minor), for the tests

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MASK_MODES = ["bits", "bool", "recompute"]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Tests of the kernels themselves (their operators, buffers, memory, agreement with the
# reference): they skip on the reference backend (FASTREG_BACKEND=reference).
requires_extension = pytest.mark.skipif(
    not _ops.HAVE_EXTENSION, reason="needs the compiled extension"
)


class OpLog(TorchDispatchMode):
    """The aten/fastreg operators run under it, by name (aten.copy_, fastreg.dropout_fwd)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def compiled_autograd_enable(compiler):
    """Compiled autograd's context manager: _enable, or enable in torch 2.4."""
    from torch._dynamo import compiled_autograd

    return (getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable)(compiler)


@pytest.fixture(autouse=True)
def _ieee_subnormals():
    """Subnormal floats as IEEE 754 has them, after every test: torch 2.4's inductor builds
    its CPU kernels with -ffast-math, and loading one sets flush-to-zero and
    denormals-are-zero for the whole process (hypothesis then refuses to draw subnormals)."""
    yield
    if not sys.float_info.min / 2 > 0:
        torch.set_flush_denormal(False)


# Hugging Face transformers, offline (the tests build models from configs), or a skip.
@pytest.fixture(scope="module")
def transformers():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # configs only: nothing may be downloaded
        module = pytest.importorskip("transformers")
        if not module.utils.is_torch_available():  # transformers 5 needs torch >= 2.6
            pytest.skip(f"transformers {module.__version__} disables torch {torch.__version__}")
        yield module


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


try:  # hypothesis: bounded runs; HYPOTHESIS_PROFILE=ci draws the same examples every run
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "default", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
    settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:
    pass
