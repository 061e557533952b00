"""BLIP-2 inference throughput on CPU: tpas's batched engine vs the seed script's one-item-at-a-time loop.

The seed (`blip/blip2_infer.py`) walks the gallery in `os.listdir` order and, per image, decodes, preprocesses and
runs `extract_features(mode="image")` on a batch of one, keeps query token 0 as a numpy vector, then does the same
per caption (`mode="text"`) and takes numpy dot products. tpas runs the same model through `tpas.models.engine.infer`
(DataLoader decoding, batched encoding, sorted ids). Both use `itc_score="first-token"` so the matrices must agree;
the script checks that, then prints images/s, captions/s and the ratio. It also reports ITM re-rank pairs/s.

The model is a small random BLIP-2 of the pretrain_vitL kind (CLIP-style ViT with ln_pre and QuickGELU, 224 px,
width 256, 4 blocks; Q-Former width 256, 4 layers, 32 queries, the real 30,523-token vocabulary).

Run: .venv/bin/python benchmarks/bench_blip2.py [--images 64 --captions 64 --batch 32 --workers 1 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import tpas.models  # noqa: F401  (torchvision workaround first)
from tpas.data.pab import Query
from tpas.models.blip2 import Blip2Model
from tpas.models.blip2_convert import default_vocab_path, load_tokenizer
from tpas.models.engine import infer


def small_model(itc_score: str) -> Blip2Model:
    """A random small pretrain_vitL-style BLIP-2 (see the module docstring)."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        qformer_config=dict(vocab_size=30523, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, use_qformer_text_input=True),
        num_query_tokens=32, image_text_hidden_size=256, image_token_index=None,
    )  # fmt: skip
    hf = Blip2ForImageTextRetrieval(config).eval()
    lavis = {"model_type": "pretrain_vitL", "ln_pre": True, "ln_pre_eps": 1e-5, "ln_vision_eps": 1e-5}
    return Blip2Model(hf, load_tokenizer(default_vocab_path()), lavis, itc_score=itc_score).eval()


def write_gallery(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (256, 128, 3), dtype=np.uint8)).save(root / f"img_{i:05d}.jpg")


def captions(n: int) -> list[str]:
    colours = ["red", "blue", "green", "black", "white", "yellow"]
    acts = ["walking", "running", "falling down", "fighting", "standing", "riding a bike"]
    return [
        f"A {'man' if i % 2 else 'woman'} in a {colours[i % 6]} coat and {colours[(i // 6) % 6]} trousers is "
        f"{acts[(i // 3) % 6]} near the entrance, carrying a bag."
        for i in range(n)
    ]


@torch.inference_mode()
def seed_loop(model: Blip2Model, gallery: Path, texts: list[str]) -> tuple[list[str], np.ndarray, float, float]:
    """blip2_infer.py's shape: one image / one caption per forward pass, os.listdir order, numpy per item."""
    t0 = time.perf_counter()
    names, image_vecs = [], []
    for name in os.listdir(gallery):
        image = Image.open(gallery / name).convert("RGB")
        pixels = model.preprocess(image)["pixel_values"].unsqueeze(0)
        embed = model.encode_images({"pixel_values": pixels})["embed"]
        image_vecs.append(embed.squeeze(0)[0].numpy())
        names.append(Path(name).stem)
    t_images = time.perf_counter() - t0
    t0 = time.perf_counter()
    text_vecs = [model.encode_texts(model.tokenize([c]))["embed"][0].numpy() for c in texts]
    sims = np.stack([[float(np.dot(t, v)) for v in image_vecs] for t in text_vecs])
    return names, sims, t_images, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--captions", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rerank-k", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = small_model("first-token")
    texts = captions(args.captions)
    queries = [Query(str(i), c) for i, c in enumerate(texts)]
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Path(tmp) / "gallery"
        gallery.mkdir()
        write_gallery(gallery, args.images)
        names, seed_sims, seed_img_s, seed_txt_s = seed_loop(model, gallery, texts)

        events: dict[str, float] = {}

        def progress(ev) -> None:  # the engine's own items/s per stage
            events[ev.stage] = ev.rate

        t0 = time.perf_counter()
        sims = infer(model, gallery, queries, Path(tmp) / "itc.pt", batch_size=args.batch,
                     num_workers=args.workers, device="cpu", use_cache=False, progress=progress)  # fmt: skip
        engine_s = time.perf_counter() - t0
        order = [names.index(g) for g in sims.gallery_ids]
        diff = float(np.abs(sims.to_dense().numpy() - seed_sims[:, order]).max())
        assert diff < 1e-4, f"engine and seed loop disagree by {diff}"

        model.itc_score = "max"
        t0 = time.perf_counter()
        infer(model, gallery, queries, Path(tmp) / "itm.pt", rerank_k=args.rerank_k, batch_size=args.batch,
              num_workers=args.workers, device="cpu", use_cache=False, progress=progress)  # fmt: skip
        rerank_s = time.perf_counter() - t0

    seed_total = seed_img_s + seed_txt_s
    print(f"small BLIP-2 (pretrain_vitL-style, 224 px), {args.images} images x {args.captions} captions, "
          f"{args.threads} threads, batch {args.batch}, {args.workers} worker(s); max |diff| {diff:.1e}")  # fmt: skip
    print(f"seed loop : images {args.images / seed_img_s:7.1f}/s  captions {args.captions / seed_txt_s:7.1f}/s  "
          f"total {seed_total:6.2f} s")  # fmt: skip
    print(f"tpas      : images {events.get('images', float('nan')):7.1f}/s  "
          f"captions {events.get('texts', float('nan')):7.1f}/s  total {engine_s:6.2f} s")  # fmt: skip
    print(f"ratio (seed total / tpas total): {seed_total / engine_s:.2f}x")
    print(f"ITM re-rank k={args.rerank_k}: {events.get('rerank', float('nan')):.1f} pairs/s "
          f"(whole run with re-rank {rerank_s:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
