"""Host overhead of the penalty API: the time of one call on tiny CPU tensors, where the
kernels cost next to nothing, so what is measured is the work around them (argument
checks, parameter selection, the dispatcher, autograd).

    PYTHONPATH=. python benchmarks/penalty_overhead.py [--calls 2000] [--rounds 15]

Timed by the bench's timer (fastreg.bench.Timer.interleaved): the variants of one size
run interleaved, one block of `--calls` calls back to back each per round, the order
rotated from round to round, so a burst of load hits them all alike. Each row is the
median over rounds of the mean time of one call within a round (after a warm-up); the
spread printed is the rounds' interquartile range (fastreg.bench.quartiles). With
`--clock cpu` the times are the process's CPU time (time.process_time), which leaves out
the time the process was descheduled by competing load. Cases, for 148 tensors (GPT-2
small's parameter count, 4 elements each) and 1,000:

  penalty(list)       fastreg.penalty(params, l1=, l2=) on a list that requires grad
  penalty(list) in step  the same while the parameters are in a live graph (as in a
                      training step): their AccumulateGrad nodes exist and are not made
                      anew on each call, which "penalty(list)" above pays for
  penalty(list) no_grad  the same under torch.no_grad(): no autograd node, no edges
  penalty(list) bwd   the same and .backward()  (not part of the target: for scale)
  Penalty(module)     a Penalty(l1=, l2=, exclude="bias_and_norm") module called on the model
  Penalty(module) in step  the same on a model whose parameters are in a live graph
  penalty(module)     fastreg.penalty(model, l1=, l2=, exclude="bias_and_norm")
  penalty_grad_(list) fastreg.penalty_grad_(params, l1=, l2=), gradients present
  penalty_grad_(mod)  the same on the model with exclude="bias_and_norm"
  prox_l1_(list)      fastreg.prox_l1_(params, 1e-9)
  prox_l1_(module)    the same on the model with exclude="bias_and_norm"
  _foreach_norm       torch._foreach_norm(params) (torch's own multi-tensor op, for scale)
  penalty(1-d) in step   fastreg.penalty on as many 1-d tensors of 4 elements, in a live
                      graph, and
  torch.cat(1-d) in step torch.cat on the same list: torch's own Tensor[] operator with
                      autograd, for scale (the per-tensor work of autograd, an edge to
                      each AccumulateGrad node, that any such operator pays)
  penalty(1-d), torch.cat(1-d)  the same two with no graph alive: every call makes each
                      tensor's AccumulateGrad node anew and frees it with the result,
                      which torch.cat pays as well (torch's own floor for this case)
  cat, then penalty(1-d)  torch.cat and then fastreg.penalty on one more such list, no
  penalty, then cat(1-d)  graph alive before, both results held to the end of the call,
                      in either order: the nodes are made once, by whichever comes
                      first, so either row less "torch.cat(1-d)" is what the penalty adds
                      to a step whose forward (here torch.cat) uses the same tensors

The target: at most 30 us for 148 tensors and 150 us for 1,000, for penalty,
Penalty(module), penalty_grad_ and prox_l1_.
"""

import argparse
import os
import platform
import sys
import time

import torch
from torch import nn

import fastreg
from fastreg import bench


class Block(nn.Module):
    """A GPT-2 block's parameter layout (12 tensors), at a tiny width."""

    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class TinyGPT(nn.Module):
    """12 * blocks + 4 parameter tensors: 148 for GPT-2 small's 12 blocks."""

    def __init__(self, blocks, d=2, vocab=2, context=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList(Block(d) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)


def model_with(n_tensors):
    """A TinyGPT with about n_tensors parameter tensors (148 for 12 blocks; 1,000 -> 83
    blocks, 1,000 tensors)."""
    blocks = max(1, round((n_tensors - 4) / 12))
    model = TinyGPT(blocks)
    return model


def cases(n_tensors):
    model = model_with(n_tensors)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    reg = fastreg.Penalty(l1=1e-5, l2=1e-4, exclude="bias_and_norm")
    # In a training step the parameters are in the forward's graph when the penalty is
    # taken, so their AccumulateGrad nodes exist: a graph over a twin model's parameters,
    # kept for the whole run, gives that case without changing the others.
    stepped_model = model_with(n_tensors)
    stepped = list(stepped_model.parameters())
    forward_graph = sum(p.sum() for p in stepped)

    def in_step():
        assert forward_graph.grad_fn is not None
        return fastreg.penalty(stepped, l1=1e-5, l2=1e-4)

    def module_in_step():
        assert forward_graph.grad_fn is not None
        return reg(stepped_model)

    # torch.cat wants tensors of one rank: the same count of 1-d tensors for both
    flat = [torch.zeros(4, requires_grad=True) for _ in params]
    flat_graph = sum(p.sum() for p in flat)

    def flat_penalty():
        assert flat_graph.grad_fn is not None
        return fastreg.penalty(flat, l1=1e-5, l2=1e-4)

    def flat_cat():
        assert flat_graph.grad_fn is not None
        return torch.cat(flat)

    # the same count of 1-d tensors, in no graph
    lone = [torch.zeros(4, requires_grad=True) for _ in params]

    # one more such list, for the pair of calls in either order
    paired = [torch.zeros(4, requires_grad=True) for _ in params]

    def cat_then_penalty():
        joined = torch.cat(paired)
        return joined, fastreg.penalty(paired, l1=1e-5, l2=1e-4)

    def penalty_then_cat():
        value = fastreg.penalty(paired, l1=1e-5, l2=1e-4)
        return value, torch.cat(paired)

    def backward():
        fastreg.penalty(params, l1=1e-5, l2=1e-4).backward()

    def no_grad():
        with torch.no_grad():
            return fastreg.penalty(params, l1=1e-5, l2=1e-4)

    return len(params), {
        "penalty(list)": lambda: fastreg.penalty(params, l1=1e-5, l2=1e-4),
        "penalty(list) in step": in_step,
        "penalty(list) no_grad": no_grad,
        "penalty(list) bwd": backward,
        "Penalty(module)": lambda: reg(model),
        "Penalty(module) in step": module_in_step,
        "penalty(module)": lambda: fastreg.penalty(
            model, l1=1e-5, l2=1e-4, exclude="bias_and_norm"
        ),
        "penalty_grad_(list)": lambda: fastreg.penalty_grad_(params, l1=1e-5, l2=1e-4),
        "penalty_grad_(mod)": lambda: fastreg.penalty_grad_(
            model, l1=1e-5, l2=1e-4, exclude="bias_and_norm"
        ),
        "prox_l1_(list)": lambda: fastreg.prox_l1_(params, 1e-9),
        "prox_l1_(module)": lambda: fastreg.prox_l1_(model, 1e-9, exclude="bias_and_norm"),
        "_foreach_norm": lambda: torch._foreach_norm(params),
        "penalty(1-d) in step": flat_penalty,
        "torch.cat(1-d) in step": flat_cat,
        "penalty(1-d)": lambda: fastreg.penalty(lone, l1=1e-5, l2=1e-4),
        "torch.cat(1-d)": lambda: torch.cat(lone),
        "cat, then penalty(1-d)": cat_then_penalty,
        "penalty, then cat(1-d)": penalty_then_cat,
    }


def interleaved(fns, calls, rounds, clock=time.perf_counter):
    """{name: [microseconds per call, one per round]}: the bench's Timer, one block of
    `calls` calls of every callable per round, the order rotated from round to round,
    after a warm-up of max(10, calls // 10) calls each."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    timer = bench.Timer("cpu", repeats=rounds, min_time_s=0.0, number=calls, clock=clock)
    times, _, errors = timer.interleaved(fns)
    if errors:
        raise next(iter(errors.values()))
    return {name: [t * 1e6 for t in ts] for name, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", default="148,1000")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: the process's CPU time (time.process_time)",
    )
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    load_before = os.getloadavg()[0]
    print(
        f"fastreg penalty host overhead: torch {torch.__version__}, python "
        f"{platform.python_version()}, commit {bench.commit()}, {platform.machine()} "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"extension {'yes' if fastreg._ops.HAVE_EXTENSION else 'no (reference)'}, "
        f"clock {args.clock}"
    )
    print(f"{'case':<24}{'tensors':>8}{'median us':>11}{'  IQR us':>18}")
    for size in (int(s) for s in args.sizes.split(",")):
        n, fns = cases(size)
        times = interleaved(fns, args.calls, args.rounds, clock)
        for name, ts in times.items():
            q1, median, q3 = bench.quartiles(ts)
            print(f"{name:<24}{n:>8}{median:>11.1f}{f'{q1:.1f}..{q3:.1f}':>18}")
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
