"""Convert a LAVIS BLIP-2 checkpoint (Q-Former file + separate ViT file) into a transformers directory.

A released LAVIS checkpoint (`blip2_pretrained.pth`, `blip2_pretrained_vitL.pth`) holds only the Q-Former side
under `['model']`; the frozen ViT comes from its own bare state dict (`eva_vit_g.pth`, `clip_vit_L.pth`). The key
map is data (`data/blip2_lavis_to_hf_keymap.json`, checked at full size against both layouts): ordered
`[regex, template]` rules, concatenations (EVA's `q_bias`/`v_bias` -> one `qkv.bias`), reshapes, synthesized
tensors, and drops with a reason each. Every input key is either mapped, dropped for a stated reason, or an error.

The output directory loads with `tpas infer blip2 --checkpoint DIR` (and, for `pretrain`, with plain transformers
`Blip2ForImageTextRetrieval.from_pretrained(DIR)`):
`config.json` (with a `lavis` block recording what the HF classes cannot express: `ln_vision` eps, CLIP's `ln_pre`),
`model.safetensors`, `lavis_ln_pre.safetensors` (CLIP ViT-L only), `vocab.txt` + tokenizer files (`[DEC]` added).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import TpasInputError
from .checkpoint import extract_state_dict, load_checkpoint, sha256_file

KEYMAP_FILE = "blip2_lavis_to_hf_keymap.json"
DEFAULT_VOCAB = "bert-base-uncased-vocab.txt"
LN_PRE_FILE = "lavis_ln_pre.safetensors"
VIT_PREFIX = "visual_encoder."


@dataclass(frozen=True)
class ModelTypeSpec:
    """What a LAVIS model type fixes beyond its tensors' shapes."""

    keymap_variant: str  # variant name inside the key-map JSON
    vit_model: str
    lavis_depth: int  # blocks LAVIS builds; released ViT files may hold more (loaded with strict=False)
    head_dim: int  # heads = width / head_dim (EVA: embed_dim // 88; CLIP: width // 64)
    hidden_act: str
    block_eps: float
    vit_file: str
    qformer_file: str
    block_pattern: str  # LAVIS key of a ViT block; group 1 = block index
    # Keys released ViT files may hold that LAVIS never reads (its ViT has no slot for them; strict=False skips them).
    unused_vit_keys: tuple[str, ...]


MODEL_TYPES: dict[str, ModelTypeSpec] = {
    "pretrain": ModelTypeSpec(
        keymap_variant="eva_clip_g",
        vit_model="eva_clip_g",
        lavis_depth=39,
        head_dim=88,
        hidden_act="gelu",
        block_eps=1e-6,
        vit_file="eva_vit_g.pth",
        qformer_file="blip2_pretrained.pth",
        block_pattern=r"visual_encoder\.blocks\.(\d+)\..*",
        unused_vit_keys=(r"visual_encoder\.(norm|fc_norm|head)\.(weight|bias)",),
    ),
    "pretrain_vitL": ModelTypeSpec(
        keymap_variant="clip_L",
        vit_model="clip_L",
        lavis_depth=23,
        head_dim=64,
        hidden_act="quick_gelu",
        block_eps=1e-5,
        vit_file="clip_vit_L.pth",
        qformer_file="blip2_pretrained_vitL.pth",
        block_pattern=r"visual_encoder\.transformer\.resblocks\.(\d+)\..*",
        unused_vit_keys=(r"visual_encoder\.ln_post\.(weight|bias)", r"visual_encoder\.proj"),
    ),
}
LN_VISION_EPS = 1e-5  # LAVIS ln_vision = LayerNorm(width) with torch's default eps, for both ViTs
BERT_HEAD_DIM = 64
QFORMER_EPS = 1e-12


def load_keymap() -> dict[str, Any]:
    """The LAVIS -> HF key map shipped with tpas (a copy of the reference JSON)."""
    return json.loads(resources.files("tpas.models").joinpath("data", KEYMAP_FILE).read_text())


def default_vocab_path() -> Path:
    """The bert-base-uncased WordPiece vocabulary shipped with tpas (30,522 entries; `[DEC]` is added on top)."""
    return Path(str(resources.files("tpas.models").joinpath("data", DEFAULT_VOCAB)))


def _sub(template: str, m: re.Match[str]) -> str:
    return m.expand(template)


@dataclass
class KeymapResult:
    """Outcome of applying the key map: HF tensors, tensors without an HF slot, and what was dropped and why."""

    hf: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)


def apply_keymap(
    lavis: Mapping[str, torch.Tensor],
    model_type: str,
    *,
    vit_depth: int,
    source_of: Callable[[str], str] | None = None,
) -> KeymapResult:
    """Map a merged LAVIS state dict (Q-Former keys + `visual_encoder.`-prefixed ViT keys) to HF keys.

    Works on meta tensors as well (shape-only checks). ViT blocks with index >= `vit_depth` are dropped, as LAVIS
    never builds them. An unknown key raises TpasInputError naming it and the file it came from (`source_of`).
    """
    spec = MODEL_TYPES[model_type]
    variant = load_keymap()["variants"][spec.keymap_variant]
    where = source_of or (lambda key: "checkpoint")
    remaining = dict(lavis)
    result = KeymapResult(hf={}, extra={})

    block_re = re.compile(spec.block_pattern)
    for key in list(remaining):
        m = block_re.fullmatch(key)
        if m and int(m.group(1)) >= vit_depth:
            del remaining[key]
            result.dropped[key] = f"ViT block {m.group(1)} is beyond the {vit_depth} blocks LAVIS builds"
    drops = [(re.compile(p), why) for p, why in variant["drop"]]
    drops += [
        (re.compile(p), "in the released ViT file but unused by LAVIS (loaded with strict=False)")
        for p in spec.unused_vit_keys
    ]
    for key in list(remaining):
        for pattern, why in drops:
            if pattern.fullmatch(key):
                del remaining[key]
                result.dropped[key] = why
                break

    for rule in variant["concat"]:
        match_re = re.compile(rule["match"])
        for key in sorted(remaining):
            m = match_re.fullmatch(key)
            if not m or key not in remaining:
                continue
            parts = []
            for part in rule["parts"]:
                if part.startswith("ZEROS_LIKE:"):
                    name = _sub(part[len("ZEROS_LIKE:") :], m)
                    if name not in lavis:
                        raise TpasInputError(f"key {name!r} is missing (needed next to {key!r})", where(key))
                    parts.append(torch.zeros_like(lavis[name]))
                else:
                    name = _sub(part, m)
                    if name not in remaining:
                        raise TpasInputError(f"key {name!r} is missing (needed next to {key!r})", where(key))
                    parts.append(remaining.pop(name))
            result.hf[_sub(rule["hf"], m)] = torch.cat(parts, dim=rule["dim"])

    rules = [(re.compile(p), t) for p, t in variant["rules"]]
    for key, tensor in remaining.items():
        for pattern, template in rules:
            m = pattern.fullmatch(key)
            if m:
                target = _sub(template, m)
                if target.startswith("EXTRA:"):
                    result.extra[target[len("EXTRA:") :]] = tensor
                else:
                    if target in result.hf:
                        raise TpasInputError(f"keys {key!r} and another both map to {target!r}", where(key))
                    result.hf[target] = tensor
                break
        else:
            raise TpasInputError(
                f"unknown key {key!r} for LAVIS model type {model_type!r} (not in the key map; expected the "
                f"layout of {spec.qformer_file} + {spec.vit_file})",
                where(key),
            )

    for item in variant["reshape"]:
        name = item["hf"]
        if name in result.hf:
            result.hf[name] = _add_leading_axes(result.hf[name], item["shape"])
    for item in variant["synthesize"]:
        if item["value"] != "zeros":
            raise ValueError(f"unsupported synthesize value {item['value']!r} in {KEYMAP_FILE}")
        like = result.hf.get("vision_model.embeddings.patch_embedding.weight")
        # The synthesized tensor's width follows the converted model (the JSON records the full-size shape).
        shape = [like.shape[0]] if like is not None else item["shape"]
        device = like.device if like is not None else "cpu"
        dtype = like.dtype if like is not None else torch.float32
        result.hf[item["hf"]] = torch.zeros(shape, dtype=dtype, device=device)
    return result


def _add_leading_axes(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """View `tensor` with the rank of `shape` by prepending singleton axes (CLIP [W] -> [1, 1, W], [P, W] -> [1, P, W]).

    The key map records full-size target shapes; keeping the tensor's own sizes lets the same rule convert any width.
    """
    extra = len(shape) - tensor.ndim
    if extra < 0 or any(d != 1 for d in shape[:extra]):
        raise ValueError(f"reshape {list(tensor.shape)} -> {shape} in {KEYMAP_FILE} is not a leading-axes view")
    return tensor.reshape([1] * extra + list(tensor.shape))


def _count_indices(keys: Mapping[str, Any] | list[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.fullmatch(k))})


def infer_model_type(lavis: Mapping[str, torch.Tensor]) -> str | None:
    """`pretrain` (EVA ViT-g) or `pretrain_vitL` (CLIP ViT-L) from the ViT keys; None if neither layout is seen."""
    if "visual_encoder.blocks.0.attn.q_bias" in lavis or "visual_encoder.cls_token" in lavis:
        return "pretrain"
    if "visual_encoder.transformer.resblocks.0.attn.in_proj_weight" in lavis or "visual_encoder.conv1.weight" in lavis:
        return "pretrain_vitL"
    return None


def _shape(lavis: Mapping[str, torch.Tensor], key: str, where: Callable[[str], str]) -> tuple[int, ...]:
    if key not in lavis:
        raise TpasInputError(f"key {key!r} is missing", where(key))
    return tuple(lavis[key].shape)


def build_hf_config(
    lavis: Mapping[str, torch.Tensor],
    model_type: str,
    *,
    vit_depth: int,
    source_of: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """The transformers `Blip2Config` dict implied by a LAVIS state dict (every size read from a tensor shape)."""
    spec = MODEL_TYPES[model_type]
    where = source_of or (lambda key: "checkpoint")
    if model_type == "pretrain":
        width, _, patch, _ = _shape(lavis, "visual_encoder.patch_embed.proj.weight", where)
        positions = _shape(lavis, "visual_encoder.pos_embed", where)[1]
        mlp = _shape(lavis, "visual_encoder.blocks.0.mlp.fc1.weight", where)[0]
        block = "visual_encoder.blocks.{}.norm1.weight"
    else:
        width, _, patch, _ = _shape(lavis, "visual_encoder.conv1.weight", where)
        positions = _shape(lavis, "visual_encoder.positional_embedding", where)[0]
        mlp = _shape(lavis, "visual_encoder.transformer.resblocks.0.mlp.c_fc.weight", where)[0]
        block = "visual_encoder.transformer.resblocks.{}.ln_1.weight"
    blocks = _count_indices(lavis, re.escape(block).replace(re.escape("{}"), r"(\d+)"))
    if len(blocks) < vit_depth or blocks[:vit_depth] != list(range(vit_depth)):
        missing = next(i for i in range(vit_depth) if i not in blocks)
        raise TpasInputError(
            f"the ViT has {len(blocks)} blocks but {model_type} uses {vit_depth} (block {missing} is missing); "
            "pass --vit-layers for a non-standard ViT",
            where(block.format(missing)),
        )
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise TpasInputError(f"ViT position embedding has {positions} rows; expected 1 + a square number", where(""))
    if width % spec.head_dim:
        raise TpasInputError(
            f"ViT width {width} is not a multiple of the {spec.vit_model} head size {spec.head_dim}", where("")
        )
    ln_vision = _shape(lavis, "ln_vision.weight", where)[0]
    if ln_vision != width:
        raise TpasInputError(
            f"Q-Former checkpoint expects a ViT of width {ln_vision} (ln_vision) but the ViT file has width {width}; "
            f"{model_type} pairs {spec.qformer_file} with {spec.vit_file}",
            where("ln_vision.weight"),
        )

    _, num_query, hidden = _shape(lavis, "query_tokens", where)
    vocab, _ = _shape(lavis, "Qformer.bert.embeddings.word_embeddings.weight", where)
    max_pos, _ = _shape(lavis, "Qformer.bert.embeddings.position_embeddings.weight", where)
    intermediate = _shape(lavis, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", where)[0]
    embed_dim = _shape(lavis, "vision_proj.weight", where)[0]
    layers = _count_indices(lavis, r"Qformer\.bert\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight")
    cross = _count_indices(lavis, r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.self\.query\.weight")
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if not cross or cross[0] != 0 or cross != list(range(0, len(layers), freq)):
        raise TpasInputError(
            f"Q-Former cross-attention sits in layers {cross}; expected every k-th layer starting at 0", where("")
        )
    if "Qformer.bert.encoder.layer.0.intermediate.dense.weight" not in lavis:
        raise TpasInputError(
            "Q-Former has no text feed-forward (intermediate/output); not a retrieval Q-Former", where("")
        )
    return {
        "vision_config": {
            "hidden_size": width,
            "intermediate_size": mlp,
            "num_hidden_layers": vit_depth,
            "num_attention_heads": width // spec.head_dim,
            "image_size": grid * patch,
            "patch_size": patch,
            "hidden_act": spec.hidden_act,
            "layer_norm_eps": spec.block_eps,
            "qkv_bias": True,
        },
        "qformer_config": {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": len(layers),
            "num_attention_heads": hidden // BERT_HEAD_DIM,
            "intermediate_size": intermediate,
            "max_position_embeddings": max_pos,
            "layer_norm_eps": QFORMER_EPS,
            "cross_attention_frequency": freq,
            "encoder_hidden_size": width,
            "use_qformer_text_input": True,
        },
        "num_query_tokens": num_query,
        "image_text_hidden_size": embed_dim,
        "image_token_index": None,
    }


def load_tokenizer(vocab: str | Path) -> Any:
    """bert-base-uncased WordPiece from a `vocab.txt` plus `[DEC]` as bos token, as LAVIS `init_tokenizer` does.

    In transformers 5 the vocab must be passed as `vocab=`; `vocab_file=` is silently ignored (5-token vocab).
    """
    from transformers import BertTokenizer

    vocab = Path(vocab)
    if not vocab.is_file():
        raise TpasInputError("vocabulary file not found (expected a bert-base-uncased vocab.txt)", vocab)
    tok = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    if len(tok) < 10 or tok.cls_token_id is None or tok.convert_tokens_to_ids("[CLS]") == tok.unk_token_id:
        raise TpasInputError("not a WordPiece vocab.txt with [CLS]/[SEP]/[PAD]/[UNK] entries", vocab)
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    else:
        tok.bos_token = "[DEC]"
    return tok


@dataclass
class ConversionSummary:
    """What `convert_lavis` wrote, for the CLI to print."""

    out: Path
    model_type: str
    hf_keys: int
    extra_keys: list[str]
    dropped: dict[str, str]
    config: dict[str, Any]


def _load_state(path: Path, trust: bool, what: str) -> dict[str, torch.Tensor]:
    obj = load_checkpoint(path, trust=trust)
    state = extract_state_dict(obj, path, keys=("model", "state_dict"))
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TpasInputError(f"{what} entry {bad[0]!r} is not a tensor", path)
    return state


def _expected_hf_layout(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    with torch.device("meta"):
        model = Blip2ForImageTextRetrieval(Blip2Config(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against_hf(hf: Mapping[str, torch.Tensor], config: dict[str, Any], source: Path) -> None:
    """Refuse a conversion whose keys or shapes differ from `Blip2ForImageTextRetrieval` built from `config`."""
    expected = _expected_hf_layout(config)
    missing = sorted(set(expected) - set(hf))
    unexpected = sorted(set(hf) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise TpasInputError(f"converted state dict does not fit Blip2ForImageTextRetrieval: {detail}", source)
    for key, shape in expected.items():
        if tuple(hf[key].shape) != shape:
            raise TpasInputError(
                f"converted tensor {key!r} has shape {list(hf[key].shape)}, the model expects {list(shape)}", source
            )


def convert_lavis(
    qformer: str | Path,
    vit: str | Path | None,
    out: str | Path,
    *,
    vocab: str | Path | None = None,
    model_type: str | None = None,
    vit_layers: int | None = None,
    overwrite: bool = False,
    trust: bool = False,
    hash_sources: bool = True,
) -> ConversionSummary:
    """Convert LAVIS `QFORMER.pth` (+ the bare ViT file) into a transformers directory at `out`, atomically.

    Args:
        qformer: LAVIS checkpoint (`{'model': state_dict}`; `visual_encoder.*` absent as released).
        vit: the bare ViT state dict (keys without `visual_encoder.`); may be None only if `qformer` holds the ViT.
        out: directory to create (refused if it exists, unless `overwrite`).
        vocab: bert-base-uncased `vocab.txt` (default: the copy shipped with tpas).
        model_type: `pretrain` or `pretrain_vitL`; inferred from the ViT keys when None, refused if it disagrees.
        vit_layers: ViT blocks to keep (default: what LAVIS builds: 39 for EVA ViT-g, 23 for CLIP ViT-L).
        trust: allow full unpickling of the input files (see `load_checkpoint`).
        hash_sources: record the inputs' sha256 in config.json (provenance).
    """
    qformer, out = Path(qformer), Path(out)
    q_state = _load_state(qformer, trust, "checkpoint")
    origin = dict.fromkeys(q_state, qformer)
    lavis = dict(q_state)
    if vit is not None:
        vit = Path(vit)
        v_state = _load_state(vit, trust, "ViT file")
        for key, tensor in v_state.items():
            full = key if key.startswith(VIT_PREFIX) else VIT_PREFIX + key
            if full in lavis:
                raise TpasInputError(f"ViT key {key!r} is also in the Q-Former checkpoint {qformer}", vit)
            lavis[full] = tensor
            origin[full] = vit

    def source_of(key: str) -> str:
        return str(origin.get(key, vit if key.startswith(VIT_PREFIX) and vit is not None else qformer))

    found = infer_model_type(lavis)
    if found is None:
        if vit is None:
            raise TpasInputError(
                "no ViT weights: pass the ViT file with --vit (eva_vit_g.pth or clip_vit_L.pth)", qformer
            )
        raise TpasInputError(
            "neither an EVA ViT-g (blocks.N.attn.q_bias) nor a CLIP ViT-L (transformer.resblocks.N) layout", vit
        )
    if model_type is not None and model_type != found:
        raise TpasInputError(
            f"--model-type {model_type} disagrees with the ViT weights, which are {MODEL_TYPES[found].vit_model} "
            f"({found})",
            vit or qformer,
        )
    spec = MODEL_TYPES[found]
    depth = vit_layers if vit_layers is not None else spec.lavis_depth
    if depth < 1:
        raise TpasInputError(f"--vit-layers must be >= 1, got {depth}")

    config = build_hf_config(lavis, found, vit_depth=depth, source_of=source_of)
    mapped = apply_keymap(lavis, found, vit_depth=depth, source_of=source_of)
    check_against_hf(mapped.hf, config, qformer)

    vocab = Path(vocab) if vocab is not None else default_vocab_path()
    tokenizer = load_tokenizer(vocab)
    vocab_rows = config["qformer_config"]["vocab_size"]
    if len(tokenizer) != vocab_rows:
        raise TpasInputError(
            f"the tokenizer has {len(tokenizer)} tokens (vocab + [DEC]) but the checkpoint's word embeddings have "
            f"{vocab_rows} rows; pass the vocab.txt the model was trained with (--vocab)",
            vocab,
        )

    lavis_block: dict[str, Any] = {
        "model_type": found,
        "vit_model": spec.vit_model,
        "ln_vision_eps": LN_VISION_EPS,
        "ln_pre": bool(mapped.extra),
        "ln_pre_eps": spec.block_eps if mapped.extra else None,
        "max_txt_len": 32,
        "max_words": 50,
        "sources": {"qformer": qformer.name, "vit": vit.name if vit is not None else None},
    }
    if hash_sources:
        lavis_block["sources"]["qformer_sha256"] = sha256_file(qformer)
        lavis_block["sources"]["vit_sha256"] = sha256_file(vit) if vit is not None else None
    _write_directory(out, config, lavis_block, mapped, tokenizer, vocab, overwrite=overwrite)
    return ConversionSummary(
        out=out,
        model_type=found,
        hf_keys=len(mapped.hf),
        extra_keys=sorted(mapped.extra),
        dropped=mapped.dropped,
        config=config,
    )


def _write_directory(
    out: Path,
    config: dict[str, Any],
    lavis_block: dict[str, Any],
    mapped: KeymapResult,
    tokenizer: Any,
    vocab: Path,
    *,
    overwrite: bool,
) -> None:
    from safetensors.torch import save_file
    from transformers import Blip2Config

    if out.exists() and not overwrite:
        raise TpasInputError("output directory already exists; remove it or pass --overwrite", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        hf_config = Blip2Config(**config)
        hf_config.lavis = lavis_block
        hf_config.architectures = ["Blip2ForImageTextRetrieval"]
        hf_config.save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in mapped.hf.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        if mapped.extra:
            save_file(
                {k: v.contiguous() for k, v in mapped.extra.items()}, str(tmp / LN_PRE_FILE), metadata={"format": "pt"}
            )
        tokenizer.save_pretrained(tmp)
        # vocab.txt is the plain WordPiece list; [DEC] stays an added token (tokenizer_config.json), as in LAVIS.
        shutil.copyfile(vocab, tmp / "vocab.txt")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
