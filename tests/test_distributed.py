"""fastreg under torch.distributed: the scenarios of tools/distributed_worker.py, run in
two processes on the gloo backend (CPU), on 127.0.0.1, where the checks run. One launch
runs every scenario (starting the processes, mostly importing torch, is most of the
time); each scenario is its own test, passed when every rank printed "NAME: ok".

* ddp: DistributedDataParallel with fastreg.Dropout and fastreg.penalty in the loss keeps
  the replicas bitwise identical, and ranks seeded apart draw their own masks.
* regenerate: DDP with the dropped tensors regenerated in backward
  (`replace_dropout(..., regenerate=True)`): the same parameters, bit for bit, as with them
  kept.
* generators: a generator per tensor-parallel group: seeded alike, equal masks on every
  rank; with seed + rank, different ones.
* placements: DTensors on 1-D and 2-D meshes, sharded and replicated: replicated mesh
  dimensions are not counted once per replica.
* fsdp: fully_shard (FSDP2): penalties over the sharded parameters equal the unsharded
  model's, on every rank; gradients land on the right shards; the in-place steps work on
  the shards; mixed meshes and Partial parameters are refused by name.

The workers import the fastreg of this tree (PYTHONPATH and cwd are its root; they check
it), run with OMP_NUM_THREADS=1, and are killed (their process groups) after TIMEOUT
seconds or as soon as one of them fails; a failure shows every rank's output.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

WORLD_SIZE = 2
TIMEOUT = 240  # seconds, for all the scenarios
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tools" / "distributed_worker.py"
# placements before fsdp: a scenario that fails ends the launch, and placements runs
# where fsdp skips
SCENARIOS = ("ddp", "regenerate", "generators", "placements", "fsdp")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch is built without torch.distributed"
)


def run_workers(scenarios):
    """Runs `scenarios` on WORLD_SIZE ranks: (each rank's output lines, a report of every
    rank's exit code and output, whether they timed out)."""
    # The test holds the rendezvous store on a port the system picks (port 0): no race
    # for a free port between picking it and binding it.
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    logs, workers = [], []
    failed = False
    try:
        for rank in range(WORLD_SIZE):
            logs.append(tempfile.TemporaryFile("w+"))
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(WORKER),
                        ",".join(scenarios),
                        str(rank),
                        str(WORLD_SIZE),
                        str(store.port),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )  # its own process group, to kill it with its children
        deadline = time.monotonic() + TIMEOUT
        while any(w.poll() is None for w in workers):
            failed = any(w.returncode not in (None, 0) for w in workers)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        timed_out = not failed and any(w.poll() is None for w in workers)
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    report = "\n".join(
        f"---- rank {rank}, exit code {worker.returncode} ----\n{output}"
        for rank, (worker, output) in enumerate(zip(workers, outputs))
    )
    return [output.splitlines() for output in outputs], report, timed_out


@pytest.fixture(scope="module")
def launch():
    return run_workers(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(launch, scenario):
    lines, report, timed_out = launch
    results = [
        [line for line in rank_lines if line.startswith(f"{scenario}: ")] for rank_lines in lines
    ]
    skips = [r[0] for r in results if r and r[0].startswith(f"{scenario}: SKIP: ")]
    if len(skips) == WORLD_SIZE:
        pytest.skip(skips[0][len(f"{scenario}: SKIP: ") :])
    if all(r == [f"{scenario}: ok"] for r in results):
        return
    why = f"still running after {TIMEOUT} s" if timed_out else "not ok on every rank"
    pytest.fail(f"{scenario}: {why}\n{report}")
