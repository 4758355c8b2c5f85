"""What the framework tests' hand-written loops share (tests/hf_trainer_cases.py,
tests/lightning_cases.py): the settings, the optimizer step as a training loop writes it
(unscale, clip, step) and the comparison of two models' parameters."""

import torch

L1, L2, LR, MAX_NORM = 2e-3, 2e-2, 0.1, 0.5
BATCH = 2
INIT_SCALE = 2.0**8
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def grad_scaler(precision):
    """The CPU gradient scaler of an fp16 run (None otherwise)."""
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) if precision == "fp16" else None


def optimizer_step(opt, params, scaler, clip):
    """Unscale, clip to MAX_NORM, step, zero the gradients."""
    if scaler:
        scaler.unscale_(opt)
    if clip:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def max_difference(a, b):
    """The largest elementwise difference of two models' parameters."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return max((pa[k].detach() - pb[k].detach()).abs().max().item() for k in pa)
