"""The case grid: ops, impls, sizes, dtypes, parameter sets, :class:`Case` and
:func:`cases`, and the parsers of the command line's lists.

Ops (the names ``--ops`` takes; ``dropout``, ``fused``, ``penalty`` and ``host`` select a
family):

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
* ``host_penalty``, ``host_penalty_step``, ``host_penalty_grad``, ``host_prox_l1``: the
  penalty's host overhead on tiny CPU tensors (148 or 1,000 tensors of 4 elements, the
  parameter sets ``tiny148`` and ``tiny1000``), whatever ``--device``.

The impls of each family, the baseline (the speedup's reference) first, are in
``DROPOUT_IMPLS``, ``FUSED_IMPLS``, ``PENALTY_IMPLS`` and ``HOST_IMPLS``;
:mod:`fastreg.bench.baselines` builds them.
"""

import dataclasses
import math
import re

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}

DROPOUT_OPS = ("dropout_fwd", "dropout_bwd", "dropout_fwdbwd")
FUSED_OPS = ("bias_dropout_add", "bias_gelu_dropout")
PENALTY_OPS = ("penalty_value", "penalty_fwdbwd", "penalty_grad")
HOST_OPS = ("host_penalty", "host_penalty_step", "host_penalty_grad", "host_prox_l1")
OPS = DROPOUT_OPS + FUSED_OPS + PENALTY_OPS + HOST_OPS
FAMILY = {
    **{op: "dropout" for op in DROPOUT_OPS},
    **{op: "fused" for op in FUSED_OPS},
    **{op: "penalty" for op in PENALTY_OPS},
    **{op: "host" for op in HOST_OPS},
}
OP_LABELS = {
    "dropout_fwd": "forward",
    "dropout_bwd": "backward",
    "dropout_fwdbwd": "fwd+bwd",
    "bias_dropout_add": "bias+dropout+add",
    "bias_gelu_dropout": "bias+gelu+dropout",
    "penalty_value": "value",
    "penalty_fwdbwd": "fwd+bwd",
    "penalty_grad": "grad_",
    "host_penalty": "penalty",
    "host_penalty_step": "penalty in step",
    "host_penalty_grad": "penalty_grad_",
    "host_prox_l1": "prox_l1_",
}

# The impls of each family, the baseline (the speedup's reference) first.
DROPOUT_IMPLS = ("native", "fastreg:bits", "fastreg:bool", "fastreg:recompute")
FUSED_IMPLS = DROPOUT_IMPLS
PENALTY_IMPLS = ("loop", "foreach", "fastreg")
# fastreg:Penalty is fastreg.Penalty(l1=, l2=)(module), the module holding the tensors;
# torch.cat is torch.cat(list), torch's own operator over a tensor list with autograd: for
# scale, the autograd work (an edge to each tensor's AccumulateGrad node, made anew when no
# graph holds it) that any such operator pays.
HOST_IMPLS = {
    "host_penalty": ("loop", "fastreg", "fastreg:Penalty", "torch.cat"),
    "host_penalty_step": ("loop", "fastreg", "fastreg:Penalty", "torch.cat"),
    "host_penalty_grad": ("loop", "fastreg"),
    "host_prox_l1": ("loop", "fastreg"),
}
COMPILE_IMPL = "compile"
BASELINE = {"dropout": "native", "fused": "native", "penalty": "loop", "host": "loop"}
FUSED_WIDTH = 1024  # the last dimension of the fused ops' input (the bias' length)

GPU_SIZES = tuple(2**k for k in range(16, 29, 2))
CPU_SIZES = tuple(2**k for k in range(16, 25, 2))
QUICK_SIZES = {"cpu": (2**16, 2**20), "cuda": (2**16, 2**20, 2**24)}
QUICK_DTYPES = ("float32",)


def _mlp_shapes(layers=50, width=256):
    return [(width, width), (width,)] * layers


def _gpt2_shapes(layers=12, d=768, vocab=50257, context=1024):
    block = [
        (d,),
        (d,),
        (d, 3 * d),
        (3 * d,),
        (d, d),
        (d,),  # ln_1, attn
        (d,),
        (d,),
        (d, 4 * d),
        (4 * d,),
        (4 * d, d),
        (d,),
    ]  # ln_2, mlp
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
    value = int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]
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


OP_GROUPS = {
    "dropout": DROPOUT_OPS,
    "fused": FUSED_OPS,
    "penalty": PENALTY_OPS,
    "host": HOST_OPS,
    "all": OPS,
}


def cases(device, *, ops=OPS, dtypes=None, sizes=None, params=None, quick=False, compile=False):
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
            out += [
                Case(op, impl, dt, n)
                for dt in dtypes
                for n in sizes
                for impl in DROPOUT_IMPLS + extra
            ]
        elif op in FUSED_OPS:
            out += [
                Case(op, impl, dt, n)
                for dt in dtypes
                for n in sizes
                if n % FUSED_WIDTH == 0
                for impl in FUSED_IMPLS + extra
            ]
        elif op in HOST_OPS:  # float32 CPU tensors whatever the dtypes and device
            sets = ("tiny148",) if quick else tuple(HOST_SETS)
            out += [
                Case(op, impl, "float32", HOST_SETS[hs] * HOST_TENSOR_NUMEL, hs)
                for hs in sets
                for impl in HOST_IMPLS[op]
            ]
        else:
            out += [
                Case(op, impl, dt, param_set_numel(ps), ps)
                for dt in dtypes
                for ps in params
                for impl in PENALTY_IMPLS + extra
            ]
    return out


def param_set_numel(name):
    if name in HOST_SETS:
        return HOST_SETS[name] * HOST_TENSOR_NUMEL
    return sum(math.prod(s) for s in PARAM_SETS[name][1])


def param_set_tensors(name):
    return HOST_SETS[name] if name in HOST_SETS else len(PARAM_SETS[name][1])
