"""The benchmark behind ``python -m fastreg bench`` and the ``benchmarks/`` suite.

Every timed thing is a :class:`Case` (op, impl, dtype, size). :func:`cases` lists the
grid, :func:`prepare` builds one case's inputs and the callable to time, :func:`run`
times them all against the native baselines in the same process, and :func:`format_table`,
:func:`write_json` and :func:`plot` report. The pytest-benchmark suite in ``benchmarks/``
times the very same callables.

Ops (the names ``--ops`` takes; ``dropout``, ``fused`` and ``penalty`` select a family):

* ``dropout_fwd``: ``out = f(x)`` with ``x.requires_grad`` (training: the mask is kept).
* ``dropout_bwd``: ``torch.autograd.grad(out, x, g)`` through a graph built once.
* ``dropout_fwdbwd``: ``out = f(x); torch.autograd.grad(out, x, g)``.
* ``bias_dropout_add``: ``residual + dropout(x + bias)`` forward and backward (gradients
  of x, bias and residual), x of shape (numel / 1024, 1024); ``fastreg.bias_dropout_add``
  against the composition of native ops, in each mask mode.
* ``bias_gelu_dropout``: ``dropout(gelu(x + bias))`` likewise (``fastreg.bias_act_dropout``).
* ``penalty_value``: ``l1 * sum|w| + l2 * sum w**2`` over a parameter list, no autograd.
* ``penalty_fwdbwd``: the same value, then ``torch.autograd.grad(value, params)``.
* ``penalty_grad``: ``l1 * sign(w) + 2 * l2 * w`` added into each ``w.grad`` in place.

Bytes an op must move (for GB/s): dropout forward reads the input and writes the output
and the mask it keeps; backward reads the gradient and the mask and writes the input's
gradient; the mask's size is what the impl is measured to keep for backward (bits:
numel/8, bool: numel, recompute: 16 bytes of seed and offset, native on the CPU: a
full-width tensor). The penalty value reads every parameter once; its gradient reads
the parameters and writes (penalty_grad: reads and writes) the gradients. The fused ops
are charged the same bytes whatever the impl (their inputs, output and gradients and a
1-bit mask, forward and backward): their GB/s is an effective bandwidth.

The penalty's host overhead (``host_penalty``, ``host_penalty_grad``, ``host_prox_l1``;
the group ``host``): tiny CPU tensors (148 or 1,000 tensors of 4 elements, the parameter
sets ``tiny148`` and ``tiny1000``), so that the kernels cost nearly nothing and the time
per call is the Python and C++ work around them: ``fastreg.penalty(list)``,
``fastreg.Penalty(l1=, l2=)(module)``, ``fastreg.penalty_grad_(list)`` and
``fastreg.prox_l1_(list)`` against the Python loop, in microseconds, whatever ``--device``.
``host_penalty`` calls the penalty with no graph alive (each call makes every parameter's
AccumulateGrad node anew), ``host_penalty_step`` with the parameters in a live graph, as
in a training step; both also time ``torch.cat(list)``, torch's own operator over a
tensor list with autograd, which pays the same autograd work per tensor.

The method (docs/bench-method.md):

* Variants interleaved. The impls of one comparison (an op, dtype and size) are timed
  round after round, each round one block of calls of every impl, the order rotated from
  round to round; each round gives a ratio baseline time / impl time. The speedup is the
  median of these per-round ratios and the spread their interquartile range: a machine
  that slows down for a while slows every impl of the rounds it hits, and the ratio of
  one round stays fair. A row whose spread crosses 1.0, or is wider than half its median,
  prints "spread too wide" instead of a speedup.
* GPU timing measures HBM, not L2: before each timed call a buffer of 256 MB (or four
  times the L2, if larger) is written, outside the timed region, as
  ``triton.testing.do_bench`` does, and each call is timed by its own pair of CUDA events
  (``--no-l2-flush``: blocks of back-to-back calls between two events instead, which is
  what a training loop of small tensors sees: launch overhead included).
* Load recorded: :class:`LoadMonitor` measures the CPU time that other processes take
  during the run (``/proc/stat`` less this process and its children) and samples the
  1-minute load average before, during and after; ``python -m fastreg bench`` will not
  write JSON into ``benchmarks/results/`` from a run that others competed with, unless
  ``--allow-load``.

What comes from ``torch.utils.benchmark`` and what is ours: each impl's per-round times
are summarised by its ``Measurement`` (median, IQR). Ours, because torch's does not do
it: interleaving the variants round by round and the ratios per round
(``blocked_autorange`` and ``adaptive_autorange`` time one statement's blocks back to
back); the blocks themselves (``Timer.timeit`` adds two untimed warm-up calls to every
block, which would double or triple a run of large sizes, so a CPU block is timed by
``timeit.Timer`` with the garbage collector off, as torch's Timer does inside); the L2
flush between calls and per-call CUDA events (torch's Timer reads a host clock around a
synchronise); the load monitor; and the table (``Compare`` prints times, without GB/s,
copy share, per-round ratios, their spread or notes).
"""

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import timeit

import torch
import torch.nn.functional as F

import fastreg

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "half": "float16"}

DROPOUT_OPS = ("dropout_fwd", "dropout_bwd", "dropout_fwdbwd")
FUSED_OPS = ("bias_dropout_add", "bias_gelu_dropout")
PENALTY_OPS = ("penalty_value", "penalty_fwdbwd", "penalty_grad")
HOST_OPS = ("host_penalty", "host_penalty_step", "host_penalty_grad", "host_prox_l1")
OPS = DROPOUT_OPS + FUSED_OPS + PENALTY_OPS + HOST_OPS
FAMILY = {**{op: "dropout" for op in DROPOUT_OPS}, **{op: "fused" for op in FUSED_OPS},
          **{op: "penalty" for op in PENALTY_OPS}, **{op: "host" for op in HOST_OPS}}
OP_LABELS = {"dropout_fwd": "forward", "dropout_bwd": "backward", "dropout_fwdbwd": "fwd+bwd",
             "bias_dropout_add": "bias+dropout+add", "bias_gelu_dropout": "bias+gelu+dropout",
             "penalty_value": "value", "penalty_fwdbwd": "fwd+bwd", "penalty_grad": "grad_",
             "host_penalty": "penalty", "host_penalty_step": "penalty in step",
             "host_penalty_grad": "penalty_grad_",
             "host_prox_l1": "prox_l1_"}

# The impls of each family, the baseline (the speedup's reference) first.
DROPOUT_IMPLS = ("native", "fastreg:bits", "fastreg:bool", "fastreg:recompute")
FUSED_IMPLS = DROPOUT_IMPLS
PENALTY_IMPLS = ("loop", "foreach", "fastreg")
# fastreg:Penalty is fastreg.Penalty(l1=, l2=)(module), the module holding the tensors;
# torch.cat is torch.cat(list), torch's own operator over a tensor list with autograd: for
# scale, the autograd work (an edge to each tensor's AccumulateGrad node, made anew when no
# graph holds it) that any such operator pays.
HOST_IMPLS = {"host_penalty": ("loop", "fastreg", "fastreg:Penalty", "torch.cat"),
              "host_penalty_step": ("loop", "fastreg", "fastreg:Penalty", "torch.cat"),
              "host_penalty_grad": ("loop", "fastreg"), "host_prox_l1": ("loop", "fastreg")}
COMPILE_IMPL = "compile"
BASELINE = {"dropout": "native", "fused": "native", "penalty": "loop", "host": "loop"}
FUSED_WIDTH = 1024  # the last dimension of the fused ops' input (the bias' length)

GPU_SIZES = tuple(2 ** k for k in range(16, 29, 2))
CPU_SIZES = tuple(2 ** k for k in range(16, 25, 2))
QUICK_SIZES = {"cpu": (2 ** 16, 2 ** 20), "cuda": (2 ** 16, 2 ** 20, 2 ** 24)}
QUICK_DTYPES = ("float32",)

PENALTY_UNAVAILABLE = "penalty: not available in this build"
INTERRUPTED = "not timed: the run was interrupted"
FUSED_UNAVAILABLE = "fused: not available in this build"


def _mlp_shapes(layers=50, width=256):
    return [(width, width), (width,)] * layers


def _gpt2_shapes(layers=12, d=768, vocab=50257, context=1024):
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),          # ln_1, attn
             (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]      # ln_2, mlp
    return [(vocab, d), (context, d)] + block * layers + [(d,), (d,)]


# Parameter lists the penalty is timed on: name -> (description, shapes).
PARAM_SETS = {
    "mlp": ("50-layer 256x256 MLP", _mlp_shapes()),
    "gpt2": ("GPT-2 small", _gpt2_shapes()),
}
DEFAULT_PARAM_SETS = {"cpu": ("mlp",), "cuda": ("mlp", "gpt2")}
# The host-overhead rows: name -> number of CPU tensors of HOST_TENSOR_NUMEL elements.
HOST_SETS = {"tiny148": 148, "tiny1000": 1000}
HOST_TENSOR_NUMEL = 4
HOST_PROX_THRESHOLD = 1e-7  # small: thousands of calls leave the weights nearly as they were


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run holds fixed: dropout probability and penalty coefficients."""
    p: float = 0.5
    l1: float = 1e-5
    l2: float = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    impl: str
    dtype: str
    numel: int
    params: str = None  # the penalty's parameter set, None for dropout

    @property
    def family(self):
        return FAMILY[self.op]

    @property
    def size_label(self):
        return self.params if self.params else human_size(self.numel)

    @property
    def name(self):
        """A stable id (pytest-benchmark compares runs by it)."""
        return f"{self.op}-{self.impl}-{self.dtype}-{self.size_label}"


@dataclasses.dataclass
class Prepared:
    """One case, ready: `fn()` is what is timed."""
    fn: object = None
    bytes: int = 0                  # bytes the op must move per call
    saved_per_elem: float = None    # bytes autograd keeps for backward, per element
    rel_err: float = None           # penalty: relative error against float64
    note: str = None                # why there is no fn


# ---------------------------------------------------------------- sizes, dtypes, ops


def human_size(n):
    """2^20 for powers of two, else 3.29M style."""
    if n > 0 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def parse_size(text):
    """65536, 2^16, 2**16, 64k, 1M -> int."""
    t = text.strip().lower().replace("**", "^")
    m = re.fullmatch(r"(\d+)\^(\d+)", t)
    if m:
        return int(m.group(1)) ** int(m.group(2))
    m = re.fullmatch(r"(\d+)([kmg]?)", t)
    if not m:
        raise ValueError(f"cannot read size {text!r}: give an integer, 2^k, or 64k / 1M / 1G")
    value = int(m.group(1)) * {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30}[m.group(2)]
    if value <= 0:
        raise ValueError(f"size must be positive, but got {text!r}")
    return value


def parse_list(text, choices, aliases=None, groups=None, what="value"):
    """A comma-separated list of choices (aliases and groups expanded), order kept."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        item = (aliases or {}).get(item, item)
        expanded = (groups or {}).get(item, (item,))
        for name in expanded:
            if name not in choices:
                raise ValueError(f"unknown {what} {item!r}; choose from {', '.join(choices)}")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"no {what} given")
    return out


OP_GROUPS = {"dropout": DROPOUT_OPS, "fused": FUSED_OPS, "penalty": PENALTY_OPS,
             "host": HOST_OPS, "all": OPS}


def cases(device, *, ops=OPS, dtypes=None, sizes=None, params=None, quick=False,
          compile=False):
    """The grid for `device` ("cpu" or "cuda"), narrowed by the arguments."""
    kind = torch.device(device).type
    if dtypes is None:
        dtypes = QUICK_DTYPES if quick else tuple(DTYPES)
    if sizes is None:
        sizes = QUICK_SIZES[kind] if quick else (GPU_SIZES if kind == "cuda" else CPU_SIZES)
    if params is None:
        params = ("mlp",) if quick else DEFAULT_PARAM_SETS[kind]
    extra = (COMPILE_IMPL,) if compile else ()
    out = []
    for op in ops:
        if op in DROPOUT_OPS:
            out += [Case(op, impl, dt, n) for dt in dtypes for n in sizes
                    for impl in DROPOUT_IMPLS + extra]
        elif op in FUSED_OPS:
            out += [Case(op, impl, dt, n) for dt in dtypes for n in sizes
                    if n % FUSED_WIDTH == 0 for impl in FUSED_IMPLS + extra]
        elif op in HOST_OPS:  # float32 CPU tensors whatever the dtypes and device
            sets = ("tiny148",) if quick else tuple(HOST_SETS)
            out += [Case(op, impl, "float32", HOST_SETS[hs] * HOST_TENSOR_NUMEL, hs)
                    for hs in sets for impl in HOST_IMPLS[op]]
        else:
            out += [Case(op, impl, dt, param_set_numel(ps), ps) for dt in dtypes
                    for ps in params for impl in PENALTY_IMPLS + extra]
    return out


def param_set_numel(name):
    if name in HOST_SETS:
        return HOST_SETS[name] * HOST_TENSOR_NUMEL
    return sum(math.prod(s) for s in PARAM_SETS[name][1])


def param_set_tensors(name):
    return HOST_SETS[name] if name in HOST_SETS else len(PARAM_SETS[name][1])


# ---------------------------------------------------------------- the impls


def penalty_api():
    """(fastreg.penalty, fastreg.penalty_grad_), or None before the penalty is merged."""
    penalty = getattr(fastreg, "penalty", None)
    penalty_grad_ = getattr(fastreg, "penalty_grad_", None)
    if not callable(penalty) or not callable(penalty_grad_):
        return None
    return penalty, penalty_grad_


def penalty_loop(params, l1, l2):
    """What users write: a Python loop over the parameters."""
    reg = 0.0
    for w in params:
        if l1:
            reg = reg + l1 * w.abs().sum()
        if l2:
            reg = reg + l2 * w.pow(2).sum()
    return reg


def penalty_foreach(params, l1, l2):
    """The multi-tensor norms torch already has."""
    reg = 0.0
    if l1:
        reg = reg + l1 * torch.stack(torch._foreach_norm(params, 1)).sum()
    if l2:
        reg = reg + l2 * torch.stack(torch._foreach_norm(params, 2)).square().sum()
    return reg


def penalty_grad_loop(params, l1, l2):
    for w in params:
        w.grad.add_(w.sign(), alpha=l1).add_(w, alpha=2 * l2)


def penalty_grad_foreach(params, l1, l2):
    grads = [w.grad for w in params]
    torch._foreach_add_(grads, torch._foreach_sign(params), alpha=l1)
    torch._foreach_add_(grads, params, alpha=2 * l2)


def _compiled(fn):
    # A fresh compile per case: dynamo caches per code object and falls back to eager
    # past its recompile limit, which a grid of sizes and dtypes would reach.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def dropout_impl(impl, p):
    """The function x -> dropout(x) of `impl`."""
    if impl == "native":
        return lambda x: F.dropout(x, p, training=True)
    if impl.startswith("fastreg:"):
        mode = impl.split(":", 1)[1]
        return lambda x: fastreg.dropout(x, p, mask=mode)
    if impl == COMPILE_IMPL:
        return _compiled(lambda x: F.dropout(x, p, training=True))
    raise ValueError(f"unknown dropout impl {impl!r}")


def fused_impl(impl, op, p):
    """The function (x, bias, residual) -> output of `impl` for a fused op, or a note (str)
    when this build has no such op."""
    if op == "bias_dropout_add":
        def native(x, b, r):
            return r + F.dropout(x + b, p, training=True)
        name = "bias_dropout_add"
    else:
        def native(x, b, r):
            return F.dropout(F.gelu(x + b), p, training=True)
        name = "bias_act_dropout"
    if impl == "native":
        return native
    if impl == COMPILE_IMPL:
        return _compiled(native)
    fused = getattr(fastreg, name, None)
    if not callable(fused):
        return FUSED_UNAVAILABLE
    mode = impl.split(":", 1)[1]
    if op == "bias_dropout_add":
        return lambda x, b, r: fused(x, b, r, p, mask=mode)
    return lambda x, b, r: fused(x, b, p, "gelu", mask=mode)


def penalty_impl(impl, op, settings):
    """The penalty function of `impl`: params -> value (or None for penalty_grad), or a
    note (str) when unavailable."""
    l1, l2 = settings.l1, settings.l2
    grad_op = op == "penalty_grad"
    if impl == "fastreg":
        api = penalty_api()
        if api is None:
            return PENALTY_UNAVAILABLE
        penalty, penalty_grad_ = api
        if grad_op:
            return lambda ps: penalty_grad_(ps, l1=l1, l2=l2)
        return lambda ps: penalty(ps, l1=l1, l2=l2)
    if impl == "loop":
        base = penalty_grad_loop if grad_op else penalty_loop
    elif impl == "foreach":
        base = penalty_grad_foreach if grad_op else penalty_foreach
    elif impl == COMPILE_IMPL:
        loop = penalty_grad_loop if grad_op else penalty_loop
        return _compiled(lambda ps: loop(ps, l1, l2))
    else:
        raise ValueError(f"unknown penalty impl {impl!r}")
    return lambda ps: base(ps, l1, l2)


# ---------------------------------------------------------------- preparing a case


def saved_bytes(fn, exclude=()):
    """(result of fn(), bytes of the storages autograd saves for backward while running
    it, each storage counted once, less those of the tensors in `exclude`)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr or id(storage)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def _generator(device, seed=0):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _prepare_dropout(case, device, settings):
    dtype = DTYPES[case.dtype]
    gen = _generator(device)
    x = torch.randn(case.numel, device=device, dtype=dtype, generator=gen).requires_grad_()
    g = torch.randn(case.numel, device=device, dtype=dtype, generator=gen)
    f = dropout_impl(case.impl, settings.p)
    out, kept = saved_bytes(lambda: f(x), exclude=(x,))
    io = 2 * case.numel * x.element_size()
    mask_read = 0 if case.impl == "fastreg:recompute" else kept  # recompute regenerates it
    prepared = Prepared(saved_per_elem=kept / case.numel)
    if case.op == "dropout_fwd":
        prepared.fn, prepared.bytes = (lambda: f(x)), io + kept
    elif case.op == "dropout_bwd":
        prepared.fn = lambda: torch.autograd.grad(out, x, g, retain_graph=True)
        prepared.bytes = io + mask_read
    else:
        prepared.fn = lambda: torch.autograd.grad(f(x), x, g)
        prepared.bytes = 2 * io + kept + mask_read
    return prepared


_PARAMS_CACHE = {}


def cached_params(name, dtype, device, settings):
    """(make_params(name, dtype, device), its float64 penalty_reference), shared by the
    cases of one parameter set and dtype: only the last one asked for is kept."""
    key = (name, dtype, str(device), settings)
    if key not in _PARAMS_CACHE:
        _PARAMS_CACHE.clear()
        params = make_params(name, dtype, device)
        _PARAMS_CACHE[key] = params, penalty_reference(params, settings)
    return _PARAMS_CACHE[key]


def _prepare_fused(case, device, settings):
    f = fused_impl(case.impl, case.op, settings.p)
    if isinstance(f, str):
        return Prepared(note=f)
    dtype = DTYPES[case.dtype]
    gen = _generator(device)
    shape = (case.numel // FUSED_WIDTH, FUSED_WIDTH)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
    b = torch.randn(FUSED_WIDTH, device=device, dtype=dtype, generator=gen).requires_grad_()
    g = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    if case.op == "bias_dropout_add":
        r = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_()
        inputs, tensors = (x, b, r), 5  # x, residual, out; grad, grad of x
    else:
        r, inputs, tensors = None, (x, b), 5  # x, out; grad, x again, grad of x
    _, kept = saved_bytes(lambda: f(x, b, r), exclude=inputs)
    n_bytes = tensors * case.numel * x.element_size() + 2 * (case.numel // 8)
    return Prepared(fn=lambda: torch.autograd.grad(f(x, b, r), inputs, g), bytes=n_bytes,
                    saved_per_elem=kept / case.numel)


def make_params(name, dtype, device, requires_grad=True, seed=0):
    """The parameter list `name` of PARAM_SETS: N(0, 0.02) tensors."""
    gen = _generator(device, seed)
    params = []
    for shape in PARAM_SETS[name][1]:
        w = torch.randn(shape, device=device, dtype=torch.float32, generator=gen).mul_(0.02)
        params.append(w.to(DTYPES[dtype]).requires_grad_(requires_grad))
    return params


def penalty_reference(params, settings):
    """The penalty and its gradients in float64."""
    value, grads = 0.0, []
    for w in params:
        w64 = w.detach().double()
        value += settings.l1 * w64.abs().sum().item() + settings.l2 * w64.square().sum().item()
        grads.append(settings.l1 * w64.sign() + 2 * settings.l2 * w64)
    return value, grads


def _rel_err(value, reference):
    value = float(value.detach() if isinstance(value, torch.Tensor) else value)
    return abs(value - reference) / abs(reference) if reference else abs(value)


def _prepare_penalty(case, device, settings):
    f = penalty_impl(case.impl, case.op, settings)
    if isinstance(f, str):
        return Prepared(note=f)
    params, (ref_value, ref_grads) = cached_params(case.params, case.dtype, device, settings)
    numel, size = case.numel, params[0].element_size()
    if case.op == "penalty_value":
        with torch.no_grad():
            value = f(params)
        no_grad = torch.no_grad

        def fn():
            with no_grad():
                return f(params)
        return Prepared(fn=fn, bytes=numel * size, rel_err=_rel_err(value, ref_value))
    if case.op == "penalty_fwdbwd":
        value, kept = saved_bytes(lambda: f(params), exclude=params)
        return Prepared(fn=lambda: torch.autograd.grad(f(params), params), bytes=3 * numel * size,
                        saved_per_elem=kept / numel, rel_err=_rel_err(value, ref_value))
    for w in params:
        w.grad = torch.zeros_like(w)
    with torch.no_grad():
        f(params)
    diff = sum((w.grad.double() - r).square().sum().item() for w, r in zip(params, ref_grads))
    norm = sum(r.square().sum().item() for r in ref_grads)
    return Prepared(fn=lambda: f(params), bytes=3 * numel * size,
                    rel_err=math.sqrt(diff / norm) if norm else math.sqrt(diff))


def _call_with_graph_alive(fn, forward_graph):
    """fn(); the partial that calls it holds forward_graph."""
    return fn()


def _prepare_host(case, settings):
    """Tiny float32 CPU tensors: the time per call is the work around the kernels."""
    gen = _generator("cpu")
    params = [torch.randn(HOST_TENSOR_NUMEL, generator=gen).requires_grad_()
              for _ in range(HOST_SETS[case.params])]
    l1, l2, impl = settings.l1, settings.l2, case.impl
    if case.op in ("host_penalty", "host_penalty_step"):
        if impl == "loop":
            fn = lambda: penalty_loop(params, l1, l2)  # noqa: E731
        elif impl == "fastreg":
            fn = lambda: fastreg.penalty(params, l1=l1, l2=l2)  # noqa: E731
        elif impl == "torch.cat":
            fn = lambda: torch.cat(params)  # noqa: E731
        else:  # fastreg:Penalty, called on a module that holds the tensors
            module = torch.nn.Module()
            module.params = torch.nn.ParameterList(torch.nn.Parameter(w.detach().clone())
                                                   for w in params)
            params = list(module.parameters())
            penalty_module = fastreg.Penalty(l1=l1, l2=l2)
            fn = lambda: penalty_module(module)  # noqa: E731
        if case.op == "host_penalty_step":
            # As in a training step: a forward's graph holds the parameters' AccumulateGrad
            # nodes, which a call with no graph alive makes anew for every parameter.
            forward_graph = sum(w.sum() for w in params)
            fn = functools.partial(_call_with_graph_alive, fn, forward_graph)
        return Prepared(fn=fn)
    for w in params:
        w.grad = torch.zeros_like(w)
    no_grad = torch.no_grad
    if case.op == "host_penalty_grad":
        grad_ = penalty_grad_loop if impl == "loop" else (
            lambda ps, a, b: fastreg.penalty_grad_(ps, l1=a, l2=b))

        def fn():
            with no_grad():
                grad_(params, l1, l2)
        return Prepared(fn=fn)
    threshold = HOST_PROX_THRESHOLD
    if impl == "loop":
        def fn():
            with no_grad():
                for w in params:
                    w.copy_(F.softshrink(w, threshold))
    else:
        def fn():
            with no_grad():
                fastreg.prox_l1_(params, threshold)
    return Prepared(fn=fn)


def prepare(case, device, settings=Settings()):
    """Inputs for `case` on `device` and the callable to time (or a note why not). The
    host-overhead cases run on the CPU whatever `device`."""
    if case.family == "dropout":
        return _prepare_dropout(case, device, settings)
    if case.family == "fused":
        return _prepare_fused(case, device, settings)
    if case.family == "host":
        return _prepare_host(case, settings)
    return _prepare_penalty(case, device, settings)


# ---------------------------------------------------------------- timing

L2_FLUSH_MIN_BYTES = 256 * 2 ** 20  # triton.testing.do_bench's cache buffer


def l2_flush_bytes(device):
    """Bytes written before each timed CUDA call: 256 MB, or four times the L2 if larger
    (an H200 has 60 MB of L2)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return max(L2_FLUSH_MIN_BYTES, 4 * l2)


class Timer:
    """Seconds per call of a callable, in blocks of calls.

    A block is `number` calls, enough for it to last `min_block_s`. On the CPU each block
    is timed by ``timeit.Timer`` (gc off while timing) with ``time.perf_counter``.
    On the GPU, with `l2_flush` (the default there) every call is preceded by a write of
    :func:`l2_flush_bytes` bytes and timed by its own pair of CUDA events, the flush
    outside them, so that what is timed reads its inputs from HBM rather than from L2;
    without it a block is timed back to back between two events.

    ``timer(fn)`` times one callable (median of at least `repeats` blocks, more while it
    has run less than `min_time_s`, at most 10 * repeats); :meth:`interleaved` times
    several round by round, for per-round ratios.
    """

    def __init__(self, device, repeats=5, min_time_s=0.3, min_block_s=None, l2_flush=None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.repeats = max(1, repeats)
        self.min_time_s = min_time_s
        self.min_block_s = min_block_s if min_block_s is not None else (
            1e-3 if self.cuda else 2e-3)
        self.l2_flush = self.cuda if l2_flush is None else bool(l2_flush) and self.cuda
        self._flush_buffer = None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush(self):
        """Evicts the inputs from L2: writes a buffer larger than it (not timed)."""
        if self._flush_buffer is None:
            self._flush_buffer = torch.empty(l2_flush_bytes(self.device) // 4,
                                             dtype=torch.int32, device=self.device)
        self._flush_buffer.zero_()

    @staticmethod
    def _event():
        return torch.cuda.Event(enable_timing=True)

    def _block(self, fn, number):
        """Seconds per call over one block of `number` calls."""
        if self.cuda and self.l2_flush:
            pairs = [(self._event(), self._event()) for _ in range(number)]
            for start, end in pairs:
                self.flush()
                start.record()
                fn()
                end.record()
            pairs[-1][1].synchronize()
            return sum(s.elapsed_time(e) for s, e in pairs) / 1e3 / number
        if self.cuda:
            start, end = self._event(), self._event()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        # timeit.Timer, as torch.utils.benchmark.Timer does inside (gc off while timing);
        # torch's own timeit() adds two untimed warm-up calls to every block.
        return timeit.Timer(fn, timer=time.perf_counter).timeit(number) / number

    def _number(self, first):
        """Calls per block, from the time of one call."""
        cap = 1_000 if self.l2_flush else 10_000
        return max(1, min(cap, math.ceil(self.min_block_s / max(first, 1e-9))))

    def _calibrate(self, fn):
        """Warms `fn` up and returns its calls per block."""
        self.sync()
        fn()                                   # warm-up: lazy init, allocator, compile
        self.sync()
        return self._number(self._block(fn, 1))  # a second warm-up, to size the blocks

    def __call__(self, fn):
        """(median seconds per call, number of timed calls)"""
        self.sync()
        fn()
        self.sync()
        first = self._block(fn, 1)
        number = self._number(first)
        times = [first] if number == 1 else []
        spent = first
        while len(times) < self.repeats or (spent < self.min_time_s
                                            and len(times) < 10 * self.repeats):
            t = self._block(fn, number)
            times.append(t)
            spent += t * number
        return statistics.median(times), len(times) * number

    def interleaved(self, fns):
        """Times the callables of `fns` ({name: fn}) round by round: each round one block
        of every callable, the order rotated by one from round to round. At least
        `repeats` rounds, more while the rounds have taken less than `min_time_s` of wall
        time per callable (at most 10 * repeats).

        Returns ({name: [seconds per call, one per round]}, {name: calls per block},
        {name: error}); a callable that raises is dropped from the rounds with its error."""
        numbers, errors = {}, {}
        for name, fn in fns.items():
            try:
                numbers[name] = self._calibrate(fn)
            except Exception as error:  # one broken impl must not lose the comparison
                errors[name] = error
        names = [n for n in fns if n in numbers]
        times = {n: [] for n in names}
        spent, rounds = 0.0, 0
        while names and (rounds < self.repeats or (spent < self.min_time_s * len(names)
                                                   and rounds < 10 * self.repeats)):
            shift = rounds % len(names)
            for name in names[shift:] + names[:shift]:
                wall = time.perf_counter()
                try:
                    t = self._block(fns[name], numbers[name])
                except Exception as error:
                    errors[name] = error
                    continue
                times[name].append(t)
                spent += time.perf_counter() - wall  # flushes included: bounds the run
            for name in [n for n in names if n in errors]:
                names.remove(name)
                del times[name]
            rounds += 1
        return times, numbers, errors


def quartiles(values):
    """(q1, median, q3) of `values` (all three the value itself for one value)."""
    values = sorted(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


SPREAD_LIMIT = 0.5  # an interquartile range wider than this share of the median is too wide


def ratio_summary(base_times, times):
    """The per-round ratios base / impl of two equally long lists of per-round times:
    {"speedup": median, "speedup_q1", "speedup_q3", "speedup_min", "speedup_max",
    "speedup_clear": whether the spread supports the ratio}."""
    if len(base_times) != len(times) or not times:
        raise ValueError(f"per-round times must pair up, but got {len(base_times)} baseline "
                         f"and {len(times)} impl rounds")
    ratios = [b / t for b, t in zip(base_times, times)]
    q1, median, q3 = quartiles(ratios)
    return {"speedup": median, "speedup_q1": q1, "speedup_q3": q3,
            "speedup_min": min(ratios), "speedup_max": max(ratios),
            "speedup_clear": spread_supports(median, q1, q3)}


def spread_supports(median, q1, q3):
    """False when the per-round ratios cannot say which is faster (their interquartile
    range holds 1.0) or scatter too widely (a range wider than SPREAD_LIMIT of the
    median)."""
    if q1 < 1.0 < q3:
        return False
    return (q3 - q1) <= SPREAD_LIMIT * median


def time_measurement(times, number, case, threads):
    """A torch.utils.benchmark Measurement of one impl's per-round times: its median and
    interquartile range are the row's."""
    from torch.utils.benchmark.utils.common import Measurement, TaskSpec
    spec = TaskSpec(stmt=case.impl, setup="pass", label=case.op,
                    sub_label=f"{case.dtype} {case.size_label}", description=case.impl,
                    num_threads=threads)
    return Measurement(number_per_run=number, raw_times=[t * number for t in times],
                       task_spec=spec)


def copy_case(numel, dtype, device):
    """`dst.copy_(src)`: the device's bandwidth at this size, bytes = 2 * size."""
    src = torch.randn(numel, device=device, dtype=torch.float32).to(DTYPES[dtype])
    dst = torch.empty_like(src)
    return Prepared(fn=lambda: dst.copy_(src), bytes=2 * numel * src.element_size())


# ---------------------------------------------------------------- the run


class Progress:
    """One updating line on a terminal, plain lines otherwise (both on stderr)."""

    def __init__(self, total, stream=None, enabled=True):
        self.total, self.count, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label):
        self.count += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        text = f"[{self.count:>{len(str(self.total))}}/{self.total}] {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + text[:200])
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self):
        if self.tty:
            self.stream.write("\r\033[K")
        if self.enabled:
            self.stream.write(f"bench: {self.count} cases in "
                              f"{time.perf_counter() - self.start:.0f}s\n")
            self.stream.flush()


def comparisons(case_list):
    """The cases grouped by (op, dtype, size, parameter set), in their order: each group
    is timed round by round."""
    groups = {}
    for case in case_list:
        groups.setdefault((case.op, case.dtype, case.numel, case.params), []).append(case)
    return list(groups.values())


def run(case_list, device, settings=Settings(), timer=None, progress=True):
    """Times every comparison (the impls of one op, dtype and size, interleaved round by
    round), and the copy bandwidth at each (dtype, numel) the dropout and fused cases use.

    Returns (rows, copy rows). A case that cannot run gives a row with a note; when the
    run is interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM under the command line),
    the cases not yet timed get the note INTERRUPTED and the rows so far are returned."""
    timer = timer or Timer(device)
    host_timer = Timer("cpu", repeats=timer.repeats, min_time_s=timer.min_time_s)
    copy = {}
    rows = []
    bar = Progress(len(case_list), enabled=progress)
    groups = comparisons(case_list)
    for done, group in enumerate(groups):
        first = group[0]
        key = (first.dtype, first.numel)
        try:
            if first.family in ("dropout", "fused", "penalty") and key not in copy:
                copy_prep = copy_case(first.numel, first.dtype, device)
                seconds, _ = timer(copy_prep.fn)
                copy[key] = copy_prep.bytes / seconds / 1e9
                del copy_prep
            for case in group:
                bar.step(f"{case.op} {case.impl} {case.dtype} {case.size_label}")
            rows += _time_comparison(group, device, settings,
                                     host_timer if first.family == "host" else timer)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (a time limit): report what ran
            for case in (c for g in groups[done:] for c in g):
                rows.append({**_empty_row(case), "note": INTERRUPTED})
            break
    bar.done()
    _PARAMS_CACHE.clear()
    _fill_ratios(rows, copy)
    copy_rows = [{"dtype": dt, "numel": n, "gbps": gbps} for (dt, n), gbps in copy.items()]
    return rows, copy_rows


def _empty_row(case):
    return {"op": case.op, "impl": case.impl, "dtype": case.dtype, "numel": case.numel,
            "params": case.params,
            "tensors": param_set_tensors(case.params) if case.params else None,
            "device": "cpu" if case.family == "host" else None,
            "median_ms": None, "iqr_ms": None, "runs": 0, "rounds": 0, "gbps": None,
            "copy_frac": None, "speedup": None, "speedup_q1": None, "speedup_q3": None,
            "speedup_min": None, "speedup_max": None, "speedup_clear": None,
            "saved_bytes_per_elem": None, "rel_err": None, "note": None}


def _failed(error):
    message = (str(error).strip().splitlines() or [""])[0][:120]
    return f"failed: {type(error).__name__}: {message}"


def _time_comparison(group, device, settings, timer):
    """Rows of one comparison: prepares every impl, times them interleaved, and sets each
    row's speedup from the per-round ratios against the baseline."""
    rows = {case.impl: _empty_row(case) for case in group}
    prepared = {}
    for case in group:
        try:
            prep = prepare(case, device, settings)
        except Exception as error:  # one broken case must not lose the whole run
            rows[case.impl]["note"] = _failed(error)
            continue
        if prep.fn is None:
            rows[case.impl]["note"] = prep.note
        else:
            prepared[case.impl] = prep
    times, numbers, errors = timer.interleaved({impl: p.fn for impl, p in prepared.items()})
    for impl, error in errors.items():
        rows[impl]["note"] = _failed(error)
    cases = {case.impl: case for case in group}
    base = BASELINE[group[0].family]
    threads = 1 if timer.cuda else torch.get_num_threads()
    for impl, per_round in times.items():
        row, prep = rows[impl], prepared[impl]
        m = time_measurement(per_round, numbers[impl], cases[impl], threads)
        row.update(median_ms=m.median * 1e3, iqr_ms=m.iqr * 1e3,
                   runs=len(per_round) * numbers[impl], rounds=len(per_round),
                   gbps=prep.bytes / m.median / 1e9 if prep.bytes else None,
                   saved_bytes_per_elem=prep.saved_per_elem, rel_err=prep.rel_err)
        if row["rel_err"] is not None and not math.isfinite(row["rel_err"]):
            row["note"] = f"the value is not finite: it overflows {cases[impl].dtype}"
        if base in times and impl != base:
            row.update(ratio_summary(times[base], per_round))
        elif impl == base:
            row.update(speedup=1.0, speedup_q1=1.0, speedup_q3=1.0, speedup_min=1.0,
                       speedup_max=1.0, speedup_clear=True)
    return [rows[case.impl] for case in group]


def _fill_ratios(rows, copy):
    """Each row's GB/s as a share of the copy bandwidth at its dtype and size."""
    for r in rows:
        bandwidth = copy.get((r["dtype"], r["numel"]))
        r["copy_frac"] = r["gbps"] / bandwidth if bandwidth and r["gbps"] else None


# ---------------------------------------------------------------- environment


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def commit():
    """git rev-parse --short HEAD of the checkout fastreg is imported from ("-dirty" when
    tracked files differ from it); where that is no git checkout (a copy of the tree on a
    GPU machine), the environment variable FASTREG_COMMIT, else "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastreg.__file__)))
    fallback = os.environ.get("FASTREG_COMMIT") or "unknown"
    try:
        top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10)
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return fallback
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def environment(device):
    """What the header and the JSON say about where the numbers come from."""
    info = fastreg.info()
    kind = torch.device(device).type
    kernels = info["cuda_kernels"] if kind == "cuda" else info["cpu_kernels"]
    return {
        "device": f"{kind}: {device_name(device)}",
        "device_type": kind,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastreg": info["version"],
        "backend": ("extension" if kernels else "reference") + f" ({kind} kernels "
                   + ("built)" if kernels else "missing: the pure-PyTorch fallback runs)"),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_before": _load(),
    }


def _load():
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# Other processes' share of the machine's CPU time during a run above which the run
# counts as competed with (10%: 0.2 of a core on 2 CPUs, 1.6 cores on 16).
OTHERS_LIMIT = 0.10


def machine_cpu_seconds():
    """(CPU seconds every process has used, number of CPUs counted) from /proc/stat
    (user, nice, system, irq, softirq and steal: time a hypervisor gave to others counts
    too), or (None, None) where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None, None
    cpus = sum(1 for line in lines[1:] if re.match(r"cpu\d+ ", line)) or os.cpu_count()
    fields += [0] * (8 - len(fields))
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    return busy / os.sysconf("SC_CLK_TCK"), cpus


def own_cpu_seconds():
    """CPU seconds of this process (every thread), of its children it has waited for and
    of its living descendants (torch.compile's workers), or None where unknown."""
    try:
        import resource
    except ImportError:
        return None
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total + _descendants_cpu_seconds()


def _descendants_cpu_seconds():
    """utime + stime of the living descendants of this process, from /proc/<pid>/stat."""
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return 0.0
    children, cpu = {}, {}
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2:].split()  # the fields after the command name
        try:
            pid, ppid = int(entry), int(rest[1])
            cpu[pid] = (int(rest[11]) + int(rest[12])) / tick
        except (IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(os.getpid(), ()))
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += children.get(pid, ())
    return total


class LoadMonitor:
    """How much other processes competed with a run: the CPU time that the machine used
    less that of this process and its descendants, over the run's wall time and the
    CPUs (the share of the machine they took); and the 1-minute load average before the
    run, every `interval_s` during it (a thread) and after.

    ``with LoadMonitor(own_threads) as monitor: ...``, then ``monitor.result``; or
    :meth:`start` and :meth:`stop`. The readers are arguments so that tests can fake them.
    """

    def __init__(self, own_threads=1, interval_s=2.0, *, clock=time.perf_counter,
                 machine=machine_cpu_seconds, own=own_cpu_seconds, load=_load):
        self.own_threads = own_threads
        self.interval_s = interval_s
        self._clock, self._machine, self._own, self._load = clock, machine, own, load
        self.samples = []
        self.result = None
        self._thread = None
        self._stop = None

    def start(self):
        import threading
        self._t0, (self._busy0, self._cpus), self._own0 = (
            self._clock(), self._machine(), self._own())
        self.load_before = self._load()
        self._stop = threading.Event()
        if self.interval_s:
            self._thread = threading.Thread(target=self._sample, daemon=True,
                                            name="fastreg-load-monitor")
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            value = self._load()
            if value is not None:
                self.samples.append(value)

    def stop(self):
        """The verdict: a dict with load_before, load_max (during, before and after
        included), load_after, load_samples, cpus, others_cpu_share, competed and why."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        wall = self._clock() - self._t0
        busy, cpus = self._machine()
        own = self._own()
        after = self._load()
        loads = [v for v in [self.load_before, *self.samples, after] if v is not None]
        share = None
        if None not in (busy, self._busy0, own, self._own0) and wall > 0 and cpus:
            others = (busy - self._busy0) - (own - self._own0)
            share = max(0.0, others) / (wall * cpus)
        cpus = cpus or os.cpu_count() or 1
        if share is not None:
            competed = share > OTHERS_LIMIT
            why = (f"other processes took {share:.0%} of the {cpus} CPUs' time during the run "
                   f"(limit {OTHERS_LIMIT:.0%})")
        elif loads:
            # no CPU accounting: the load average beyond this run's own threads
            excess = max(loads) - self.own_threads
            competed = excess > OTHERS_LIMIT * cpus
            why = (f"the 1-minute load average reached {max(loads):.2f} on {cpus} CPUs, "
                   f"{self.own_threads} of them this run's threads")
        else:
            competed, why = False, "no load information on this system"
        self.result = {"load_before": self.load_before, "load_max": max(loads) if loads else None,
                       "load_after": after, "load_samples": len(self.samples), "cpus": cpus,
                       "others_cpu_share": share, "competed": competed, "why": why,
                       "wall_s": wall}
        return self.result

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def is_results_path(path):
    """Whether `path` is a file in a folder benchmarks/results/ (where published figures
    live)."""
    folder = os.path.dirname(os.path.abspath(path))
    return (os.path.basename(folder) == "results"
            and os.path.basename(os.path.dirname(folder)) == "benchmarks")


def load_refusal(path, load):
    """Why the JSON of a run must not be written to `path`, or None: a path in
    benchmarks/results/ and a run that other processes competed with."""
    if not load or not load.get("competed") or not is_results_path(path):
        return None
    return (f"not writing {path}: {load['why']}; figures published in benchmarks/results/ "
            "come from an idle machine. Rerun when it is idle, or pass --allow-load to write "
            "it anyway (the JSON records the load)")


def load_line(env):
    """How busy the machine was: on a shared CPU, other processes stretch the timings
    (with OpenMP, a thread that waits for a descheduled one waits a whole time slice)."""
    load = env.get("load")
    if load is not None:
        env["load_after"] = load["load_after"]
        parts = []
        if load["others_cpu_share"] is not None:
            parts.append(f"other processes took {load['others_cpu_share']:.0%} of the "
                         f"{load['cpus']} CPUs' time during the run")
        if load["load_before"] is not None:
            parts.append(f"load average (1 min) {load['load_before']:.2f} before, "
                         f"{load['load_max']:.2f} at most, {load['load_after']:.2f} after")
        line = "; ".join(parts) or load["why"]
        if load["competed"]:
            line += ": other processes competed, timings may be inflated; rerun when idle"
        return line
    before, after = env.get("load_before"), _load()
    env["load_after"] = after
    if before is None:
        return None
    line = (f"load average (1 min) before the run {before:.2f}, after {after:.2f}, "
            f"on {env['cpus']} CPUs")
    if env["device_type"] == "cpu" and before >= 1.0:
        line += ": other processes were running, CPU timings may be inflated; rerun when idle"
    return line


# ---------------------------------------------------------------- reports


def _fmt_ms(ms):
    if ms is None:
        return ""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}" if ms >= 0.01 else f"{ms:.4f}"


def _fmt(value, spec, suffix=""):
    return "" if value is None else f"{value:{spec}}{suffix}"


def _fmt_err(value):
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:.1e}"


def header_lines(env, settings=None, timer=None):
    lines = [f"fastreg bench   {env['device']}   {env['date']}",
             f"torch {env['torch']}   fastreg {env['fastreg']}, {env['backend']}   "
             f"commit {env['commit']}"]
    if env["device_type"] == "cpu":
        lines.append(f"CPU threads: {env['threads']} (torch.get_num_threads(); --threads sets it)")
    if timer is not None:
        lines += timing_lines(timer)
    load = load_line(env)
    if load:
        lines.append(load)
    return lines


def timing_lines(timer):
    """What the timings are: the method, in the table's header."""
    if timer.cuda and timer.l2_flush:
        clock = ("CUDA events around each call, L2 flushed before each call (a write of "
                 f"{L2_FLUSH_MIN_BYTES // 2**20} MB or 4x the L2, outside the timed region): "
                 "inputs come from HBM, launch gaps hidden")
    elif timer.cuda:
        clock = ("CUDA events around blocks of back-to-back calls, no L2 flush "
                 "(--no-l2-flush): small sizes run from L2, launch overhead included")
    else:
        clock = "time.perf_counter around each block (timeit.Timer, gc off)"
    return [f"timing: {clock}; the impls of each comparison interleaved, >= {timer.repeats} "
            "rounds of one block each, after warm-up"]


SPEEDUP_LINE = ("speedup: median over the rounds of baseline time / impl time in the same "
                "round; spread: their interquartile range; \"spread too wide\" where it holds "
                f"1.0 or is wider than {SPREAD_LIMIT:.0%} of the median")


def format_table(rows, env, settings=Settings(), timer=None):
    """The human-readable report: a header, then a table per family."""
    out = header_lines(env, settings, timer)
    out.append(SPEEDUP_LINE)
    out.append("GB/s: bytes the op must move / median time; copy: that as a share of "
               "dst.copy_(src) at the same size and dtype")
    dropout = [r for r in rows if r["op"] in DROPOUT_OPS]
    fused = [r for r in rows if r["op"] in FUSED_OPS]
    penalty = [r for r in rows if r["op"] in PENALTY_OPS]
    host = [r for r in rows if r["op"] in HOST_OPS]
    if dropout:
        out += ["", f"dropout, p={settings.p}: speedup against F.dropout; kept: bytes autograd "
                    "keeps for backward per element"]
        out += _table(dropout, ["op", "dtype", "size", "impl", "median ms", "GB/s", "copy",
                                "speedup", "spread", "kept B/el"],
                      lambda r: _fmt(r["saved_bytes_per_elem"], ".3f"))
    if fused:
        out += ["", f"fused, p={settings.p}, forward and backward, bias over a last dimension of "
                    f"{FUSED_WIDTH}: speedup against the native composition; GB/s: the fused "
                    "op's bytes (same for every impl)"]
        out += _table(fused, ["op", "dtype", "size", "impl", "median ms", "GB/s", "copy",
                              "speedup", "spread", "kept B/el"],
                      lambda r: _fmt(r["saved_bytes_per_elem"], ".3f"))
    if penalty:
        sets = sorted({r["params"] for r in penalty}, key=list(PARAM_SETS).index)
        described = "; ".join(f"{s}: {PARAM_SETS[s][0]}, {len(PARAM_SETS[s][1])} tensors, "
                              f"{human_size(param_set_numel(s))} elements" for s in sets)
        out += ["", f"penalty, l1={settings.l1} l2={settings.l2} ({described}):",
                "speedup against the Python loop; rel err: against float64 (value; grad_: "
                "the gradient's norm)"]
        out += _table(penalty, ["op", "dtype", "params", "impl", "median ms", "GB/s", "copy",
                                "speedup", "spread", "rel err"],
                      lambda r: _fmt_err(r["rel_err"]))
    if host:
        out += ["", f"the penalty's host overhead: float32 CPU tensors of {HOST_TENSOR_NUMEL} "
                    "elements (tiny148: 148 of them, as GPT-2 small has; tiny1000: 1,000), "
                    "time per call in microseconds against the Python loop; fastreg: "
                    "penalty(list), penalty_grad_(list), prox_l1_(list); fastreg:Penalty: "
                    "Penalty(l1=, l2=)(module); torch.cat: torch.cat(list), torch's own "
                    "operator over a tensor list with autograd, for scale"]
        out += _table(host, ["op", "dtype", "params", "impl", "median us", "GB/s", "copy",
                             "speedup", "spread", "per tensor us"],
                      lambda r: _fmt(r["median_ms"] * 1e3 / r["tensors"], ".2f"), unit="us")
    return "\n".join(out)


SPREAD_TOO_WIDE = "spread too wide"


def speedup_cells(r):
    """The speedup and spread cells of a row: "1.42x" and "1.38-1.47", or "spread too
    wide" in place of the speedup when the per-round ratios do not support it."""
    if r["speedup"] is None:
        return "", ""
    spread = ("" if r["speedup_q1"] is None or r["speedup_q1"] == r["speedup_q3"]
              else f"{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}")
    if r["speedup_clear"] is False:
        return SPREAD_TOO_WIDE, spread
    return f"{r['speedup']:.2f}x", spread


def _table(rows, names, last_cell, unit="ms"):
    """Aligned rows, grouped by (op, dtype, size); repeated group cells left blank."""
    order = {op: i for i, op in enumerate(OPS)}
    impl_order = (DROPOUT_IMPLS + PENALTY_IMPLS + HOST_IMPLS["host_penalty"]
                  + (COMPILE_IMPL,))
    impls = {impl: i for i, impl in enumerate(dict.fromkeys(impl_order))}
    rows = sorted(rows, key=lambda r: (order[r["op"]], list(DTYPES).index(r["dtype"]),
                                       r["numel"], r["params"] or "", impls.get(r["impl"], 99)))
    scale = 1e3 if unit == "us" else 1.0
    body, notes, previous = [], [], None
    for r in rows:
        group = (r["op"], r["dtype"], r["numel"], r["params"])
        size = r["params"] or human_size(r["numel"])
        lead = [OP_LABELS[r["op"]], r["dtype"], size] if group != previous else ["", "", ""]
        if group != previous and previous is not None:
            body.append(None)  # a blank line between groups
        previous = group
        if r["median_ms"] is None:
            notes.append(len(body))
            body.append(lead + [r["impl"], r["note"] or "no result"])
            continue
        body.append(lead + [r["impl"], _fmt_ms(r["median_ms"] * scale), _fmt(r["gbps"], ".1f"),
                            _fmt(r["copy_frac"], ".0%"), *speedup_cells(r), last_cell(r)])
    widths = [len(n) for n in names]
    for i, cells in enumerate(body):
        for k, cell in enumerate(cells or ()):
            if not (i in notes and k >= 4):  # a note runs free, past the columns
                widths[k] = max(widths[k], len(cell))

    def line(cells):
        # text columns left-aligned, numbers right-aligned; a note row's note runs free
        parts = [c.ljust(widths[k]) if k < 4 else c.rjust(widths[k]) if len(cells) > 5 else c
                 for k, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(names), line(["-" * w for w in widths])]
    out += ["" if cells is None else line(cells) for cells in body]
    return out


def device_slug(env):
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def json_path(path, env):
    """`path`, or `path`/<device>.json when it is a folder (or ends with a slash)."""
    if path.endswith(os.sep) or path.endswith("/") or os.path.isdir(path):
        return os.path.join(path, device_slug(env) + ".json")
    return path


def report(env, settings, copy_rows, rows, memory=None):
    """The JSON document: device, torch, fastreg, commit, copy_gbps, results."""
    doc = {"device": env["device"], "torch": env["torch"], "fastreg": env["fastreg"],
           "commit": env["commit"], "copy_gbps": copy_rows, "results": rows,
           "backend": env["backend"], "threads": env["threads"], "date": env["date"],
           "python": env["python"], "settings": dataclasses.asdict(settings),
           "load_before": env.get("load_before"), "load_after": env.get("load_after"),
           "load": env.get("load")}
    if memory is not None:
        doc["memory"] = memory
    return doc


def _finite(value):
    """`value` with every inf or nan float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path, doc):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(doc), f, indent=1, allow_nan=False)
        f.write("\n")
    return path


PLOT_MISSING = ("--plot needs matplotlib, an optional dependency that is not installed: "
                "pip install matplotlib")


def require_matplotlib():
    """The pyplot module (Agg backend); ImportError with PLOT_MISSING if absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(PLOT_MISSING) from error
    return plt


def plot(rows, copy_rows, env, path):
    """Bandwidth against size per impl, one panel per (dtype, dropout or fused op), with the
    copy bandwidth dashed; log-log axes. The penalty has one size per parameter set and is
    not drawn."""
    plt = require_matplotlib()
    from matplotlib import ticker

    rows = [r for r in rows if r["op"] in DROPOUT_OPS + FUSED_OPS and r["gbps"]]
    if not rows:
        raise ValueError("nothing to plot: --plot draws the dropout and fused rows, and none ran")
    ops = [op for op in DROPOUT_OPS + FUSED_OPS if any(r["op"] == op for r in rows)]
    dtypes = [dt for dt in DTYPES if any(r["dtype"] == dt for r in rows)]
    impls = [i for i in DROPOUT_IMPLS + (COMPILE_IMPL,) if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(len(dtypes), len(ops), figsize=(max(8.0, 4.2 * len(ops)), 1.0 + 3.2 * len(dtypes)),
                             squeeze=False, sharex=True)
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, dt in enumerate(dtypes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for impl in impls:
                pts = sorted((r["numel"], r["gbps"]) for r in rows
                             if r["op"] == op and r["dtype"] == dt and r["impl"] == impl)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=impl, color=colors[impl])
            sizes = {r["numel"] for r in rows if r["op"] == op and r["dtype"] == dt}
            cp = sorted((c["numel"], c["gbps"]) for c in copy_rows
                        if c["dtype"] == dt and c["numel"] in sizes)
            if cp:
                ax.plot(*zip(*cp), ls="--", marker=".", color="black", lw=1, label="copy_")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # the impls differ by factors, and copy_ sits far above
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"{OP_LABELS[op]}, {dt}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("GB/s")
            if i == len(dtypes) - 1:
                ax.set_xlabel("elements")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"fastreg dropout: {env['device']}\ntorch {env['torch']}, commit "
                 f"{env['commit']}, {env['date']}", fontsize=10)
    top = 1 - 1.0 / fig.get_figheight()  # room for the title and the legend
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
               bbox_to_anchor=(0.5, top + 0.35 / fig.get_figheight()), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@contextlib.contextmanager
def num_threads(n):
    """torch.set_num_threads(n) inside, restored after (n None: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
