"""fastreg.replace_dropout on models people use: torch's nn.TransformerEncoder, a
torchvision-style CNN with Dropout2d and, when transformers is installed, Hugging Face
BERT and GPT-2 built from tiny configs (random weights, no download) with their eager and
sdpa attention. After the swap a model trains, repeats for a seed, evaluates exactly as
the original, keeps its state dict, and deep-copies and pickles."""

import collections
import contextlib
import copy
import dataclasses
import io
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastreg

SWAPPED = {
    nn.Dropout: fastreg.Dropout,
    nn.Dropout1d: fastreg.Dropout1d,
    nn.Dropout2d: fastreg.Dropout2d,
    nn.Dropout3d: fastreg.Dropout3d,
}


@dataclasses.dataclass
class Case:
    make: Callable[[], nn.Module]  # a fresh model in train mode, weights from torch's RNG
    inputs: dict  # keyword arguments of the forward
    target: torch.Tensor
    loss: Callable  # loss(output, target)
    counts: dict  # torch dropout class -> how many the model has
    idle: set = dataclasses.field(default_factory=set)  # dropout modules forward never calls


class SmallCNN(nn.Module):
    """torchvision's pattern (VGG-like): conv-bn-relu blocks with channel dropout, then a
    classifier with dropout."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout2d(0.2, inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(16 * 4, 32), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(32, classes)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _generator():
    return torch.Generator().manual_seed(0)


def transformer_encoder_case():
    def make():
        layer = nn.TransformerEncoderLayer(
            d_model=16, nhead=2, dim_feedforward=32, dropout=0.2, batch_first=True
        )
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    g = _generator()
    return Case(
        make,
        {"src": torch.randn(4, 6, 16, generator=g)},
        torch.randn(4, 6, 16, generator=g),
        F.mse_loss,
        {nn.Dropout: 6},
    )


def cnn_case():
    g = _generator()
    return Case(
        SmallCNN,
        {"x": torch.randn(4, 3, 8, 8, generator=g)},
        torch.randint(5, (4,), generator=g),
        F.cross_entropy,
        {nn.Dropout2d: 2, nn.Dropout: 1},
    )


def bert_case(transformers, attention):
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )

    def make():
        return transformers.AutoModelForSequenceClassification.from_config(
            config, attn_implementation=attention
        ).train()

    g = _generator()
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padding
    inputs = {"input_ids": torch.randint(99, (4, 8), generator=g), "attention_mask": mask}
    # The attention-probability dropout's p is passed to F.dropout or sdpa's dropout_p.
    idle = {f"bert.encoder.layer.{i}.attention.self.dropout" for i in range(2)}
    return Case(
        make, inputs, torch.randint(3, (4,), generator=g), F.cross_entropy, {nn.Dropout: 8}, idle
    )


def gpt2_case(transformers, attention, upcast=False):
    config = transformers.GPT2Config(
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        reorder_and_upcast_attn=upcast,
    )

    def make():
        return transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=attention
        ).train()

    def next_token_loss(logits, ids):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    ids = torch.randint(99, (4, 8), generator=_generator())
    # Only the eager path with reorder_and_upcast_attn calls the attention dropout module.
    idle = (
        set()
        if upcast and attention == "eager"
        else {f"transformer.h.{i}.attn.attn_dropout" for i in range(2)}
    )
    return Case(make, {"input_ids": ids}, ids, next_token_loss, {nn.Dropout: 7}, idle)


CASES = [
    "transformer_encoder",
    "cnn",
    "bert-eager",
    "bert-sdpa",
    "gpt2-eager",
    "gpt2-sdpa",
    "gpt2-eager-upcast",
]


@pytest.fixture(params=CASES)
def case(request):
    if request.param == "transformer_encoder":
        return transformer_encoder_case()
    if request.param == "cnn":
        return cnn_case()
    transformers = request.getfixturevalue("transformers")
    family, attention, *upcast = request.param.split("-")
    if family == "bert":
        return bert_case(transformers, attention)
    return gpt2_case(transformers, attention, upcast=bool(upcast))


# ---- helpers ---------------------------------------------------------------------


def dropouts(model):
    """(name, module) of every torch or fastreg dropout module (fastreg's subclass torch's)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, tuple(SWAPPED))]


def settings(model):
    return [
        (name, type(m), m.p, m.inplace, m.training, getattr(m, "mask", None))
        for name, m in dropouts(model)
    ]


def original_and_swapped(case, seed=0):
    torch.manual_seed(seed)
    original = case.make()
    return original, fastreg.replace_dropout(copy.deepcopy(original))


def output(model, case):
    out = model(**case.inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def train(model, case, steps=3, seed=1):
    """SGD steps on the case's batch from `seed`: (losses, names of the parameters that
    got a gradient)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = case.loss(output(model, case), case.target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name for name, p in model.named_parameters() if p.grad is not None}


def assert_same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- the swap ------------------------------------------------------------------------


def test_every_dropout_is_swapped_keeping_its_settings(case):
    torch.manual_seed(0)
    original = case.make()
    for i, (_, module) in enumerate(dropouts(original)):
        module.train(i % 2 == 0)  # mixed modes, to see each module's carried over
    swapped = fastreg.replace_dropout(copy.deepcopy(original))
    before, after = dropouts(original), dropouts(swapped)
    assert collections.Counter(type(m) for _, m in before) == case.counts
    assert [name for name, _ in after] == [name for name, _ in before]
    for (name, old), (_, new) in zip(before, after):
        assert type(new) is SWAPPED[type(old)], name
        assert (new.p, new.inplace, new.training, new.mask) == (
            old.p,
            old.inplace,
            old.training,
            "bits",
        ), name
    others = [(name, type(m)) for name, m in original.named_modules() if name not in dict(before)]
    assert [
        (name, type(m)) for name, m in swapped.named_modules() if name not in dict(after)
    ] == others
    assert_same_state(swapped, original)


def test_fastreg_runs_where_the_model_calls_its_dropout_modules(case):
    original, swapped = original_and_swapped(case)
    called = {}
    for model in (original, swapped):
        names = called[model] = set()
        for name, module in dropouts(model):
            module.register_forward_hook(lambda m, i, o, name=name, names=names: names.add(name))
        output(model, case)
    everything = {name for name, _ in dropouts(swapped)}
    assert case.idle <= everything
    assert called[swapped] == called[original] == everything - case.idle
    with torch.no_grad():  # and they drop: two training forwards differ
        assert not torch.equal(output(swapped, case), output(swapped, case))


def test_transformer_encoder_attention_dropout_is_a_float_not_a_module():
    torch.manual_seed(0)
    model = fastreg.replace_dropout(transformer_encoder_case().make())
    for layer in model.layers:
        assert type(layer.self_attn.dropout) is float and layer.self_attn.dropout == 0.2
        assert not any(isinstance(m, nn.Dropout) for m in layer.self_attn.modules())
        assert {type(m) for m in (layer.dropout, layer.dropout1, layer.dropout2)} == {
            fastreg.Dropout
        }


# ---- training, evaluation, state -------------------------------------------------------


def test_swapped_model_trains(case):
    original, swapped = original_and_swapped(case)
    start = copy.deepcopy(swapped.state_dict())
    _, graded_before = train(copy.deepcopy(original), case, steps=1)
    losses, graded = train(swapped, case)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert graded and graded == graded_before
    for name, param in swapped.named_parameters():
        assert torch.isfinite(param).all(), name
        assert not torch.equal(param, start[name]), f"{name} did not change"


def test_training_repeats_for_a_seed(case):
    runs = []
    for seed in (1, 1, 2):
        _, swapped = original_and_swapped(case)
        losses, _ = train(swapped, case, seed=seed)
        runs.append((losses, swapped))
    assert runs[0][0] == runs[1][0]
    assert_same_state(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]  # another seed, other masks


@pytest.mark.parametrize("grad_mode", [torch.no_grad, contextlib.nullcontext])
def test_eval_is_deterministic_and_equals_the_original(case, grad_mode):
    original, swapped = original_and_swapped(case)
    original.eval()
    swapped.eval()
    with grad_mode():
        expected = output(original, case)
        assert torch.equal(output(swapped, case), expected)
        assert torch.equal(output(swapped, case), expected)


def test_state_dict_loads_both_ways_strictly(case):
    original, swapped = original_and_swapped(case)
    train(swapped, case, steps=1)  # weights (and BatchNorm statistics) now differ from init
    torch.manual_seed(1)
    fresh = case.make()
    result = fresh.load_state_dict(swapped.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state(fresh, swapped)
    with torch.no_grad():
        assert torch.equal(output(fresh.eval(), case), output(swapped.eval(), case))

    torch.manual_seed(2)
    fresh_swapped = fastreg.replace_dropout(case.make())
    fresh_swapped.load_state_dict(original.state_dict(), strict=True)
    assert_same_state(fresh_swapped, original)


def test_deepcopy_and_pickle(case):
    _, swapped = original_and_swapped(case)
    buffer = io.BytesIO()
    torch.save(swapped, buffer)
    buffer.seek(0)
    clones = [copy.deepcopy(swapped), torch.load(buffer, weights_only=False)]
    for clone in clones:
        assert settings(clone) == settings(swapped)
        assert_same_state(clone, swapped)
    for clone in clones:
        torch.manual_seed(5)
        expected = output(swapped, case)
        torch.manual_seed(5)
        assert torch.equal(output(clone, case), expected)  # training mode: the same masks
