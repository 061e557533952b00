"""Inference engine vs the seed scripts' approach, same small CLIP, CPU.

Seed approach (clip_infer.py): `os.listdir` order, one image at a time (decode, transform, encode with batch size 1),
features to numpy per item, L2-normalised in numpy; captions encoded one at a time; sims = (img @ txt.T).T.
Engine: `tpas.models.engine.infer` with DataLoader workers, batched inference_mode encoding, feature store (a cold
run, `use_cache=False`, is what is compared; a warm re-run from the cache is printed as well).

Run: .venv/bin/python benchmarks/bench_infer.py [--images 256] [--queries 64] [--batch-size 32] [--workers N]
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
    """The seed's loop: listdir order, batch size 1, numpy per item."""
    feats = []
    for name in os.listdir(gallery):
        image = Image.open(os.path.join(gallery, name))
        x = transform(image).unsqueeze(0)
        with torch.no_grad():
            f = model.encode_image(x).float().cpu().numpy()
        feats.append(f / np.linalg.norm(f, axis=-1, keepdims=True))
    img = np.concatenate(feats)
    texts = []
    for c in captions:
        with torch.no_grad():
            t = model.encode_text(tokenizer([c])).float().cpu().numpy()
        texts.append(t / np.linalg.norm(t, axis=-1, keepdims=True))
    txt = np.concatenate(texts)
    return (img @ txt.T).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=default_num_workers())
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gallery, queries = make_data(root, args.images, args.queries)
        torch.manual_seed(0)
        ckpt = root / "small_clip.pt"
        torch.save(build_open_clip(SMALL_CFG).state_dict(), ckpt)
        model = load_model("clip", ckpt, {"model_cfg": SMALL_CFG})
        from tpas.data.pab import read_queries

        captions = [q.caption for q in read_queries(queries)]

        # Warm-up both paths on a few items (first-call allocations, lazy imports).
        seed_approach(model.clip, model.transform, model.tokenizer, gallery, captions[:2])
        t = time.perf_counter()
        seed = seed_approach(model.clip, model.transform, model.tokenizer, gallery, captions)
        t_seed = time.perf_counter() - t

        t = time.perf_counter()
        sims = infer(model, gallery, queries, root / "engine.pt", batch_size=args.batch_size,
                     num_workers=args.workers, use_cache=False, device="cpu")  # fmt: skip
        t_engine = time.perf_counter() - t
        t = time.perf_counter()
        infer(model, gallery, queries, root / "warm.pt", batch_size=args.batch_size, num_workers=args.workers,
              cache_dir=root / "cache", device="cpu")  # fmt: skip
        t_cold_cached = time.perf_counter() - t
        t = time.perf_counter()
        infer(model, gallery, queries, root / "warm.pt", batch_size=args.batch_size, num_workers=args.workers,
              cache_dir=root / "cache", device="cpu")  # fmt: skip
        t_warm = time.perf_counter() - t

        # Same numbers once the seed's listdir columns are put in id order.
        order = [sims.gallery_ids.index(Path(n).stem) for n in os.listdir(gallery)]
        diff = float(np.abs(sims.scores.numpy()[:, order] - seed).max())

    n = args.images
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"small CLIP {SMALL_CFG['vision_cfg']}, {n} images 128x256 JPEG, {args.queries} queries")
    print(f"seed approach : {t_seed:7.2f} s  {n / t_seed:8.1f} images/s (batch 1, listdir, numpy per item)")
    print(f"tpas engine   : {t_engine:7.2f} s  {n / t_engine:8.1f} images/s "
          f"(batch {args.batch_size}, {args.workers} workers, no cache)")  # fmt: skip
    print(f"ratio         : {t_seed / t_engine:7.2f}x")
    print(f"engine, cache being filled: {t_cold_cached:.2f} s; re-run from cache: {t_warm:.2f} s "
          f"({n / t_warm:.0f} images/s)")  # fmt: skip
    print(f"max |engine - seed| over the matrix: {diff:.2e}")


if __name__ == "__main__":
    main()
