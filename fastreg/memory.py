"""``python -m fastreg bench --memory``: what dropout costs in a training step.

A small GPT-style transformer (causal self-attention written out, so that dropout acts
on the attention probabilities, on the residual branches and on the embeddings, as in
GPT-2) is trained for a few steps with ``nn.Dropout`` and with ``fastreg.Dropout`` in
each mask mode, from the same initial weights and data. Reported side by side:

* the bytes autograd keeps for backward during one step, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters left out:
  they are kept anyway), on every device;
* on the GPU, the peak of ``torch.cuda.max_memory_allocated`` over the timed steps
  (weights, gradients and AdamW state included);
* the median step time (forward, backward, AdamW step).

"no dropout" (the same model with p=0) gives the floor: what the model keeps without
any dropout at all.
"""

import dataclasses
import math
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

import fastreg
from fastreg.bench import saved_bytes

VARIANTS = ("no dropout", "nn.Dropout", "fastreg:bits", "fastreg:bool", "fastreg:recompute")
BASELINE = "nn.Dropout"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    layers: int = 2
    width: int = 128
    heads: int = 4
    batch: int = 8
    seq: int = 256
    vocab: int = 512
    p: float = 0.1


DEFAULTS = {"cpu": ModelConfig(),
            "cuda": ModelConfig(layers=12, width=768, heads=12, batch=8, seq=1024, vocab=50304)}


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width ({cfg.width}) must be a multiple of heads ({cfg.heads})")
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attn_drop = nn.Dropout(cfg.p)
        self.resid_drop = nn.Dropout(cfg.p)
        causal = torch.ones(cfg.seq, cfg.seq, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        att = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(dim=-1)
        y = self.attn_drop(att) @ v
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(),
                                 nn.Linear(4 * cfg.width, cfg.width), nn.Dropout(cfg.p))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """GPT-2's layout at any size: embeddings, pre-norm blocks, a final norm and head."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.seq, cfg.width)
        self.drop = nn.Dropout(cfg.p)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(cfg, variant, device, dtype=torch.float32, seed=0):
    """The model of `variant` (one of VARIANTS), the same weights for every variant."""
    torch.manual_seed(seed)
    p = 0.0 if variant == "no dropout" else cfg.p
    model = TinyGPT(dataclasses.replace(cfg, p=p))
    if variant.startswith("fastreg:"):
        fastreg.replace_dropout(model, mask=variant.split(":", 1)[1])
    return model.to(device=device, dtype=dtype).train()


def _step(model, optimizer, idx, targets):
    logits = model(idx)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def measure(cfg, variant, device, dtype=torch.float32, steps=5):
    """One row: kept bytes, peak bytes (GPU), median step time, last loss."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = build(cfg, variant, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1)
    idx = torch.randint(cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen).to(device)
    idx, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    _step(model, optimizer, idx, targets)  # warm-up: allocates AdamW's state
    params = [p for p in model.parameters()] + [b for b in model.buffers()]
    _, kept = saved_bytes(lambda: model(idx), exclude=params)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        loss = _step(model, optimizer, idx, targets)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return {"variant": variant, "parameters": sum(p.numel() for p in model.parameters()),
            "kept_bytes": kept, "peak_bytes": peak,
            "step_ms": statistics.median(times) * 1e3, "loss": loss.item()}


def run(cfg, device, dtype=torch.float32, steps=5, progress=None):
    """Rows for every variant, with ratios against nn.Dropout."""
    rows = []
    for variant in VARIANTS:
        if progress:
            progress.step(f"memory: {variant}")
        rows.append(measure(cfg, variant, device, dtype, steps))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    base = next(r for r in rows if r["variant"] == BASELINE)
    floor = next(r for r in rows if r["variant"] == "no dropout")
    for r in rows:
        r["dropout_kept_bytes"] = r["kept_bytes"] - floor["kept_bytes"]
        r["kept_vs_native"] = r["kept_bytes"] / base["kept_bytes"]
        r["peak_vs_native"] = (r["peak_bytes"] / base["peak_bytes"]
                               if r["peak_bytes"] is not None else None)
        r["speedup"] = base["step_ms"] / r["step_ms"]
    return rows


def _mib(n):
    return "" if n is None else f"{n / 2**20:.1f}"


def format_table(rows, cfg, dtype, steps, env_lines):
    cuda = rows[0]["peak_bytes"] is not None
    params = rows[0]["parameters"]
    out = list(env_lines) + [
        "",
        f"memory: GPT-style model, {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, "
        f"vocab {cfg.vocab}, {params / 1e6:.2f}M parameters, {dtype}; batch {cfg.batch} x "
        f"sequence {cfg.seq}; dropout p={cfg.p}; AdamW; median of {steps} steps after one warm-up",
        "kept: bytes autograd keeps for backward in one step, parameters left out; "
        "of which dropout: kept less that of the model without dropout (masks, and the "
        "dropped activations that the next layer saves)"
        + ("; peak: torch.cuda.max_memory_allocated over the steps" if cuda else ""),
    ]
    names = ["variant", "kept MiB", "of which dropout", "vs nn.Dropout"]
    if cuda:
        names += ["peak MiB", "vs nn.Dropout"]
    names += ["step ms", "speedup", "loss"]
    body = []
    for r in rows:
        cells = [r["variant"], _mib(r["kept_bytes"]), _mib(r["dropout_kept_bytes"]),
                 f"{r['kept_vs_native']:.2f}x"]
        if cuda:
            cells += [_mib(r["peak_bytes"]), f"{r['peak_vs_native']:.2f}x"]
        cells += [f"{r['step_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['loss']:.4f}"]
        body.append(cells)
    widths = [max(len(c[k]) for c in body + [names]) for k in range(len(names))]

    def line(cells):
        return "  ".join(c.ljust(widths[0]) if k == 0 else c.rjust(widths[k])
                         for k, c in enumerate(cells))
    out += [line(names), line(["-" * w for w in widths])] + [line(c) for c in body]
    return "\n".join(out)
