"""Reading a local transformers folder (config.json + weights + processor files) for the hf-dual and vlm-embed
families: offline only, the architecture from the folder's config, a `--config` that disagrees refused, and no
silently random weights (a missing tensor is an error, not a warning)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import TpasInputError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def missing_folder_error(path: Path | None, family: str, example: str) -> TpasInputError:
    """The one-line answer to a checkpoint that is not a local folder (none given, a hub name, a wrong path)."""
    how = (
        f"download the model folder (config.json, model*.safetensors, preprocessor/processor and tokenizer files), "
        f"e.g. `huggingface-cli download {example} --local-dir checkpoints/{example.split('/')[-1]}`, and pass "
        f"--checkpoint checkpoints/{example.split('/')[-1]}"
    )
    if path is None:
        return TpasInputError(f"{family} needs --checkpoint DIR (a transformers folder); {how} (tpas never downloads)")
    name = str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.exists():
        repo = name.split("/")[-1]
        return TpasInputError(
            f"{name!r} is not a local folder (a Hugging Face hub name?); tpas never downloads: "
            f"`huggingface-cli download {name} --local-dir checkpoints/{repo}` and pass --checkpoint checkpoints/{repo}"
        )
    if path.is_file():
        return TpasInputError(f"{family} loads a transformers folder, not a single file; pass its folder", path)
    if not path.exists():
        return TpasInputError(f"checkpoint folder not found; {how}", path)
    return TpasInputError("not a transformers folder (config.json missing)", path)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports from transformers while tpas loads (tpas reports problems itself)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_config(path: Path | None, family: str, model_types: tuple[str, ...], example: str) -> Any:
    """The folder's transformers config; refused unless its model_type is one of `model_types`."""
    if path is None or not Path(path).is_dir() or not (Path(path) / "config.json").is_file():
        raise missing_folder_error(None if path is None else Path(path), family, example)
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TpasInputError(f"unreadable config.json ({str(e).splitlines()[0]})", Path(path) / "config.json") from None
    if config.model_type not in model_types:
        raise TpasInputError(
            f"config.json is model_type {config.model_type!r}; {family} runs {', '.join(model_types)}", path
        )
    if not any((Path(path) / f).is_file() for f in WEIGHT_FILES) and not list(Path(path).glob("model-*.safetensors")):
        raise TpasInputError(f"folder holds no weights ({', '.join(WEIGHT_FILES[::2])})", path)
    return config


def config_disagreements(given: Any, actual: Any, where: str = "") -> list[str]:
    """`key: folder X, config Y` for every value of `given` (a nested mapping) that the folder's config differs on."""
    out: list[str] = []
    if isinstance(given, dict):
        for k, v in given.items():
            have = actual.get(k) if isinstance(actual, dict) else None
            out += config_disagreements(v, have, f"{where}.{k}" if where else str(k))
    elif given != actual:
        out.append(f"{where}: folder {actual!r}, config {given!r}")
    return out


def check_config(config: dict[str, Any] | None, hf_config: Any, path: Path, family: str) -> None:
    """Refuse a `--config` (architecture keys of config.json, `family` aside) that the folder's config contradicts."""
    given = {k: v for k, v in (config or {}).items() if k != "family"}
    diffs = config_disagreements(given, hf_config.to_dict())
    if diffs:
        raise TpasInputError(
            f"the checkpoint folder does not fit the {family} config: {'; '.join(diffs[:5])} (the architecture is "
            "read from the folder's config.json)",
            path,
        )


def load_weights(
    auto_cls: Any, path: Path, allow_unused: tuple[str, ...] = (), dtype: Any = None, **kwargs: Any
) -> Any:
    """`auto_cls.from_pretrained` in `dtype` (fp32 by default), offline, with `kwargs` (e.g. attn_implementation);
    TpasInputError when any weight of the model is missing from the files (transformers would initialise it randomly)
    or an unused tensor is not one of `allow_unused` (prefixes)."""
    import torch
    from safetensors import SafetensorError

    from .checkpoint import check_weight_files

    check_weight_files(path)
    try:
        with quiet_transformers():
            model, info = auto_cls.from_pretrained(
                str(path), local_files_only=True, dtype=dtype or torch.float32, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a damaged weight file
        raise TpasInputError(f"weights do not load ({' '.join(str(e).split())[:300]})", path) from None
    missing = sorted(info.get("missing_keys") or [])
    unused = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(allow_unused))
    mismatched = info.get("mismatched_keys") or []
    if missing or unused or mismatched:
        what = missing[:1] or unused[:1] or [str(mismatched[0])]
        raise TpasInputError(
            f"weights do not match config.json ({len(missing)} missing, {len(unused)} unexpected, "
            f"{len(mismatched)} mis-shaped tensors; first: {what[0]})",
            path,
        )
    return model.eval()


def load_processor(path: Path, **kwargs: Any) -> Any:
    """`AutoProcessor.from_pretrained` offline (processor, image processor and tokenizer files of the folder)."""
    from transformers import AutoProcessor

    try:
        with quiet_transformers():
            return AutoProcessor.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise TpasInputError(
            f"no usable processor/tokenizer files in the folder ({str(e).splitlines()[0][:200]})", path
        ) from None
