"""DTensor parameters (FSDP2's fully_shard, tensor parallelism) in the penalty API.

The kernels see only plain tensors: every DTensor is replaced by its local shard. The
in-place steps (penalty_grad_, prox_l1_) are elementwise, so that is all they need. The
penalty's value is a sum: each rank reduces its shards with the fused kernel, and the
partial sums are added over the mesh dimensions where the parameters are sharded (not
where they are replicated, which would count them once per replica).
"""

import sys

_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")  # torch >= 2.5, 2.4


def dtensor_type():
    """The DTensor class, or None while torch's DTensor module is not loaded: no DTensor
    can exist before it is, and fastreg does not import it itself (it takes seconds)."""
    for name in _MODULES:
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls
    return None


def _placement_types():
    try:
        from torch.distributed.tensor import Partial, Replicate
    except ImportError:  # torch 2.4
        from torch.distributed._tensor.placement_types import Partial, Replicate
    return Partial, Replicate


def local(tensor, dtensor=None):
    """`tensor`'s local shard if it is a DTensor (differentiable), else `tensor`."""
    dtensor = dtensor or dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def check(function, tensors, label, one_mesh):
    """DTensors among `tensors` must be placed by Shard or Replicate on every mesh
    dimension (a Partial parameter's penalty is not the sum of its parts'), and with
    `one_mesh` all on one mesh; label(i) names tensors[i]. Plain tensors may be mixed in."""
    dtensor = dtensor_type()
    if dtensor is None:
        return
    first = None
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, dtensor):
            continue
        for dim, placement in enumerate(tensor.placements):
            if not (placement.is_shard() or placement.is_replicate()):
                raise TypeError(
                    f"{function}(): {label(i)} must be a DTensor placed by Shard or "
                    f"Replicate, but mesh dimension {dim} has {placement}"
                )
        if first is None:
            first = i
        elif one_mesh and tensor.device_mesh != tensors[first].device_mesh:
            raise RuntimeError(
                f"{function}(): all DTensors must be on one device mesh, but "
                f"{label(first)} is on {tensors[first].device_mesh} and "
                f"{label(i)} on {tensor.device_mesh}; call it once per mesh "
                f"and add the values"
            )


def has_dtensors(tensors):
    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def penalty(apply, tensors, l1s, l2s):
    """The penalty of checked tensors, some of them DTensors on one mesh: a plain 0-dim
    tensor with the same value on every rank of the mesh. A collective: every rank must
    call it with the same parameters. Plain tensors count as replicated (each rank adds
    its own, as under DDP)."""
    dtensor = dtensor_type()
    Partial, Replicate = _placement_types()
    mesh = next(t.device_mesh for t in tensors if isinstance(t, dtensor))
    # Tensors grouped by the mesh dimensions they are sharded on, in order of first
    # appearance (the same on every rank, so the collectives match up).
    groups = {}
    for i, tensor in enumerate(tensors):
        sharded = ()
        if isinstance(tensor, dtensor):
            sharded = tuple(d for d, p in enumerate(tensor.placements) if p.is_shard())
        groups.setdefault(sharded, []).append(i)
    total = None
    for sharded, members in groups.items():
        value = apply(
            [local(tensors[i], dtensor) for i in members],
            [l1s[i] for i in members],
            [l2s[i] for i in members],
        )
        if sharded:
            # Partial (a pending sum) where the parameters are sharded, Replicate where
            # each rank already holds the whole value; full_tensor() all-reduces over the
            # Partial dimensions. Its backward is the identity: DTensor's redistribute
            # keeps a Replicate gradient as is when going back to Partial (it does not
            # split it over the ranks), so each shard gets exactly d(penalty)/d(shard),
            # not world_size times it nor a 1/world_size share.
            placements = [Partial() if d in sharded else Replicate() for d in range(mesh.ndim)]
            value = dtensor.from_local(value, mesh, placements, run_check=False).full_tensor()
        total = value if total is None else total + value
    return total


def local_grads(function, tensors, grads):
    """The local shards of `grads`, the gradients of `tensors`: a DTensor's gradient must
    be a DTensor with its mesh and placements, a plain tensor's a plain tensor."""
    dtensor = dtensor_type()

    def placed(t):
        return (t.device_mesh, t.placements) if isinstance(t, dtensor) else None

    def describe(t):
        return (
            f"a DTensor placed {t.placements} on {t.device_mesh}" if placed(t) else "a plain tensor"
        )

    for tensor, grad in zip(tensors, grads):
        # A Partial gradient (pending a sum over ranks) would get the slope once per rank.
        if placed(grad) != placed(tensor):
            raise RuntimeError(
                f"{function}(): a gradient must be placed as its parameter, but "
                f"a parameter is {describe(tensor)} and its gradient "
                f"{describe(grad)}"
            )
    return [local(grad, dtensor) for grad in grads]
