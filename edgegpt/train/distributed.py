"""Data-parallel training under torchrun: one process per device, gradients averaged every step.

Launched as `torchrun --nproc_per_node N -m edgegpt train ...`, each process finds its rank in the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE). Without torchrun this is a
world of one and every function here is a no-op, so the training loop has one code path.

The run stays the run a single process would do with the same global batch: every rank draws the same
global batch from (seed, step) and trains on its own slice of rows, and DistributedDataParallel
averages the gradients, so the update is the mean over the whole global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edgegpt.core.errors import EdgeGPTError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and reports progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a torchrun job (a world of one when not launched by torchrun)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        raise EdgeGPTError("RANK/WORLD_SIZE/LOCAL_RANK are not integers; launch with torchrun") from None
    return World(rank, size, local_rank, local_size)


def start(world: World, device_name: str) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's device."""
    if not world.distributed:
        return torch.device(device_name)
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() < world.local_size:
            raise EdgeGPTError(f"torchrun started {world.local_size} processes on this node but it has "
                               f"{torch.cuda.device_count()} CUDA devices; lower --nproc_per_node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return device


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def mean(world: World, values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-rank scalars averaged over the ranks (the losses every rank reports), in one all-reduce."""
    if not world.distributed:
        return dict(values)
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world.size).tolist()))


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks must agree on when to stop."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def rank_rows(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous share of a global batch's rows."""
    if not world.distributed:
        return batch
    rows = batch.shape[0] // world.size
    return batch[world.rank * rows:(world.rank + 1) * rows]
