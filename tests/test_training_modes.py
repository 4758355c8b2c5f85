"""Training under torch.autocast, torch.use_deterministic_algorithms and CUDA graphs,
with every fastreg op family (tests/all_ops_model.py)."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from all_ops_model import AllOps, batch, loss_fn, train
from conftest import MASK_MODES, requires_cuda, requires_extension
from torch import nn

import fastreg

P = 0.3

AUTOCAST = [("cpu", torch.bfloat16)] + (
    [("cuda", torch.float16), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else []
)


# ---- autocast ------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_keeps_the_dtype_rules_of_native_dropout(device, dtype):
    """Dropout is not on autocast's lists: it runs in its input's dtype, and the fused ops
    promote as their eager compositions do. fastreg's output dtypes are native's, and
    autocast changes nothing else (same bits as the same call outside it)."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 16, bias=False).to(device)
    conv = nn.Conv2d(3, 4, 3).to(device)
    bias = torch.randn(16, device=device, requires_grad=True)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    residual = torch.randn(4, 16, device=device)
    with torch.autocast(device, dtype=dtype):
        h = linear(x)  # low precision
        c = conv(torch.randn(2, 3, 6, 6, device=device))
        cases = {
            "dropout": (fastreg.dropout(h, P, seed=1), F.dropout(h, P)),
            "dropout float32": (fastreg.dropout(x, P, seed=1), F.dropout(x, P)),
            "bias_dropout_add": (
                fastreg.bias_dropout_add(h, bias, residual, P, seed=1),
                residual + F.dropout(h + bias, P),
            ),
            "bias_act_dropout": (
                fastreg.bias_act_dropout(h, bias, P, "gelu", seed=1),
                F.dropout(F.gelu(h + bias), P),
            ),
            "dropout2d": (fastreg.dropout2d(c, P, seed=1), F.dropout2d(c, P)),
        }
    assert h.dtype == c.dtype == dtype
    for name, (ours, native) in cases.items():
        assert ours.dtype == native.dtype, name
    outside = {
        "dropout": fastreg.dropout(h, P, seed=1),
        "dropout float32": fastreg.dropout(x, P, seed=1),
        "bias_dropout_add": fastreg.bias_dropout_add(h, bias, residual, P, seed=1),
        "bias_act_dropout": fastreg.bias_act_dropout(h, bias, P, "gelu", seed=1),
        "dropout2d": fastreg.dropout2d(c, P, seed=1),
    }
    for name, out in outside.items():
        assert torch.equal(cases[name][0], out), name
    sum(ours.float().sum() for ours, _ in cases.values()).backward()
    assert x.grad.dtype == linear.weight.grad.dtype == bias.grad.dtype == torch.float32


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_model_trains_under_autocast(device, dtype):
    torch.manual_seed(0)
    model = AllOps().to(device)
    before = copy.deepcopy(model.state_dict())

    def autocast_step(model, x, y):
        with torch.autocast(device, dtype=dtype):
            return loss_fn(model, x, y)

    losses = train(model, 2, seed=3, step_fn=autocast_step, device=device)
    assert all(torch.isfinite(loss) for loss in losses)
    for name, param in model.state_dict().items():
        assert param.dtype == torch.float32 and not torch.equal(param, before[name]), name


# ---- deterministic algorithms --------------------------------------------------


@contextlib.contextmanager
def deterministic_algorithms():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def cublas_workspace(monkeypatch):
    """The setting deterministic cuBLAS needs (else CUDA matmuls raise in that mode)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.mark.parametrize("mode", MASK_MODES)
def test_training_runs_and_repeats_bitwise_under_deterministic_algorithms(
    device, mode, cublas_workspace
):
    """Three SGD steps run with torch.use_deterministic_algorithms(True) (which also fills
    new tensors with NaN, so a kernel reading memory it did not write would show) and
    give the same bits twice; on the CPU also the bits of a run without the setting."""
    torch.manual_seed(0)
    model = AllOps(mode).to(device)
    copies = [copy.deepcopy(model) for _ in range(3)]
    runs = [train(copies[0], 3, seed=5, device=device)]
    with deterministic_algorithms():
        runs += [train(m, 3, seed=5, device=device) for m in copies[1:]]
    # CUDA's own conv backward is not deterministic without the setting
    first = 1 if device == "cuda" else 0
    for run, other in zip(runs[first + 1 :], copies[first + 1 :]):
        assert all(torch.equal(a, b) for a, b in zip(runs[first], run))
        assert all(
            torch.equal(a, b) for a, b in zip(copies[first].parameters(), other.parameters())
        )


def test_in_place_penalty_steps_repeat_bitwise_under_deterministic_algorithms(device):
    torch.manual_seed(0)
    model = AllOps().to(device)
    results = []
    for _ in range(2):
        m = copy.deepcopy(model)
        for param in m.parameters():
            param.grad = torch.ones_like(param)
        with deterministic_algorithms():
            fastreg.penalty_grad_(m, l1=1e-3, l2=1e-2)
            fastreg.prox_l1_(m, 1e-2)
        results.append([t.clone() for p in m.parameters() for t in (p, p.grad)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@requires_extension  # reads the operators' mask buffers
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("op", ["dropout", "bias_dropout_add", "bias_act_dropout"])
def test_mask_buffers_are_fully_written(device, mode, op):
    """The deterministic setting fills new tensors (the masks included) with NaN or the
    dtype's maximum: every bit of a saved mask, the padding of the last bits word included,
    must come out the same as without it."""
    x = torch.randn(149, 7, device=device)  # 1043 elements: the last bits word is partial
    bias, residual = torch.randn(7, device=device), torch.randn(149, 7, device=device)
    state = torch.tensor([12, 34], device=device)
    ops = torch.ops.fastreg
    run = {
        "dropout": lambda: ops.dropout_fwd(x, P, state, mode),
        "bias_dropout_add": lambda: ops.bias_dropout_add_fwd(x, bias, residual, P, state, mode),
        "bias_act_dropout": lambda: ops.bias_act_dropout_fwd(x, bias, P, "gelu", state, mode),
    }[op]
    with deterministic_algorithms():
        out, mask = run()
    out_plain, mask_plain = run()
    assert torch.equal(out, out_plain) and torch.equal(mask, mask_plain)


# ---- CUDA graphs ---------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("mode", MASK_MODES)
def test_cuda_graph_training_step_replays_with_fresh_masks(mode):
    """A whole SGD step (forward with every op family, the penalty, backward, optimizer
    step) captured in one CUDA graph: each replay draws new masks, as native dropout does
    (the (seed, offset) pair is drawn on the device, by the graph-safe generator)."""
    torch.manual_seed(0)
    model = AllOps(mode).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    static_x, static_y = batch("cuda")
    outputs = {}
    for name in ("drop", "drop2d"):
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: outputs.__setitem__(name, out)
        )

    def step():
        loss = loss_fn(model, static_x, static_y)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the graph, as torch's docs do
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()

    patterns, weights = [], []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_loss)
        patterns.append({name: (out == 0).clone() for name, out in outputs.items()})
        weights.append(model.fc1.weight.detach().clone())
    for name in ("drop", "drop2d"):
        assert not torch.equal(patterns[0][name], patterns[1][name]), name
        assert not torch.equal(patterns[1][name], patterns[2][name]), name
    assert not torch.equal(weights[0], weights[1])
