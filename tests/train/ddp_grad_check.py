"""Run by tests/train/test_distributed.py under `torchrun --nproc_per_node N`: each rank takes its slice of one fixed
global batch, runs the CMP losses through DDP (ITC over the all-gathered batch) and rank 0 saves the gradients.

Dropout is off and BatchNorm uses its running statistics so the only thing that differs from one process holding the
whole batch is the distribution itself. ITM in-batch negatives are off here: they are sampled within each rank's
batch by design (as the original trainer), so they cannot match a single process's draw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import random_batch, tiny_model

from tpas.runtime import distributed
from tpas.train.losses import CMPLossModule, LossConfig

GLOBAL_BATCH = 8
LOSS_CONFIG = LossConfig(itm_in_batch_negatives=False)


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
        model = build_model()
        n = GLOBAL_BATCH // dist.world
        local = {k: v[dist.rank * n : (dist.rank + 1) * n] for k, v in global_batch().items()}
        module = torch.nn.parallel.DistributedDataParallel(CMPLossModule(model, LOSS_CONFIG))
        losses = module(local)
        losses["total"].backward()
        if dist.rank == 0:
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "world": dist.world}, out)


if __name__ == "__main__":
    main(sys.argv[1])
