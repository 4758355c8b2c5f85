"""fastreg.regenerate_dropped and replace_dropout(regenerate=True) (docs/regenerate.md):
the ops after a dropout keep its input and (seed, offset) instead of the dropped tensor,
and the backward regenerates it.

Every gradient is compared bitwise with that of the same step, same seeds, with the
dropped tensor kept; and the dropped tensor's storage must be missing from what autograd
keeps. The module runs on the CPU kernels, on the CUDA simulator (make test-cudasim) and on
the reference backend (make test-reference): the same assertions on each."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from conftest import MASK_MODES, requires_extension
from torch import nn

import fastreg
from fastreg import _regen, _rng

P = 0.3


# Whether this torch reports the active saved-tensor hooks, which regenerate_dropped
# composes with its own; where it does not (torch 2.4), the context's hooks replace outer
# ones while it is active, so an outer Probe sees nothing inside it.
HOOKS_COMPOSE = hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks")


class Probe:
    """An outer saved-tensor hook pair that records what autograd keeps (each storage
    once, by its data pointer) and keeps it unchanged. Around a regenerate_dropped context
    on a torch whose hooks do not compose it sees nothing: asking it then skips the test
    (after the gradients have been compared)."""

    def __init__(self):
        self.storages = {}
        self.blind = False

    def _check_sight(self):
        if self.blind:
            pytest.skip(
                "this torch cannot report the active saved-tensor hooks, so an outer "
                "probe sees nothing inside regenerate_dropped()"
            )

    def pack(self, t):
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t.detach()

    def unpack(self, t):
        return t

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def keeps(self, tensor):
        self._check_sight()
        return tensor.untyped_storage().data_ptr() in self.storages

    def bytes(self):
        self._check_sight()
        return sum(self.storages.values())


def grads(tensors):
    out = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y), (x - y).abs().max()


def run(step, leaves, regenerate, seed=0, probe=None):
    """(gradients of `leaves`, what step() returned) for one step with seed `seed`."""
    torch.manual_seed(seed)
    if probe is not None and regenerate and not HOOKS_COMPOSE:
        probe.blind = True
    with probe() if probe is not None else _nothing():
        with fastreg.regenerate_dropped(regenerate):
            loss, extra = step()
    loss.backward()
    return grads(leaves), extra


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- each op, each mask mode, each kind of consumer ------------------------------------


def _ops():
    return {
        "dropout": lambda h, mask: fastreg.dropout(h, P, mask=mask),
        "dropout1d": lambda h, mask: fastreg.dropout1d(h, P, mask=mask),
        "dropout2d": lambda h, mask: fastreg.dropout2d(h.unsqueeze(-1), P, mask=mask).squeeze(-1),
        "dropout1d-unbatched": lambda h, mask: fastreg.dropout1d(h[0], P, mask=mask),
        "bias_act_dropout": lambda h, mask: fastreg.bias_act_dropout(h, BIAS, P, "gelu", mask=mask),
        "bias_act_dropout-none": lambda h, mask: fastreg.bias_act_dropout(
            h, BIAS, P, None, mask=mask
        ),
    }


BIAS = torch.randn(24, generator=torch.Generator().manual_seed(5)).requires_grad_()
OPS = list(_ops())

# consumers that save the dropped tensor: a Linear on a 3-D input saves a 2-D view of it,
# a matmul with a transposed operand saves a strided view, a product saves it whole
CONSUMERS = {
    "linear": lambda d, w: F.linear(d, w),
    "matmul-transposed": lambda d, w: (
        d.transpose(-1, -2) @ w[: d.shape[-2]].expand(d.shape[:-2] + (d.shape[-2], w.shape[1]))
    ),
    "mul": lambda d, w: d * w[0],
}


@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mask", MASK_MODES)
def test_gradients_equal_and_the_dropped_tensor_is_not_kept(mask, op, consumer):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 24, generator=gen).requires_grad_()
    w = torch.randn(24, 24, generator=gen).requires_grad_()
    drop, use = _ops()[op], CONSUMERS[consumer]

    def step():
        h = torch.tanh(x)  # tanh keeps its output: h is kept anyway
        d = drop(h, mask)
        return use(d, w).square().sum(), d

    expected, _ = run(step, [x, w, BIAS], False)
    probe = Probe()
    got, dropped = run(step, [x, w, BIAS], True, probe=probe)
    assert_same(got, expected)
    assert not probe.keeps(dropped), "the dropped tensor is still kept"
    probe = Probe()  # and without the context it is
    _, dropped = run(step, [x, w, BIAS], False, probe=probe)
    assert probe.keeps(dropped)


@requires_extension  # the reference keeps a bool mask in every mode
def test_what_is_kept_is_the_floor_plus_16_bytes_per_call():
    """A LoRA-like block: a frozen base Linear and an adapter A(dropout(x)) @ B, for three
    projections of the same input. Without dropout A keeps x; with fastreg's dropout in
    recompute mode and regeneration, x (the same storage) and 16 bytes per call."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 32, generator=gen).requires_grad_()
    base = torch.randn(32, 32, generator=gen)
    a = [torch.randn(4, 32, generator=gen).requires_grad_() for _ in range(3)]
    b = [torch.zeros(32, 4).requires_grad_() for _ in range(3)]

    def block(dropout):
        h = F.layer_norm(x, (32,))
        return sum(
            F.linear(h, base) + F.linear(F.linear(dropout(h), a[i]), b[i]) for i in range(3)
        ).sum()

    def kept(dropout, regenerate):
        probe = Probe()
        probe.blind = regenerate and not HOOKS_COMPOSE
        with probe(), fastreg.regenerate_dropped(regenerate):
            block(dropout).backward()
        return probe.bytes()

    floor = kept(lambda h: h, False)
    native = kept(lambda h: F.dropout(h, P), False)
    bits = kept(lambda h: fastreg.dropout(h, P), False)
    regen = kept(lambda h: fastreg.dropout(h, P, mask="recompute"), True)
    regen_bits = kept(lambda h: fastreg.dropout(h, P, mask="bits"), True)
    n = x.numel()
    assert regen == floor + 3 * 16
    assert regen_bits == floor + 3 * (16 + (n + 31) // 32 * 4)
    assert bits > regen_bits and native > bits


# ---- views, in place, versions ----------------------------------------------------------


def test_a_view_saved_by_several_consumers_is_regenerated_for_each():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 8, generator=gen).requires_grad_()
    w = torch.randn(8, 8, generator=gen).requires_grad_()
    calls = []

    def step():
        d = fastreg.dropout(torch.tanh(x), 0.5, mask="recompute")
        v = d[1, 1:5].t()  # a strided view with an offset
        return (torch.mm(v, w[:4]).sum() + (d[1] * d[2]).sum() + F.linear(d, w).sum()), d

    expected, _ = run(step, [x, w], False)
    original = _regen._Recipe.regenerate

    def counted(self, tensors=None):
        calls.append(1)
        return original(self, tensors)

    _regen._Recipe.regenerate = counted
    try:
        probe = Probe()
        got, d = run(step, [x, w], True, probe=probe)
    finally:
        _regen._Recipe.regenerate = original
    assert_same(got, expected)
    assert not probe.keeps(d)
    assert len(calls) == 4  # one per saved use: mm's view, two rows, the Linear's view


def test_an_input_modified_in_place_before_backward_raises():
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    with fastreg.regenerate_dropped():
        h = x * 2
        out = F.linear(fastreg.dropout(h, P, mask="recompute"), w)
    h.mul_(3)
    with pytest.raises(
        RuntimeError, match="modified by an inplace operation: the input of fastreg's dropout"
    ):
        out.sum().backward()


def test_an_input_modified_in_place_before_it_is_saved_keeps_the_copy():
    """Between the dropout and the consumer: the input can no longer stand in, so the
    consumer keeps the dropped tensor itself, and the gradient is right."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 8, generator=gen).requires_grad_()
    w = torch.randn(8, 8, generator=gen).requires_grad_()

    def step():
        h = x * 2
        d = fastreg.dropout(h, P)
        h.add_(1)
        return F.linear(d, w).sum(), d

    expected, _ = run(step, [x, w], False)
    probe = Probe()
    got, d = run(step, [x, w], True, probe=probe)
    assert_same(got, expected)
    assert probe.keeps(d)


def test_a_kept_tensor_modified_in_place_raises_as_without_the_context():
    """Autograd does not check the versions of tensors that saved-tensor hooks pack: the
    context's hooks do, for every tensor they keep."""
    x = torch.randn(4, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    with fastreg.regenerate_dropped():
        h = x * 2
        out = (h @ w).sum()
    h.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_an_output_modified_in_place_is_kept_or_refused_as_autograd_does():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 8, generator=gen).requires_grad_()
    w = torch.randn(8, 8, generator=gen).requires_grad_()

    def step():  # modified before it is saved: its current value is kept
        d = fastreg.dropout(x * 2, P)
        d.mul_(3)
        return F.linear(d, w).sum(), d

    expected, _ = run(step, [x, w], False)
    probe = Probe()
    got, d = run(step, [x, w], True, probe=probe)
    assert_same(got, expected)
    assert probe.keeps(d)
    with fastreg.regenerate_dropped():  # modified after: autograd's own error
        d = fastreg.dropout(x * 2, P)
        out = F.linear(d, w).sum()
    d.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("mask", MASK_MODES)
def test_inplace_dropout_keeps_its_output(mask):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 16, generator=gen).requires_grad_()
    w = torch.randn(16, 16, generator=gen).requires_grad_()

    def step():
        d = fastreg.dropout(x * 2, P, inplace=True, mask=mask)
        return F.linear(d, w).sum(), d

    expected, _ = run(step, [x, w], False)
    probe = Probe()
    got, d = run(step, [x, w], True, probe=probe)
    assert_same(got, expected)
    assert probe.keeps(d) and not hasattr(d, _regen._ATTR)


def test_nothing_is_noted_outside_the_context_or_without_grad():
    x = torch.randn(4, 4)
    assert not hasattr(fastreg.dropout(x, P), _regen._ATTR)
    with fastreg.regenerate_dropped():
        assert hasattr(fastreg.dropout(x, P), _regen._ATTR)  # a LoRA input needs no grad
        with torch.no_grad():
            assert not hasattr(fastreg.dropout(x, P), _regen._ATTR)
        with fastreg.regenerate_dropped(False):
            assert _regen.active()  # an inner disabled context changes nothing
    assert not _regen.active()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastreg.regenerate_dropped("yes")


def test_double_backward():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 8, generator=gen).requires_grad_()
    w = torch.randn(8, 8, generator=gen).requires_grad_()

    def step():
        d = fastreg.dropout(torch.tanh(x), P, mask="recompute")
        (gw,) = torch.autograd.grad(F.linear(d, w).square().sum(), [w], create_graph=True)
        return gw.square().sum(), None

    expected, _ = run(step, [x, w], False)
    got, _ = run(step, [x, w], True)
    assert_same(got, expected)


# ---- checkpointing, routing, autocast, compile -------------------------------------------


def _block(x, w):
    return F.linear(fastreg.dropout(torch.tanh(x), 0.5, mask=MODE[0]), w).square().sum()


MODE = ["recompute"]


@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("mask", MASK_MODES)
def test_checkpointing_one_mask_same_gradients(mask, use_reentrant, where):
    MODE[0] = mask
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(16, 32, generator=gen).requires_grad_()
    w = torch.randn(32, 32, generator=gen).requires_grad_()
    expected, _ = run(lambda: (_block(x, w), None), [x, w], False)

    def inner(x, w):
        with fastreg.regenerate_dropped():
            return _block(x, w)

    fn = inner if where == "inside" else _block
    torch.manual_seed(0)
    with fastreg.regenerate_dropped(where == "outside"):
        loss = cp.checkpoint(fn, x, w, use_reentrant=use_reentrant)
    loss.backward()
    assert_same(grads([x, w]), expected)


class Net(nn.Module):
    """Dropout modules, a functional dropout call, and a channel dropout."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.drop = nn.Dropout(0.2)
        self.conv = nn.Conv1d(32, 32, 1)
        self.drop1d = nn.Dropout1d(0.25)

    def forward(self, x):
        h = self.drop(F.gelu(self.fc1(x)))
        h = F.dropout(torch.tanh(self.fc2(h)), 0.3, self.training)
        h = self.drop1d(self.conv(h.unsqueeze(-1))).squeeze(-1)
        return self.fc3(h)


@pytest.mark.parametrize("mask", MASK_MODES)
def test_replace_dropout_regenerate_functional(mask):
    torch.manual_seed(0)
    net = Net()
    plain = fastreg.replace_dropout(copy.deepcopy(net), mask=mask, functional=True)
    regen = fastreg.replace_dropout(copy.deepcopy(net), mask=mask, functional=True, regenerate=True)
    x = torch.randn(8, 16)
    results = []
    for model in (plain, regen):
        probe = Probe()
        probe.blind = model is regen and not HOOKS_COMPOSE
        torch.manual_seed(1)
        with probe():
            model(x).square().sum().backward()
        results.append(([p.grad for p in model.parameters()], probe))
    assert_same(results[1][0], results[0][0])
    assert not _regen.active()
    copy.deepcopy(regen)
    regen.eval()
    with torch.no_grad():
        assert torch.equal(regen(x), net.eval()(x))
    assert results[1][1].bytes() < results[0][1].bytes()


def test_dropout_mode_inside_the_context():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(8, 16, generator=gen).requires_grad_()
    w = torch.randn(16, 16, generator=gen).requires_grad_()

    def step():
        with fastreg.DropoutMode(mask="recompute"):
            d = F.dropout(torch.tanh(x), P)
        return F.linear(d, w).sum(), d

    expected, _ = run(step, [x, w], False)
    probe = Probe()
    got, d = run(step, [x, w], True, probe=probe)
    assert_same(got, expected)
    assert not probe.keeps(d)


@pytest.mark.parametrize("mask", MASK_MODES)
def test_autocast_bfloat16(mask):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 16, 32, generator=gen).requires_grad_()
    w1 = torch.randn(32, 32, generator=gen).requires_grad_()
    w2 = torch.randn(32, 32, generator=gen).requires_grad_()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = fastreg.dropout(F.linear(x, w1), P, mask=mask)  # bfloat16
            out = F.linear(d, w2)
        return out.float().square().sum(), d

    expected, _ = run(step, [x, w1, w2], False)
    probe = Probe()
    got, d = run(step, [x, w1, w2], True, probe=probe)
    assert d.dtype == torch.bfloat16
    assert_same(got, expected)
    assert not probe.keeps(d)


# where the compiled dropout is tagged MUST_RECOMPUTE (torch >= 2.8)
HAVE_SAC = _rng.memory_budget_refusal() is None


def _saved_bytes_backend(record):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    aliases = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)

    def root(node):  # a detach (the checkpoint region makes them) is no new memory
        while getattr(node, "target", None) in aliases:
            node = node.args[0]
        return node

    def fw(gm, inputs):
        """The bytes of the forward graph's outputs (the user's and the saved ones), each
        tensor once."""
        (outs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        roots = {root(n) for n in outs if hasattr(n, "meta")}
        vals = [n.meta.get("val") for n in roots]
        record.append(
            sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor))
        )
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, inputs: make_boxed_func(gm))


@pytest.mark.parametrize("budget", [1.0, 0.05])
@pytest.mark.parametrize("mask", MASK_MODES)
def test_compiled_the_partitioner_recomputes_the_dropout(mask, budget):
    """The forward graph's saved outputs lose the dropped tensor (16 x 64 float32) and the
    gradient is bitwise the eager one's, with and without a memory budget."""
    import torch._functorch.config as functorch_config

    if budget < 1 and _rng.memory_budget_refusal() is not None:
        pytest.skip(f"torch {torch.__version__} refuses a budget below 1")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(16, 64, generator=gen).requires_grad_()
    w = torch.randn(8, 64, generator=gen).requires_grad_()

    def f(x, w):
        h = torch.tanh(x)
        return F.linear(fastreg.dropout(h, P, mask=mask), w).square().sum() + h.sum()

    expected, _ = run(lambda: (f(x, w), None), [x, w], False)
    saved = {}
    for regenerate in (False, True):
        record = []
        torch._dynamo.reset()
        compiled = torch.compile(f, backend=_saved_bytes_backend(record), fullgraph=True)
        with functorch_config.patch(activation_memory_budget=budget):
            got, _ = run(lambda: (compiled(x, w), None), [x, w], regenerate)
        assert_same(got, expected)
        saved[regenerate] = record[0]
    if HAVE_SAC and budget == 1.0:
        assert saved[True] <= saved[False] - x.numel() * 4
    else:  # torch < 2.8: the output is kept; under a budget the partitioner decides anyway
        assert saved[True] <= saved[False]


def test_compiled_inductor_same_gradient():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(16, 64, generator=gen).requires_grad_()
    w = torch.randn(8, 64, generator=gen).requires_grad_()

    def f(x, w):
        return F.linear(fastreg.dropout(torch.tanh(x), P, mask="recompute"), w).square().sum()

    results = []
    for regenerate in (False, True):  # inductor's fused tanh is not eager's, bitwise
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True)
        results.append(run(lambda: (compiled(x, w), None), [x, w], regenerate)[0])
    assert_same(results[1], results[0])


def test_a_graph_compiled_outside_the_context_is_recompiled_inside():
    record = []
    torch._dynamo.reset()
    x = torch.randn(16, 64, requires_grad=True)
    w = torch.randn(8, 64, requires_grad=True)

    def f(x, w):
        return F.linear(fastreg.dropout(x.tanh(), P, mask="recompute"), w).sum()

    compiled = torch.compile(f, backend=_saved_bytes_backend(record), fullgraph=True)
    compiled(x, w)
    with fastreg.regenerate_dropped():
        compiled(x, w)
    compiled(x, w)
    assert len(record) == 2 and (not HAVE_SAC or record[1] < record[0])


# ---- Hugging Face models ------------------------------------------------------------------


def _same_model_gradients(model, inputs, mask="recompute"):
    plain = fastreg.replace_dropout(copy.deepcopy(model), mask=mask, functional=True)
    regen = fastreg.replace_dropout(
        copy.deepcopy(model), mask=mask, functional=True, regenerate=True
    )
    out = []
    for m in (plain, regen):
        m.train()
        probe = Probe()
        probe.blind = m is regen and not HOOKS_COMPOSE
        torch.manual_seed(0)
        with probe():
            loss = m(**inputs).loss
        loss.backward()
        out.append(([p.grad for p in m.parameters() if p.requires_grad], probe))
    assert_same(out[1][0], out[0][0])
    assert out[1][1].bytes() < out[0][1].bytes()


def test_t5(transformers):
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        dropout_rate=0.1,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 12), generator=gen)
    _same_model_gradients(model, {"input_ids": ids, "labels": ids})


def test_peft_lora_llama(transformers):
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():  # B starts at zero: give A a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 12), generator=gen)
    _same_model_gradients(model, {"input_ids": ids, "labels": ids})


def test_a_compiled_model_with_replace_dropout_regenerate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 4))
    plain = fastreg.replace_dropout(copy.deepcopy(net), mask="recompute")
    regen = fastreg.replace_dropout(copy.deepcopy(net), mask="recompute", regenerate=True)
    x = torch.randn(8, 16)
    results = []
    for model in (plain, regen):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        torch.manual_seed(1)
        compiled(x).square().sum().backward()
        results.append([p.grad for p in model.parameters()])
    assert_same(results[1], results[0])
    assert not _regen.active()


# ---- DDP and FSDP2 (one process, gloo) -----------------------------------------------------


@pytest.fixture
def process_group(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch without torch.distributed's gloo backend")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def _wrapped_gradients(wrap):
    grads_ = []
    for regenerate in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 4))
        fastreg.replace_dropout(net, mask="recompute", regenerate=regenerate)
        model = wrap(net)
        torch.manual_seed(1)
        model(torch.randn(8, 16)).square().sum().backward()
        grads_.append(
            [
                p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                for p in model.parameters()
            ]
        )
    return grads_


def test_ddp(process_group):
    from torch.nn.parallel import DistributedDataParallel

    plain, regen = _wrapped_gradients(DistributedDataParallel)
    assert_same(regen, plain)


def test_fsdp2(process_group):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        pytest.skip("torch without FSDP2 (torch.distributed.fsdp.fully_shard)")

    def wrap(net):
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
        for layer in (net[0], net[3]):
            fully_shard(layer, mesh=mesh)
        return fully_shard(net, mesh=mesh)

    plain, regen = _wrapped_gradients(wrap)
    assert_same(regen, plain)
