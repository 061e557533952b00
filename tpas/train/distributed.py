"""Tensor collectives of the training losses: all-gather with gradients, all-gather and all-reduce without.

Process-group set-up and tear-down, ranks and object collectives live in `tpas.runtime` (shared with inference);
these functions use the default group that `tpas.runtime.distributed` joins or creates, and are identities for one
process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..runtime import is_distributed, rank, world_size

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "all_reduce_sum", "is_distributed", "rank", "world_size"]


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
