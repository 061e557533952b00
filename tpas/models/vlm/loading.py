"""Local transformers folders -> processor, model and PEFT adapter, with the checks that make mistakes one line.

Nothing here reaches a model hub: the folder readers of `tpas.models.hf_folder` are offline, and a missing folder,
config, weight, processor or chat template is a TpasInputError naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...errors import TpasInputError
from .. import hf_folder
from ..hf_folder import missing_folder_error, quiet_transformers

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
EXAMPLE = "Qwen/Qwen2.5-VL-7B-Instruct"  # the folder a missing-checkpoint message suggests downloading


def read_config(folder: Path) -> Any:
    """The folder's transformers config, checked to be a model `AutoModelForImageTextToText` can build."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise missing_folder_error(folder, "vlm", EXAMPLE)
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise TpasInputError(f"config.json cannot be read ({str(e).splitlines()[0]})", folder) from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise TpasInputError(
            f"model type {config.model_type!r} is not an image-text-to-text model transformers can load", folder
        )
    return config


def load_processor(folder: Path, min_pixels: int | None, max_pixels: int | None) -> Any:
    """The folder's processor (tokenizer + image processor + chat template), with Qwen-style pixel limits applied."""
    if not any((folder / f).is_file() for f in _PROCESSOR_FILES):
        raise TpasInputError(f"no {' or '.join(_PROCESSOR_FILES)}: the folder has no image processor", folder)
    processor = hf_folder.load_processor(folder)
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise TpasInputError(f"{type(processor).__name__} is not a processor with a tokenizer and images", folder)
    if not (getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)):
        raise TpasInputError("the processor has no chat template (chat_template.jinja or chat_template.json)", folder)
    if min_pixels is not None or max_pixels is not None:
        set_pixel_limits(processor.image_processor, min_pixels, max_pixels)
    return processor


def set_pixel_limits(image_processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set Qwen-style limits (total pixels per image) on `image_processor`; refused for other processors."""
    size = dict(getattr(image_processor, "size", None) or {})
    if not hasattr(image_processor, "merge_size") or "shortest_edge" not in size or "longest_edge" not in size:
        raise TpasInputError(
            f"--min-pixels/--max-pixels apply to Qwen-style image processors; {type(image_processor).__name__} "
            "sizes images otherwise"
        )
    lo = int(min_pixels) if min_pixels is not None else int(size["shortest_edge"])
    hi = int(max_pixels) if max_pixels is not None else int(size["longest_edge"])
    if lo < 1 or hi < lo:
        raise TpasInputError(f"--min-pixels {lo} / --max-pixels {hi}: need 1 <= min <= max")
    image_processor.size = {**size, "shortest_edge": lo, "longest_edge": hi}


def image_settings(image_processor: Any) -> dict[str, Any]:
    """The image processor's settings that change the visual tokens (for meta and the cache key)."""
    keep = (
        "size",
        "max_image_size",
        "patch_size",
        "merge_size",
        "temporal_patch_size",
        "do_image_splitting",
        "image_grid_pinpoints",
        "crop_size",
        "do_resize",
        "resample",
        "image_mean",
        "image_std",
    )
    out: dict[str, Any] = {"class": type(image_processor).__name__}
    for key in keep:
        value = getattr(image_processor, key, None)
        if value is not None:
            out[key] = json.loads(json.dumps(dict(value) if hasattr(value, "items") else value, default=str))
    return out


def load_weights(folder: Path, dtype: torch.dtype, attn_implementation: str | None) -> torch.nn.Module:
    """`AutoModelForImageTextToText` from the folder in `dtype` (every weight present), in eval mode."""
    from transformers import AutoModelForImageTextToText

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        return hf_folder.load_weights(AutoModelForImageTextToText, folder, dtype=dtype, **kwargs)
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package
        raise TpasInputError(f"the model cannot be loaded ({str(e).splitlines()[0]})", folder) from None


def check_adapter_folder(adapter: Path) -> dict[str, Any]:
    """The adapter's adapter_config.json (peft's format); TpasInputError when the folder is not an adapter."""
    cfg_file = adapter / "adapter_config.json"
    if not adapter.is_dir() or not cfg_file.is_file():
        raise TpasInputError("not a PEFT adapter folder (adapter_config.json missing)", adapter)
    if not any((adapter / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise TpasInputError("the adapter folder holds no adapter_model.safetensors", adapter)
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TpasInputError(f"adapter_config.json is not valid JSON ({e.msg})", cfg_file) from None


def apply_adapter(model: torch.nn.Module, adapter: Path, merge: bool) -> torch.nn.Module:
    """Wrap `model` with the PEFT adapter (LoRA, DoRA, ...), every adapter tensor checked to land on a module of this
    model with its shape (an adapter trained on another base model is refused); merged into the weights if asked."""
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    with quiet_transformers():
        config = PeftConfig.from_pretrained(str(adapter))
        config.inference_mode = True
        try:
            wrapped = PeftModel(model, config)
            result = set_peft_model_state_dict(wrapped, load_peft_weights(str(adapter), device="cpu"))
        except (ValueError, RuntimeError, KeyError) as e:
            raise TpasInputError(
                f"the adapter does not fit this model (trained on another base?): {str(e).splitlines()[0]}", adapter
            ) from None
    if result.unexpected_keys:
        raise TpasInputError(
            f"the adapter does not fit this model (trained on another base?): it holds {result.unexpected_keys[0]!r}, "
            "which names no module of this model",
            adapter,
        )
    wrapped.eval()
    return wrapped.merge_and_unload() if merge else wrapped
