"""The optimiser's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, optim: dict[str, Any]) -> list[dict[str, Any]]:
    """AdamW groups: (new parts: lr x lr_mult) x (weight decay except on biases, norms and scalars)."""
    patterns = [re.compile(p) for p in optim.get("new_param_patterns") or []]
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        new = any(pat.search(name) for pat in patterns)
        decay = p.ndim >= 2
        groups.setdefault((new, decay), []).append(p)
    out = []
    for (new, decay), params in sorted(groups.items()):
        mult = float(optim["lr_mult"]) if new else 1.0
        out.append(
            {
                "params": params,
                "lr": float(optim["lr"]) * mult,
                "lr_mult": mult,
                "weight_decay": float(optim["weight_decay"]) if decay else 0.0,
                "name": f"{'new' if new else 'pretrained'}_{'decay' if decay else 'no_decay'}",
            }
        )
    return out


def lr_factor(step: int, total: int, warmup: int, lr: float, lr_end: float) -> float:
    """Linear warm-up from 0 over `warmup` steps, then linear decay from lr to lr_end at `total` (as a factor of lr)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    end = lr_end / lr if lr > 0 else 0.0
    return end + (1.0 - end) * (1.0 - progress)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Apply `factor` to every group (times its lr_mult); returns the base group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_mult", 1.0)
    return base_lr * factor
