"""The Hugging Face Trainer runs of tests/test_integrations_hf.py, shared with the DDP
worker (tools/hf_ddp_worker.py): a tiny BERT classifier trained by the Trainer with
fastreg's callback, and the hand-written loop that it must equal: the same micro-batches
(recorded from the Trainer's run), the loss as the Trainer normalizes it, plus
``l1 * sum|w| + l2 * sum w**2`` over the parameters that Trainer's weight decay takes,
scaled by a GradScaler, unscaled, clipped, stepped."""

import contextlib
import copy

import torch
import transformers
from hand_loop import (  # noqa: F401  (the settings, for the tests that import this module)
    BATCH,
    INIT_SCALE,
    L1,
    L2,
    LR,
    MAX_NORM,
    PRECISIONS,
    grad_scaler,
    max_difference,
    optimizer_step,
)
from transformers import Trainer, TrainingArguments

from fastreg.integrations.huggingface import FastregCallback


def config(dropout=0.0):
    return transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def make_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_config(
        config(dropout), attn_implementation="eager"
    ).train()


def dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(50, (8,), generator=g),
            "labels": torch.randint(3, (), generator=g),
        }
        for _ in range(n)
    ]


def training_args(out, precision="fp32", accum=1, clip=True, steps=3, **extra):
    kwargs = dict(
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        max_grad_norm=MAX_NORM if clip else 0.0,
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=0,
    )
    kwargs.update(extra)
    return TrainingArguments(out, **kwargs)


def use_cpu_grad_scaler(trainer):
    """Accelerate turns fp16 off on the CPU (no autocast, no scaler); give its accelerator
    a CPU GradScaler and turn autocast on, the code path of a GPU: the Trainer then
    autocasts the forward to float16, scales the loss, unscales before clipping and steps
    through the scaler."""
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)


def record_inputs(model):
    """The keyword arguments of every training forward of `model` (the Trainer passes
    num_items_in_batch to models that take loss kwargs)."""
    calls = []

    def hook(module, args, kwargs):
        if module.training:
            calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def train_with_callback(
    out,
    precision="fp32",
    accum=1,
    clip=True,
    steps=3,
    model=None,
    callback=None,
    data=None,
    **extra,
):
    """(trained model, recorded calls, trainer, initial state dict)."""
    model = make_model() if model is None else model
    start = copy.deepcopy(model.state_dict())
    calls = record_inputs(model)
    callback = FastregCallback(l1=L1, l2=L2) if callback is None else callback
    trainer = Trainer(
        model=model,
        args=training_args(out, precision, accum, clip, steps, **extra),
        train_dataset=dataset() if data is None else data,
        callbacks=[callback],
    )
    if precision == "fp16":
        use_cpu_grad_scaler(trainer)
    trainer.train()
    return model, calls, trainer, start


def hand_penalty(model, times=1.0):
    """l1 * sum|w| + l2 * sum w**2 over the parameters that Trainer's weight decay takes,
    written out."""
    decay = set(Trainer.get_decay_parameter_names(None, model))
    total = 0.0
    for name, p in model.named_parameters():
        if name in decay and p.requires_grad:
            total = total + L1 * p.abs().sum() + L2 * p.pow(2).sum()
    return total * times


def hand_written(
    start, calls, precision="fp32", accum=1, clip=True, steps=3, penalty_times=1.0, ddp=False
):
    """The loop the Trainer run must equal, on `calls` (a Trainer run's micro-batches)."""
    model = make_model()
    model.load_state_dict(start)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dtype = PRECISIONS[precision]
    scaler = grad_scaler(precision)
    assert len(calls) == accum * steps, len(calls)
    for step in range(steps):
        batch = calls[step * accum : (step + 1) * accum]
        for i, kwargs in enumerate(batch):
            sync = net.no_sync() if ddp and i < accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    loss = net(**kwargs).loss.float()
                if "num_items_in_batch" not in kwargs:
                    loss = loss / accum
                elif ddp:  # average_tokens_across_devices: a loss over the global count
                    loss = loss * torch.distributed.get_world_size()
                # the penalty in the loss: once per optimizer step, a k-th on each of k
                loss = loss + hand_penalty(model, penalty_times) / accum
                (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(opt, model.parameters(), scaler, clip)
    return model
