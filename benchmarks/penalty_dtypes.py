"""The penalty's CPU kernels in float16 against bfloat16 (the target: float16 as fast as
bfloat16 in every CPU kernel): the same op on the same shapes in both dtypes, one torch
thread, the two dtypes interleaved by the bench's timer (fastreg.bench.Timer.interleaved:
one block of `--calls` calls each per round, the order rotated from round to round).

    PYTHONPATH=. python benchmarks/penalty_dtypes.py [--rounds 9] [--calls 5]

Each row gives, per dtype, the median over rounds of the mean time of one call within a
round, and the median over rounds of the per-round ratio float16 / bfloat16 with the
interquartile range of those ratios (fastreg.bench.ratio_summary). Cases, on 100 tensors
of (256, 256) (6.6M elements) unless said:

  penalty             fastreg.penalty(params, l1=, l2=) under no_grad (the value)
  penalty 2^22        the same on one tensor of 2^22 elements
  penalty backward    penalty(...).backward() on parameters that require grad
  penalty_grad_       fastreg.penalty_grad_(params, l1=, l2=), gradients present
  prox_l1_            fastreg.prox_l1_(params, t) with a t that zeroes nothing
"""

import argparse
import os
import statistics
import sys

import torch

import fastreg
from fastreg import bench


def make_cases(dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(256, 256, generator=gen).to(dtype) for _ in range(100)]
    with_grads = [p.clone() for p in params]
    for p in with_grads:
        p.grad = torch.randn(256, 256, generator=gen).to(dtype)
    big = [torch.randn(1 << 22, generator=gen).to(dtype)]
    leaves = [p.clone().requires_grad_() for p in params]

    def value():
        with torch.no_grad():
            return fastreg.penalty(params, l1=1e-5, l2=1e-4)

    def value_big():
        with torch.no_grad():
            return fastreg.penalty(big, l1=1e-5, l2=1e-4)

    def backward():
        for p in leaves:
            p.grad = None
        fastreg.penalty(leaves, l1=1e-5, l2=1e-4).backward()

    return {
        "penalty": value,
        "penalty 2^22": value_big,
        "penalty backward": backward,
        "penalty_grad_": lambda: fastreg.penalty_grad_(with_grads, l1=1e-5, l2=1e-4),
        "prox_l1_": lambda: fastreg.prox_l1_(params, 1e-12),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5, help="calls per dtype per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    print(
        f"fastreg penalty, float16 against bfloat16: torch {torch.__version__}, commit "
        f"{bench.commit()}, torch threads {torch.get_num_threads()}, "
        "CPU clone "
        + (fastreg._ops._C.cpu_clone if fastreg._ops.HAVE_EXTENSION else "none (reference)")
    )
    bf16, f16 = make_cases(torch.bfloat16), make_cases(torch.float16)
    print(f"{'case':<18}{'bfloat16 ms':>13}{'float16 ms':>12}{'f16/bf16':>10}{'  IQR':>14}")
    timer = bench.Timer("cpu", repeats=args.rounds, min_time_s=0.0, number=args.calls)
    for name in bf16:
        times, _, errors = timer.interleaved({"bf16": bf16[name], "f16": f16[name]})
        if errors:
            raise next(iter(errors.values()))
        # ratio_summary gives base / other per round: float16's time over bfloat16's
        ratio = bench.ratio_summary(times["f16"], times["bf16"])
        spread = f"{ratio['speedup_q1']:.2f}..{ratio['speedup_q3']:.2f}"
        print(
            f"{name:<18}{statistics.median(times['bf16']) * 1e3:>13.3f}"
            f"{statistics.median(times['f16']) * 1e3:>12.3f}{ratio['speedup']:>10.2f}"
            f"{spread:>14}"
        )
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
