"""What regenerating the dropped tensor costs in the backward (docs/regenerate.md), on the
Hugging Face models of ``bench --memory`` (PEFT LoRA Llama, BERT, T5; its CPU defaults).

    PYTHONPATH=. python benchmarks/regenerate_cost.py [--rounds 20] [--threads N]

For each model, ``replace_dropout(mask="recompute", functional=True)`` with and without
``regenerate=True``, one training forward and backward each per round, the two in
alternating order; times are the process's CPU time (time.process_time), which leaves out
the time the process was descheduled by competing load. Printed per model: the median
backward time of each, the per-round ratio regenerated / plain (median and interquartile
range), and the share of the regenerated backward spent regenerating (inside the unpack
hook that reruns the dropout kernel), measured within the same backward.
"""

import argparse
import statistics
import time

import torch

from fastreg import _regen
from fastreg.bench import memory
from fastreg.bench.timing import quartiles


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers = memory._transformers()
    if transformers is None:
        raise SystemExit("needs transformers")
    spent = [0.0]
    unpack = _regen._Hooks.unpack

    def timed(self, packed):
        if not isinstance(packed, _regen._Packed):
            return unpack(self, packed)
        start = time.process_time()
        try:
            return unpack(self, packed)
        finally:
            spent[0] += time.process_time() - start

    _regen._Hooks.unpack = timed
    cfg = memory.HF_DEFAULTS["cpu"]
    models = [m for m in memory.HF_MODELS if m != "llama-lora" or memory._peft() is not None]
    for name in models:
        trainees = []
        for variant in ("fastreg:recompute", memory.REGENERATED):
            model, blocks = memory.build_hf(transformers, name, cfg, variant, "cpu")
            trainees.append(memory._HFTrainee(variant, model, blocks, cfg, "cpu"))
        backward = {t.variant: [] for t in trainees}
        share = []
        for round_ in range(args.rounds + 1):  # round 0: the warm-up
            for t in trainees if round_ % 2 else trainees[::-1]:
                loss = t.forward().loss
                t.model.zero_grad(set_to_none=True)
                spent[0] = 0.0
                start = time.process_time()
                loss.backward()
                took = time.process_time() - start
                if round_:
                    backward[t.variant].append(took)
                    if t.variant == memory.REGENERATED:
                        share.append(spent[0] / took)
        plain, regen = backward["fastreg:recompute"], backward[memory.REGENERATED]
        ratio = quartiles([r / p for p, r in zip(plain, regen)])
        print(
            f"{name}: backward CPU ms plain {statistics.median(plain) * 1e3:.1f}, "
            f"regenerated {statistics.median(regen) * 1e3:.1f}; regenerated / plain "
            f"{ratio[1]:.3f} (IQR {ratio[0]:.3f}-{ratio[2]:.3f}); regenerating: "
            f"{statistics.median(share):.1%} of the regenerated backward "
            f"(IQR {quartiles(share)[0]:.1%}-{quartiles(share)[2]:.1%})",
            flush=True,
        )


if __name__ == "__main__":
    main()
