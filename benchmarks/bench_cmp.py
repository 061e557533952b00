"""CMP inference throughput on CPU: ITC + ITM re-rank, tpas's batched engine path vs the reference's per-query loop.

The seed approach (CMP's eval.py `evaluation_itm`) runs the cross encoder once per query on that query's top-k
(batch = k), fills the rest of a 1000.0-initialised matrix row by row, then min-max normalises. tpas's engine
(`tpas.models.rerank.rerank_topk`) gathers all (query, image) pairs of the top-k, orders them by image, runs them in
fixed-size batches across queries, and fills with one scatter; `CMP.finalize_rerank` applies the same final rule.
Both run the same model on the same features; the script checks their final matrices agree, then prints the ratio.

Run: .venv/bin/python benchmarks/bench_cmp.py [--queries 128 --gallery 256 --k 128 --batch 512 --threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from tpas.models.cmp import CMP, CMPConfig
from tpas.models.rerank import in_memory, rerank_topk


def small_config() -> CMPConfig:
    """CMPConfig.tiny() with the real vocabulary size: Swin embed 16 (1-1-2-1), 64 px, BERT width 128, 2+2 layers."""
    return CMPConfig.tiny(vocab_size=30522)


@torch.inference_mode()
def reference_loop(model: CMP, sims: torch.Tensor, img_tokens: torch.Tensor, states: torch.Tensor,
                   atts: torch.Tensor, k: int) -> torch.Tensor:  # fmt: skip
    """CMP eval.py evaluation_itm, single process: one cross-encoder pass of k pairs per query."""
    score = torch.full(sims.size(), 1000.0)
    for i, row in enumerate(sims):
        _, topk_idx = row.topk(k=k, dim=0)
        enc = img_tokens[topk_idx]
        cls = model.cross_cls(states[i].repeat(k, 1, 1), atts[i].repeat(k, 1), enc)
        score[i, topk_idx] = model.itm_logits(cls)[:, 1]
    min_values, _ = torch.min(score, dim=1)
    repl = min_values.view(-1, 1).expand(-1, score.size(1))
    for i in range(sims.size(0)):
        score[i][score[i] == 1000.0] = repl[i][score[i] == 1000.0]
    score = (score - score.min()) / (score.max() - score.min())
    itc = (sims - sims.min()) / (sims.max() - sims.min())
    return score + 0.002 * itc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--gallery", type=int, default=256)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--batch", type=int, default=512, help="pairs per forward in the engine path")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CMP(small_config()).eval()
    cfg = model.config
    q, g, k = args.queries, args.gallery, args.k

    with torch.inference_mode():
        t0 = time.perf_counter()
        imgs = torch.randn(g, 3, cfg.image_size, cfg.image_size)
        poses = torch.randn(g, 3, cfg.image_size, cfg.image_size)
        feats = [model.encode_images({"image": imgs[s : s + 64], "pose": poses[s : s + 64]}) for s in range(0, g, 64)]
        img_embed = torch.cat([f["embed"] for f in feats])
        img_tokens = torch.cat([f["tokens"] for f in feats])
        t_img = time.perf_counter() - t0
        ids = torch.randint(1000, 30000, (q, cfg.max_tokens))
        lens = torch.randint(8, cfg.max_tokens, (q,))
        atts = (torch.arange(cfg.max_tokens)[None] < lens[:, None]).long()
        ids = ids * atts
        t0 = time.perf_counter()
        text = model.encode_texts({"input_ids": ids, "attention_mask": atts})
        itc = model.similarity(text["embed"], img_embed)
        t_itc = time.perf_counter() - t0 + t_img

    t0 = time.perf_counter()
    ref = reference_loop(model, itc, img_tokens, text["states"], atts, k)
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    reranked = rerank_topk(model, in_memory({"tokens": img_tokens}), text, itc, k, torch.device("cpu"),
                           batch_size=args.batch)  # fmt: skip
    ours = model.finalize_rerank(reranked.filled, itc)
    t_ours = time.perf_counter() - t0

    # Same top-k sets (same ITC); scores agree to float rounding (tpas drops trailing [PAD] positions).
    diff = (ours - ref).abs().max().item()
    pairs = q * k
    print(f"config: Swin embed {cfg.swin_embed_dim} {cfg.swin_depths} @ {cfg.image_size}px, BERT {cfg.text_width}x"
          f"{cfg.text_layers}+{cfg.fusion_layers}; Q={q} G={g} k={k}; threads={args.threads}")  # fmt: skip
    print(f"ITC (encode {g} images+poses, {q} queries, sims): {t_itc:.2f} s")
    print(f"ITM re-rank, reference per-query loop: {t_ref:.2f} s = {pairs / t_ref:,.0f} pairs/s "
          f"({q / t_ref:,.1f} queries/s)")  # fmt: skip
    print(f"ITM re-rank, tpas engine (batch {args.batch}): {t_ours:.2f} s = {pairs / t_ours:,.0f} pairs/s "
          f"({q / t_ours:,.1f} queries/s)")  # fmt: skip
    print(f"speed-up (reference / tpas): {t_ref / t_ours:.2f}x; max |final difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
