"""Run by tests/train/test_distributed.py under `torchrun --nproc_per_node N`: each rank takes its slice of one fixed
global batch, runs the CMP losses through DDP (ITC over the all-gathered batch) and rank 0 saves the gradients, once
per `itc_gradient` mode (`global`, `paper`) and once with ITC written as the original code writes it (`original`:
full logits on every rank, an all-gather whose backward keeps the local slice), which `paper` must reproduce.

Dropout is off and BatchNorm uses its running statistics so the only thing that differs from one process holding the
whole batch is the distribution itself. ITM in-batch negatives are off here: they are sampled within each rank's
batch by design (as the original trainer), so they cannot match a single process's draw.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import random_batch, tiny_model

from tpas.runtime import distributed
from tpas.train import losses
from tpas.train.losses import CMPLossModule, LossConfig

tpas_itc = losses.itc_loss

GLOBAL_BATCH = 8
LOSS_CONFIG = LossConfig(itm_in_batch_negatives=False, itc_gradient="global")
MODES = ("global", "paper", "original")


class _SliceBackwardGather(torch.autograd.Function):
    """The original code's all-gather: its backward returns only this rank's slice of the local gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.b = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        r = dist.get_rank()
        return grad[r * ctx.b : (r + 1) * ctx.b]


def original_itc(image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor, temp: torch.Tensor,
                 label_smoothing: float = 0.2) -> torch.Tensor:  # fmt: skip
    """ITC as the original computes it: every rank builds the full [WB, WB] logits and averages over all rows."""
    image_all = _SliceBackwardGather.apply(image_feat)
    text_all = _SliceBackwardGather.apply(text_feat)
    idx_all = _SliceBackwardGather.apply(idx.view(-1, 1).float()).long()
    logits = image_all @ text_all.T / temp
    pos = (idx_all == idx_all.T).float()
    targets = pos / pos.sum(1, keepdim=True)
    targets = (1 - label_smoothing) * targets + label_smoothing / logits.shape[1]
    i2t = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(logits.T, dim=1) * targets).sum(1).mean()
    return (i2t + t2i) / 2


def build_model() -> torch.nn.Module:
    """The tiny model, deterministic: no dropout/drop-path, BatchNorm in eval mode."""
    model = tiny_model(seed=0, hidden_dropout=0.0, attention_dropout=0.0, itc_dropout=0.0, drop_path_rate=0.0)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def global_batch() -> dict[str, torch.Tensor]:
    """The fixed global batch every run slices."""
    return random_batch(GLOBAL_BATCH, seed=5)


def main(out: str) -> None:
    torch.set_num_threads(1)
    with distributed(torch.device("cpu")) as dist:
        n = GLOBAL_BATCH // dist.world
        local = {k: v[dist.rank * n : (dist.rank + 1) * n] for k, v in global_batch().items()}
        grads = {}
        for mode in MODES:
            model = build_model()
            cfg = dataclasses.replace(LOSS_CONFIG, itc_gradient="global" if mode == "original" else mode)
            losses.itc_loss = original_itc if mode == "original" else tpas_itc
            module = torch.nn.parallel.DistributedDataParallel(CMPLossModule(model, cfg))
            module(local)["total"].backward()
            grads[mode] = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        if dist.rank == 0:
            torch.save({"grads": grads, "world": dist.world}, out)


if __name__ == "__main__":
    main(sys.argv[1])
