"""BEiT-3 throughput: tpas batched encoding vs the seed's one-at-a-time loop (lhp_2/beit3/inference.py).

The seed opens each gallery image, transforms it with torchvision, and calls the model on a batch of one under
`torch.no_grad`; then the same for every caption. tpas encodes batches under `torch.inference_mode` (and, through
`tpas infer`, decodes in DataLoader workers and caches features). Both run the same randomly initialised full-size
model here, so the script also checks that the two give the same similarity matrix.

    .venv/bin/python benchmarks/bench_beit3.py                       # base-224, 48 images, 96 captions
    .venv/bin/python benchmarks/bench_beit3.py --variant large_384 --images 8 --captions 16
"""

from __future__ import annotations

import argparse
import io
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from tpas.models import load_model
from tpas.models.beit3 import BEiT3Config, BEiT3Retrieval, BEiT3Tokenizer

VARIANTS = {
    "base_224": BEiT3Config(img_size=224, embed_dim=768, layers=12, heads=12, ffn_dim=3072),
    "large_384": BEiT3Config(),
}
VOCABULARY = (
    "a man woman person in red blue black jacket shirt is walking running falling fighting near the door street"
)
WORDS = VOCABULARY.split()


def make_tokenizer(folder: Path) -> BEiT3Tokenizer:
    """A small sentencepiece model (the real beit3.spm is not needed for timing: captions stay 64 ids either way)."""
    import sentencepiece

    sentences = [" ".join(random.choices(WORDS, k=14)) + "." for _ in range(400)]
    path = folder / "bench.spm"
    with open(path, "wb") as fh:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=fh, vocab_size=80, hard_vocab_limit=False, minloglevel=2
        )
    return BEiT3Tokenizer(path)


def make_gallery(folder: Path, n: int) -> list[Path]:
    """n person-crop-shaped JPEGs (128 x 256) with random content."""
    paths = []
    for i in range(n):
        pixels = (torch.rand(256, 128, 3) * 255).to(torch.uint8).numpy()
        path = folder / f"{i:05d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def seed_loop(model: BEiT3Retrieval, paths: list[Path], captions: list[str]) -> tuple[torch.Tensor, float, float]:
    """The seed's approach: one image / one caption per forward, torchvision transform, no_grad."""
    from torchvision import transforms

    size = model.config.img_size
    transform = transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=3),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ]
    )
    t0 = time.perf_counter()
    image_feats = []
    for path in paths:
        with open(path, "rb") as fh:
            image = Image.open(fh).convert("RGB")
        with torch.no_grad():
            image_feats.append(model.encode_images({"image": transform(image).unsqueeze(0)})["embed"])
    t_images = time.perf_counter() - t0
    t0 = time.perf_counter()
    text_feats = []
    for caption in captions:
        with torch.no_grad():
            text_feats.append(model.encode_texts(model.tokenize([caption]))["embed"])
    t_texts = time.perf_counter() - t0
    return torch.cat(text_feats) @ torch.cat(image_feats).T, t_images, t_texts


def tpas_batched(
    model: BEiT3Retrieval, paths: list[Path], captions: list[str], batch_size: int
) -> tuple[torch.Tensor, float, float]:
    """tpas's library path: the model's own preprocess, batched encoding under inference_mode."""
    t0 = time.perf_counter()
    image_feats = []
    for s in range(0, len(paths), batch_size):
        batch = []
        for path in paths[s : s + batch_size]:
            with Image.open(path) as image:
                batch.append(model.preprocess(image)["image"])
        with torch.inference_mode():
            image_feats.append(model.encode_images({"image": torch.stack(batch)})["embed"])
    t_images = time.perf_counter() - t0
    t0 = time.perf_counter()
    text_feats = []
    for s in range(0, len(captions), batch_size):
        with torch.inference_mode():
            text_feats.append(model.encode_texts(model.tokenize(captions[s : s + batch_size]))["embed"])
    t_texts = time.perf_counter() - t0
    return torch.cat(text_feats) @ torch.cat(image_feats).T, t_images, t_texts


def tpas_engine(
    model: BEiT3Retrieval, folder: Path, captions: list[str], batch_size: int, workers: int
) -> tuple[torch.Tensor, float, float, float]:
    """The whole `tpas infer` engine (DataLoader decoding, no cache): (sims, images/s, captions/s, wall seconds)."""
    import json

    from tpas.models.engine import infer

    queries = folder / "query.json"
    queries.write_text(
        "".join(json.dumps({"query_index": str(i), "caption": c}) + "\n" for i, c in enumerate(captions))
    )
    rates: dict[str, float] = {}
    t0 = time.perf_counter()
    sims = infer(
        model,
        folder / "gallery",
        queries,
        folder / "engine.pt",
        batch_size=batch_size,
        num_workers=workers,
        device="cpu",
        use_cache=False,
        progress=lambda ev: rates.__setitem__(ev.stage, ev.rate),
    )
    return sims.to_dense(), rates["images"], rates["texts"], time.perf_counter() - t0


def main() -> None:
    """Run both paths on the same model and inputs; print rates, ratios and the largest score difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="base_224")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--captions", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=1, help="engine DataLoader workers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = make_tokenizer(folder)
        config = VARIANTS[args.variant]
        # Full size, random weights, saved in the official layout and loaded the way `tpas infer` loads it.
        torch.save({"model": BEiT3Retrieval(config).state_dict()}, folder / "random.pth")
        model = load_model("beit3", folder / "random.pth", tokenizer=tokenizer.path)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        (folder / "gallery").mkdir()
        paths = make_gallery(folder / "gallery", args.images)
        captions = [" ".join(random.choices(WORDS, k=random.randint(8, 30))) + "." for _ in range(args.captions)]
        # Warm-up (allocator, oneDNN kernels) so neither side pays first-call costs.
        tpas_batched(model, paths[:2], captions[:2], 2)
        seed_sims, seed_ti, seed_tt = seed_loop(model, paths, captions)
        t0 = time.perf_counter()
        ours_sims, ours_ti, ours_tt = tpas_batched(model, paths, captions, args.batch_size)
        ours_wall = time.perf_counter() - t0
        engine_sims, engine_ir, engine_tr, engine_wall = tpas_engine(
            model, folder, captions, args.batch_size, args.workers
        )

    diff = (seed_sims - ours_sims).abs().max().item()
    engine_diff = (seed_sims - engine_sims).abs().max().item()
    print(
        f"BEiT-3 {config.name} ({params:.0f}M params, random weights), CPU, {args.threads} threads, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(f"{args.images} images, {args.captions} captions, tpas batch size {args.batch_size}")
    rows = [
        ("images/s", args.images / seed_ti, args.images / ours_ti),
        ("captions/s", args.captions / seed_tt, args.captions / ours_tt),
    ]
    rows[0] += (engine_ir,)
    rows[1] += (engine_tr,)
    print(f"{'':12s}{'seed loop':>12s}{'tpas batched':>14s}{'ratio':>8s}{'tpas infer':>12s}{'ratio':>8s}")
    for name, seed, ours, engine in rows:
        print(f"{name:12s}{seed:12.2f}{ours:14.2f}{ours / seed:7.2f}x{engine:12.2f}{engine / seed:7.2f}x")
    seed_wall = seed_ti + seed_tt
    print(
        f"wall: seed {seed_wall:.1f} s, tpas batched {ours_wall:.1f} s ({seed_wall / ours_wall:.2f}x), "
        f"tpas infer engine {engine_wall:.1f} s ({seed_wall / engine_wall:.2f}x, {args.workers} decode worker(s))"
    )
    print(f"max |seed - tpas| similarity: batched {diff:.2e}, engine {engine_diff:.2e}")


if __name__ == "__main__":
    main()
