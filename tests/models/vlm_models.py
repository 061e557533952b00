"""Tiny random vision-language models with real processors, written with `save_pretrained` (no downloads).

Each builder trains a small byte-level BPE tokenizer on a fixed corpus (so " yes" and "yes" are single tokens and
"YES" is not), gives it the architecture's special tokens and a chat template, pairs it with the architecture's own
image processor at small pixel limits, and saves model + processor into one folder that `AutoProcessor` and
`AutoModelForImageTextToText` load. Built once per test session (see `vlm_dirs` in conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Words of the default prompts and of the tiny galleries' captions, so prompts tokenize into few tokens.
_CORPUS = [
    "Does this image show the following description? Answer yes or no.",
    "A man woman red shirt falling running bag fighting street black person walking.",
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    'Note that the answer can only be "yes" or "no". Given a search query, retrieve relevant candidates.',
    "yes no Yes No yes no Yes No system user assistant User Assistant",
]

# A Qwen-style chat template (ChatML turns; an image item renders as vision-start, image pad, vision-end).
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# An Idefics3/SmolVLM-style template: "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
IDEFICS3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                    "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]  # fmt: skip


def train_tokenizer(special: list[str], eos: str, vocab_size: int = 360):
    """A byte-level BPE tokenizer trained on `_CORPUS` with `special` tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")


def _tiny_text(tokenizer, **extra) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        **extra,
    }


def _save(model, processor, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    # Random init at std 0.02 makes every logit nearly equal; larger weights give scores that differ between pairs.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_qwen2_vl(out: Path, seed: int = 0) -> Path:
    """Qwen2-VL: 14 px patches merged 2x2, images scaled to 2..12 merged tokens."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,  # fmt: skip
        Qwen2VLVideoProcessor,
    )

    tok = train_tokenizer(QWEN_SPECIAL, "<|im_end|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL}
    pixels = {"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 12}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_TEMPLATE,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    cfg = Qwen2VLConfig(
        text_config=_tiny_text(tok, rope_parameters=rope),
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return _save(Qwen2VLForConditionalGeneration(cfg), processor, out, seed)


def build_qwen3_vl(out: Path, seed: int = 1) -> Path:
    """Qwen3-VL (the Qwen3-VL-Reranker's architecture): 16 px patches merged 2x2, one deepstack layer."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,  # fmt: skip
        Qwen3VLVideoProcessor,
    )

    tok = train_tokenizer(QWEN_SPECIAL, "<|im_end|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL}
    pixels = {"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 10}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=16, merge_size=2, temporal_patch_size=2),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=QWEN_TEMPLATE,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    cfg = Qwen3VLConfig(
        text_config=_tiny_text(tok, head_dim=16, rope_parameters=rope),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return _save(Qwen3VLForConditionalGeneration(cfg), processor, out, seed)


def build_idefics3(out: Path, seed: int = 2) -> Path:
    """Idefics3 (SmolVLM's architecture): 32 px sub-images of 8 px patches, split into a grid plus a global view."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = train_tokenizer(IDEFICS3_SPECIAL, "<end_of_utterance>")
    image_size, patch, scale = 32, 8, 2
    seq_len = (image_size // patch) ** 2 // scale**2
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=True
        ),
        tokenizer=tok,
        image_seq_len=seq_len,
        chat_template=IDEFICS3_TEMPLATE,
    )
    cfg = Idefics3Config(
        text_config={**_tiny_text(tok), "model_type": "llama", "head_dim": 16},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
        },
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return _save(Idefics3ForConditionalGeneration(cfg), processor, out, seed)


BUILDERS = {"qwen2_vl": build_qwen2_vl, "qwen3_vl": build_qwen3_vl, "idefics3": build_idefics3}


# Sizes that give different numbers of visual tokens (and Idefics3 sub-images) within one batch.
GALLERY_SIZES = [(20, 24), (96, 64), (40, 60), (64, 40), (28, 90), (56, 56), (120, 40), (33, 47)]


def make_vlm_gallery(root: Path, n_queries: int = 5, seed: int = 0):
    """`make_tiny_gallery` with its images resized to `GALLERY_SIZES` (captions already differ in length)."""
    from PIL import Image

    from tests.models.conftest import make_tiny_gallery

    g = make_tiny_gallery(root, n_images=len(GALLERY_SIZES), n_queries=n_queries, seed=seed)
    files = sorted(g.images.rglob("*.jpg"), key=lambda p: p.stem)
    for path, size in zip(files, GALLERY_SIZES, strict=True):
        with Image.open(path) as im:
            im.resize(size).save(path, quality=90)
    return g


def random_candidates(g, path: Path, seed: int = 0, k: int | None = None):
    """A random dense (or top-k) candidates SimsMatrix over the gallery's ids, saved to `path`."""
    from tpas.sims import SimsMatrix

    gen = torch.Generator().manual_seed(seed)
    m = SimsMatrix(
        g.query_ids,
        g.gallery_ids,
        scores=torch.rand(len(g.query_ids), len(g.gallery_ids), generator=gen),
        source="pool",
    )
    if k is not None:
        m = m.top_k(k)
    m.save(path)
    return m
