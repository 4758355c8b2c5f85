"""Interleaved CPU timing of fastreg's dropout against F.dropout (docs/cpu-kernels.md).

Each round times every variant once (native and each fastreg mode, in an order that
rotates from round to round), each timing the median of `reps` calls; the figure of a variant is the median over rounds of
its per-round ratio native / variant, with the spread (min and max of the per-round
ratios) beside it. The load average before and after is printed with the figures, and
a large Tensor.copy_ in the same run gives the copy bandwidth the kernels are set against.

    python benchmarks/cpu_ratio.py --op fwdbwd --dtype float32 --log2 24 --threads 2
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastreg

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


CLOCK = time.perf_counter


def time_once(fn, reps):
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def copy_bandwidth(n, dtype, reps):
    a = torch.randn(n).to(dtype)
    b = torch.empty_like(a)
    t = time_once(lambda: b.copy_(a), reps)
    return 2 * a.nbytes / t / 1e9, t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="fwdbwd", choices=["fwd", "bwd", "fwdbwd", "inplace"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--log2", type=int, nargs="+", default=[24])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: the process's CPU time (time.process_time), which a loaded "
                         "machine does not inflate by descheduling; use it with --threads 1")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()[0]
    for k in args.log2:
        n = 1 << k
        fns = callables(args.op, n, dtype, args.p)
        for fn in fns.values():  # warm-up
            fn()
        ratios = {name: [] for name in fns if name != "native"}
        times = {name: [] for name in fns}
        names = list(fns)
        for r in range(args.rounds):
            # The order rotates from round to round: whatever one variant leaves behind
            # (freed memory that the next one's allocation faults in again, a cold
            # cache) does not always land on the same successor.
            t_round = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                t_round[name] = time_once(fns[name], args.reps)
                times[name].append(t_round[name])
            for name in ratios:
                ratios[name].append(t_round["native"] / t_round[name])
        gbs, t_copy = copy_bandwidth(n, dtype, args.reps * 3)
        cells = []
        for name, r in ratios.items():
            cells.append(f"{name} {statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}] "
                         f"{statistics.median(times[name]) * 1e3:.3f}ms")
        print(f"{args.op} {args.dtype} 2^{k} threads={args.threads} clock={args.clock}: native "
              f"{statistics.median(times['native']) * 1e3:.3f}ms | " + " | ".join(cells)
              + f" | copy_ {gbs:.1f} GB/s ({t_copy * 1e3:.3f}ms)", flush=True)
    print(f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
          f"fastreg {fastreg.__file__}", flush=True)


if __name__ == "__main__":
    main()
