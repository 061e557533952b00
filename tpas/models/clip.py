"""CLIP (open-clip-torch) as a tpas family: `tpas infer clip --checkpoint ViT-L-14-336px.pt ...`.

Accepted checkpoints, all offline: OpenAI's TorchScript release (`ViT-L-14-336px.pt`), an OpenAI-layout state dict
(`.pt`/`.bin`, with or without the three int64 metadata keys), open_clip / Hugging Face files
(`open_clip_pytorch_model.bin`, `open_clip_model.safetensors`, or their folder with `open_clip_config.json`), and
open_clip training checkpoints (`{"state_dict": ...}`, `module.` prefix).

Every trap that silently changes the numbers (docs/models/clip.md) is guarded here:
- activation: OpenAI weights need QuickGELU. It is read from the checkpoint (an OpenAI release is recognised by its
  TorchScript container, its metadata keys or its fp16 pattern; open_clip files by `open_clip_config.json`); an
  `--arch`/config that states the other activation is refused, and a checkpoint that shows neither needs one stated;
- resolution and every other size come from the checkpoint's shapes; an `--arch` or config that disagrees is refused
  (no silent position-embedding interpolation: weights load with `strict=True` into the exact architecture);
- fp16 tensors are cast to fp32; the int64 metadata keys are checked against the shapes and dropped;
- nothing is downloaded: a hub tag such as `openai` is answered with the file to download and where to put it;
- text is tokenized as the model was trained: open_clip's BPE for CLIP-style text towers, otherwise the model's own
  tokenizer from local files (an HF tokenizer folder, by default the checkpoint's own folder, or a sentencepiece
  `.model` via `--tokenizer`), always padded to the context length (SigLIP's text tower pools the last position, so
  dynamic padding would change every text embedding);
- images are preprocessed as the weights' `open_clip_config.json` says (SigLIP: squash to the square size, no crop,
  mean = std = 0.5), else as open_clip's pretrained table says for `--arch`, else OpenAI's recipe.
SigLIP-style models are scored by cosine like the rest; their logit scale and bias are recorded in meta.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import TpasInputError
from .base import TRUST_CHECKPOINT, FamilyOption, Features, RetrievalModel, register
from .checkpoint import extract_state_dict, load_checkpoint, strip_prefix
from .tta import TTA_OPTION, check_tta, encode_views, with_tta

DEFAULT_ARCH = "ViT-L-14-336"
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# An HF tokenizer folder holds at least one of these (AutoTokenizer reads them).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Tensors that OpenAI's convert_weights leaves in fp16 (any one of them in fp16 beside an fp32 LayerNorm marks the
# release format).
_OPENAI_FP16_PROBE = "visual.conv1.weight"
_OPENAI_FP32_PROBE = "ln_final.weight"


def _oc() -> Any:
    import open_clip

    return open_clip


# ---------------------------------------------------------------------------------------------- checkpoint reading
def _download_hint(arch: str | None = None, tag: str | None = None) -> str:
    """Which file(s) to get for an open_clip (arch, tag) and where to put them (tag: `openai` or the arch's first)."""
    oc = _oc()
    base = (arch or DEFAULT_ARCH).removesuffix("-quickgelu")
    tags = oc.list_pretrained_tags_by_model(base)
    tag = tag or ("openai" if "openai" in tags or not tags else tags[0])
    cfg = oc.get_pretrained_cfg(base, tag) or {}
    if cfg.get("hf_hub") and _needs_hf_tokenizer(oc.get_model_config(base) or {}):
        return _hub_folder_hint(cfg["hf_hub"].rstrip("/"))
    sources = []
    if cfg.get("url"):
        sources.append(cfg["url"])
    if cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        sources.append(f"https://huggingface.co/{repo} (file {OPEN_CLIP_FILES[0]} + {OPEN_CLIP_CONFIG})")
    if not sources:
        return f"open_clip knows no {tag!r} weights for {base}; pass a local checkpoint file"
    name = Path(cfg["url"]).name if cfg.get("url") else OPEN_CLIP_FILES[0]
    return f"download {' or '.join(sources)}, put it at checkpoints/{name} and pass --checkpoint checkpoints/{name}"


def _hub_folder_hint(repo: str) -> str:
    """Where to put an open_clip hub repository's files so that tpas reads the folder offline."""
    folder = f"checkpoints/{repo.split('/')[-1]}"
    return (
        f"download {OPEN_CLIP_CONFIG}, {OPEN_CLIP_FILES[0]} and the tokenizer files (tokenizer.json, "
        f"tokenizer_config.json, special_tokens_map.json) from https://huggingface.co/{repo} into {folder}/ "
        f"and pass --checkpoint {folder}"
    )


def _needs_hf_tokenizer(model_cfg: dict[str, Any]) -> bool:
    """True when the text tower was trained with a Hugging Face / sentencepiece tokenizer, not open_clip's BPE."""
    return bool((model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name"))


def _missing_checkpoint(path: Path | None, arch: str | None) -> TpasInputError:
    oc = _oc()
    if path is None:
        return TpasInputError(f"clip needs --checkpoint: {_download_hint(arch)} (tpas never downloads weights)")
    tag = str(path)
    base = (arch or DEFAULT_ARCH).removesuffix("-quickgelu")
    if "/" not in tag and (oc.is_pretrained_cfg(base, tag) or oc.list_pretrained_models_by_tag(tag)):
        return TpasInputError(
            f"{tag!r} is an open_clip hub tag, not a file; tpas never downloads weights: {_download_hint(arch, tag)}"
        )
    repo = tag.removeprefix("hf-hub:")
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and Path(repo).suffix not in _WEIGHT_SUFFIXES
    if tag.startswith("hf-hub:") or (looks_like_repo and not repo.startswith(".")):
        return TpasInputError(
            f"{tag!r} is not a local folder (a Hugging Face hub name?); tpas never downloads weights: "
            f"{_hub_folder_hint(repo)}"
        )
    return TpasInputError(f"checkpoint not found; {_download_hint(arch)}", path)


def _read_checkpoint(path: Path, trust: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict + what the container says about its origin: {"format", "openai", "open_clip_config", "meta"}."""
    from .checkpoint import is_torchscript

    info: dict[str, Any] = {"openai": False, "open_clip_config": None, "meta": {}}
    file = path
    if path.is_dir():
        found = [path / f for f in OPEN_CLIP_FILES if (path / f).is_file()]
        if not found:
            raise TpasInputError(f"folder holds none of {', '.join(OPEN_CLIP_FILES)}", path)
        file = found[0]
    cfg_file = file.parent / OPEN_CLIP_CONFIG
    if cfg_file.is_file():
        try:
            info["open_clip_config"] = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TpasInputError(f"not valid JSON ({e})", cfg_file) from None
        if not isinstance(info["open_clip_config"], dict) or "model_cfg" not in info["open_clip_config"]:
            raise TpasInputError("expected an object with a 'model_cfg' entry", cfg_file)
    if is_torchscript(file):
        info["format"] = "openai-torchscript"
        info["openai"] = True
    elif file.suffix == ".safetensors":
        info["format"] = "safetensors"
    else:
        info["format"] = "state-dict"
    with warnings.catch_warnings():
        # torch.jit is deprecated, but OpenAI's release is a TorchScript archive and jit.load is its safe reader.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=DeprecationWarning)
        obj = load_checkpoint(file, trust=trust)
    state = extract_state_dict(obj, file, keys=("state_dict", "model", "module"))
    state = strip_prefix(dict(state), "module.")
    for k in OPENAI_META_KEYS:
        if k in state:
            t = state.pop(k)
            if t.ndim != 0 or t.is_floating_point():
                raise TpasInputError(
                    f"metadata key {k!r} should be an integer scalar, found shape {tuple(t.shape)}", file
                )
            info["meta"][k] = int(t)
            info["openai"] = True
    probe, ref = state.get(_OPENAI_FP16_PROBE), state.get(_OPENAI_FP32_PROBE)
    if probe is not None and ref is not None and probe.dtype == torch.float16 and ref.dtype == torch.float32:
        info["openai"] = True  # clip.model.convert_weights leaves LayerNorms fp32 and casts conv/linear to fp16
    # Released weights are partly fp16; tpas computes in fp32 and autocasts on GPU when asked.
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    info["file"] = file
    return state, info


def infer_geometry(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """open_clip model_cfg (sizes only) of a ViT CLIP state dict, as OpenAI's build_model reads them; None for
    layouts whose sizes cannot be read from shapes (ResNet, timm or HF towers); ValueError when a tensor the sizes
    are read from has the wrong number of dimensions."""
    # Each key the sizes are read from, with the number of dimensions it has in a ViT CLIP.
    need = {
        "visual.conv1.weight": 4,
        "visual.positional_embedding": 2,
        "text_projection": 2,
        "positional_embedding": 2,
        "token_embedding.weight": 2,
        "ln_final.weight": 1,
    }
    if not all(k in state for k in need):
        return None
    for k, ndim in need.items():
        shape = tuple(getattr(state[k], "shape", ()))
        if len(shape) != ndim or 0 in shape:
            raise ValueError(f"tensor {k!r} has shape {list(shape)}; a ViT CLIP has {ndim} non-empty dimensions there")
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    v_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    t_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    t_width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "vision_cfg": {
            "image_size": int(patch * grid),
            "layers": v_layers,
            "width": int(width),
            "patch_size": int(patch),
        },
        "text_cfg": {
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]),
            "width": int(t_width),
            "heads": int(t_width // 64),
            "layers": t_layers,
        },
    }


def _geometry_mismatch(ckpt: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Human-readable differences between the checkpoint's sizes and a config's (keys the config leaves at
    open_clip defaults are compared against those defaults)."""
    oc = _oc()
    vdef, tdef = oc.model.CLIPVisionCfg(), oc.model.CLIPTextCfg()
    diffs = []
    if cfg.get("embed_dim") != ckpt["embed_dim"]:
        diffs.append(f"embed_dim: checkpoint {ckpt['embed_dim']}, config {cfg.get('embed_dim')}")
    for tower, default in (("vision_cfg", vdef), ("text_cfg", tdef)):
        given = cfg.get(tower) or {}
        for key, value in ckpt[tower].items():
            if tower == "text_cfg" and key == "heads":
                continue  # not in the weights' shapes; OpenAI's rule (width / 64) is only a convention
            have = given.get(key, getattr(default, key))
            if isinstance(have, (list, tuple)) and len(set(have)) == 1:
                have = have[0]
            if have != value:
                diffs.append(f"{tower[:-4]}.{key}: checkpoint {value}, config {have}")
    return diffs


def _resolve_config(
    state: dict[str, torch.Tensor], info: dict[str, Any], config: dict[str, Any] | None, arch: str | None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(arch name, open_clip model_cfg incl. quick_gelu, preprocess cfg) for this checkpoint, or refuse."""
    oc = _oc()
    config = dict(config or {})
    unknown = set(config) - {"family", "arch", "model_cfg", "preprocess"}
    if unknown:
        raise TpasInputError(
            f"unknown clip config key(s) {', '.join(sorted(unknown))}; expected arch, model_cfg, preprocess"
        )
    bad_pre = set(config.get("preprocess") or {}) - set(_PRE_KEYS)
    if bad_pre:
        raise TpasInputError(
            f"unknown clip preprocess key(s) {', '.join(sorted(bad_pre))}; expected {', '.join(_PRE_KEYS)}"
        )
    if arch and config.get("arch") and arch != config["arch"]:
        raise TpasInputError(f"--arch {arch} disagrees with the config's arch {config['arch']}")
    arch = arch or config.get("arch")
    stated: dict[str, Any] | None = None
    name = "custom"
    if arch:
        stated = oc.get_model_config(arch)
        if stated is None:
            near = [m for m in oc.list_models() if m.lower().startswith(arch.lower().split("-")[0])][:8]
            raise TpasInputError(f"--arch {arch!r} is not an open_clip architecture (e.g. {', '.join(near)})")
        name = arch
        if config.get("model_cfg"):
            raise TpasInputError("give either arch or model_cfg in a clip config, not both")
    elif config.get("model_cfg"):
        stated = dict(config["model_cfg"])
    oc_json = info["open_clip_config"]
    if stated is None and oc_json is not None:
        stated, name = dict(oc_json["model_cfg"]), "open_clip_config.json"
    if "multimodal_cfg" in (stated or {}):
        raise TpasInputError(f"{name} is a captioning (CoCa) architecture; tpas runs contrastive CLIP models only")

    # Activation: evidence from the checkpoint vs what the arch/config states.
    evidence, why = None, ""
    if info["openai"]:
        evidence, why = True, "an OpenAI release (trained with QuickGELU)"
    elif oc_json is not None:
        evidence, why = bool(oc_json["model_cfg"].get("quick_gelu", False)), f"its {OPEN_CLIP_CONFIG}"
    statement = None
    if arch or config.get("model_cfg"):
        statement = bool((stated or {}).get("quick_gelu", False))
    act = lambda q: "QuickGELU" if q else "GELU"  # noqa: E731
    if evidence is not None and statement is not None and evidence != statement:
        hint = f"; use --arch {arch.removesuffix('-quickgelu')}{'-quickgelu' if evidence else ''}" if arch else ""
        raise TpasInputError(
            f"the checkpoint is {why}: {act(evidence)}, but {name} builds {act(statement)}, which silently changes "
            f"every score{hint}"
        )
    quick_gelu = evidence if evidence is not None else statement
    if quick_gelu is None:
        raise TpasInputError(
            "cannot tell from this checkpoint whether it was trained with QuickGELU (OpenAI weights) or GELU (most "
            f"open_clip weights); state it: --arch NAME-quickgelu or --arch NAME (e.g. {DEFAULT_ARCH}-quickgelu), "
            f"or put {OPEN_CLIP_CONFIG} beside the file",
            info["file"],
        )

    try:
        geometry = infer_geometry(state)
    except ValueError as e:
        raise TpasInputError(str(e), info["file"]) from None
    if stated is None:
        if geometry is None:
            raise TpasInputError(
                "cannot read the architecture from this checkpoint's shapes; pass --arch", info["file"]
            )
        stated = geometry
        name = _registered_name(geometry, quick_gelu) or "custom"
    elif geometry is not None:
        diffs = _geometry_mismatch(geometry, stated)
        if diffs:
            raise TpasInputError(
                f"the checkpoint does not fit {name}: {'; '.join(diffs)} (tpas refuses to interpolate or truncate "
                "weights; without --arch/--config the architecture is read from the checkpoint)",
                info["file"],
            )
    res = info["meta"].get("input_resolution")
    image_size = (stated.get("vision_cfg") or {}).get("image_size")
    if res is not None and geometry is not None and res != geometry["vision_cfg"]["image_size"]:
        raise TpasInputError(
            f"metadata input_resolution {res} disagrees with the position embedding "
            f"({geometry['vision_cfg']['image_size']} px)",
            info["file"],
        )
    model_cfg = json.loads(json.dumps(stated))  # deep copy, plain JSON types
    model_cfg["quick_gelu"] = quick_gelu
    pre = {"image_size": image_size if image_size is not None else 224}
    if oc_json is not None:
        pre.update({k: v for k, v in (oc_json.get("preprocess_cfg") or {}).items() if k in _PRE_KEYS})
    elif arch:
        pre.update(_arch_preprocess(arch))
    pre.update({k: v for k, v in (config.get("preprocess") or {}).items() if k in _PRE_KEYS})
    return name, model_cfg, pre


_PRE_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _arch_preprocess(arch: str) -> dict[str, Any]:
    """The eval preprocessing open_clip's pretrained table gives an architecture (SigLIP: squash, mean = std = 0.5);
    empty when it lists none; refused when its weights disagree (then the config must state it)."""
    oc = _oc()
    base = arch.removesuffix("-quickgelu")
    found = set()
    for tag in oc.list_pretrained_tags_by_model(base):
        cfg = oc.get_pretrained_cfg(base, tag)
        if cfg.get("mean") is not None:
            found.add(
                tuple(
                    (k, tuple(v) if isinstance(v, (list, tuple)) else v)
                    for k, v in sorted(cfg.items())
                    if k in _PRE_KEYS
                )
            )
    if len(found) > 1:
        raise TpasInputError(
            f"open_clip's weights for {base} differ in preprocessing; state it in a config (preprocess: mean, std, "
            f"interpolation, resize_mode) or put the weights' {OPEN_CLIP_CONFIG} beside them"
        )
    return {k: list(v) if isinstance(v, tuple) else v for k, v in next(iter(found), ())}


def _registered_name(geometry: dict[str, Any], quick_gelu: bool) -> str | None:
    """The open_clip architecture name whose sizes and activation equal `geometry` (for describe/tokenizer)."""
    oc = _oc()
    for name in oc.list_models():
        cfg = oc.get_model_config(name)
        if (
            cfg
            and bool(cfg.get("quick_gelu", False)) == quick_gelu
            and "timm_model_name" not in cfg.get("vision_cfg", {})
            and "hf_model_name" not in cfg.get("text_cfg", {})
            and not _geometry_mismatch(geometry, cfg)
            and set(cfg) <= {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
            and set(cfg["vision_cfg"]) <= {"image_size", "layers", "width", "patch_size"}
        ):
            return name
    return None


# ---------------------------------------------------------------------------------------------- tokenizers
class SentencePieceTokenizer:
    """A SigLIP-style tokenizer from a local sentencepiece `.model`: cleaned text -> pieces + EOS, truncated and
    padded to the context length. Padding as open_clip's SigLipTokenizer sets it: EOS for T5 vocabularies (SigLIP),
    `<pad>` for Gemma's (SigLIP 2, recognised by its `<bos>` piece)."""

    def __init__(self, path: Path, context_length: int, clean: str = "canonicalize"):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TpasInputError(f"not a sentencepiece model ({str(e).splitlines()[0]})", path) from None
        unk = self.sp.unk_id()
        gemma = self.sp.piece_to_id("<bos>") != unk
        self.eos_id = self.sp.piece_to_id("<eos>" if gemma else "</s>")
        self.pad_id = self.sp.piece_to_id("<pad>") if gemma else self.eos_id
        if unk in (self.eos_id, self.pad_id):
            raise TpasInputError("sentencepiece model has no </s> (T5) or <eos>/<pad> (Gemma) piece", path)
        self.context_length = context_length
        self.clean = _oc().tokenizer.get_clean_fn(clean)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [*self.sp.encode(self.clean(text))[: self.context_length - 1], self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def build_tokenizer(model_cfg: dict[str, Any], folder: Path | None, tokenizer: Path | None) -> tuple[Any, str]:
    """(tokenizer callable -> [N, context_length] ids, where it came from) for a model_cfg.

    Text towers trained with open_clip's BPE use it (a `--tokenizer` is refused); the others need their own tokenizer
    from local files: `tokenizer` (an HF tokenizer folder or a sentencepiece `.model`), else `folder` (the weights'
    folder) when it holds HF tokenizer files. open_clip's HFTokenizer always pads to the context length.
    """
    oc = _oc()
    text_cfg = model_cfg.get("text_cfg") or {}
    length = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        if tokenizer is not None:
            raise TpasInputError("--tokenizer does not apply: this model's text tower uses open_clip's BPE tokenizer")
        return oc.SimpleTokenizer(context_length=length, **kwargs), "open_clip-bpe"
    source = tokenizer
    if source is None and folder is not None and any((folder / f).is_file() for f in HF_TOKENIZER_FILES):
        source = folder
    if source is None:
        raise TpasInputError(
            f"this model's text tower was trained with the {hf_name} tokenizer, which tpas never downloads: put its "
            f"files (tokenizer.json, tokenizer_config.json, special_tokens_map.json from https://huggingface.co/"
            f"{hf_name}) beside {OPEN_CLIP_CONFIG}, or pass --tokenizer DIR (those files) or FILE.model (sentencepiece)"
        )
    source = Path(source)
    if source.is_file() and source.suffix == ".model":
        return SentencePieceTokenizer(source, length, kwargs.get("clean", "canonicalize")), f"sentencepiece:{source}"
    if not source.is_dir() or not any((source / f).is_file() for f in HF_TOKENIZER_FILES):
        raise TpasInputError(
            f"expected a folder with {' or '.join(HF_TOKENIZER_FILES)}, or a sentencepiece .model file", source
        )
    try:
        tok = oc.tokenizer.HFTokenizer(
            str(source),
            context_length=length,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            local_files_only=True,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise TpasInputError(f"unreadable tokenizer ({str(e).splitlines()[0]})", source) from None
    return tok, f"hf:{source}"


# ---------------------------------------------------------------------------------------------- the family
class ClipPreprocess:
    """open_clip eval transform as a small picklable callable: PIL image -> {"pixels": [3, S, S]}."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        return {"pixels": self.transform(image)}


@register("clip")
class ClipModel(RetrievalModel):
    """An open_clip model (CLIP, SigLIP, EVA02-CLIP, MetaCLIP, DFN, ...) with its own test-time preprocessing and
    tokenizer; features L2-normalised, sims = cosine."""

    options = (
        FamilyOption("arch", str, "open_clip architecture, e.g. ViT-B-16-SigLIP; default: read from the checkpoint."),
        FamilyOption(
            "tokenizer",
            Path,
            "Tokenizer of an HF-tokenizer text tower: folder (tokenizer.json ...) or "
            "sentencepiece .model; default: the checkpoint's folder.",
        ),
        TTA_OPTION,
        TRUST_CHECKPOINT,
    )

    def __init__(
        self,
        clip: torch.nn.Module,
        arch: str,
        model_cfg: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        checkpoint_format: str = "none",
        tokenizer: tuple[Any, str] | None = None,
        tta: str = "none",
    ):
        super().__init__()
        oc = _oc()
        self.clip = clip
        self.arch = arch
        self.model_cfg = model_cfg
        self.checkpoint_format = checkpoint_format
        self.tta = check_tta(tta)
        mean = preprocess_cfg.get("mean") or oc.constants.OPENAI_DATASET_MEAN
        std = preprocess_cfg.get("std") or oc.constants.OPENAI_DATASET_STD
        self.preprocess_cfg = {
            "image_size": preprocess_cfg["image_size"],
            "mean": [float(x) for x in mean],
            "std": [float(x) for x in std],
            "interpolation": preprocess_cfg.get("interpolation") or "bicubic",
            "resize_mode": preprocess_cfg.get("resize_mode") or "shortest",
        }
        p = self.preprocess_cfg
        self.transform = oc.image_transform(
            p["image_size"],
            is_train=False,
            mean=tuple(p["mean"]),
            std=tuple(p["std"]),
            resize_mode=p["resize_mode"],
            interpolation=p["interpolation"],
        )
        self.context_length = int((model_cfg.get("text_cfg") or {}).get("context_length", 77))
        self.tokenizer, self.tokenizer_source = tokenizer or build_tokenizer(model_cfg, None, None)

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | None,
        config: dict[str, Any] | None = None,
        *,
        arch: str | None = None,
        tokenizer: Path | None = None,
        tta: str | None = None,
        trust_checkpoint: bool = False,
    ) -> ClipModel:
        """Build from any accepted checkpoint; the architecture comes from its shapes (see module docstring)."""
        tta = check_tta(tta)
        if path is None or not Path(path).exists():
            raise _missing_checkpoint(None if path is None else Path(path), arch or (config or {}).get("arch"))
        state, info = _read_checkpoint(Path(path), trust_checkpoint)
        name, model_cfg, pre = _resolve_config(state, info, config, arch)
        folder = info["file"].parent if info["open_clip_config"] is not None else None
        tok = build_tokenizer(model_cfg, folder, tokenizer)
        clip = build_open_clip(model_cfg, name)
        try:
            clip.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = " ".join(str(e).split())[:400]
            raise TpasInputError(f"weights do not fit the {name} architecture: {first}", info["file"]) from None
        model = cls(clip, name, model_cfg, pre, info["format"], tok, tta)
        model.checkpoint_path = Path(path)
        return model

    def describe(self) -> dict[str, Any]:
        """Architecture, activation, preprocessing, tokenizer and TTA (JSON-able)."""
        out = {
            "family": "clip",
            "arch": self.arch,
            "model_cfg": self.model_cfg,
            "quick_gelu": bool(self.model_cfg.get("quick_gelu", False)),
            "checkpoint_format": self.checkpoint_format,
            "preprocess": {"transform": "open_clip.image_transform(is_train=False)", **self.preprocess_cfg},
            "tokenizer": {
                "type": type(self.tokenizer).__name__,
                "source": self.tokenizer_source,
                "context_length": self.context_length,
                "padding": "max_length",
                "truncate": True,
            },
            "tta": self.tta,
            "features": "L2-normalised; similarity = text @ image.T",
        }
        bias = getattr(self.clip, "logit_bias", None)
        if bias is not None:
            # Sigmoid-trained (SigLIP): tpas scores by cosine; P(match) = sigmoid(scale * cosine + bias).
            out["sigmoid"] = {
                "logit_scale": float(self.clip.logit_scale.detach().exp()),
                "logit_bias": float(bias.detach()),
            }
        return out

    @property
    def image_preprocessor(self) -> Any:
        """The picklable transform that DataLoader workers run (no weights inside), with the mirror view for TTA."""
        return with_tta(ClipPreprocess(self.transform), self.tta)

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        """open_clip's eval transform (resize per resize_mode, center crop, RGB, mean/std); with TTA, two views."""
        return self.image_preprocessor(image, pose)

    def tokenize(self, texts: Sequence[str]) -> Features:
        """The model's tokenizer, truncated and padded to the context length (BPE: EOT kept last)."""
        return {"input_ids": self.tokenizer(list(texts))}

    def encode_images(self, batch: Features) -> Features:
        """L2-normalised image embeddings [N, D], normalised in fp32 whatever the autocast precision."""

        def encode(b: Features) -> torch.Tensor:
            return torch.nn.functional.normalize(self.clip.encode_image(b["pixels"]).float(), dim=-1)

        return encode_views(encode, batch, self.tta)

    def encode_texts(self, tokens: Features) -> Features:
        """L2-normalised text embeddings [N, D] (pooled as the text tower was trained: EOT, last token, ...)."""
        feats = self.clip.encode_text(tokens["input_ids"])
        return {"embed": torch.nn.functional.normalize(feats.float(), dim=-1)}


def build_open_clip(model_cfg: dict[str, Any], name: str = "custom") -> torch.nn.Module:
    """An open_clip CLIP (or CustomTextCLIP) from a model_cfg dict, randomly initialised, fp32, eval mode."""
    oc = _oc()
    cfg = json.loads(json.dumps(model_cfg))
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in (cfg.get("text_cfg") or {})
    try:
        if custom_text:
            cfg.setdefault("text_cfg", {})["hf_model_pretrained"] = False  # weights come from our checkpoint
            model = oc.model.CustomTextCLIP(**cfg)
        else:
            model = oc.model.CLIP(**cfg)
    except (TypeError, ValueError, OSError) as e:
        raise TpasInputError(f"cannot build the open_clip architecture {name} ({e})") from None
    return model.eval()
