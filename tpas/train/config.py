"""Training configuration: YAML sections with defaults, `--set key=value` overrides.

Each kind of model has its defaults: `DEFAULTS` (= the original CMP code's recipe) for `tpas train cmp`,
`XVLM_DEFAULTS` (= X-VLM's retrieval fine-tuning, zengyan-97/X-VLM Retrieval.py and configs/Retrieval_*.yaml) for
`tpas train xvlm`; they share every section that means the same (data, train, eval, output).
Unknown keys are errors that name the key and the known ones, so a typo never silently trains with a default.
Relative paths in the file are relative to the directory `tpas train` runs in (as in the original `run.py`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..errors import TpasInputError
from ..io import find_config, parse_override, read_yaml

# The original code's 2x-learning-rate groups ("newly initialised" parts, docs/models/cmp.md): Swin stages 2-3, BERT
# layers 4, 5, 10, 11, the MLM head, both projections, itm_head, pose_block and pose_conv. Regexes over parameter names.
PAPER_NEW_PARAM_PATTERNS = [
    r"^vision_encoder\.layers\.[23]\.",
    r"^text_encoder\.bert\.encoder\.layer\.(4|5|10|11)\.",
    r"^text_encoder\.cls\.",
    r"^vision_proj\.",
    r"^text_proj\.",
    r"^itm_head\.",
    r"^pose_block\.",
    r"^pose_conv\.",
]

DEFAULTS: dict[str, Any] = {
    "data": {
        "root": "data/PAB",  # PAB root: images at root/<image>, pose maps at root/pose/<image>
        "train": ["annotation/train"],  # annotation files or folders of attr_*.json / pair_*.json, under root
        "vocab": "checkpoint/bert-base-uncased/vocab.txt",
        "pose": True,
        "num_workers": 4,
        "max_records": None,  # use only the first N training records (quick experiments)
        "subset": None,  # a list file: train only on the pairs of the images it names, one per line
    },
    "model": {"preset": "base"},  # base (cmp.pth architecture) or tiny; any CMPConfig field overrides
    "init": {
        "checkpoint": None,  # APTM / X-VLM style checkpoint (vision_encoder.*, text_encoder.* keys)
        "swin": None,  # or Swin-B weights (swin_base_patch4_window7_224_22k.pth) ...
        "bert": None,  # ... and bert-base-uncased weights (folder or file)
    },
    # Every default below is the original code's (Shuyu-XJTU/CMP configs/cmp.yaml, optim.py, scheduler.py, dataset/,
    # models/); the opt-in alternatives are documented in the README ("Training CMP").
    "augment": {
        "hflip": 0.5,
        "randaug_n": 0,  # RandAugment-style ops per image: none in the original (tpas's earlier recipe drew 2)
        "randaug_m": 7,
        "random_erasing": 0.6,
        "erasing_area": [0.02, 0.4],
        "erasing_aspect": 0.3,  # aspect ratio drawn uniformly from [0.3, 1 / 0.3]
        "pose": "independent",  # independent (own flip + erasing, as the original) | follow-image
        "eda": True,
        "eda_alpha": 0.1,
    },
    "masking": {
        "mask_prob": 0.25,
        "max_masks": 10,
        "skipgram_prob": 0.2,
        "skipgram_size": 3,
        "whole_word": True,
        "mask_token_prob": 0.8,
        "random_token_prob": 0.1,
        "candidates": "padded",  # padded (the original: any position of the padded ids) | caption
    },
    "loss": {
        "itc_label_smoothing": 0.2,
        "eda_weight": 0.8,
        "eda": True,
        "ihnm": True,
        "itm_in_batch_negatives": True,
        "itm_pooling": "paper",  # paper (in-batch mean + hard-negative mean) | pooled (one mean over all rows)
        "itc_gradient": "paper",  # paper (the original's all-gather: 1/world_size under DDP) | global
        "temp_clamp": None,  # null: never clamped (the original) | [0.001, 0.5]
        "itm_weight": 1.0,  # 0: no ITM term, its passes skipped (tpas's ITC-only alternative)
        "mlm_weight": 1.0,  # 0: no MLM term, its passes skipped
        "itc_hard_pairs": False,  # true: each record's hard pair (hard_i, hard_c) joins the ITC batch (needs ihnm)
    },
    "optim": {
        "lr": 1.0e-4,
        "lr_end": 0.0,
        "weight_decay": 0.01,
        "decay_rule": "name",  # name (the original's no-decay substrings) | ndim (decay tensors with >= 2 dims)
        "betas": [0.9, 0.98],
        "eps": 1.0e-8,
        "lr_mult": 2.0,
        "new_param_patterns": PAPER_NEW_PARAM_PATTERNS,
        "warmup_steps": 500,  # steps, or a fraction of the run's steps when below 1 (X-VLM's 0.1)
        "schedule": "step",  # step (x1 / x0.5 / x0.2 until 4x / 7x warm-up / after) | linear
        "grad_clip": None,
    },
    "train": {
        "epochs": 30,
        "batch_size": 22,  # per process
        "seed": 42,
        "precision": "fp32",  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
        "grad_checkpointing": False,
        "device": "auto",
        "log_every": 50,
        "save_every_steps": 0,  # also checkpoint every N steps inside an epoch (0: only at epoch ends)
        "max_steps": None,  # stop (and checkpoint) after this many optimizer steps in total
    },
    "eval": {
        "enabled": True,
        "annotation": "annotation/test/attr.json",
        "root": None,  # default: data.root
        "every_epochs": 1,
        "batch_size": 64,
        "rerank_k": 0,  # > 0: also ITM re-rank each query's top-k (the paper's test uses 128)
        "select_by": "R@1",  # metric that picks checkpoint_best.pth (the original keeps the best ITM R@1)
    },
    "output": {"dir": "output/cmp", "tensorboard": True},
}


def _xvlm_defaults() -> dict[str, Any]:
    """X-VLM retrieval fine-tuning (Retrieval.py, configs/Retrieval_coco.yaml / Retrieval_flickr.yaml,
    dataset/__init__.py `train_transform`, optim.py, scheduler.py); sections CMP has and X-VLM has not (masking,
    pose, the EDA/IHNM/MLM switches) are absent, so setting them is an error."""
    d = copy.deepcopy(DEFAULTS)
    del d["masking"], d["data"]["pose"]
    d["model"] = {"preset": "base"}  # base (X-VLM's retrieval architecture, 384 px) or tiny; XVLMConfig fields
    d["init"] = {
        "checkpoint": None,  # an X-VLM retrieval checkpoint (loaded strictly, as `tpas infer xvlm` loads it)
        "pretrained": None,  # or X-VLM's pre-training (16m_base_model_state_step_199999.th), reported key by key
    }
    d["augment"] = {
        "hflip": 0.5,
        "crop_scale": [0.5, 1.0],  # RandomResizedCrop(scale=(0.5, 1.0), bicubic)
        "randaug_n": 2,  # RandomAugment(2, 7)
        "randaug_m": 7,
        "random_erasing": 0.0,
        "erasing_area": [0.02, 0.4],
        "erasing_aspect": 0.3,
        "eda": False,
    }
    d["loss"] = {"itc_label_smoothing": 0.0, "itm_in_batch_negatives": True, "itc_gradient": "paper",
                 "temp_clamp": None}  # fmt: skip
    d["optim"].update(lr=3.0e-5, new_param_patterns=[], warmup_steps=0.1, schedule="linear")
    d["train"].update(epochs=10, batch_size=20)
    d["eval"].update(rerank_k=128)
    d["output"]["dir"] = "output/xvlm"
    return d


XVLM_DEFAULTS: dict[str, Any] = _xvlm_defaults()
KIND_DEFAULTS: dict[str, dict[str, Any]] = {"cmp": DEFAULTS, "xvlm": XVLM_DEFAULTS}


def _merge(base: dict[str, Any], update: dict[str, Any], where: str, source: str | Path | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}.{key}" if where else key
        if key not in base and where != "model":
            known = ", ".join(sorted(base))
            raise TpasInputError(f"unknown config key {name!r}; expected one of: {known}", source)
        if isinstance(base.get(key), dict) and key != "model":
            if not isinstance(value, dict):
                raise TpasInputError(f"config key {name!r} must be a mapping", source)
            out[key] = _merge(base[key], value, name, source)
        elif key == "model" and not where:
            if not isinstance(value, dict):
                raise TpasInputError("config key 'model' must be a mapping", source)
            out[key] = {**base[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_train_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), kind: str = "cmp"
) -> dict[str, Any]:
    """The full training config of `kind` (cmp | xvlm): its defaults <- YAML file or packaged preset (`cmp_tiny`),
    if any <- `--set` overrides."""
    if kind not in KIND_DEFAULTS:
        raise TpasInputError(f"unknown training kind {kind!r}; expected one of {', '.join(KIND_DEFAULTS)}")
    cfg = copy.deepcopy(KIND_DEFAULTS[kind])
    if path is not None:
        p = find_config(path, "train")
        data = read_yaml(p, expected="a YAML mapping of sections")
        cfg = _merge(cfg, data, "", p)
    for item in overrides:
        key, value = parse_override(item)
        nested: Any = value
        for k in reversed(key.split(".")):
            nested = {k: nested}
        cfg = _merge(cfg, nested, "", f"--set {item}")
    return cfg
