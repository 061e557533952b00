"""torch.distributed helpers for the trainer: set-up from torchrun's environment, rank helpers, gathers.

One process per device, started by `torchrun --nproc_per_node N -m tpas train cmp ...`; the backend is nccl on CUDA
and gloo on CPU. Without torchrun's variables everything runs as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_owns_group = False


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that logs and writes checkpoints (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> torch.device:
    """Initialise the process group when launched with WORLD_SIZE > 1 and return this process's device.

    `device` is "auto", "cpu", "cuda" or "cuda:N"; under torchrun a CUDA device becomes cuda:LOCAL_RANK.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if launched_by_torchrun() and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        global _owns_group
        _owns_group = True
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return dev


def cleanup() -> None:
    """Destroy the process group if `setup` created it (a caller's own group is left alone)."""
    global _owns_group
    if _owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if is_distributed():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient for a slice back to the rank that owns it.

    Each rank's loss uses all ranks' features, so the gradient of the global loss with respect to this rank's
    features is the SUM over ranks of their local gradients for this slice: all_reduce, then take the own slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = dist.get_rank()
        return grad[r * ctx.batch : (r + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0 (rank order), keeping gradients; identity for 1 process.

    Every rank must pass the same B (the trainer drops the last incomplete batch).
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, without gradients (ids, labels)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new tensor; `x` itself is left as it was)."""
    if not is_distributed():
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
