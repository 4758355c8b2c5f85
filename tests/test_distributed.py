"""fastreg under torch.distributed: each test runs scenarios of tests/distributed_worker.py
in two processes on the gloo backend (CPU), on 127.0.0.1, where the checks run (two tests,
not three: starting the processes, mostly importing torch, is most of the time).

* ddp: DistributedDataParallel with fastreg.Dropout and fastreg.penalty in the loss keeps
  the replicas bitwise identical, and ranks seeded apart draw their own masks.
* generators: a generator per tensor-parallel group: seeded alike, equal masks on every
  rank; with seed + rank, different ones.
* fsdp: fully_shard (FSDP2): penalties over the sharded parameters equal the unsharded
  model's, on every rank; gradients land on the right shards; the in-place steps work on
  the shards; mixed meshes and Partial parameters are refused by name.
* placements: DTensors on 1-D and 2-D meshes, sharded and replicated: replicated mesh
  dimensions are not counted once per replica.

The workers import the fastreg of this tree (PYTHONPATH and cwd are its root; they check
it), run with OMP_NUM_THREADS=1, and are killed (their process groups) after TIMEOUT
seconds or as soon as one of them fails; the failure shows every rank's output.
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

from distributed_worker import SKIP_CODE

WORLD_SIZE = 2
TIMEOUT = 120  # seconds, per test
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch is built without torch.distributed")


def run_workers(*scenarios):
    """Runs `scenarios` on WORLD_SIZE ranks; fails with their output unless every rank
    passes each of them."""
    scenario = ",".join(scenarios)
    # The test holds the rendezvous store on a port the system picks (port 0): no race
    # for a free port between picking it and binding it.
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    logs, workers = [], []
    try:
        for rank in range(WORLD_SIZE):
            logs.append(tempfile.TemporaryFile("w+"))
            workers.append(subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(rank), str(WORLD_SIZE),
                 str(store.port)],
                cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                start_new_session=True))  # its own process group, to kill it with its children
        deadline = time.monotonic() + TIMEOUT
        while any(w.poll() is None for w in workers):
            failed = any(w.returncode not in (None, 0, SKIP_CODE) for w in workers)
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
    report = "\n".join(f"---- rank {rank}, exit code {worker.returncode} ----\n{output}"
                       for rank, (worker, output) in enumerate(zip(workers, outputs)))
    if timed_out:
        pytest.fail(f"{scenario}: the workers were still running after {TIMEOUT} s\n{report}")
    if all(w.returncode == SKIP_CODE for w in workers):
        reason = next(line for line in outputs[0].splitlines() if line.startswith("SKIP: "))
        pytest.skip(reason[len("SKIP: "):])
    assert all(w.returncode == 0 for w in workers), f"{scenario} failed\n{report}"
    passed = [f"{name}: ok" for name in scenarios]
    assert all([line for line in output.splitlines() if line in passed] == passed
               for output in outputs), report


def test_ddp_and_a_generator_per_tensor_parallel_group():
    run_workers("ddp", "generators")


def test_fsdp2_and_dtensor_placements():
    run_workers("placements", "fsdp")  # placements first: it runs where fsdp skips
