"""Helpers of the trainer tests: a tiny CMP and a random batch in the trainer's batch format."""

from __future__ import annotations

import torch

from tpas.models.cmp import CMP, CMPConfig

VOCAB = 60
LENGTH = 56


def tiny_model(seed: int = 0, **overrides: object) -> CMP:
    """CMPConfig.tiny with a 60-token vocabulary, deterministic init."""
    torch.manual_seed(seed)
    return CMP(CMPConfig.tiny(vocab_size=VOCAB, **overrides))


def random_batch(b: int, seed: int = 0, size: int = 64, duplicate_ids: bool = True) -> dict[str, torch.Tensor]:
    """A batch as CMPTrainDataset + default_collate produce it, with random content."""
    g = torch.Generator().manual_seed(seed)

    def text() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(b, LENGTH, dtype=torch.long)
        mask = torch.zeros(b, LENGTH, dtype=torch.long)
        for i in range(b):
            n = int(torch.randint(6, 20, (1,), generator=g))
            ids[i, 0], ids[i, n - 1] = 2, 3
            ids[i, 1 : n - 1] = torch.randint(5, VOCAB, (n - 2,), generator=g)
            mask[i, :n] = 1
        return ids, mask

    ids, mask = text()
    hard_ids, hard_mask = text()
    eda_ids, eda_mask = text()
    mlm_ids = ids.clone()
    mlm_pos = torch.zeros(b, 10, dtype=torch.long)
    mlm_labels = torch.full((b, 10), -100, dtype=torch.long)
    for i in range(b):
        mlm_pos[i, :2] = torch.tensor([1, 2])
        mlm_labels[i, :2] = ids[i, 1:3]
        mlm_ids[i, 1:3] = 4
    idx = torch.arange(b)
    if duplicate_ids and b >= 4:
        idx[1] = idx[0]  # two captions of one image: identity-aware ITC targets
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "pose": torch.randn(b, 3, size, size, generator=g),
        "hard_image": torch.randn(b, 3, size, size, generator=g),
        "hard_pose": torch.randn(b, 3, size, size, generator=g),
        "text_ids": ids,
        "text_mask": mask,
        "hard_ids": hard_ids,
        "hard_mask": hard_mask,
        "eda_ids": eda_ids,
        "eda_mask": eda_mask,
        "mlm_ids": mlm_ids,
        "mlm_pos": mlm_pos,
        "mlm_labels": mlm_labels,
        "idx": idx,
        "hard_idx": idx + 1000,
        "has_hard": torch.ones(b, dtype=torch.bool),
    }
