"""Interleaved CPU timing of fastreg's dropout against F.dropout (docs/cpu-kernels.md).

Timed by the bench's timer (fastreg.bench.Timer.interleaved): after one warm-up call each,
every round times one block of `--reps` calls back to back of every variant (native and
each fastreg mode), in an order that rotates from round to round; the figure of a variant
is the median over rounds of its per-round ratio native / variant, with the spread (the
interquartile range of the per-round ratios, fastreg.bench.ratio_summary) beside it, and
its median time per call. The load average before and after is printed with the
figures, and a large Tensor.copy_ timed in the same run gives the copy bandwidth the
kernels are set against.

    python benchmarks/cpu_ratio.py --op fwdbwd --dtype float32 --log2 24 --threads 2
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastreg
from fastreg import bench

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def callables(op, n, dtype, p):
    x = torch.randn(n, dtype=dtype, requires_grad=True)
    g = torch.randn(n, dtype=dtype)
    impls = {"native": lambda t: F.dropout(t, p)}
    for mode in ("bits", "bool", "recompute"):
        impls[mode] = (lambda m: lambda t: fastreg.dropout(t, p, mask=m))(mode)
    out = {}
    for name, f in impls.items():
        if op == "fwd":
            out[name] = (lambda f: lambda: f(x))(f)
        elif op == "bwd":
            y = f(x)
            out[name] = (lambda y: lambda: torch.autograd.grad(y, x, g, retain_graph=True))(y)
        elif op == "fwdbwd":
            out[name] = (lambda f: lambda: torch.autograd.grad(f(x), x, g))(f)
        elif op == "inplace":  # no autograd: dropout(h, inplace=True) on a fresh activation
            h = x.detach().clone()
            if name == "native":
                out[name] = lambda: F.dropout(h, p, inplace=True)
            else:
                out[name] = (lambda m: lambda: fastreg.dropout(h, p, inplace=True, mask=m))(name)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="fwdbwd", choices=["fwd", "bwd", "fwdbwd", "inplace"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--log2", type=int, nargs="+", default=[24])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--reps", type=int, default=5, help="calls per block (one block per variant per round)"
    )
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: the process's CPU time (time.process_time), which a loaded "
        "machine does not inflate by descheduling; use it with --threads 1",
    )
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    timer = bench.Timer("cpu", repeats=args.rounds, min_time_s=0.0, number=args.reps, clock=clock)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()[0]
    for k in args.log2:
        n = 1 << k
        fns = callables(args.op, n, dtype, args.p)
        times, _, errors = timer.interleaved(fns)
        if errors:
            raise next(iter(errors.values()))
        a = torch.randn(n).to(dtype)
        b = torch.empty_like(a)
        t_copy, _ = timer(lambda: b.copy_(a))
        gbs = 2 * a.nbytes / t_copy / 1e9
        cells = []
        for name in fns:
            if name == "native":
                continue
            s = bench.ratio_summary(times["native"], times[name])
            cells.append(
                f"{name} {s['speedup']:.2f}x [{s['speedup_q1']:.2f}-"
                f"{s['speedup_q3']:.2f}] {statistics.median(times[name]) * 1e3:.3f}ms"
            )
        print(
            f"{args.op} {args.dtype} 2^{k} threads={args.threads} clock={args.clock}: native "
            f"{statistics.median(times['native']) * 1e3:.3f}ms | "
            + " | ".join(cells)
            + f" | copy_ {gbs:.1f} GB/s ({t_copy * 1e3:.3f}ms)",
            flush=True,
        )
    print(
        f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
        f"fastreg {fastreg.__file__}",
        flush=True,
    )


if __name__ == "__main__":
    main()
