"""The script of test_integrations_lightning.py's DDP test: Lightning's "ddp" strategy
with two CPU processes (gloo) starts the second rank by running this script again. For
each case: lightning.Trainer + FastregCallback, then the hand-written DDP loop on this
rank's batches; rank 0 writes {case: largest parameter difference over ranks}."""

import json
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))  # the cases
import lightning_cases as cases  # noqa: E402

out, result = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
differences = {}
for precision in ("fp32", "bf16", "fp16"):
    for accum in (1, 4):
        for clip in (True, False):
            name = f"{precision}-accum{accum}-clip{int(clip)}"
            module, start, trainer = cases.fit(
                out / name, precision, accum, clip, devices=2, strategy="ddp"
            )
            assert trainer.world_size == 2 and dist.is_initialized()
            expected = cases.hand_written(start, module.batches, precision, accum, clip, ddp=True)
            difference = torch.tensor(cases.max_difference(module.net, expected))
            dist.all_reduce(difference, op=dist.ReduceOp.MAX)
            differences[name] = difference.item()
if dist.get_rank() == 0:
    result.write_text(json.dumps(differences))
