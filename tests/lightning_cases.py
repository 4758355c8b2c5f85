"""The Lightning runs of tests/test_integrations_lightning.py, shared with its DDP worker
(tools/lightning_ddp_worker.py): a small MLP with LayerNorm and dropout, trained by
lightning.Trainer with fastreg's callback, and the hand-written loop that it must equal
(the same batches, recorded in training_step; the loss divided by the accumulation,
plus ``l1 * sum|w| + l2 * sum w**2`` over the weights that are neither biases nor
LayerNorm's, scaled, unscaled, clipped, stepped)."""

import contextlib
import copy

import lightning as L
import torch
import torch.nn.functional as F
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
from torch import nn

from fastreg.integrations.lightning import FastregCallback


def make_net(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)
    )


class Module(L.LightningModule):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.net = make_net(dropout)
        self.batches = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.batches.append([t.clone() for t in batch])
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(n, 6, generator=g), torch.randint(3, (n,), generator=g)
    )
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


def plugins(precision):
    if precision != "fp16":
        return {"precision": {"fp32": "32-true", "bf16": "bf16-mixed"}[precision]}
    # Lightning turns 16-mixed into bf16-mixed on the CPU: give it the plugin with a CPU
    # GradScaler, the code path of a GPU (autocast to float16, scaled loss, unscale_)
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}


def fit(
    root,
    precision="fp32",
    accum=1,
    clip=True,
    steps=3,
    module=None,
    callback=None,
    devices=1,
    strategy="auto",
    **extra,
):
    """(module, its initial state dict, trainer)."""
    module = Module() if module is None else module
    start = copy.deepcopy(module.net.state_dict())
    callback = FastregCallback(l1=L1, l2=L2) if callback is None else callback
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        accumulate_grad_batches=accum,
        gradient_clip_val=MAX_NORM if clip else None,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **plugins(precision),
        **extra,
    )
    trainer.fit(module, data())
    return module, start, trainer


def hand_penalty(net, times=1.0):
    total = 0.0
    for name, p in net.named_parameters():
        if not name.endswith("bias") and not isinstance(net[int(name.split(".")[0])], nn.LayerNorm):
            total = total + L1 * p.abs().sum() + L2 * p.pow(2).sum()
    return total * times


def hand_written(
    start, batches, precision="fp32", accum=1, clip=True, steps=3, penalty_times=1.0, ddp=False
):
    net = make_net()
    net.load_state_dict(start)
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    dtype = PRECISIONS[precision]
    scaler = grad_scaler(precision)
    assert len(batches) == accum * steps, len(batches)
    for step in range(steps):
        for i, (x, y) in enumerate(batches[step * accum : (step + 1) * accum]):
            with model.no_sync() if ddp and i < accum - 1 else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    loss = F.cross_entropy(model(x), y)
                loss = (loss + hand_penalty(net, penalty_times)) / accum
                (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(opt, net.parameters(), scaler, clip)
    return net
