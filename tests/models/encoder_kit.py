"""Builders of the tiny encoder folders the SigLIP / hf-dual / vlm-embed tests use (no downloads, random weights).

Everything is written the way the real releases are laid out: an open_clip hub folder (`open_clip_config.json`,
`open_clip_model.safetensors`, tokenizer files), or a transformers folder (`config.json`, `model.safetensors`,
processor and tokenizer files from `save_pretrained`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from tpas.sims import SimsMatrix

WORDS = (
    "a",
    "man",
    "woman",
    "person",
    "in",
    "red",
    "black",
    "shirt",
    "is",
    "falling",
    "running",
    "fighting",
    "on",
    "the",
    "street",
    "near",
    "car",
    "with",
    "bag",
)
# SigLIP's open_clip preprocessing, as its hub open_clip_config.json states it.
SIGLIP_PREPROCESS = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}


def _clean_timm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return kwargs


def register_tiny_timm_towers() -> None:
    """Register two tiny timm image towers under test-only names: a SigLIP-style ViT (no class token, MAP pooling)
    and an EVA02-CLIP-style Eva (rotary positions, SwiGLU, sub-LN), so open_clip configs can name them."""
    import timm
    from timm.models import register_model
    from timm.models.eva import Eva

    if "tpas_test_vit_siglip_tiny" in timm.list_models("tpas_test_*"):
        return
    register_siglip_tower("tpas_test_vit_siglip_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)

    @register_model
    def tpas_test_eva02_tiny_clip(pretrained: bool = False, **kwargs: Any) -> Eva:
        args = dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=1,
            num_heads=2,
            qkv_fused=False,
            mlp_ratio=4 * 2 / 3,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(4, 4),
        )
        return Eva(**{**args, **_clean_timm_kwargs(kwargs)})


def register_siglip_tower(name: str, **sizes: Any) -> None:
    """Register a SigLIP-style timm ViT (no class token, MAP pooling) of the given sizes under `name`."""
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    def build(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return VisionTransformer(**{"class_token": False, "global_pool": "map", **sizes, **_clean_timm_kwargs(kwargs)})

    build.__name__ = name
    register_model(build)


def word_vocab() -> dict[str, int]:
    """T5-style ids (<pad> 0, </s> 1, <unk> 2) then one id per test word."""
    return {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}


def hf_word_tokenizer() -> Any:
    """A fast HF tokenizer over `word_vocab()`: words split on whitespace/punctuation, `</s>` appended, padded with
    `</s>` as SigLIP's tokenizer pads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(word_vocab(), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def train_sentencepiece(path_prefix: Path, gemma: bool = False) -> Path:
    """A tiny unigram sentencepiece model trained on test sentences: T5 layout (<pad> 0, </s> 1, <unk> 2) or Gemma's
    (<pad> 0, <eos> 1, <bos> 2, <unk> 3)."""
    import sentencepiece

    r = random.Random(0)
    corpus = path_prefix.with_suffix(".txt")
    corpus.write_text("\n".join(" ".join(r.choice(WORDS) for _ in range(8)) for _ in range(300)))
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>")
    if not gemma:
        ids = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path_prefix), vocab_size=40, model_type="unigram", minloglevel=2, **ids
    )
    return path_prefix.with_suffix(".model")


def open_clip_siglip_cfg(
    vocab_size: int, tower: str = "tpas_test_vit_siglip_tiny", width: int = 32, image_size: int = 32, layers: int = 1
) -> dict[str, Any]:
    """A tiny SigLIP in open_clip's model_cfg form (as the hub's ViT-B-16-SigLIP, scaled down): timm MAP-pooled ViT
    `tower` (of width `width`), bidirectional text tower pooled at the last position, context length 64."""
    return {
        "embed_dim": width,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": image_size,
            "timm_model_name": tower,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": {
            "context_length": 64,
            "vocab_size": vocab_size,
            "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
            "tokenizer_kwargs": {"clean": "canonicalize"},
            "width": width,
            "heads": 2,
            "layers": layers,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
        },
    }


def open_clip_eva02_cfg() -> dict[str, Any]:
    """A tiny EVA02-CLIP in open_clip's model_cfg form (as EVA02-B-16, scaled down): timm Eva tower, BPE text."""
    return {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": "tpas_test_eva02_tiny_clip",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def write_open_clip_folder(folder: Path, model_cfg: dict, preprocess_cfg: dict | None, seed: int = 0) -> Path:
    """Random weights of `model_cfg` as an open_clip hub folder (config + safetensors)."""
    from safetensors.torch import save_file

    from tpas.models.clip import build_open_clip

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_open_clip(model_cfg)
    with torch.no_grad():  # a non-trivial logit bias, so meta shows it was read from the weights
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.fill_(-7.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    cfg = {"model_cfg": model_cfg, **({"preprocess_cfg": preprocess_cfg} if preprocess_cfg else {})}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return folder


def write_lossless_gallery(src: Path, dst: Path, mirror: bool = False) -> Path:
    """The decoded images (JPEG or PNG) of gallery `src` as RGB PNGs (same stems) in `dst`, optionally mirrored
    left-right."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(q for q in src.rglob("*") if q.suffix in (".jpg", ".png")):
        im = Image.open(p).convert("RGB")
        (ImageOps.mirror(im) if mirror else im).save(dst / f"{p.stem}.png")
    return dst


def gallery_images(images: Path, ids: list[str]) -> list[Image.Image]:
    """The decoded (RGB) gallery images in `ids` order."""
    paths = {p.stem: p for p in images.rglob("*") if p.suffix in (".jpg", ".png")}
    return [Image.open(paths[i]).convert("RGB") for i in ids]


def check_tta_hflip(
    load: Callable[..., Any], images: Path, queries: Path, tmp: Path, pose: Path | None = None, rerank: bool = False
) -> SimsMatrix:
    """`--tta hflip` of the family `load(**options)` builds == the mean of two explicit runs of its plain model (the
    images, and their mirrors), re-normalised (per token for token-level features); with `rerank`, every pair is
    re-ranked and the ITM scores are the plain run's (the mirror changes the ITC embedding only). Returns the TTA run.
    """
    from tpas.data.pab import read_queries
    from tpas.models.engine import encode_images_in_memory, encode_texts, infer, itc_path_for, itm_path_for
    from tpas.runtime import precision_policy

    plain_dir = write_lossless_gallery(images, tmp / "plain")
    mirror_dir = write_lossless_gallery(images, tmp / "mirror", mirror=True)
    mirror_pose = None if pose is None else write_lossless_gallery(pose, tmp / "mirror-pose", mirror=True)
    plain, flip = load(), load(tta="hflip")
    assert plain.describe()["tta"] == "none" and flip.describe()["tta"] == "hflip"  # the cache key tells them apart
    k = len(list(plain_dir.iterdir())) if rerank else None
    runs = {}
    for name, model in (("plain", plain), ("flip", flip)):
        out = tmp / f"{name}.pt"
        runs[name] = infer(model, plain_dir, queries, out, pose_dir=pose, rerank_k=k, batch_size=3, num_workers=0,
                           use_cache=False, device="cpu")  # fmt: skip
    ids = runs["flip"].gallery_ids
    cpu = torch.device("cpu")
    fp32 = precision_policy(cpu, "fp32").autocast

    def embed(folder: Path, poses: Path | None) -> torch.Tensor:
        pose_files = None if poses is None else [poses / f"{i}.png" for i in ids]
        feats = encode_images_in_memory(plain, [folder / f"{i}.png" for i in ids], pose_files, cpu, fp32, 2)
        return feats["embed"]

    a, b = embed(plain_dir, pose), embed(mirror_dir, mirror_pose)
    by_id = {q.id: q.caption for q in read_queries(queries)}
    text = encode_texts(plain, [by_id[q] for q in runs["flip"].query_ids], cpu, fp32, 4)["embed"]
    with torch.inference_mode():
        want = plain.similarity(text, torch.nn.functional.normalize(a + b, dim=-1))
        unflipped = plain.similarity(text, a)
    itc = {n: SimsMatrix.load(itc_path_for(tmp / f"{n}.pt")) if rerank else r for n, r in runs.items()}
    torch.testing.assert_close(itc["flip"].to_dense(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(itc["plain"].to_dense(), unflipped, atol=1e-5, rtol=0)
    assert (want - unflipped).abs().max() > 1e-4  # the mirror matters on these images
    if rerank:
        itm = [SimsMatrix.load(itm_path_for(tmp / f"{n}.pt")).to_dense(fill=float("nan")) for n in runs]
        torch.testing.assert_close(itm[1], itm[0], atol=1e-5, rtol=0)
    assert runs["flip"].meta["model"]["tta"] == "hflip"
    return runs["flip"]


def check_cpu_bf16(
    model: Any, images: Path, queries: Path, tmp: Path, pose: Path | None = None, rerank: bool = False
) -> SimsMatrix | None:
    """`precision="bf16"` on the CPU: where the CPU has native bf16, the run computes in bf16 (its matrices differ
    from fp32's, ITC by < 0.05, re-ranked finals by < 0.2: the tiny models' ITM heads are scaled up, and CMP
    min-max-normalises, which widens bf16's ~0.4% per op), meta says so, and the model's fp32 weights are
    bit-identical afterwards; elsewhere one TpasInputError. Returns the bf16 run (None where refused)."""
    import pytest

    from tpas.errors import TpasInputError
    from tpas.models.engine import infer, itc_path_for
    from tpas.runtime import cpu_has_bf16

    k = len(list(images.rglob("*.*"))) if rerank else None
    run = dict(pose_dir=pose, rerank_k=k, batch_size=3, num_workers=0, use_cache=False, device="cpu")
    if not cpu_has_bf16():
        with pytest.raises(TpasInputError, match="needs native bf16"):
            infer(model, images, queries, tmp / "bf16.pt", precision="bf16", **run)
        return None
    before = {n: t.clone() for n, t in model.state_dict().items()}
    fp32 = infer(model, images, queries, tmp / "fp32.pt", **run)
    bf16 = infer(model, images, queries, tmp / "bf16.pt", precision="bf16", **run)
    after = model.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
    assert bf16.meta["precision"] == "bf16" and fp32.meta["precision"] == "fp32"
    pairs = [(fp32, bf16, 0.2 if rerank else 0.05)]
    if rerank:
        pairs.append((*(SimsMatrix.load(itc_path_for(tmp / f"{n}.pt")) for n in ("fp32", "bf16")), 0.05))
    for a, b, tol in pairs:
        diff = (a.to_dense() - b.to_dense()).abs().max().item()
        assert 0 < diff < tol, (a.source, diff)  # bf16 really ran, and close to fp32
    return bf16


def write_hf_dual_folder(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A tiny SiglipModel / Siglip2Model (NaFlex, patch 8, 16 patches) / CLIPModel with its processor, saved as a
    transformers folder; text towers over `word_vocab()` with 64 positions (CLIP: 16-d projections)."""
    import transformers as tf

    text = dict(
        vocab_size=len(word_vocab()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8)
    if model_type == "siglip":
        config = tf.SiglipConfig(text_config=text, vision_config={**vision, "image_size": 32})
        model_cls, processor = tf.SiglipModel, tf.SiglipProcessor
        image_processor = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    elif model_type == "siglip2":
        config = tf.Siglip2Config(text_config=text, vision_config={**vision, "num_patches": 16})
        model_cls, processor = tf.Siglip2Model, tf.Siglip2Processor
        image_processor = tf.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    else:
        ids = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 1}
        config = tf.CLIPConfig(
            text_config={**text, **ids}, vision_config={**vision, "image_size": 32}, projection_dim=16
        )
        model_cls, processor = tf.CLIPModel, tf.CLIPProcessor
        image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    processor(image_processor=image_processor, tokenizer=hf_word_tokenizer()).save_pretrained(folder)
    return folder


QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def write_qwen2_vl_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen2-VL (2 decoder layers of width 32, 1 vision block, patch 14, merge 2) with a byte-level tokenizer
    holding Qwen's special tokens, saved as a transformers folder (Qwen2VLForConditionalGeneration, as GME ships)."""
    import transformers as tf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = tf.Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(list(QWEN_SPECIALS)), strict=True))
    image_processor = tf.Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16})
    processor = tf.Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=tf.Qwen2VLVideoProcessor()
    )
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    config = tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    tf.Qwen2VLForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
