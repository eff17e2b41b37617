"""torch.distributed for clipfast: the process group torchrun describes, or a single process.

Launch `clipfast scan|repair|defend` (or `bench --suite pipeline`) under torchrun (`torchrun
--nproc_per_node 8 -m clipfast.cli defend ...`) and `init_from_environment` joins the group: NCCL on
GPUs (one per process, cuda:LOCAL_RANK), gloo on CPUs. Other code asks `current()` for the group; a
single process is a group of one whose collectives return their input, so most code need not care
whether the run is distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from clipfast.errors import ClipfastError

# torch 2.13 renamed the tensor-to-tensor collectives; the GPU images still have torch 2.11.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# A rank that waits longer than this for the others (e.g. one crashed) fails instead of hanging.
DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, source: int = 0) -> Any:
        """source's obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=source)
        return box[0]


_SINGLE = ProcessGroup()


class DistributedSetupError(ClipfastError, RuntimeError):
    """The torchrun launch does not fit this machine (e.g. more ranks per node than GPUs)."""


def current() -> ProcessGroup:
    """The process group this process belongs to (a group of one unless torch.distributed is up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return _SINGLE
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str = "auto", timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[ProcessGroup, str]:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, ...), if any.

    device "auto" means cuda:LOCAL_RANK where CUDA exists, else cpu; the backend follows the device
    (nccl for CUDA, gloo for CPU). Returns the group and this process's device name.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and launched_by_torchrun():
        device = f"cuda:{local_rank}"  # one GPU per process
    if device.startswith("cuda") and launched_by_torchrun() and local_rank >= torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise DistributedSetupError(f"rank with LOCAL_RANK {local_rank} needs a GPU of its own, but this node has "
                                    f"{gpus}: use --nproc_per_node <= {gpus}, or --device cpu (gloo)")
    if not launched_by_torchrun():
        return current(), device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout,
                                device_id=torch.device(device) if backend == "nccl" else None)
    return current(), device


def gather_rows(local: torch.Tensor, group: ProcessGroup, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (rank r holds sizes[r] of them) in rank order, on every rank,
    keeping the autograd graph: the gradient of each rank's copy flows back to the rank that owns the
    rows (summed over ranks), as open_clip's gather_with_grad does."""
    if not group.distributed:
        return local
    longest = max(sizes)
    padded = torch.nn.functional.pad(local, (0, 0) * (local.dim() - 1) + (0, longest - len(local)))
    parts = _AllGatherRows.apply(padded.contiguous(), group.world_size, group.rank).split(longest)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """all_gather_into_tensor along dim 0; backward sums every rank's gradient of this rank's rows
    (reduce-scatter where the backend has it, else all-reduce and keep this rank's slice)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, len(local)
        out = local.new_empty((world_size * len(local), *local.shape[1:]))
        _all_gather_tensor(out, local)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            _reduce_scatter_tensor(mine, grad)
        else:
            dist.all_reduce(grad)
            mine = grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
        return mine, None, None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
