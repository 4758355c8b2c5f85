"""One rank of test_integrations_hf.py's DDP test (run by torch.distributed.run): for
each case, Trainer + FastregCallback, then the hand-written DDP loop on this rank's
recorded micro-batches; rank 0 writes {case: largest parameter difference over ranks}."""

import json
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))  # the cases
import hf_trainer_cases as cases  # noqa: E402

out, result = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
differences = {}
for precision in ("fp32", "bf16"):
    for accum in (1, 4):
        for clip in (True, False):
            name = f"{precision}-accum{accum}-clip{int(clip)}"
            model, calls, trainer, start = cases.train_with_callback(
                out / name, precision, accum, clip
            )
            assert trainer.args.world_size == 2 and dist.is_initialized()
            expected = cases.hand_written(start, calls, precision, accum, clip, ddp=True)
            difference = torch.tensor(cases.max_difference(model, expected))
            dist.all_reduce(difference, op=dist.ReduceOp.MAX)
            differences[name] = difference.item()
if dist.get_rank() == 0:
    result.write_text(json.dumps(differences))
