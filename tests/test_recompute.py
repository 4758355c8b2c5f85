"""One mask for forward and backward under recomputation (docs/recomputation.md).

For each scheme (torch.utils.checkpoint reentrant and not, selective activation
checkpointing with a policy that recomputes and one that saves, and under torch.compile the
partitioner with activation_memory_budget < 1), each mask mode, eager and compiled: the
backward's mask is the forward's, and the gradient is bitwise that of the same step without
recomputation for the same seed (for Hugging Face's GPT-2, equal to rounding: see
same_gradients)."""

import pytest
import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from conftest import MASK_MODES, TORCH_VERSION

import fastreg
from fastreg import _rng

P = 0.5
SETTING = {"mask": "bits", "impl": "fastreg"}


def drop(h):
    if SETTING["impl"] == "native":
        return F.dropout(h, P)
    return fastreg.dropout(h, P, mask=SETTING["mask"])


def block(x):
    # sin and cos give the partitioner something to recompute; a dropped element of
    # drop(sin(x)) is 0, so the block's output there is exactly 2 and its gradient 0.
    return torch.cos(drop(torch.sin(x))) * 2.0


def _recompute_policy(ctx, op, *args, **kwargs):
    return cp.CheckpointPolicy.PREFER_RECOMPUTE


def _save_policy(ctx, op, *args, **kwargs):
    return cp.CheckpointPolicy.MUST_SAVE


def _sac_recompute():
    return cp.create_selective_checkpoint_contexts(_recompute_policy)


def _sac_save():
    return cp.create_selective_checkpoint_contexts(_save_policy)


# Selective activation checkpointing (torch >= 2.5): the SAC schemes, and fastreg's
# MUST_SAVE tag under a memory budget. Where the tag is missing or does not hold (torch
# 2.4, 2.5), fastreg refuses a budget below 1.
HAVE_SAC = hasattr(cp, "create_selective_checkpoint_contexts")
NO_SAC = "torch < 2.5: no selective activation checkpointing"
BUDGET_REFUSED = _rng.memory_budget_refusal() is not None

SCHEMES = {
    "none": block,
    "reentrant": lambda x: cp.checkpoint(block, x, use_reentrant=True),
    "non-reentrant": lambda x: cp.checkpoint(block, x, use_reentrant=False),
    "sac-recompute": lambda x: cp.checkpoint(
        block, x, use_reentrant=False, context_fn=_sac_recompute
    ),
    "sac-save": lambda x: cp.checkpoint(block, x, use_reentrant=False, context_fn=_sac_save),
    "memory-budget": block,  # compiled with activation_memory_budget=0.05
}


def step(scheme, backend=None, seed=0):
    """(gradient, forward's keep-mask, backward's keep-mask) of one step."""
    x = (torch.rand(32, 48, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
    fn = SCHEMES[scheme]
    if backend is not None:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=backend, fullgraph=True)
    budget = 0.05 if scheme == "memory-budget" else 1.0
    with functorch_config.patch(activation_memory_budget=budget):
        torch.manual_seed(seed)
        out = fn(x)
        out.sum().backward()  # .backward(): reentrant checkpoint refuses autograd.grad
    return x.grad, out.detach() != 2.0, x.grad != 0


def check_one_mask(scheme, backend, mask, impl="fastreg"):
    SETTING.update(mask=mask, impl=impl)
    if scheme.startswith("sac") and not HAVE_SAC:
        pytest.skip(NO_SAC)
    if scheme == "memory-budget" and impl == "fastreg" and BUDGET_REFUSED:
        check_budget_refused(lambda: step(scheme, backend))
        return
    expected, _, _ = step("none", backend)
    grad, forward_keep, backward_keep = step(scheme, backend)
    assert 0 < forward_keep.sum() < forward_keep.numel()
    assert torch.equal(backward_keep, forward_keep), (
        f"{(backward_keep != forward_keep).sum()} elements' masks differ"
    )
    assert torch.equal(grad, expected)


# Dynamo before 2.8 reports an error raised in traced code, under fullgraph=True, as its
# own "Observed exception" (pointing at the user's line) without the error's message
REFUSAL = "activation_memory_budget is 0.05, and this torch" + (
    "|Observed exception" if TORCH_VERSION < (2, 8) else ""
)


def check_budget_refused(run):
    with pytest.raises(RuntimeError, match=REFUSAL):
        run()


EAGER_SCHEMES = ["reentrant", "non-reentrant", "sac-recompute", "sac-save"]


@pytest.mark.parametrize("mask", MASK_MODES)
@pytest.mark.parametrize("scheme", EAGER_SCHEMES)
def test_eager(scheme, mask):
    check_one_mask(scheme, None, mask)


@pytest.mark.parametrize("mask", MASK_MODES)
@pytest.mark.parametrize("scheme", EAGER_SCHEMES + ["memory-budget"])
def test_compiled_aot_eager(scheme, mask):
    check_one_mask(scheme, "aot_eager", mask)


@pytest.mark.parametrize("scheme", EAGER_SCHEMES + ["memory-budget"])
def test_compiled_inductor(scheme):
    check_one_mask(scheme, "inductor", "bits")


def test_the_budget_would_recompute_the_draw_without_fastregs_tag(monkeypatch):
    """What the MUST_SAVE region is for: drawn without it, the (seed, offset) draw is
    recomputed in the backward graph under a memory budget and the masks differ."""
    monkeypatch.setattr(_rng, "_saved_draw", lambda device: _rng.draw_rng_state(device, None))
    SETTING.update(mask="recompute", impl="fastreg")
    _, forward_keep, backward_keep = step("memory-budget", "aot_eager")
    assert not torch.equal(forward_keep, backward_keep)


@pytest.mark.parametrize("why", ["no selective checkpointing", "a partitioner that recomputes"])
def test_a_budget_is_refused_where_the_draw_would_be_recomputed(why, monkeypatch):
    """A torch without selective checkpointing (2.4) has no tag to keep the draw from being
    recomputed, and torch 2.5's partitioner recomputed the tagged draw: fastreg refuses the
    budget there with its own message, through Dynamo."""
    if why == "no selective checkpointing":
        monkeypatch.delattr(cp, "create_selective_checkpoint_contexts", raising=False)
    else:
        monkeypatch.setattr(_rng, "BUDGET_KEEPS_THE_DRAW_FROM", (99, 0))
    SETTING.update(mask="bits", impl="fastreg")
    for fullgraph in (True, False):
        torch._dynamo.reset()
        block_ = torch.compile(block, backend="aot_eager", fullgraph=fullgraph)
        x = torch.rand(8, 8, requires_grad=True)
        with functorch_config.patch(activation_memory_budget=0.05):
            check_budget_refused(lambda: block_(x))
        with functorch_config.patch(activation_memory_budget=1.0):  # a budget of 1 is fine
            torch._dynamo.reset()
            assert block_(x).shape == x.shape


@pytest.mark.parametrize("scheme", ["reentrant", "non-reentrant"])
def test_native_dropout_under_checkpoint_keeps_one_mask(scheme):
    SETTING.update(impl="native")
    _, forward_keep, backward_keep = step(scheme)
    assert torch.equal(forward_keep, backward_keep)


# ---- explicit generators and seeds ----------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_an_explicit_generator_re_run_by_checkpoint_raises(use_reentrant):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 8, requires_grad=True)

    def f(x):
        return fastreg.dropout(x * 2, 0.5, generator=generator)

    out = cp.checkpoint(f, x, use_reentrant=use_reentrant)
    with pytest.raises(
        RuntimeError, match="explicit generator is being re-run in the backward pass"
    ):
        out.sum().backward()


def test_an_explicit_generator_without_recomputation_is_fine():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 8, requires_grad=True)
    fastreg.dropout(x * 2, 0.5, generator=generator).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_seed_under_checkpoint_keeps_one_mask(use_reentrant):
    x = (torch.rand(8, 8) + 0.5).requires_grad_()
    out = cp.checkpoint(
        lambda x: fastreg.dropout(x * 2, 0.5, seed=7), x, use_reentrant=use_reentrant
    )
    out.sum().backward()
    assert torch.equal(x.grad != 0, fastreg.dropout_mask(x.shape, 0.5, 7))


# ---- a real model: Hugging Face GPT-2 with gradient checkpointing, functional routing ----


def gpt2_gradients(transformers, mask, checkpoint_kwargs, seeds):
    """Each parameter's gradient of a tiny GPT-2 with fastreg's dropout routed in, once per
    seed, with Hugging Face's gradient checkpointing when checkpoint_kwargs is given."""
    config = transformers.GPT2Config(
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = fastreg.replace_dropout(model.train(), mask=mask, functional=True)
    if checkpoint_kwargs is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    ids = torch.randint(99, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for seed in seeds:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    return grads


def same_gradients(a, b):
    """Equal up to the rounding of a different summation order: the checkpointed backward
    is another autograd graph, and on some CPUs (an AMD EPYC with AVX-512, torch 2.14.1,
    transformers 5.17 and 5.24) it differs from the plain one in the last bits even with
    every dropout probability 0. Another mask at any dropout site changes the gradients by
    far more (test_gpt2_gradients_tell_another_mask)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("mask", MASK_MODES)
def test_gpt2_gradient_checkpointing_with_routed_functional_dropout(
    transformers, mask, use_reentrant
):
    """The re-run forward draws the masks the forward drew: the same gradients."""
    (plain,) = gpt2_gradients(transformers, mask, None, [1])
    (checkpointed,) = gpt2_gradients(transformers, mask, {"use_reentrant": use_reentrant}, [1])
    same_gradients(plain, checkpointed)


def test_gpt2_gradients_tell_another_mask(transformers):
    """What same_gradients tells apart: the masks of another seed."""
    one, other = gpt2_gradients(transformers, "bits", None, [1, 2])
    with pytest.raises(AssertionError):
        same_gradients(one, other)


# ---- the fused ops and channel dropout draw the same way ---------------------------------

FUSED = {
    "bias_dropout_add": lambda h, bias: fastreg.bias_dropout_add(
        h, bias, torch.zeros_like(h), P, mask="bits"
    ),
    "bias_act_dropout": lambda h, bias: fastreg.bias_act_dropout(h, bias, P, None, mask="bool"),
    "dropout2d": lambda h, bias: fastreg.dropout2d(
        h.view(4, 8, 6, 8) + bias.view(1, 1, 1, 8), P, mask="recompute"
    ).view(32, 48),
}


@pytest.mark.parametrize("op", list(FUSED))
@pytest.mark.parametrize(
    "scheme,backend", [("non-reentrant", None), ("memory-budget", "aot_eager")]
)
def test_fused_and_channel_dropout(op, scheme, backend):
    bias = torch.zeros(48 if op != "dropout2d" else 8)

    def fused_block(x):
        return torch.cos(FUSED[op](torch.sin(x), bias)) * 2.0

    SCHEMES_FUSED = {
        "non-reentrant": lambda x: cp.checkpoint(fused_block, x, use_reentrant=False),
        "memory-budget": fused_block,
        "none": fused_block,
    }

    def run(name):
        x = (torch.rand(32, 48, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
        fn = SCHEMES_FUSED[name]
        if backend is not None:
            torch._dynamo.reset()
            fn = torch.compile(fn, backend=backend, fullgraph=True)
        with functorch_config.patch(
            activation_memory_budget=0.05 if name == "memory-budget" else 1.0
        ):
            torch.manual_seed(0)
            out = fn(x)
            out.sum().backward()
        return x.grad, out.detach() != 2.0

    expected, _ = run("none")
    if scheme == "memory-budget" and BUDGET_REFUSED:
        check_budget_refused(lambda: run(scheme))
        return
    grad, forward_keep = run(scheme)
    assert torch.equal(grad != 0, forward_keep)
    assert torch.equal(grad, expected)
