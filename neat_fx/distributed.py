"""Parameters sharded by FSDP2 (DTensor): the one place that knows how to recognise, gather and scatter them."""

from __future__ import annotations

import torch


def is_sharded(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def any_sharded(module: torch.nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a parameter sharded by FSDP2 (a collective: every rank must call it), or `t`."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor `value` sharded as `param` is (each rank keeps its part), or `value` if `param` is whole."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.to(device=param.device_mesh.device_type, dtype=param.dtype), param.device_mesh, param.placements
    )


def copy_into(param: torch.Tensor, value: torch.Tensor):
    """`param.copy_(value)` where `value` is a whole tensor and `param` may be sharded (each rank keeps its part)."""
    param.copy_(shard_like(value, param))


def is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
