"""The ranks of a point whose model is split over processes (engine=transformers with engine.tensor_parallel > 1).

torch's distributed launch starts one process per rank and says which one each is in RANK and WORLD_SIZE. Every
rank runs the whole point: the same requests, in the same order, so that the collective calls inside the sharded
layers meet. Rank 0 alone writes the point's result. Two things would let the ranks part, and go through here:
a decision taken on a rank's own clock (a bench's stop rule: rank 0's decision is everyone's), and the figures only
one rank can see (each rank's memory and weights, gathered to all).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _joined() -> bool:
    """This process is one of several ranks and their process group is up."""
    if world_size() == 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank0_decides(value: T) -> T:
    """Rank 0's value on every rank (unchanged where the point runs in one process)."""
    if not _joined():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank ([value] in one process)."""
    if not _joined():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def backend() -> str | None:
    if not _joined():
        return None
    import torch.distributed as dist

    return str(dist.get_backend())


def leave() -> None:
    """Close this rank's process group (torch warns at exit about one left open)."""
    if _joined():
        import torch.distributed as dist

        dist.destroy_process_group()
