"""X-VLM's pre-training checkpoint (e.g. 16m_base_model_state_step_199999.th) as the initialisation of another model.

CMP's trainer starts from it exactly so (Shuyu-XJTU/CMP models/cmp.py `load_pretrained`: the file's `model` dict, or
the file itself, loaded with strict=False): Swin, BERT text + fusion layers, MLM head, `temp` and `itm_head` share
names and shapes with CMP and are copied; X-VLM's Linear projections and `bbox_head` have no place in CMP; CMP's
BatchNorm projections and pose branch keep their fresh initialisation. X-VLM's own fine-tuning (models/xvlm.py
`load_pretrained`) also drops BERT's `bert.` level for its BertModel text encoder; that rename applies when the
target model has the X-VLM retrieval layout. A shape mismatch stops the original (PyTorch's size-mismatch error),
and stops here too, except for buffers the model recomputes (shifted-window masks, position indices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...errors import TpasInputError
from ..checkpoint import extract_state_dict, load_checkpoint, strip_prefix

RECOMPUTED = ("attn_mask", "relative_position_index", "position_ids")


@dataclass
class PretrainedReport:
    """What loading a pre-training checkpoint did, key by key (model key names; file names for `unexpected`).

    Attributes:
        loaded: copied from the file.
        missing: the model's keys the file lacks; they keep the model's fresh initialisation.
        unexpected: the file's keys the model has no place for; ignored.
        reinitialised: in both, but with another shape in the file (a buffer for another input size); the model's
            own recomputed value is kept.
        renamed: {file key: model key} for the keys renamed before matching.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: the count of each kind."""
        return (
            f"{len(self.loaded)} loaded, {len(self.missing)} missing (fresh initialisation), "
            f"{len(self.unexpected)} unexpected (ignored), {len(self.reinitialised)} re-initialised (recomputed)"
        )

    def lines(self) -> list[str]:
        """One line per key: `<status> <key>`, statuses in the order loaded, missing, unexpected, re-initialised."""
        kinds = (("loaded", self.loaded), ("missing", self.missing), ("unexpected", self.unexpected),
                 ("re-initialised", self.reinitialised))  # fmt: skip
        return [f"{name} {k}" for name, keys in kinds for k in keys]


def _rename_for(model_keys: set[str], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """X-VLM's fine-tuning rename: `text_encoder.bert.X` -> `text_encoder.X` when the model has no `bert.` level."""
    if any(k.startswith("text_encoder.bert.") for k in model_keys):
        return {}
    return {k: "text_encoder." + k[len("text_encoder.bert.") :] for k in state if k.startswith("text_encoder.bert.")}


@torch.no_grad()
def load_xvlm_pretrained(model: nn.Module, path: str | Path, *, trust_checkpoint: bool = False) -> PretrainedReport:
    """Copy the tensors of an X-VLM pre-training checkpoint into a freshly initialised `model` (CMP, X-VLM, APTM).

    Keys present in both with equal shapes are loaded; the rest is reported (see `PretrainedReport`). A learnable
    tensor whose shape differs raises TpasInputError naming the keys (the original stops there as well).
    """
    path = Path(path)
    state = strip_prefix(extract_state_dict(load_checkpoint(path, trust=trust_checkpoint), path), "module.")
    own = model.state_dict()
    renamed = _rename_for(set(own), state)
    state = {renamed.get(k, k): v for k, v in state.items()}
    report = PretrainedReport(renamed=renamed)
    inverse = {v: k for k, v in renamed.items()}
    report.unexpected = [inverse.get(k, k) for k in state if k not in own]
    clash = []
    take: dict[str, torch.Tensor] = {}
    for k, v in own.items():
        if k not in state:
            report.missing.append(k)
        elif tuple(state[k].shape) == tuple(v.shape):
            take[k] = state[k]
            report.loaded.append(k)
        elif k.rsplit(".", 1)[-1] in RECOMPUTED:
            report.reinitialised.append(k)
        else:
            clash.append(f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})")
    if clash:
        raise TpasInputError(
            f"{len(clash)} tensor(s) of the pre-training checkpoint do not fit the model: {'; '.join(clash[:3])}", path
        )
    # Tied tensors (CMP's MLM decoder and word embeddings) are one parameter under two names; both names carry the
    # same values in the file, so loading both is loading one.
    model.load_state_dict(take, strict=False)
    return report
