"""fastreg.integrations.lightning.FastregCallback in real runs of lightning.Trainer (a small
MLP, CPU, a few steps): the parameters after training equal those of the hand-written
loop that adds the penalty to the loss (tests/lightning_cases.py) in fp32, bf16 autocast
and fp16 with a GradScaler, with gradient accumulation 1 and 4, clipping on and off, and
under the "ddp" strategy (two gloo processes); dropout is fastreg's; the penalty is
logged; a checkpoint loads into the plain module and a resumed fit ends where the
uninterrupted one does."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning")

TOL = 1e-7  # float32 weights; the two loops add the same terms in other orders


@pytest.fixture(scope="module")
def cases():
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import lightning_cases

    return lightning_cases


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_lightning_equals_the_hand_written_loop(cases, precision, tmp_path):
    for accum in (1, 4):
        for clip in (True, False):
            module, start, trainer = cases.fit(tmp_path, precision, accum, clip)
            expected = cases.hand_written(start, module.batches, precision, accum, clip)
            difference = cases.max_difference(module.net, expected)
            assert difference <= TOL, (accum, clip, difference)
            if accum == 1:
                assert difference == 0.0
            if clip and accum == 4:  # the test sees a penalty counted 0 or 4 times
                for times in (0.0, 4.0):
                    wrong = cases.hand_written(
                        start, module.batches, precision, accum, clip, penalty_times=times
                    )
                    assert cases.max_difference(module.net, wrong) > 1e3 * TOL, times


def test_fp16_autocasts_and_scales(cases, tmp_path):
    seen = []
    module = cases.Module()
    module.net[4].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    _, _, trainer = cases.fit(tmp_path, "fp16", module=module, steps=2)
    assert seen == [torch.float16] * 2
    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == cases.INIT_SCALE


def test_dropout_is_swapped_and_the_penalty_logged(cases, tmp_path):
    import fastreg
    from fastreg.integrations.lightning import FastregCallback

    module = cases.Module(dropout=0.2)
    cases.fit(
        tmp_path,
        module=module,
        steps=2,
        callback=FastregCallback(l1=cases.L1, l2=cases.L2, dropout="bool"),
    )
    assert type(module.net[3]) is fastreg.Dropout and module.net[3].mask == "bool"
    logged = module.trainer.callback_metrics["penalty"].item()
    # logged at the weights of the last step, before it
    assert logged > 0 and logged == pytest.approx(cases.hand_penalty(module.net).item(), rel=0.05)


def test_only_the_stepping_optimizers_parameters(cases):
    from fastreg.integrations.lightning import FastregCallback

    module = cases.Module()
    callback = FastregCallback(l2=1.0)
    optimizer = torch.optim.SGD(module.net[0].parameters(), lr=0.1)
    assert callback.selection(module, optimizer) == [module.net[0].weight]
    whole = torch.optim.SGD(module.parameters(), lr=0.1)
    assert callback.selection(module, whole) == [module.net[0].weight, module.net[4].weight]


def test_checkpoint_loads_into_the_plain_module_and_resume_continues(cases, tmp_path):
    import lightning as L

    def fit(epochs, root, ckpt_path=None, rng=None):
        from fastreg.integrations.lightning import FastregCallback

        module = cases.Module(dropout=0.2)
        if rng is not None:
            torch.set_rng_state(rng)
        trainer = L.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            max_epochs=epochs,
            callbacks=[FastregCallback(l1=cases.L1, l2=cases.L2)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, cases.data(n=8), ckpt_path=ckpt_path)
        return module, trainer

    full, _ = fit(2, tmp_path / "full")  # two epochs of four steps
    half, trainer = fit(1, tmp_path / "half")
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    rng = torch.get_rng_state()
    # the checkpoint's state dict is the plain module's (fastreg.Dropout keeps nn.Dropout's)
    state = torch.load(path, weights_only=False)["state_dict"]
    plain = cases.make_net(dropout=0.2)
    plain.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    assert not any(type(m).__module__.startswith("fastreg") for m in plain.modules())
    # Lightning restores weights, optimizer and loop, not torch's RNG, and restarts an
    # interrupted epoch's data: from the end of an epoch, with the RNG state of the
    # interruption put back, the resumed fit draws the uninterrupted one's masks and ends
    # on its weights
    resumed, _ = fit(2, tmp_path / "resumed", ckpt_path=path, rng=rng)
    assert cases.max_difference(resumed.net, full.net) == 0.0


def test_ddp_two_processes(cases, tmp_path):
    """tools/lightning_ddp_worker.py: strategy="ddp", devices=2 on the CPU (gloo), the fit
    against the hand-written DDP loop for fp32, bf16 and fp16, accumulation 1 and 4,
    clipping on and off."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            [str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = tmp_path / "result.json"
    worker = pathlib.Path(__file__).parents[1] / "tools" / "lightning_ddp_worker.py"
    run = subprocess.run(
        [sys.executable, str(worker), str(tmp_path), str(result)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    differences = json.loads(result.read_text())
    assert len(differences) == 12
    for case, difference in differences.items():
        assert difference <= TOL, (case, difference)
