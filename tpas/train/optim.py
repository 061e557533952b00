"""The optimiser's parameter groups and the learning-rate schedule.

Defaults are the original code's (`optim.py`, `scheduler.py`): weight decay on every parameter except those whose
*name contains* one of `PAPER_NO_DECAY` (so the temperature, LayerNorm/BatchNorm weights named by position such as
`itm_head.1.weight`, and the projections' BatchNorm are decayed, and every Swin `relative_position_bias_table` is
not); the `step` schedule. Opt-in: `decay_rule: ndim` (decay exactly the tensors with >= 2 dimensions: matrices and
convolution kernels, never biases, norms or scalars) and the `linear` schedule.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import TpasInputError

# The original's no-decay list, matched as substrings of parameter names ("bias" alone already covers the *.bias).
PAPER_NO_DECAY = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
)
DECAY_RULES = ("name", "ndim")
SCHEDULES = ("step", "linear")
# The `step` schedule's multipliers: x1 until 4 x warm-up, x0.5 until 7 x warm-up, x0.2 after.
STEP_PHASES = ((4, 1.0), (7, 0.5))
STEP_LAST = 0.2


def decays(name: str, p: nn.Parameter, rule: str) -> bool:
    """Whether weight decay applies to parameter `name` under `rule` (`name`: no `PAPER_NO_DECAY` substring;
    `ndim`: >= 2-D)."""
    if rule == "name":
        return not any(part in name for part in PAPER_NO_DECAY)
    if rule == "ndim":
        return p.ndim >= 2
    raise TpasInputError(f"optim.decay_rule {rule!r}; expected one of {', '.join(DECAY_RULES)}")


def param_groups(model: nn.Module, optim: dict[str, Any]) -> list[dict[str, Any]]:
    """AdamW groups: (new parts: lr x lr_mult) x (weight decay or not, by `optim.decay_rule`)."""
    patterns = [re.compile(p) for p in optim.get("new_param_patterns") or []]
    rule = str(optim.get("decay_rule", "name"))
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once, under their first name
            continue
        seen.add(id(p))
        new = any(pat.search(name) for pat in patterns)
        groups.setdefault((new, decays(name, p, rule)), []).append(p)
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


def check_schedule(schedule: str) -> None:
    """TpasInputError unless `schedule` is one of `SCHEDULES`."""
    if schedule not in SCHEDULES:
        raise TpasInputError(f"optim.schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def warmup_steps(value: float, total: int) -> int:
    """Warm-up length in steps: `value` itself, or when 0 < value < 1 that fraction of the run's `total` steps
    (X-VLM's scheduler.py rule, truncated to an int as there)."""
    value = float(value)
    if value < 0:
        raise TpasInputError(f"optim.warmup_steps must be >= 0, not {value:g}")
    return int(total * value) if value < 1 else int(value)


def lr_factor(step: int, total: int, warmup: int, lr: float, lr_end: float, schedule: str = "step") -> float:
    """The learning rate of optimiser step `step` (0-based) as a factor of `lr`.

    Both schedules warm up linearly from 0 over `warmup` steps, then decay linearly to `lr_end` at step `total`.
    `step` (the original's) multiplies the decay by 1 until 4 x warm-up, 0.5 until 7 x warm-up and 0.2 after;
    `linear` does not.
    """
    check_schedule(schedule)
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    end = lr_end / lr if lr > 0 else 0.0
    decay = end + (1.0 - end) * (1.0 - progress)
    if schedule == "linear":
        return decay
    phase = next((mult for until, mult in STEP_PHASES if step < until * warmup), STEP_LAST)
    return phase * decay


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Apply `factor` to every group (times its lr_mult); returns the base group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_mult", 1.0)
    return base_lr * factor
