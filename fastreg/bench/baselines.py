"""The impls of every case (the native, Python-loop and ``torch._foreach`` baselines
beside fastreg's calls) and :func:`prepare`, which builds one case's inputs and the
callable to time.

Bytes an op must move (for GB/s): dropout forward reads the input and writes the output
and the mask it keeps; backward reads the gradient and the mask and writes the input's
gradient; the mask's size is what the impl is measured to keep for backward (bits:
numel/8, bool: numel, recompute: 16 bytes of seed and offset, native on the CPU: a
full-width tensor). The penalty value reads every parameter once; its gradient reads
the parameters and writes (penalty_grad: reads and writes) the gradients. The fused ops
are charged the same bytes whatever the impl (their inputs, output and gradients and a
1-bit mask, forward and backward): their GB/s is an effective bandwidth.

The host-overhead cases time ``fastreg.penalty(list)``, ``fastreg.Penalty(l1=, l2=)(module)``,
``fastreg.penalty_grad_(list)`` and ``fastreg.prox_l1_(list)`` against the Python loop on
tiny CPU tensors, so that the time per call is the Python and C++ work around the
kernels. ``host_penalty`` calls the penalty with no graph alive (each call makes every
parameter's AccumulateGrad node anew), ``host_penalty_step`` with the parameters in a live
graph, as in a training step; both also time ``torch.cat(list)``, torch's own operator
over a tensor list with autograd, which pays the same autograd work per tensor.
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

import fastreg
from fastreg.bench.grid import (
    COMPILE_IMPL,
    DTYPES,
    FUSED_WIDTH,
    HOST_PROX_THRESHOLD,
    HOST_SETS,
    HOST_TENSOR_NUMEL,
    PARAM_SETS,
    Settings,
)

PENALTY_UNAVAILABLE = "penalty: not available in this build"
FUSED_UNAVAILABLE = "fused: not available in this build"


@dataclasses.dataclass
class Prepared:
    """One case, ready: `fn()` is what is timed."""

    fn: object = None
    bytes: int = 0  # bytes the op must move per call
    saved_per_elem: float = None  # bytes autograd keeps for backward, per element
    rel_err: float = None  # penalty: relative error against float64
    note: str = None  # why there is no fn


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


def forget_params():
    """Frees the parameters :func:`cached_params` keeps."""
    _PARAMS_CACHE.clear()


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
    return Prepared(
        fn=lambda: torch.autograd.grad(f(x, b, r), inputs, g),
        bytes=n_bytes,
        saved_per_elem=kept / case.numel,
    )


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
        return Prepared(
            fn=lambda: torch.autograd.grad(f(params), params),
            bytes=3 * numel * size,
            saved_per_elem=kept / numel,
            rel_err=_rel_err(value, ref_value),
        )
    for w in params:
        w.grad = torch.zeros_like(w)
    with torch.no_grad():
        f(params)
    diff = sum((w.grad.double() - r).square().sum().item() for w, r in zip(params, ref_grads))
    norm = sum(r.square().sum().item() for r in ref_grads)
    return Prepared(
        fn=lambda: f(params),
        bytes=3 * numel * size,
        rel_err=math.sqrt(diff / norm) if norm else math.sqrt(diff),
    )


def _call_with_graph_alive(fn, forward_graph):
    """fn(); the partial that calls it holds forward_graph."""
    return fn()


def _prepare_host(case, settings):
    """Tiny float32 CPU tensors: the time per call is the work around the kernels."""
    gen = _generator("cpu")
    params = [
        torch.randn(HOST_TENSOR_NUMEL, generator=gen).requires_grad_()
        for _ in range(HOST_SETS[case.params])
    ]
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
            module.params = torch.nn.ParameterList(
                torch.nn.Parameter(w.detach().clone()) for w in params
            )
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
        grad_ = (
            penalty_grad_loop
            if impl == "loop"
            else (lambda ps, a, b: fastreg.penalty_grad_(ps, l1=a, l2=b))
        )

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


def copy_case(numel, dtype, device):
    """`dst.copy_(src)`: the device's bandwidth at this size, bytes = 2 * size."""
    src = torch.randn(numel, device=device, dtype=torch.float32).to(DTYPES[dtype])
    dst = torch.empty_like(src)
    return Prepared(fn=lambda: dst.copy_(src), bytes=2 * numel * src.element_size())
