"""fastreg.replace_dropout on timm, torchvision and PEFT models as they come: a timm ViT
(head_drop, attn_drop, proj_drop, pos_drop), a torchvision MobileNetV3 (classifier
dropout), a PEFT LoRA model (lora_dropout). Every dropout module becomes fastreg's with
its p; the ones the forward calls run fastreg's kernel; a training step works; eval equals
the original; the state dict keeps its keys (it loads into the model without fastreg)."""

import copy

import pytest
import torch
from torch import nn

import fastreg


def dropouts(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Dropout)}


def check(original, inputs, expect_names, loss=lambda out: out.float().pow(2).mean()):
    swapped = fastreg.replace_dropout(copy.deepcopy(original))
    before, after = dropouts(original), dropouts(swapped)
    assert set(expect_names) <= set(after), sorted(set(expect_names) - set(after))
    assert before.keys() == after.keys()
    for name, module in after.items():
        assert type(module) is fastreg.Dropout and module.p == before[name].p, name
    original.eval()  # before training changes BatchNorm's statistics
    swapped.eval()
    with torch.no_grad():
        a, b = original(**inputs), swapped(**inputs)
        a, b = (a, b) if isinstance(a, torch.Tensor) else (a.logits, b.logits)
        assert torch.equal(a, b)
    called = set()
    for name, module in after.items():
        module.register_forward_hook(lambda m, i, o, name=name: called.add(name))
    swapped.train()
    out = swapped(**inputs)
    out = out if isinstance(out, torch.Tensor) else out.logits
    loss(out).backward()
    graded = [p for p in swapped.parameters() if p.requires_grad]
    assert graded and all(p.grad is not None for p in graded)
    assert list(swapped.state_dict()) == list(original.state_dict())
    copy.deepcopy(original).load_state_dict(swapped.state_dict(), strict=True)
    return called


def test_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        num_classes=3,
        depth=2,
        drop_rate=0.1,
        pos_drop_rate=0.1,
        attn_drop_rate=0.1,
        proj_drop_rate=0.1,
    )
    names = [
        "head_drop",
        "pos_drop",
        "blocks.0.attn.attn_drop",
        "blocks.0.attn.proj_drop",
        "blocks.1.mlp.drop1",
    ]
    called = check(model, {"x": torch.randn(2, 3, 32, 32)}, names)
    assert {"head_drop", "pos_drop", "blocks.0.attn.proj_drop", "blocks.1.mlp.drop1"} <= called
    # timm's fused attention passes attn_drop.p to scaled_dot_product_attention (torch's
    # dropout): the module runs only on the unfused path
    assert ("blocks.0.attn.attn_drop" in called) == (not model.blocks[0].attn.fused_attn)


def test_torchvision_mobilenet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=3, dropout=0.2)
    called = check(model, {"x": torch.randn(2, 3, 32, 32)}, ["classifier.2"])
    assert called == {"classifier.2"}


def test_peft_lora(transformers):
    peft = pytest.importorskip("peft")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_config(config)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    model = peft.get_peft_model(base, lora)
    names = [n for n in dropouts(model) if "lora_dropout" in n]
    assert len(names) == 2
    called = check(model, {"input_ids": torch.randint(50, (2, 8))}, names)
    assert set(names) <= called
    # only the adapter (and the classifier PEFT keeps trainable) gets a gradient, and
    # the penalty selects those
    selected = [n for n, _ in fastreg._params.module_params(model, "bias_and_norm")]
    assert selected and all("lora_" in n or "classifier" in n for n in selected)
