"""Inference engine vs the seed scripts' one-item-at-a-time approach, same model, on the CPU (or `--device cuda`).

Seed approach (clip_infer.py): `os.listdir` order, one image at a time (decode, transform, encode with batch size 1),
features to numpy per item, L2-normalised in numpy; captions encoded one at a time; sims = (img @ txt.T).T.
Engine: `tpas.models.engine.infer` with DataLoader workers, batched inference_mode encoding, feature store (a cold
run, `use_cache=False`, is what is compared; a warm re-run from the cache is printed as well).

`--path siglip` runs the same comparison for an open_clip SigLIP folder (timm MAP-pooled ViT, HF tokenizer, text
padded to 64), `--path vlm-embed` for a tiny Qwen2-VL embedding model (GME prompts, last-token pooling; the loop runs
the processor and the backbone one prompt at a time, as GME's own script does with batch size 1). `--path clip-b16`
and `--path siglip-b16` are real-size models with random weights (open_clip's own ViT-B-16 and ViT-B-16-SigLIP
configs, 224 px). `--precision bf16` runs the engine with bf16 weights on a CPU with native bf16 (the loop stays fp32,
the common approach).

Run: .venv/bin/python benchmarks/bench_infer.py [--path clip|siglip|vlm-embed|clip-b16|siglip-b16] [--images 256]
     [--queries 64] [--batch-size 32] [--workers N] [--precision fp32|fp16|bf16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # encoder_kit: tiny model folders

import tpas.models  # noqa: F401 - makes torchvision importable before open_clip
from tpas.models import load_model
from tpas.models.clip import build_open_clip
from tpas.models.engine import default_num_workers, infer

# A small ViT CLIP: 112 px, patch 16 (49 tokens + CLS), width 192 x 4 layers; text width 128 x 2 layers.
SMALL_CFG = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 112, "layers": 4, "width": 192, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def make_data(root: Path, n_images: int, n_queries: int) -> tuple[Path, Path]:
    """Person-crop-sized JPEGs (128 x 256, noisy) and a name-masked query.json."""
    rng = np.random.default_rng(0)
    gallery = root / "gallery"
    gallery.mkdir(parents=True)
    for i in range(n_images):
        arr = rng.integers(0, 256, size=(256, 128, 3), dtype=np.uint8)
        Image.fromarray(arr).save(gallery / f"{i:015d}.jpg", quality=90)
    words = ("a", "man", "woman", "in", "red", "black", "shirt", "is", "falling", "running", "fighting", "on",
             "the", "street", "near", "car", "with", "bag")  # fmt: skip
    r = random.Random(0)
    lines = [
        f'{{"query_index": "Q{i:014d}", "caption": "{" ".join(r.choice(words) for _ in range(20))}"}}\n'
        for i in range(n_queries)
    ]
    (root / "query.json").write_text("".join(lines))
    return gallery, root / "query.json"


def seed_approach(model: torch.nn.Module, transform, tokenizer, gallery: Path, captions: list[str]) -> np.ndarray:
    """The seed's loop: listdir order, batch size 1, numpy per item (on the model's device)."""
    dev = next(model.parameters()).device
    feats = []
    for name in os.listdir(gallery):
        image = Image.open(os.path.join(gallery, name))
        x = transform(image).unsqueeze(0).to(dev)
        with torch.no_grad():
            f = model.encode_image(x).float().cpu().numpy()
        feats.append(f / np.linalg.norm(f, axis=-1, keepdims=True))
    img = np.concatenate(feats)
    texts = []
    for c in captions:
        with torch.no_grad():
            t = model.encode_text(tokenizer([c]).to(dev)).float().cpu().numpy()
        texts.append(t / np.linalg.norm(t, axis=-1, keepdims=True))
    txt = np.concatenate(texts)
    return (img @ txt.T).T


def real_size_folder(root: Path, name: str) -> Path:
    """open_clip's own config `name` (ViT-B-16, ViT-B-16-SigLIP) with random weights as an open_clip folder; SigLIP
    gets the tests' word-level HF tokenizer (ids well inside its 32,000-token vocabulary)."""
    import open_clip
    from encoder_kit import SIGLIP_PREPROCESS, hf_word_tokenizer, write_open_clip_folder

    siglip = "SigLIP" in name
    preprocess = SIGLIP_PREPROCESS if siglip else None
    folder = write_open_clip_folder(root / name, open_clip.get_model_config(name), preprocess)
    if siglip:
        hf_word_tokenizer().save_pretrained(folder)
    return folder


def siglip_folder(root: Path) -> Path:
    """An open_clip SigLIP folder the size of SMALL_CFG: 112 px, patch 16, width 192 x 4; text 192 x 2, 64 tokens."""
    from encoder_kit import (
        SIGLIP_PREPROCESS,
        hf_word_tokenizer,
        open_clip_siglip_cfg,
        register_siglip_tower,
        word_vocab,
        write_open_clip_folder,
    )

    register_siglip_tower("bench_vit_siglip_small", img_size=112, patch_size=16, embed_dim=192, depth=4, num_heads=3)
    cfg = open_clip_siglip_cfg(len(word_vocab()), "bench_vit_siglip_small", width=192, image_size=112, layers=2)
    folder = write_open_clip_folder(root / "siglip", cfg, SIGLIP_PREPROCESS)
    hf_word_tokenizer().save_pretrained(folder)
    return folder


def siglip_loop(model, gallery: Path, captions: list[str]) -> np.ndarray:
    """One image / caption at a time through open_clip (transform, HF tokenizer, encode), numpy per item."""
    return seed_approach(model.clip, model.transform, model.tokenizer, gallery, captions)


def vlm_loop(model, gallery: Path, captions: list[str]) -> np.ndarray:
    """GME's recipe with batch size 1: processor on one prompt (+ image), backbone forward, last token, numpy."""
    proc, net = model.processor, model.model

    def embed(text: str, image=None) -> np.ndarray:
        inputs = proc(text=[text], images=None if image is None else [image], return_tensors="pt").to(net.device)
        with torch.no_grad():
            f = net(**inputs).last_hidden_state[:, -1].float().cpu().numpy()
        return f / np.linalg.norm(f, axis=-1, keepdims=True)

    img = np.concatenate(
        [embed(model.image_prompt, Image.open(gallery / n).convert("RGB")) for n in os.listdir(gallery)]
    )
    q = model.settings["query_instruction"]
    txt = np.concatenate([embed(model.prompt(q, c)) for c in captions])
    return (img @ txt.T).T


REAL_SIZE = {"clip-b16": "ViT-B-16", "siglip-b16": "ViT-B-16-SigLIP"}


def build(path: str, root: Path):
    """(model, one-at-a-time loop) of a benchmark path."""
    if path == "siglip":
        return load_model("clip", siglip_folder(root)), siglip_loop
    if path in REAL_SIZE:
        return load_model("clip", real_size_folder(root, REAL_SIZE[path])), siglip_loop
    if path == "vlm-embed":
        from encoder_kit import write_qwen2_vl_folder

        folder = write_qwen2_vl_folder(root / "qwen2_vl")
        return load_model("vlm-embed", folder, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64), vlm_loop
    torch.manual_seed(0)
    ckpt = root / "small_clip.pt"
    torch.save(build_open_clip(SMALL_CFG).state_dict(), ckpt)
    model = load_model("clip", ckpt, {"model_cfg": SMALL_CFG})
    return model, lambda m, g, c: seed_approach(m.clip, m.transform, m.tokenizer, g, c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", choices=("clip", "siglip", "vlm-embed", *REAL_SIZE), default="clip")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=default_num_workers())
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="the engine's (loop: fp32)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where both the loop and the engine run")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gallery, queries = make_data(root, args.images, args.queries)
        model, loop = build(args.path, root)
        from tpas.data.pab import read_queries

        captions = [q.caption for q in read_queries(queries)]

        # Warm-up both paths on a few items (first-call allocations, lazy imports).
        model.to(args.device)
        loop(model, gallery, captions[:2])
        t = time.perf_counter()
        seed = loop(model, gallery, captions)
        t_seed = time.perf_counter() - t

        t = time.perf_counter()
        sims = infer(model, gallery, queries, root / "engine.pt", batch_size=args.batch_size, num_workers=args.workers,
                     use_cache=False, device=args.device, precision=args.precision)  # fmt: skip
        t_engine = time.perf_counter() - t
        t = time.perf_counter()
        infer(model, gallery, queries, root / "warm.pt", batch_size=args.batch_size, num_workers=args.workers,
              cache_dir=root / "cache", device=args.device, precision=args.precision)  # fmt: skip
        t_cold_cached = time.perf_counter() - t
        t = time.perf_counter()
        infer(model, gallery, queries, root / "warm.pt", batch_size=args.batch_size, num_workers=args.workers,
              cache_dir=root / "cache", device=args.device, precision=args.precision)  # fmt: skip
        t_warm = time.perf_counter() - t

        # Same numbers once the seed's listdir columns are put in id order.
        order = [sims.gallery_ids.index(Path(n).stem) for n in os.listdir(gallery)]
        diff = float(np.abs(sims.scores.numpy()[:, order] - seed).max())

    n = args.images
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"machine: {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"path {args.path}: {model.describe().get('arch', model.family)}, {n} images 128x256 JPEG, "
        f"{args.queries} queries"
    )
    print(f"seed approach : {t_seed:7.2f} s  {n / t_seed:8.1f} images/s (batch 1, listdir, numpy per item)")
    print(f"tpas engine   : {t_engine:7.2f} s  {n / t_engine:8.1f} images/s "
          f"(batch {args.batch_size}, {args.workers} workers, {args.precision}, no cache)")  # fmt: skip
    print(f"ratio         : {t_seed / t_engine:7.2f}x")
    print(f"engine, cache being filled: {t_cold_cached:.2f} s; re-run from cache: {t_warm:.2f} s "
          f"({n / t_warm:.0f} images/s)")  # fmt: skip
    print(f"max |engine - seed| over the matrix: {diff:.2e}")


if __name__ == "__main__":
    main()
