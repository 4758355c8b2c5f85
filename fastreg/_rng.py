"""The (seed, offset) pair of the RNG contract (docs/rng-contract.md): how it is drawn,
and the policy that keeps one mask when a forward is recomputed."""

from typing import Optional

import torch

from fastreg._checks import check_seed
from fastreg._ops import TORCH_VERSION


def draw_rng_state(device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The (seed, offset) pair drawn from `generator` or the device's default generator by
    a torch random op on `device` (out of place: torch.compile traces randint, not
    random_), over nearly the full int64 range."""
    return torch.randint(
        -9223372036854775807 - 1,
        9223372036854775807,
        [2],
        dtype=torch.int64,
        device=device,
        generator=generator,
    )


def rng_state(device, seed=None, generator=None):
    """The (seed, offset) pair of the RNG contract as an int64 tensor on `device`.

    With `seed`, the pair is (seed, 0). Otherwise both words are drawn from `generator` or
    the device's default generator with a torch random op on that device: the draw stays
    on the device and inside a CUDA graph each replay draws anew, as native dropout does.
    """
    seed = check_seed(seed, generator)
    if seed is not None:
        return torch.tensor([seed, 0], dtype=torch.int64, device=device)
    if generator is not None:
        check_not_recomputing()
    elif compiling():
        return _saved_draw(device)
    return draw_rng_state(device, generator)


def compiling():
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


# ---- one mask under recomputation (docs/recomputation.md) ----
#
# The mask is a pure function of (input's shape, p, rng_state), so forward and backward
# apply one mask exactly when a recomputed forward sees the rng_state the forward drew.
# Eager: torch.utils.checkpoint (reentrant or not, selective or not) restores the default
# generators before it re-runs a forward (preserve_rng_state=True, its default), so the
# draw repeats bit for bit; an explicit generator is not restored, which is detected.
# Compiled: the partitioner may recompute any node in the backward graph, a random one
# too once activation_memory_budget < 1 (where native dropout goes wrong), and a redrawn
# rng_state gives another mask. So under torch.compile the draw runs inside a selective-
# checkpoint region whose policy is MUST_SAVE: its node is tagged so, and the partitioner
# never recomputes a MUST_SAVE node (it saves the 16 bytes instead). Where torch has no
# selective checkpointing (2.4) or its partitioner still recomputed the node (2.5, 2.6),
# a budget below 1 is refused.


def _must_save(ctx, op, *args, **kwargs):
    return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE


def _must_save_contexts():
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_must_save)


# The first torch whose partitioner, under a memory budget, was seen to keep the tagged
# draw: torch 2.5.1 and 2.6.0 recomputed it (another mask in the backward, silently),
# 2.8.0 did not (2.7 was not tried).
BUDGET_KEEPS_THE_DRAW_FROM = (2, 8)


def _have_selective_checkpointing():
    import torch.utils.checkpoint  # noqa: F401  (the submodule, for torch.utils.checkpoint.*)

    return hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts")


def memory_budget_refusal():
    """Why this torch cannot keep the partitioner from recomputing the draw under
    activation_memory_budget < 1 (a clause of fastreg's error), or None where it can."""
    if not _have_selective_checkpointing():  # torch < 2.5
        return "has no selective activation checkpointing to tag the draw with"
    if TORCH_VERSION < BUDGET_KEEPS_THE_DRAW_FROM:
        return "has a partitioner that recomputes a MUST_SAVE node (seen on 2.5, 2.6)"
    return None


def _saved_draw(device):
    """The draw, as a node the partitioner must save (see above)."""
    check_no_memory_budget()
    if not _have_selective_checkpointing():
        return draw_rng_state(device, None)
    return torch.utils.checkpoint.checkpoint(
        draw_rng_state, device, None, use_reentrant=False, context_fn=_must_save_contexts
    )


def check_no_memory_budget():
    """Refuses activation_memory_budget < 1 where this torch would recompute the draw."""
    budget = getattr(torch._functorch.config, "activation_memory_budget", 1.0)
    refusal = memory_budget_refusal() if budget < 1.0 else None
    if refusal is not None:
        first = ".".join(map(str, BUDGET_KEEPS_THE_DRAW_FROM))
        raise RuntimeError(
            f"dropout(): torch._functorch.config.activation_memory_budget is {budget}, and "
            f"this torch ({torch.__version__}) {refusal}: the backward pass would recompute "
            "the dropout's random draw and apply another mask. Use a budget of 1.0 or "
            f"torch >= {first}."
        )


def _graph_task_running():
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def check_not_recomputing():
    """A draw from an explicit generator must not run in a forward that the backward pass
    re-runs (activation checkpointing): torch.utils.checkpoint restores the default
    generators only, so the re-run would draw another mask than the forward applied."""
    if compiling() or not torch.is_grad_enabled() or not _graph_task_running():
        return
    raise RuntimeError(
        "dropout(): a forward with an explicit generator is being re-run in the backward pass "
        "(activation checkpointing): torch.utils.checkpoint restores the default generators "
        "only, so the recomputed mask would differ from the forward's. Draw from the default "
        "generator (generator=None) or pass seed= inside checkpointed regions."
    )


def no_rng_state(device):
    """The state passed when nothing is dropped (eval mode, p = 0): never read."""
    return torch.zeros(2, dtype=torch.int64, device=device)
