"""fastreg.integrations.huggingface.FastregCallback in real runs of transformers' Trainer
(tiny BERT, CPU, a few steps): the parameters after training equal those of the
hand-written loop that adds the penalty to the loss (tests/hf_trainer_cases.py) in fp32,
bf16 autocast and fp16 with a GradScaler, with gradient accumulation 1 and 4, clipping on
and off, and under DDP (two gloo processes); dropout is fastreg's; the penalty is logged;
a checkpoint loads into the original class and a resumed run ends where the uninterrupted
one does."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def cases(transformers):
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import hf_trainer_cases

    return hf_trainer_cases


TOL = 1e-7  # float32 master weights; the two loops add the same terms in other orders


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trainer_equals_the_hand_written_loop(cases, precision, tmp_path):
    for accum in (1, 4):
        for clip in (True, False):
            model, calls, trainer, start = cases.train_with_callback(
                tmp_path, precision, accum, clip
            )
            if precision == "fp16":
                assert trainer.optimizer.scaler.get_scale() == cases.INIT_SCALE
            if precision != "fp32":  # the Trainer's forward ran under autocast
                assert model.classifier.weight.dtype == torch.float32
            expected = cases.hand_written(start, calls, precision, accum, clip)
            difference = cases.max_difference(model, expected)
            assert difference <= TOL, (accum, clip, difference)
            if accum == 1:  # the same operations in the same order: bitwise
                assert difference == 0.0
            if clip and accum == 4:  # and the test sees a penalty counted 0 or 4 times
                for times in (0.0, 4.0):
                    wrong = cases.hand_written(
                        start, calls, precision, accum, clip, penalty_times=times
                    )
                    assert cases.max_difference(model, wrong) > 1e3 * TOL, times


def test_autocast_and_scaler_ran(cases, tmp_path):
    """The fp16 run autocasts its forward to float16 and scales its loss."""
    seen = []
    model = cases.make_model()
    model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    _, _, trainer, _ = cases.train_with_callback(tmp_path, "fp16", model=model, steps=1)
    assert seen == [torch.float16]
    assert trainer.accelerator.scaler is trainer.optimizer.scaler


def test_default_exclude_is_what_trainer_weight_decay_leaves_out(cases, transformers):
    from fastreg import _params
    from fastreg.integrations.huggingface import FastregCallback

    model = cases.make_model()
    callback = FastregCallback(l2=1.0)
    selected = [n for n, _ in _params.module_params(model, callback.exclude_for(model))]
    decay = transformers.Trainer.get_decay_parameter_names(None, model)
    assert sorted(selected) == sorted(decay)
    assert any("LayerNorm" in n for n, _ in model.named_parameters()) and not any(
        "LayerNorm" in n or n.endswith("bias") for n in selected
    )
    # fastreg's own rule selects the same on BERT
    assert [n for n, _ in _params.module_params(model, "bias_and_norm")] == selected


def test_dropout_is_swapped_and_runs(cases, tmp_path):
    import fastreg
    from fastreg.integrations.huggingface import FastregCallback

    model = cases.make_model(dropout=0.1)
    callback = FastregCallback(l2=1e-3, dropout="recompute")
    served = []
    original = fastreg.DropoutMode.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.dropout:
            served.append(self.mask)
        return original(self, func, types, args, kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastreg.DropoutMode, "__torch_function__", counting)
        cases.train_with_callback(tmp_path, model=model, callback=callback, steps=1)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is fastreg.Dropout and m.mask == "recompute" for m in dropouts)
    # the eager attention's F.dropout of the probabilities went to fastreg too
    assert served and set(served) == {"recompute"}


def test_penalty_is_logged(cases, tmp_path):
    import fastreg

    model, _, trainer, _ = cases.train_with_callback(tmp_path, steps=2)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("penalty" in h for h in logged)
    decay = set(trainer.get_decay_parameter_names(model))
    expected = fastreg.penalty(
        [p for n, p in model.named_parameters() if n in decay], l1=cases.L1, l2=cases.L2
    ).item()
    assert logged[-1]["penalty"] == pytest.approx(expected, rel=1e-6)


def test_checkpoint_loads_into_the_original_class_and_resume_continues(
    cases, transformers, tmp_path
):
    from fastreg.integrations.huggingface import FastregCallback

    def run(out, steps, resume=None, dropout=0.1):
        model = cases.make_model(dropout=dropout)
        trainer = transformers.Trainer(
            model=model,
            args=cases.training_args(
                out, steps=steps, save_strategy="steps", save_steps=2, max_steps=4
            ),
            train_dataset=cases.dataset(),
            callbacks=[FastregCallback(l1=cases.L1, l2=cases.L2)],
        )
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full", 4)
    # a checkpoint is the model's own: it loads into the class without fastreg
    checkpoint = tmp_path / "full" / "checkpoint-2"
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert not any(type(m).__module__.startswith("fastreg") for m in plain.modules())
    final = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "full" / "checkpoint-4"
    )
    cases_state = {k: v for k, v in full.state_dict().items()}
    for key, value in final.state_dict().items():
        assert torch.equal(value, cases_state[key]), key
    # resuming from step 2 (RNG states, data order, optimizer restored by the Trainer)
    # ends bitwise where the uninterrupted run did, dropout masks included
    resumed = run(tmp_path / "resumed", 4, resume=str(checkpoint))
    assert cases.max_difference(resumed, full) == 0.0


def test_ddp_two_processes(cases, tmp_path):
    """tools/hf_ddp_worker.py under torch.distributed.run, two CPU processes (gloo): the
    Trainer with the callback against the hand-written DDP loop, for fp32 and bf16 with
    accumulation 1 and 4, clipping on and off."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    result = tmp_path / "result.json"
    worker = pathlib.Path(__file__).parents[1] / "tools" / "hf_ddp_worker.py"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(worker),
            str(tmp_path),
            str(result),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    differences = json.loads(result.read_text())
    assert len(differences) == 8
    for case, difference in differences.items():
        assert difference <= TOL, (case, difference)
