"""One rank of tests/test_distributed.py's scenarios:

    python tools/distributed_worker.py SCENARIO[,SCENARIO...] RANK WORLD_SIZE PORT

joins a gloo process group through the TCPStore the test holds on 127.0.0.1:PORT, runs
the scenarios in turn, checking them with assertions, and prints "NAME: ok" after each,
or "NAME: SKIP: why" for a scenario that needs what this torch lacks. A failed check
prints its traceback and "NAME: FAILED", and the rank exits with 1 (the other rank may
then wait on a collective: the test kills both).
Each rank checks its own results; where ranks must agree (or differ) they compare through
all_gather.
"""

import copy
import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fastreg
from fastreg import _rng

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tolerances (test_penalty)
L1, L2, P = 1e-2, 3e-2, 0.5


class Skip(Exception):
    pass


def gather(tensor):
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def all_equal(tensor):
    return all(torch.equal(other, tensor) for other in gather(tensor))


# ---- DDP ----------------------------------------------------------------------------


def ddp(rank, world):
    """A few DDP steps with fastreg.Dropout and fastreg.penalty in the loss, ranks seeded
    apart: the replicas stay bitwise identical, and each rank drew its own masks, the
    ones its RNG state gives."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), fastreg.Dropout(P), nn.ReLU(), nn.Linear(32, 4))
    replica = DistributedDataParallel(model)
    torch.manual_seed(1000 + rank)  # a seed per rank, as real jobs do
    drawn = []  # per call: the RNG state before it, its input and output
    model[1].register_forward_pre_hook(lambda m, args: drawn.append([torch.get_rng_state()]))
    model[1].register_forward_hook(lambda m, args, out: drawn[-1].extend([args[0], out]))
    opt = torch.optim.SGD(replica.parameters(), lr=0.1)
    initial = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    data = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=data), torch.randn(16, 4, generator=data)
        opt.zero_grad()
        loss = F.mse_loss(replica(x), y) + fastreg.penalty(replica, l1=L1, l2=L2)
        loss.backward()
        opt.step()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert all_equal(flat), "the replicas' parameters differ after the steps"
    assert not torch.equal(flat, initial)
    keeps = []
    for state, input, out in drawn:
        g = torch.Generator()
        g.set_state(state)
        seed, offset = _rng.rng_state("cpu", generator=g).tolist()
        keep = fastreg.dropout_mask(out.shape, P, seed, offset)  # kept: scaled by 2, exactly
        assert torch.equal(out, torch.where(keep, input * 2.0, 0.0)), (
            "a mask is not the one the rank's RNG state gives"
        )
        keeps.append(keep)
    masks = gather(torch.stack(keeps).to(torch.uint8))
    assert not torch.equal(masks[0], masks[1]), "ranks seeded apart drew the same masks"


def regenerate(rank, world):
    """DDP steps with the dropped tensors regenerated in backward
    (replace_dropout(..., regenerate=True)): the parameters after the steps equal, bit for
    bit, those of the same steps with the dropped tensors kept, on every rank, and the
    replicas stay identical."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    def train(regenerate):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(8, 32),
            nn.Dropout(P),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Dropout(P),
            nn.Linear(32, 4),
        )
        fastreg.replace_dropout(model, mask="recompute", regenerate=regenerate)
        replica = DistributedDataParallel(model)
        opt = torch.optim.SGD(replica.parameters(), lr=0.1)
        torch.manual_seed(1000 + rank)
        data = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x, y = torch.randn(16, 8, generator=data), torch.randn(16, 4, generator=data)
            opt.zero_grad()
            F.mse_loss(replica(x), y).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    from fastreg import _regen

    regenerations = []
    original = _regen._Recipe.regenerate

    def counted(self, *args, **kwargs):
        regenerations.append(1)
        return original(self, *args, **kwargs)

    _regen._Recipe.regenerate = counted
    try:
        kept = train(False)
        assert not regenerations, "dropped tensors were regenerated with regenerate=False"
        regenerated = train(True)
    finally:
        _regen._Recipe.regenerate = original
    # 3 steps, two dropouts each, each output saved by one Linear
    assert len(regenerations) == 6, f"{len(regenerations)} regenerations, not 6"
    assert torch.equal(kept, regenerated), "regeneration changed the parameters after DDP steps"
    assert all_equal(regenerated), "the replicas' parameters differ after the steps"


# ---- generators per tensor-parallel group ---------------------------------------------


def generators(rank, world):
    """Ranks of a TP group holding the same activations: modules with generators seeded
    with a shared seed drop the same elements, with seed + rank different ones; the
    default generator seeded alike on every rank also gives equal masks."""
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))  # same on all ranks
    shared = fastreg.Dropout(P, generator=torch.Generator().manual_seed(1234))
    own = fastreg.Dropout(P, generator=torch.Generator().manual_seed(1234 + rank))
    shared2d = fastreg.Dropout2d(P, generator=torch.Generator().manual_seed(99))
    own2d = fastreg.Dropout2d(P, generator=torch.Generator().manual_seed(99 + rank))
    x4 = x.view(4, 16, 12, 4)
    for _ in range(2):  # and again, once the generators have moved on
        assert all_equal(shared(x)), "a shared seed gave different masks"
        assert all_equal(shared2d(x4)), "a shared seed gave different channel masks"
        outs = gather(own(x))
        assert not torch.equal(outs[0], outs[1]), "seed + rank gave equal masks"
        outs = gather(own2d(x4))
        assert not torch.equal(outs[0], outs[1]), "seed + rank gave equal channel masks"
    torch.manual_seed(5)  # every rank seeding the default generator alike
    assert all_equal(fastreg.Dropout(P)(x)), "equal default seeds gave different masks"


# ---- FSDP2 ------------------------------------------------------------------------------


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:  # torch 2.4, 2.5
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise Skip(f"torch {torch.__version__} has no FSDP2 fully_shard") from None
    return fully_shard


def _dtensor_api():
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor, Replicate, Shard
        from torch.distributed._tensor.placement_types import Partial
    from torch.distributed.device_mesh import init_device_mesh

    return DTensor, Partial, Replicate, Shard, init_device_mesh


def oracle64(tensors, l1, l2):
    """The penalty of full (unsharded) tensors, in float64."""
    total = 0.0
    for w in tensors:
        w = w.detach().double()
        total += l1 * w.abs().sum().item() + l2 * w.square().sum().item()
    return total


def check_value(value, expected, what):
    """A penalty over DTensors: a plain 0-dim tensor, bitwise the same on every rank, and
    the value of the full tensors."""
    from test_penalty import U32, VALUE_RTOL

    assert type(value) is torch.Tensor and value.dim() == 0, f"{what}: {type(value)}"
    assert all_equal(value.detach()), f"{what}: the ranks got different values"
    # Each partial sum is within VALUE_RTOL of its float64 value, then the partials of the
    # ranks and of the groups are added in float32: one rounding per addition, at most
    # world_size + 1 of them here (all terms >= 0).
    bound = (VALUE_RTOL["cpu"] + (dist.get_world_size() + 1) * U32) * expected
    assert abs(value.item() - expected) <= bound, f"{what}: {value.item()} vs {expected}"


def placements(rank, world):
    """DTensors placed by hand: a replicated mesh dimension is not counted once per
    replica, sharded ones are summed, on 1-D and 2-D meshes, with parameters of different
    placements in one call (one all-reduce per placement); gradients are the local part
    of the full gradient, bitwise."""
    DTensor, Partial, Replicate, Shard, init_device_mesh = _dtensor_api()
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import distribute_tensor
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(5, 4, generator=g), torch.randn(7, generator=g)  # same on all ranks
    ref_w, ref_b = w.clone().requires_grad_(), b.clone().requires_grad_()
    fastreg.penalty([ref_w, ref_b], L1, L2).backward()
    expected = oracle64([w, b], L1, L2)
    layouts = [
        ((world,), [Replicate()]),
        ((world,), [Shard(1)]),
        ((world, 1), [Replicate(), Shard(0)]),
        ((1, world), [Replicate(), Shard(0)]),
        ((world, 1), [Shard(0), Shard(1)]),
    ]
    for shape, where in layouts:
        mesh = init_device_mesh("cpu", shape)
        dw = nn.Parameter(distribute_tensor(w, mesh, where))
        db = nn.Parameter(distribute_tensor(b, mesh, [Replicate()] * len(shape)))
        value = fastreg.penalty([dw, db], L1, L2)
        check_value(value, expected, f"{shape} {where}")
        value.backward()
        for name, p, ref in (("w", dw, ref_w), ("b", db, ref_b)):
            local = distribute_tensor(ref.grad, mesh, p.placements).to_local()
            assert torch.equal(p.grad.to_local(), local), f"{shape} {where}: grad of {name}"


def fsdp(rank, world):
    """fully_shard over a model with fastreg.Dropout: penalties over the sharded
    parameters equal the unsharded model's on every rank, and gradients land on the right
    shards (penalty alone; penalty plus a loss through the FSDP forward, the penalty taken
    before or after that forward); penalty_grad_ and prox_l1_ on the shards; errors."""
    from test_penalty import U32

    fully_shard = _fully_shard()
    DTensor, Partial, Replicate, Shard, init_device_mesh = _dtensor_api()
    mesh = init_device_mesh("cpu", (world,))
    if not torch.cuda.is_available():  # torch 2.4's and 2.5's fully_shard make CUDA streams
        probe = fully_shard(nn.Linear(2, 2), mesh=mesh)
        try:
            probe(torch.zeros(1, 2))
        except RuntimeError as error:
            if "CUDA" not in str(error):
                raise
            raise Skip(f"torch {torch.__version__}'s fully_shard needs CUDA ({error})") from None
    torch.manual_seed(0)
    # Uneven dim 0 everywhere; the last layer's shards are empty on rank 1.
    model = nn.Sequential(
        nn.Linear(6, 10), fastreg.Dropout(0.25), nn.ReLU(), nn.Linear(10, 5), nn.Linear(5, 1)
    )
    ref = copy.deepcopy(model)  # the unsharded model, same weights
    try:
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[3], mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root holds model[4]
    except Exception as error:  # noqa: BLE001 (what this torch cannot do, named in the skip)
        raise Skip(
            f"fully_shard on a CPU mesh with gloo fails on torch {torch.__version__}: {error!r}"
        ) from None
    shards = dict(model.named_parameters())
    full = dict(ref.named_parameters())

    def shard(tensor):
        """This rank's part of a full tensor: FSDP2 chunks dim 0 (torch.chunk)."""
        chunks = torch.chunk(tensor, world, dim=0)
        return chunks[rank] if rank < len(chunks) else tensor[:0]

    for name, p in shards.items():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        assert torch.equal(p.to_local(), shard(full[name].detach())), name
    assert shards["4.weight"].to_local().numel() == (0 if rank else 5)

    def oracle(l1, l2, names=None):
        return oracle64([w for name, w in full.items() if names is None or name in names], l1, l2)

    weights = ["0.weight", "3.weight", "4.weight"]
    cases = [
        ("penalty", lambda m: fastreg.penalty(m, L1, L2), oracle(L1, L2)),
        ("l1_penalty", lambda m: fastreg.l1_penalty(m, L1), oracle(L1, 0.0)),
        ("l2_penalty", lambda m: fastreg.l2_penalty(m, L2), oracle(0.0, L2)),
        ("Penalty", fastreg.Penalty(L1, L2), oracle(L1, L2)),
        (
            "L2Penalty bias_and_norm",
            fastreg.L2Penalty(L2, exclude="bias_and_norm"),
            oracle(0.0, L2, weights),
        ),
        (
            "groups",
            lambda m: fastreg.penalty(
                [{"params": [m[0].weight], "l1": L1}, {"params": [m[4].bias], "l2": L2}]
            ),
            oracle(L1, 0.0, ["0.weight"]) + oracle(0.0, L2, ["4.bias"]),
        ),
        ("reference", lambda m: fastreg.reference.penalty(m, L1, L2), oracle(L1, L2)),
    ]
    for what, function, expected in cases:
        check_value(function(model), expected, what)

    # Penalty alone: each shard's gradient is exactly the slice of the full gradient
    # (bitwise: the same elementwise formula), not world_size times it.
    fastreg.penalty(model, L1, L2).backward()
    fastreg.penalty(ref, L1, L2).backward()
    for name, p in shards.items():
        assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, name
        assert torch.equal(p.grad.to_local(), shard(full[name].grad)), f"penalty grad {name}"

    # penalty_grad_ on the shards' DTensor gradients, and from no gradient at all.
    fastreg.penalty_grad_(model, L1, L2)
    fastreg.penalty_grad_(ref, L1, L2)
    for name, p in shards.items():
        assert torch.equal(p.grad.to_local(), shard(full[name].grad)), f"penalty_grad_ {name}"
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    fastreg.penalty_grad_(model, L1, L2)
    fastreg.penalty_grad_(ref, L1, L2)
    for name, p in shards.items():
        assert isinstance(p.grad, DTensor) and p.grad.placements == p.placements, name
        assert torch.equal(p.grad.to_local(), shard(full[name].grad)), f"penalty_grad_ {name}"

    def batch(r):
        return torch.randn(8, 6, generator=torch.Generator().manual_seed(10 + r))

    def reference_grads():
        """Gradients of mean_r loss_r + penalty on the unsharded model, each rank's loss
        with its batch and dropout seed: per rank, and the penalty's."""
        per_rank = []
        for r in range(world):
            ref.zero_grad(set_to_none=True)
            torch.manual_seed(100 + r)
            ref(batch(r)).square().mean().backward()
            per_rank.append({name: w.grad.clone() for name, w in full.items()})
        ref.zero_grad(set_to_none=True)
        fastreg.penalty(ref, L1, L2).backward()
        return per_rank, {name: w.grad.clone() for name, w in full.items()}

    per_rank, penalty_grad = reference_grads()

    # Penalty (over the shards, before the forward) + a loss through the FSDP forward,
    # whose dropout draws from this rank's seed. FSDP averages the loss gradients over
    # the ranks (a power of two: exact scaling); the penalty's lands on the shards
    # directly. So each shard holds the slice of (g_0 + g_1) / 2 + penalty gradient.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(100 + rank)
    penalty = fastreg.penalty(model, L1, L2)
    (model(batch(rank)).square().mean() + penalty).backward()
    for name, p in shards.items():
        expected = sum(g[name] for g in per_rank) / world + penalty_grad[name]
        assert torch.equal(p.grad.to_local(), shard(expected)), f"loss + penalty grad {name}"

    # The usual loss + penalty(model) after the forward: there the root's parameters are
    # FSDP's unsharded plain tensors (replicated), the others shards. Their penalty
    # gradient goes through FSDP's averaging instead, so the sums are rounded in another
    # order: within the rounding of three float32 additions and a halving of the terms.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(100 + rank)
    out = model(batch(rank))
    kinds = {type(p).__name__ for p in model.parameters()}
    penalty = fastreg.penalty(model, L1, L2)
    check_value(penalty, oracle(L1, L2), f"penalty after the forward ({sorted(kinds)})")
    (out.square().mean() + penalty).backward()
    for name, p in shards.items():
        terms = sum(g[name].abs() for g in per_rank) / world + penalty_grad[name].abs()
        expected = sum(g[name] for g in per_rank) / world + penalty_grad[name]
        error = (p.grad.to_local() - shard(expected)).abs()
        assert torch.all(error <= 4 * U32 * shard(terms)), f"penalty after the forward {name}"

    # A plain tensor with DTensors counts as replicated: its own value on each rank.
    mixed = fastreg.penalty([shards["0.weight"], full["4.weight"]], L1, L2)
    check_value(mixed, oracle(L1, L2, ["0.weight", "4.weight"]), "DTensor + plain tensor")

    # prox_l1_ on the shards.
    with torch.no_grad():
        fastreg.prox_l1_(model, 0.05)
        fastreg.prox_l1_(ref, 0.05)
    for name, p in shards.items():
        assert torch.equal(p.to_local(), shard(full[name].detach())), f"prox_l1_ {name}"

    # Errors name the argument.
    other_mesh = init_device_mesh("cpu", (1, world))
    elsewhere = DTensor.from_local(
        torch.ones(3), other_mesh, [Replicate(), Shard(0)], run_check=False
    )
    expect_error(
        RuntimeError,
        "penalty(): all DTensors must be on one device mesh, but params[0] is on",
        lambda: fastreg.penalty([shards["3.weight"], elsewhere], l2=1.0),
    )
    expect_error(
        RuntimeError,
        "and params[1] on",
        lambda: fastreg.l2_penalty([shards["3.weight"], elsewhere]),
    )
    pending = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    for function in (
        lambda: fastreg.penalty([shards["3.weight"], pending], l1=1.0),
        lambda: fastreg.penalty_grad_([pending], l2=1.0),
        lambda: fastreg.prox_l1_([pending], 0.1),
    ):
        expect_error(TypeError, "params[", function)
    expect_error(
        TypeError,
        "must be a DTensor placed by Shard or Replicate, but mesh dimension 0 has",
        lambda: fastreg.prox_l1_(pending, 0.1),
    )
    weight = nn.Parameter(DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False))
    weight.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Replicate()], run_check=False)
    expect_error(
        RuntimeError,
        "penalty_grad_(): a gradient must be placed as its parameter",
        lambda: fastreg.penalty_grad_([weight], l2=1.0),
    )


def expect_error(kind, text, function):
    try:
        function()
    except kind as error:
        assert text in str(error), f"{kind.__name__} without {text!r}: {error}"
    else:
        raise AssertionError(f"no {kind.__name__} ({text!r})")


SCENARIOS = {
    "ddp": ddp,
    "regenerate": regenerate,
    "generators": generators,
    "fsdp": fsdp,
    "placements": placements,
}


def main():
    names, rank, world, port = sys.argv[1].split(","), *map(int, sys.argv[2:])
    assert Path(fastreg.__file__).resolve().parent == ROOT / "fastreg", (
        f"imported {fastreg.__file__}, not the fastreg of {ROOT}"
    )
    if not dist.is_available() or not dist.is_gloo_available():
        for name in names:
            print(f"{name}: SKIP: torch has no torch.distributed with gloo", flush=True)
        sys.exit(0)
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    for name in names:
        try:
            SCENARIOS[name](rank, world)
        except Skip as why:  # raised before the scenario's first collective
            print(f"{name}: SKIP: {why}", flush=True)
            continue
        except BaseException:
            traceback.print_exc()
            print(f"{name}: FAILED", flush=True)
            os._exit(1)
        print(f"{name}: ok", flush=True)
    # Both ranks done before either leaves: a rank that destroyed its group while the
    # other still talked to it once aborted ("terminate called without an active
    # exception"). Then out without tearing gloo down: torch 2.4's teardown now and then
    # hung after both ranks had passed every check.
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
