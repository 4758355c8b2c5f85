"""``python -m fastreg bench --memory``: what dropout costs in a training step.

Two models, each trained from the same initial weights and data in every variant:

* fastreg's own small GPT-style transformer (causal self-attention written out, so that
  dropout acts on the attention probabilities, on the residual branches and on the
  embeddings, as in GPT-2, all through ``nn.Dropout`` modules), with ``nn.Dropout`` and with
  ``fastreg.Dropout`` in each mask mode;
* Hugging Face GPT-2 (built from a config, no download; eager attention, whose dropout on
  the attention probabilities is an ``F.dropout`` call), with ``nn.Dropout``, with
  ``replace_dropout(mask=...)`` (modules only) and with
  ``replace_dropout(mask=..., functional=True)`` (the functional calls routed as well), set
  beside the count of Korthikanti et al. 2022. Skipped with a message without transformers.

Reported side by side:

* the bytes autograd keeps for backward during one step, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once, parameters left out:
  they are kept anyway), on every device; for GPT-2 also per transformer block (each saved
  storage counted in the block that first saves it);
* on the GPU, the rise of ``torch.cuda.max_memory_allocated`` during a step over what was
  allocated before it (activations, gradients, temporaries);
* the step time (forward, backward, AdamW step), timed by the bench's
  :class:`~fastreg.bench.timing.Timer`: after a warm-up step each, the variants
  interleaved round by round (the order rotated each round), one step per variant per
  round; the median and interquartile range of the step times, and the median of the
  per-round ratios to ``nn.Dropout`` with their interquartile range, as the op bench
  reports them.

"no dropout" (the same model with p=0) gives the floor: what the model keeps without
any dropout at all.

Three more Hugging Face models (:func:`run_hf`, built from configs, random weights, eager
attention): a PEFT LoRA Llama (LoRA on all seven projections, ``lora_dropout``), T5 and
BERT, each with no dropout (the floor), torch's dropout, fastreg's bits mode
(``replace_dropout(mask="bits", functional=True)``) and fastreg with the dropped tensor
regenerated (``replace_dropout(mask="recompute", functional=True, regenerate=True)``,
docs/regenerate.md): the bytes kept per layer, their excess over the floor per dropout
call and per dropped element, and the bytes per element that implies for bfloat16 on a
GPU (computed from the CPU measurement, not measured).
"""

import dataclasses
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import fastreg
from fastreg.bench.report import speedup_cells
from fastreg.bench.timing import Timer, quartiles, ratio_summary

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


DEFAULTS = {
    "cpu": ModelConfig(batch=4, seq=128),
    "cuda": ModelConfig(layers=12, width=768, heads=12, batch=8, seq=1024, vocab=50304),
}


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
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, 4 * cfg.width),
            nn.GELU(),
            nn.Linear(4 * cfg.width, cfg.width),
            nn.Dropout(cfg.p),
        )

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
    if not isinstance(logits, torch.Tensor):  # Hugging Face output
        logits = logits.logits
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


class _Trainee:
    """One variant's model, optimizer and batch, and its measurements (the step times
    are the timer's)."""

    def __init__(self, variant, model, cfg, device):
        self.variant, self.model, self.device = variant, model, torch.device(device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator(device="cpu").manual_seed(1)
        idx = torch.randint(cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen).to(device)
        self.idx, self.targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
        self.times, self.peaks, self.loss = [], [], None

    def forward(self):
        return self.model(self.idx)

    def train_step(self):
        return _step(self.model, self.optimizer, self.idx, self.targets)

    def step(self):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        loss = self.train_step()
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peaks.append(torch.cuda.max_memory_allocated(self.device) - before)
        self.loss = loss.item()

    def kept(self, blocks=()):
        """(bytes autograd keeps in one forward, {block index: bytes first saved in it})."""
        params = list(self.model.parameters()) + list(self.model.buffers())
        skip = {t.untyped_storage().data_ptr() for t in params}
        seen, owner, where = {}, {}, [None]
        handles = []
        for i, block in enumerate(blocks):
            handles.append(
                block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
            )
            handles.append(
                block.register_forward_hook(
                    lambda m, a, o: where.__setitem__(0, None), always_call=True
                )
            )

        def pack(t):
            storage = t.untyped_storage()
            key = storage.data_ptr() or id(storage)
            if storage.data_ptr() not in skip and key not in seen:
                seen[key] = storage.nbytes()
                owner[key] = where[0]
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.forward()
        finally:
            for handle in handles:
                handle.remove()
        per_block = {}
        for key, nbytes in seen.items():
            if owner[key] is not None:
                per_block[owner[key]] = per_block.get(owner[key], 0) + nbytes
        return sum(seen.values()), per_block


def step_timer(device, steps):
    """The bench's timer set for training steps: one step per block (a step is long), no
    L2 flush, exactly `steps` rounds after one warm-up step per variant."""
    return Timer(device, repeats=max(1, steps), min_time_s=0.0, number=1, l2_flush=False)


def time_steps(trainees, steps, progress=None, label="memory", timer=None):
    """One warm-up step per variant (it allocates AdamW's state), then `steps` rounds of one
    step per variant, the order rotated each round (:meth:`Timer.interleaved`), so that a
    change in machine load falls on every variant alike. Sets each trainee's `times` (one
    per round) and keeps the peaks of the timed steps only."""
    for t in trainees:
        if progress:
            progress.step(f"{label}: {t.variant}")
    timer = timer or step_timer(trainees[0].device, steps)
    times, _, errors = timer.interleaved({t.variant: t.step for t in trainees})
    if errors:
        raise next(iter(errors.values()))
    for t in trainees:
        t.times = times[t.variant]
        t.peaks = t.peaks[len(t.peaks) - len(t.times) :]  # the warm-up's peak left out


def _timing(row, t, base):
    q1, median, q3 = quartiles(t.times)
    row["step_ms"], row["step_ms_q1"], row["step_ms_q3"] = median * 1e3, q1 * 1e3, q3 * 1e3
    row.update(ratio_summary(base.times, t.times))
    row["peak_bytes"] = max(t.peaks) if t.peaks else None
    row["loss"] = t.loss


def run(cfg, device, dtype=torch.float32, steps=5, progress=None):
    """Rows for every variant of fastreg's own model, with ratios against nn.Dropout."""
    trainees = [_Trainee(v, build(cfg, v, device, dtype), cfg, device) for v in VARIANTS]
    time_steps(trainees, steps, progress)
    rows = []
    for t in trainees:
        kept, _ = t.kept()
        rows.append(
            {
                "variant": t.variant,
                "kept_bytes": kept,
                "parameters": sum(p.numel() for p in t.model.parameters()),
            }
        )
    base = trainees[VARIANTS.index(BASELINE)]
    for row, t in zip(rows, trainees):
        _timing(row, t, base)
    base_row = rows[VARIANTS.index(BASELINE)]
    floor = rows[VARIANTS.index("no dropout")]
    for r in rows:
        r["dropout_kept_bytes"] = r["kept_bytes"] - floor["kept_bytes"]
        r["kept_vs_native"] = r["kept_bytes"] / base_row["kept_bytes"]
        r["peak_vs_native"] = (
            r["peak_bytes"] / base_row["peak_bytes"] if r["peak_bytes"] is not None else None
        )
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---- Hugging Face GPT-2 -------------------------------------------------------------------

GPT2_VARIANTS = (
    "no dropout",
    "nn.Dropout",
    "fastreg:bits",
    "fastreg:bool",
    "fastreg:recompute",
    "fastreg:bits+functional",
    "fastreg:bool+functional",
    "fastreg:recompute+functional",
)

MASKLESS = "fastreg:recompute+functional"

GPT2_DEFAULTS = {
    "cpu": ModelConfig(layers=2, width=64, heads=2, batch=1, seq=512, vocab=512),
    "cuda": ModelConfig(layers=12, width=768, heads=12, batch=4, seq=1024, vocab=50257),
}

TRANSFORMERS_MISSING = (
    "GPT-2: skipped, transformers is not installed (pip install "
    "transformers; the model is built from a config, nothing is downloaded)"
)


def _transformers():
    """The transformers module, or None where it is missing or disables this torch."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        return None
    if not transformers.utils.is_torch_available():
        return None
    return transformers


def build_gpt2(transformers, cfg, variant, device, dtype=torch.float32, seed=0):
    p = 0.0 if variant == "no dropout" else cfg.p
    config = transformers.GPT2Config(
        vocab_size=cfg.vocab,
        n_embd=cfg.width,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_positions=cfg.seq,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = (
        transformers.GPT2LMHeadModel(config, attn_implementation="eager")
        if _accepts_attn_kwarg(transformers)
        else transformers.GPT2LMHeadModel(config)
    )
    model.config._attn_implementation = "eager"
    model.config.use_cache = False
    if variant.startswith("fastreg:"):
        mode, _, functional = variant.split(":", 1)[1].partition("+")
        fastreg.replace_dropout(model, mask=mode, functional=bool(functional))
    return model.to(device=device, dtype=dtype).train()


def _accepts_attn_kwarg(transformers):
    import inspect

    try:
        return (
            "attn_implementation"
            in inspect.signature(transformers.GPT2LMHeadModel.__init__).parameters
        )
    except (TypeError, ValueError):
        return False


def korthikanti(cfg, bytes_per_value=2):
    """Korthikanti et al. 2022 (Reducing Activation Recomputation in Large Transformer
    Models), per transformer layer in 16-bit training: (activations, of which dropout
    masks) = (34 s b h + 5 a s^2 b, 2 s b h + a s^2 b) bytes."""
    s, b, h, a = cfg.seq, cfg.batch, cfg.width, cfg.heads
    return 34 * s * b * h + 5 * a * s * s * b, 2 * s * b * h + a * s * s * b


def run_gpt2(cfg, device, dtype=torch.float32, steps=5, progress=None):
    """Rows for every GPT-2 variant, or None without transformers."""
    transformers = _transformers()
    if transformers is None:
        return None
    trainees = [
        _Trainee(v, build_gpt2(transformers, cfg, v, device, dtype), cfg, device)
        for v in GPT2_VARIANTS
    ]
    time_steps(trainees, steps, progress, label="gpt2")
    rows = []
    for t in trainees:
        kept, per_block = t.kept(list(t.model.transformer.h))
        layer = statistics.median(per_block.values()) if per_block else 0
        rows.append(
            {
                "variant": t.variant,
                "kept_bytes": kept,
                "layer_bytes": layer,
                "parameters": sum(p.numel() for p in t.model.parameters()),
            }
        )
    base = trainees[GPT2_VARIANTS.index(BASELINE)]
    for row, t in zip(rows, trainees):
        _timing(row, t, base)
    base_row = rows[GPT2_VARIANTS.index(BASELINE)]
    # fastreg:recompute+functional keeps no mask at all (16 bytes of seed and offset per
    # call) and otherwise what nn.Dropout keeps: the masks of a variant are its excess over it
    maskless = rows[GPT2_VARIANTS.index(MASKLESS)]["layer_bytes"]
    native_masks = base_row["layer_bytes"] - maskless
    for r in rows:
        r["layer_vs_native"] = r["layer_bytes"] / base_row["layer_bytes"]
        r["mask_bytes"] = r["layer_bytes"] - maskless if r["variant"] != "no dropout" else None
        r["masks_removed"] = (
            1 - r["mask_bytes"] / native_masks
            if native_masks and r["mask_bytes"] is not None
            else None
        )
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _mib(n):
    return "" if n is None else f"{n / 2**20:.1f}"


def _table(names, body):
    widths = [max(len(c[k]) for c in body + [names]) for k in range(len(names))]

    def line(cells):
        return "  ".join(
            c.ljust(widths[0]) if k == 0 else c.rjust(widths[k]) for k, c in enumerate(cells)
        )

    return [line(names), line(["-" * w for w in widths])] + [line(c) for c in body]


def _time_cells(r):
    # the op bench's cells: "spread too wide" where the per-round ratios do not support one
    speedup, spread = speedup_cells(r)
    return [f"{r['step_ms']:.1f}", f"{r['step_ms_q1']:.1f}-{r['step_ms_q3']:.1f}", speedup, spread]


TIME_NOTE = (
    'spread: the interquartile range of the per-round ratios; "spread too wide" '
    "where it holds 1.0 (the rounds disagree on which is faster) or is wider than "
    "half the median"
)


TIME_NAMES = ["step ms", "IQR", "vs nn.Dropout", "spread"]


def format_table(rows, cfg, dtype, steps, env_lines):
    cuda = rows[0]["peak_bytes"] is not None
    params = rows[0]["parameters"]
    out = list(env_lines) + [
        "",
        f"memory: GPT-style model, {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, "
        f"vocab {cfg.vocab}, {params / 1e6:.2f}M parameters, {dtype}; batch {cfg.batch} x "
        f"sequence {cfg.seq}; dropout p={cfg.p}; AdamW; {steps} steps per variant after one "
        "warm-up, the variants interleaved round by round",
        "kept: bytes autograd keeps for backward in one step, parameters left out; "
        "of which dropout: kept less that of the model without dropout (masks, and the "
        "dropped activations that the next layer saves)"
        + ("; step peak: rise of torch.cuda.max_memory_allocated during a step" if cuda else "")
        + "; step ms: median and interquartile range; vs nn.Dropout: median of the per-round "
        "time ratios (>1: faster) and their interquartile range (spread)",
    ]
    names = ["variant", "kept MiB", "of which dropout", "vs nn.Dropout"]
    if cuda:
        names += ["step peak MiB", "vs nn.Dropout"]
    names += TIME_NAMES + ["loss"]
    body = []
    for r in rows:
        cells = [
            r["variant"],
            _mib(r["kept_bytes"]),
            _mib(r["dropout_kept_bytes"]),
            f"{r['kept_vs_native']:.2f}x",
        ]
        if cuda:
            cells += [_mib(r["peak_bytes"]), f"{r['peak_vs_native']:.2f}x"]
        cells += _time_cells(r) + [f"{r['loss']:.4f}"]
        body.append(cells)
    return "\n".join(out + _table(names, body) + [TIME_NOTE])


def format_gpt2_table(rows, cfg, dtype, steps):
    if rows is None:
        return "\n" + TRANSFORMERS_MISSING
    total, masks = korthikanti(cfg)
    elements = masks  # one byte per mask element in the count
    params = rows[0]["parameters"]
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    out = [
        "",
        f"memory: Hugging Face GPT-2 (eager attention), {cfg.layers} layers, width {cfg.width}, "
        f"{cfg.heads} heads, vocab {cfg.vocab}, {params / 1e6:.2f}M parameters, {dtype}; batch "
        f"{cfg.batch} x sequence {cfg.seq}; dropout p={cfg.p}; {steps} steps per variant, "
        "interleaved",
        "per layer: bytes autograd keeps per transformer block (median over blocks); "
        "+functional: replace_dropout(..., functional=True), the attention-probability "
        "F.dropout routed too; masks: per layer less that of fastreg:recompute+functional "
        "(which keeps no mask, only 16 bytes of seed and offset per call); removed: the share "
        "of nn.Dropout's masks removed",
        f"Korthikanti et al. 2022, per layer in 16-bit training: 34sbh + 5as^2b = "
        f"{_mib(total)} MiB of activations, of which dropout masks 2sbh + as^2b = "
        f"{_mib(masks)} MiB ({masks / total:.0%}: 1 byte per element); the same "
        f"{elements / 1e6:.2f}M mask elements at {size} bytes (torch's CPU dropout keeps its "
        f"mask in the input's dtype) = {_mib(elements * size)} MiB",
    ]
    names = ["variant", "per layer MiB", "vs nn.Dropout", "masks MiB", "removed", "kept MiB"]
    cuda = rows[0]["peak_bytes"] is not None
    if cuda:
        names += ["step peak MiB"]
    names += TIME_NAMES + ["loss"]
    body = []
    for r in rows:
        removed = "" if r["masks_removed"] is None else f"{r['masks_removed']:.0%}"
        cells = [
            r["variant"],
            _mib(r["layer_bytes"]),
            f"{r['layer_vs_native']:.2f}x",
            _mib(r["mask_bytes"]),
            removed,
            _mib(r["kept_bytes"]),
        ]
        if cuda:
            cells += [_mib(r["peak_bytes"])]
        cells += _time_cells(r) + [f"{r['loss']:.4f}"]
        body.append(cells)
    return "\n".join(out + _table(names, body) + [TIME_NOTE])


# ---- Hugging Face models with LoRA, T5, BERT: the dropped tensor regenerated -------------

HF_MODELS = ("llama-lora", "t5", "bert")
HF_VARIANTS = (
    "no dropout",
    "nn.Dropout",
    "fastreg:bits",
    "fastreg:recompute",
    "fastreg:regenerated",
)
REGENERATED = "fastreg:regenerated"


@dataclasses.dataclass(frozen=True)
class HFConfig:
    layers: int = 1
    width: int = 256
    mlp: int = 688
    heads: int = 4
    batch: int = 1
    seq: int = 512
    vocab: int = 512
    p: float = 0.1
    rank: int = 8


HF_DEFAULTS = {
    "cpu": HFConfig(),
    "cuda": HFConfig(
        layers=4, width=1024, mlp=2752, heads=16, batch=4, seq=1024, vocab=32000, rank=16
    ),
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError:
        return None
    return peft


def _eager(transformers, cls, config):
    config._attn_implementation = "eager"
    try:
        return cls(config, attn_implementation="eager")
    except TypeError:
        return cls(config)


def build_hf(transformers, name, cfg, variant, device, dtype=torch.float32, seed=0):
    """(model, its transformer blocks, the step's inputs) for model `name` in `variant`."""
    p = 0.0 if variant == "no dropout" else cfg.p
    torch.manual_seed(seed)
    if name == "llama-lora":
        peft = _peft()
        config = transformers.LlamaConfig(
            vocab_size=cfg.vocab,
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.seq,
        )
        model = _eager(transformers, transformers.LlamaForCausalLM, config)
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=cfg.rank,
                lora_alpha=2 * cfg.rank,
                lora_dropout=p,
                target_modules=list(LORA_TARGETS),
            ),
        )
        blocks = list(model.base_model.model.model.layers)
    elif name == "t5":
        config = transformers.T5Config(
            vocab_size=cfg.vocab,
            d_model=cfg.width,
            d_kv=cfg.width // cfg.heads,
            d_ff=cfg.mlp,
            num_layers=cfg.layers,
            num_decoder_layers=cfg.layers,
            num_heads=cfg.heads,
            dropout_rate=p,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        model = _eager(transformers, transformers.T5ForConditionalGeneration, config)
        blocks = list(model.encoder.block) + list(model.decoder.block)
    elif name == "bert":
        config = transformers.BertConfig(
            vocab_size=cfg.vocab,
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.seq,
            hidden_dropout_prob=p,
            attention_probs_dropout_prob=p,
        )
        model = _eager(transformers, transformers.BertForMaskedLM, config)
        blocks = list(model.bert.encoder.layer)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.config.use_cache = False
    if variant in ("fastreg:bits", "fastreg:recompute"):
        fastreg.replace_dropout(model, mask=variant.split(":")[1], functional=True)
    elif variant == REGENERATED:
        fastreg.replace_dropout(model, mask="recompute", functional=True, regenerate=True)
    return model.to(device=device, dtype=dtype).train(), blocks


class _HFTrainee(_Trainee):
    """A Hugging Face model trained on its own loss (labels = the inputs)."""

    def __init__(self, variant, model, blocks, cfg, device):
        self.variant, self.model, self.blocks = variant, model, blocks
        self.device = torch.device(device)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4
        )
        gen = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(1, cfg.vocab, (cfg.batch, cfg.seq), generator=gen).to(device)
        self.inputs = {"input_ids": ids, "labels": ids}
        self.times, self.peaks, self.loss = [], [], None

    def forward(self):
        return self.model(**self.inputs)

    def train_step(self):
        loss = self.forward().loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


class _DropoutCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """torch's dropout calls (p > 0) and their elements, per block: its CPU dropout draws
    with bernoulli_, its CUDA one is native_dropout."""

    OPS = ("aten.bernoulli_", "aten.native_dropout")

    def __init__(self, where):
        super().__init__()
        self.where, self.calls, self.elements = where, {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.OPS and self.where[0] is not None:
            block = self.where[0]
            self.calls[block] = self.calls.get(block, 0) + 1
            self.elements[block] = self.elements.get(block, 0) + args[0].numel()
        return func(*args, **(kwargs or {}))


def count_dropout(trainee):
    """(dropout calls, dropped elements) per block (medians), from torch's dropout variant."""
    where = [None]
    handles = []
    for i, block in enumerate(trainee.blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)))
        handles.append(
            block.register_forward_hook(
                lambda m, a, o: where.__setitem__(0, None), always_call=True
            )
        )
    counter = _DropoutCounter(where)
    try:
        with torch.no_grad(), counter:
            trainee.forward()
    finally:
        for handle in handles:
            handle.remove()
    n = len(trainee.blocks)
    calls = [counter.calls.get(i, 0) for i in range(n)]
    elements = [counter.elements.get(i, 0) for i in range(n)]
    return statistics.median(calls), statistics.median(elements)


# What each variant keeps per dropped element besides its copy of the dropped tensor: the
# mask (bytes per element) on the CPU (torch's CPU dropout keeps a mask in the input's
# dtype) and on a GPU (torch's CUDA dropout a bool mask); and whether the copy is kept.
_MASK_CPU = {"nn.Dropout": None, "fastreg:bits": 1 / 8, "fastreg:recompute": 0.0, REGENERATED: 0.0}
_MASK_GPU = {"nn.Dropout": 1.0, "fastreg:bits": 1 / 8, "fastreg:recompute": 0.0, REGENERATED: 0.0}


def implied_bf16_gpu(variant, per_element, element_size):
    """The bytes per dropped element that `per_element` (measured excess over the floor
    per dropped element, in a dtype of `element_size` bytes, on the CPU) implies for
    bfloat16 on a GPU: the copy of the dropped tensor scaled to 2 bytes, the mask as the
    GPU keeps it (computed, not measured)."""
    if variant not in _MASK_GPU or per_element is None:
        return None
    mask_cpu = _MASK_CPU[variant]
    if mask_cpu is None:
        mask_cpu = float(element_size)
    copy = max(per_element - mask_cpu, 0.0)
    return copy * 2 / element_size + _MASK_GPU[variant]


HF_MISSING = {
    "transformers": "skipped, transformers is not installed (pip install "
    "transformers; the models are built from configs, nothing is "
    "downloaded)",
    "peft": "skipped, peft is not installed (pip install peft)",
}


def run_hf(cfg, device, dtype=torch.float32, steps=5, progress=None, models=HF_MODELS):
    """{model: rows, or the reason it was skipped} for each of `models`."""
    transformers = _transformers()
    results = {}
    for name in models:
        if transformers is None:
            results[name] = HF_MISSING["transformers"]
            continue
        if name == "llama-lora" and _peft() is None:
            results[name] = HF_MISSING["peft"]
            continue
        trainees = []
        for v in HF_VARIANTS:
            model, blocks = build_hf(transformers, name, cfg, v, device, dtype)
            trainees.append(_HFTrainee(v, model, blocks, cfg, device))
        time_steps(trainees, steps, progress, label=name)
        calls, elements = count_dropout(trainees[HF_VARIANTS.index(BASELINE)])
        size = torch.empty((), dtype=dtype).element_size()
        rows = []
        for t in trainees:
            kept, per_block = t.kept(t.blocks)
            layer = statistics.median(per_block.get(i, 0) for i in range(len(t.blocks)))
            layer = int(layer) if layer == int(layer) else layer
            rows.append(
                {
                    "variant": t.variant,
                    "kept_bytes": kept,
                    "layer_bytes": layer,
                    "dropout_calls_per_layer": calls,
                    "dropped_elements_per_layer": elements,
                    "trainable_parameters": sum(
                        p.numel() for p in t.model.parameters() if p.requires_grad
                    ),
                }
            )
        base = trainees[HF_VARIANTS.index(BASELINE)]
        for row, t in zip(rows, trainees):
            _timing(row, t, base)
        # what regeneration costs: its step time against the same mask mode without it
        plain = trainees[HF_VARIANTS.index("fastreg:recompute")]
        regen = trainees[HF_VARIANTS.index(REGENERATED)]
        cost = ratio_summary(regen.times, plain.times)  # > 1: regenerated is slower
        rows[HF_VARIANTS.index(REGENERATED)]["vs_recompute"] = {
            k.replace("speedup", "slowdown"): v for k, v in cost.items()
        }
        floor = rows[HF_VARIANTS.index("no dropout")]["layer_bytes"]
        for r in rows:
            excess = r["layer_bytes"] - floor
            r["over_floor_bytes"] = excess
            r["over_floor_per_call"] = excess / calls if calls else None
            r["over_floor_per_element"] = excess / elements if elements else None
            r["bf16_gpu_bytes_per_element"] = implied_bf16_gpu(
                r["variant"], r["over_floor_per_element"], size
            )
        results[name] = rows
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return results


HF_TITLES = {
    "llama-lora": "PEFT LoRA Llama (LoRA r={rank} on q, k, v, o, gate, up, down; lora_dropout={p})",
    "t5": "T5 (encoder and decoder; feed-forward, attention and residual dropout p={p})",
    "bert": "BERT (masked LM; attention-probability and hidden dropout p={p})",
}


def format_hf_tables(results, cfg, dtype, steps):
    out = []
    for name, rows in results.items():
        title = HF_TITLES[name].format(rank=cfg.rank, p=cfg.p)
        if isinstance(rows, str):
            out += ["", f"memory: Hugging Face {title}: {rows}"]
            continue
        r0 = rows[0]
        out += [
            "",
            f"memory: Hugging Face {title}, {cfg.layers} layer(s), width {cfg.width}, MLP "
            f"{cfg.mlp}, {cfg.heads} heads, vocab {cfg.vocab}, {dtype}; batch {cfg.batch} x "
            f"sequence {cfg.seq}; eager attention; {steps} steps per variant, interleaved",
            f"per layer: bytes autograd keeps per block (median over blocks); "
            f"{r0['dropout_calls_per_layer']:g} dropout calls and "
            f"{r0['dropped_elements_per_layer'] / 1e6:.2f}M dropped elements per layer; "
            "over floor: per layer less the model without dropout, per call and per dropped "
            "element; bf16 GPU B/elem: what that implies for bfloat16 on a GPU (computed: "
            "the copy at 2 bytes, torch's CUDA mask 1 byte, fastreg's bits 1/8; not "
            'measured); regenerated: replace_dropout(mask="recompute", functional=True, '
            "regenerate=True); fastreg:recompute the same without regenerate=True",
        ]
        names = [
            "variant",
            "per layer MiB",
            "over floor B",
            "B/call",
            "B/elem",
            "bf16 GPU B/elem (computed)",
        ]
        cuda = rows[0]["peak_bytes"] is not None
        if cuda:
            names += ["step peak MiB"]
        names += TIME_NAMES + ["loss"]
        body = []
        for r in rows:
            per_call = r["over_floor_per_call"]
            per_elem = r["over_floor_per_element"]
            implied = r["bf16_gpu_bytes_per_element"]
            cells = [
                r["variant"],
                f"{r['layer_bytes'] / 2**20:.2f}",
                f"{r['over_floor_bytes']:,}",
                "" if per_call is None else f"{per_call:,.0f}",
                "" if per_elem is None else f"{per_elem:.3f}",
                "" if implied is None else f"{implied:.3f}",
            ]
            if cuda:
                cells += [_mib(r["peak_bytes"])]
            cells += _time_cells(r) + [f"{r['loss']:.4f}"]
            body.append(cells)
        out += _table(names, body) + [TIME_NOTE]
        cost = rows[HF_VARIANTS.index(REGENERATED)].get("vs_recompute")
        if cost:
            out.append(
                f"regeneration's cost: step time of fastreg:regenerated / fastreg:recompute, "
                f"median of the per-round ratios {cost['slowdown']:.3f} (interquartile range "
                f"{cost['slowdown_q1']:.3f}-{cost['slowdown_q3']:.3f})"
            )
    return "\n".join(out)
