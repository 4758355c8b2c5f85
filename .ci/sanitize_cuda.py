"""Every kernel family of fastreg, with small sizes, for compute-sanitizer's memcheck,
racecheck, initcheck and synccheck: `.ci/gpu-check sanitize` runs it on the GPU.

What it calls, for float16, bfloat16, float32 and float64:
* dropout forward and backward in every mask mode (bits, bool, recompute), on sizes
  that end mid-word and mid-block (1, 33, 1023, 4099, 100003 elements), on views that
  start off an alignment boundary (the scalar path), on a strided view, and in place;
  p = 0 and an evaluation call are left out (no kernel runs);
* the mask utility, with a partial last mask word, and channel dropout (dropout2d);
* bias_dropout_add (a residual of another layout) and bias_act_dropout in every mask
  mode, every activation and None, with a bias and without, forward and backward, at
  widths that do and do not divide the block;
* the penalty: its value and backward (penalty_backward), penalty_grad_ and prox_l1_
  over a list mixing empty, 1-element, odd-sized and large tensors.

Then it checks that every operator of torch.ops.fastreg with a kernel for the device was
called at least once (recorded below autograd by a TorchDispatchMode): an operator added
later without a call here makes the driver fail, so the sanitizers never miss a family.

`--device cpu` makes the same calls on the CPU kernels: CI runs it that way
(tests/test_gpu_check.py), so the driver is known to run before a GPU session spends time
on it. Exit status 0: every call ran and every operator was covered.
"""

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastreg

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("bits", "bool", "recompute")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", None)
SIZES = ((1, 0), (33, 1), (1023, 1), (4099, 3), (100_003, 0))  # (elements, view offset)
FUSED_SHAPES = ((1, 1), (7, 33), (64, 1024), (3, 4099))  # (rows, last dimension)


class Recorder(TorchDispatchMode):
    """Names of the fastreg operators that ran (overload packets: fastreg::dropout_fwd)."""

    def __init__(self):
        super().__init__()
        self.called = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("fastreg::"):
            self.called.add(name)
        return func(*args, **(kwargs or {}))


def fastreg_ops_with_kernels(device):
    """Every fastreg operator that has a kernel registered for the device's dispatch key."""
    key = "CUDA" if device == "cuda" else "CPU"
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastreg::")]
    return sorted(n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, key))


def dropout_calls(dev, dtype):
    for numel, start in SIZES:
        base = torch.randn(numel + start, device=dev, dtype=dtype)
        x = base[start:].requires_grad_()  # an offset view takes the unaligned path
        for mode in MODES:
            y = fastreg.dropout(x, 0.3, mask=mode)
            y.backward(torch.randn_like(y))
        strided = torch.randn(numel, 2, device=dev, dtype=dtype)[:, 0].requires_grad_()
        fastreg.dropout(strided, 0.5, mask="bits").sum().backward()
        with torch.no_grad():
            fastreg.dropout(base[start:].clone(), 0.3, inplace=True)
    img = torch.randn(3, 5, 7, 9, device=dev, dtype=dtype, requires_grad=True)
    fastreg.dropout2d(img, 0.4).sum().backward()


def fused_calls(dev, dtype):
    for rows, cols in FUSED_SHAPES:
        x = torch.randn(rows, cols, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(cols, device=dev, dtype=dtype, requires_grad=True)
        r = torch.randn(cols, rows, device=dev, dtype=dtype).t().requires_grad_()
        for mode in MODES:
            fastreg.bias_dropout_add(x, b, r, 0.3, mask=mode).sum().backward()
            fastreg.bias_act_dropout(x, b, 0.3, "gelu", mask=mode).sum().backward()
        for act in ACTIVATIONS:  # the activations differ in the math, not in the mask
            fastreg.bias_act_dropout(x, b, 0.3, act, mask="bits").sum().backward()
        fastreg.bias_dropout_add(x, None, r, 0.3).sum().backward()
        fastreg.bias_act_dropout(x, None, 0.3, "relu").sum().backward()


def penalty_calls(dev, dtype):
    params = [
        torch.randn(s, device=dev, dtype=dtype, requires_grad=True)
        for s in ((0,), (1,), (33, 7), (1025,), (300, 301))
    ]
    fastreg.penalty(params, l1=1e-3, l2=1e-2).backward()
    fastreg.penalty_grad_(params, l1=1e-3, l2=1e-2)
    with torch.no_grad():
        fastreg.prox_l1_(params, 1e-2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--dtypes",
        default=",".join(str(d).split(".")[1] for d in DTYPES),
        help="comma-separated subset of float16,bfloat16,float32,float64",
    )
    args = parser.parse_args(argv)
    info = fastreg.info()
    if not info["cuda_kernels" if args.device == "cuda" else "cpu_kernels"]:
        sys.exit(f"sanitize_cuda: fastreg has no {args.device} kernels here: {info}")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    dev = args.device
    torch.manual_seed(0)
    recorder = Recorder()
    with recorder:
        for dtype in dtypes:
            dropout_calls(dev, dtype)
            fused_calls(dev, dtype)
            penalty_calls(dev, dtype)
            print(f"sanitize_cuda: {dtype} done", flush=True)
        fastreg.dropout_mask((1 << 20) + 5, 0.5, 7, device=dev)
    if dev == "cuda":
        torch.cuda.synchronize()
    expected = fastreg_ops_with_kernels(dev)
    missed = sorted(set(expected) - recorder.called)
    print(
        f"sanitize_cuda: called {len(recorder.called)} fastreg operators on {dev}: "
        + ", ".join(sorted(recorder.called))
    )
    if not expected:
        sys.exit(f"sanitize_cuda: no fastreg operator has a {dev} kernel")
    if missed:
        sys.exit(
            f"sanitize_cuda: operators with a {dev} kernel that this driver never "
            f"called (add a call): {', '.join(missed)}"
        )
    print(f"sanitize_cuda: every kernel family ran ({len(expected)} operators)")


if __name__ == "__main__":
    main()
