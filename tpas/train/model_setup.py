"""Building the model a training run starts from: config from the `model` section, initialisation from partial
weights (APTM/X-VLM checkpoints, or separate Swin and BERT files), gradient checkpointing.

`build_cmp` and `build_xvlm` are the two kinds' builders (`tpas.train.kinds`): model with its tokenizer, plus what
the initialisation did. X-VLM starts from a retrieval checkpoint (loaded strictly by the `xvlm` family's own loader,
the model config must agree with it), from X-VLM's pre-training (`load_xvlm_pretrained` with the relative-position
tables resampled to the model's window, as X-VLM's fine-tuning does; reported key by key), or from scratch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TpasInputError


def build_model_config(model_section: dict[str, Any], vocab_size: int) -> Any:
    """CMPConfig from the `model` section (`preset: base|tiny` + field overrides); vocab size from the vocab file."""
    from ..models.cmp import CMPConfig

    section = dict(model_section)
    preset = section.pop("preset", "base")
    section.setdefault("vocab_size", vocab_size)
    try:
        if preset == "tiny":
            return CMPConfig.tiny(**section)
        if preset == "base":
            return CMPConfig.from_dict(section)
    except (TypeError, ValueError) as e:
        raise TpasInputError(f"invalid model config: {e}") from None
    raise TpasInputError(f"model.preset must be 'base' or 'tiny', not {preset!r}")


def build_xvlm_config(model_section: dict[str, Any], vocab_size: int) -> Any:
    """XVLMConfig from the `model` section (`preset: base|tiny` + XVLMConfig field overrides); vocab size from the
    vocab file unless the section sets it."""
    from ..models.xvlm import XVLMConfig

    section = dict(model_section)
    preset = section.pop("preset", "base")
    section.setdefault("vocab_size", vocab_size)
    if preset not in ("base", "tiny"):
        raise TpasInputError(f"model.preset must be 'base' or 'tiny', not {preset!r}")
    try:
        base = XVLMConfig.tiny("xvlm") if preset == "tiny" else XVLMConfig.for_family("xvlm")
        return XVLMConfig.from_dict(section, base)
    except (TypeError, ValueError) as e:
        raise TpasInputError(f"invalid model config: {e}") from None


@dataclass
class BuiltModel:
    """A kind builder's result: the model (tokenizer attached), its tokenizer, one line per initialisation source,
    and the key-by-key report of a pre-training load (empty otherwise; the trainer writes it to init_report.txt)."""

    model: Any
    tokenizer: Any
    notes: list[str]
    report: list[str] = field(default_factory=list)
    clean_caption: Callable[[str], str] | None = None  # the model's caption rule (None: the tokenizer's, CMP's)


def build_cmp(cfg: dict[str, Any], vocab: Path) -> BuiltModel:
    """CMP as the `model` and `init` sections say (pose must agree with `data.pose`)."""
    from ..models.cmp import CMP, CMPTokenizer

    probe = build_model_config(cfg["model"], vocab_size=0)
    tokenizer = CMPTokenizer(vocab, probe.max_tokens, probe.max_words)
    model_cfg = build_model_config(cfg["model"], vocab_size=tokenizer.vocab_size)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise TpasInputError(
            f"model.vocab_size {model_cfg.vocab_size} differs from the vocab file's {tokenizer.vocab_size} tokens",
            vocab,
        )
    if bool(cfg["data"]["pose"]) != bool(model_cfg.pose):
        raise TpasInputError(f"data.pose={cfg['data']['pose']} but model pose={model_cfg.pose}; they must agree")
    model = CMP(model_cfg)
    model.tokenizer = tokenizer  # the evaluation tokenizes through the model, as `tpas infer` does
    return BuiltModel(model, tokenizer, [s.describe() for s in initialise(model, cfg["init"])])


def build_xvlm(cfg: dict[str, Any], vocab: Path) -> BuiltModel:
    """X-VLM as the `model` and `init` sections say: `init.checkpoint` (strict), `init.pretrained`, or neither."""
    from ..models.cmp import CMPTokenizer
    from ..models.xvlm import XVLM, clean_xvlm_caption, load_xvlm_pretrained

    init = cfg["init"]
    if init.get("checkpoint") and init.get("pretrained"):
        raise TpasInputError("set init.checkpoint (a retrieval checkpoint) or init.pretrained, not both")
    vocab_size = CMPTokenizer(vocab).vocab_size
    model_cfg = build_xvlm_config(cfg["model"], vocab_size)
    report: list[str] = []
    if init.get("checkpoint"):
        path = Path(init["checkpoint"])
        model = XVLM.from_checkpoint(path, model_cfg, vocab=vocab)
        notes = [f"{path}: loaded strictly ({len(model.state_dict())} tensors)"]
    else:
        model = XVLM(model_cfg)
        model.set_tokenizer(vocab)
        notes = []
        if init.get("pretrained"):
            path = Path(init["pretrained"])
            loaded = load_xvlm_pretrained(model, path, interpolate_tables=True)  # as X-VLM's fine-tuning loader
            notes, report = [f"{path}: {loaded.summary()}"], loaded.lines()
    rule = partial(clean_xvlm_caption, rule=model_cfg.caption_cleaning, max_words=model_cfg.max_words)
    return BuiltModel(model, model.tokenizer, notes, report, clean_caption=rule)


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file or folder (HF folder: model.safetensors or pytorch_model.bin), weights_only."""
    from ..models.checkpoint import extract_state_dict, load_checkpoint, strip_prefix

    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise TpasInputError("no model.safetensors or pytorch_model.bin in this folder", path)
    if not path.is_file():
        raise TpasInputError("initialisation weights not found", path)
    state = extract_state_dict(load_checkpoint(path), path)
    return strip_prefix(state, "module.")


@dataclass
class InitSummary:
    """What an initialisation loaded: counts and the names that did not fit (strict=False semantics)."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: loaded / missing / unexpected / shape-mismatched counts with a few example keys."""

        def ex(keys: list[str]) -> str:
            return f" (e.g. {', '.join(keys[:3])})" if keys else ""

        return (
            f"{self.source}: loaded {self.loaded} tensors; missing {len(self.missing)}{ex(self.missing)}; "
            f"unexpected {len(self.unexpected)}{ex(self.unexpected)}; shape-mismatched {len(self.mismatched)}"
            f"{ex(self.mismatched)}"
        )


def load_partial(model: nn.Module, state: dict[str, torch.Tensor], source: str, prefix: str = "") -> InitSummary:
    """Copy every tensor whose (prefixed) name and shape match into `model` (strict=False); report the rest.

    `missing` lists model keys under `prefix` that the file did not provide.
    """
    own = model.state_dict()
    summary = InitSummary(source)
    fitting = {}
    for k, v in state.items():
        key = prefix + k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key not in own:
            summary.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(v.shape):
            summary.mismatched.append(f"{key} {tuple(v.shape)}->{tuple(own[key].shape)}")
        else:
            fitting[key] = v
    model.load_state_dict(fitting, strict=False)
    summary.loaded = len(fitting)
    summary.missing = [k for k in own if k.startswith(prefix) and k not in fitting]
    return summary


def initialise(model: nn.Module, init: dict[str, Any]) -> list[InitSummary]:
    """Initialise from an APTM/X-VLM-style checkpoint, or from separate Swin and BERT weights (local files)."""
    out = []
    if init.get("checkpoint"):
        out.append(load_partial(model, _state_dict_of(Path(init["checkpoint"])), str(init["checkpoint"])))
    if init.get("swin"):
        state = {k: v for k, v in _state_dict_of(Path(init["swin"])).items() if not k.startswith("head.")}
        out.append(load_partial(model, state, str(init["swin"]), prefix="vision_encoder."))
    if init.get("bert"):
        state = _state_dict_of(Path(init["bert"]))
        # Plain BERT checkpoints name the encoder `bert.*`; a bare BertModel has no prefix.
        if not any(k.startswith("bert.") for k in state):
            state = {f"bert.{k}": v for k, v in state.items()}
        out.append(load_partial(model, state, str(init["bert"]), prefix="text_encoder."))
    return out


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute every Swin block and BERT layer in the backward pass instead of storing activations.

    Uses non-reentrant `torch.utils.checkpoint`, which restores the RNG state so dropout/drop-path masks match.
    Returns the number of wrapped modules.
    """
    from torch.utils.checkpoint import checkpoint

    from ..models.cmp.bert import BertLayer
    from ..models.cmp.swin import SwinBlock

    n = 0
    for m in model.modules():
        if isinstance(m, (SwinBlock, BertLayer)) and not getattr(m, "_tpas_checkpointed", False):
            forward = m.forward

            def wrapped(*args: Any, _f: Callable = forward, _m: nn.Module = m, **kwargs: Any) -> Any:
                if _m.training and torch.is_grad_enabled():
                    return checkpoint(_f, *args, use_reentrant=False, **kwargs)
                return _f(*args, **kwargs)

            m.forward = wrapped  # type: ignore[method-assign]
            m._tpas_checkpointed = True  # type: ignore[attr-defined]
            n += 1
    return n
