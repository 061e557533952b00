"""The trainer's per-epoch evaluation, computed exactly as `tpas infer cmp` + `tpas evaluate` compute it.

It runs the engine's own building blocks (decoding and preprocessing, `encode_images` / `encode_texts` batches,
blocked `similarity`, the shared ITM re-rank with the stable tie rule, the family's `finalize_rerank`) on a gallery
held in memory, with the engine's column order (one column per image id, sorted), and scores with
`tpas.scoring.evaluate`: the numbers in the training log are the numbers the written checkpoint gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.images import pose_path
from ..data.pab import annotation_query_ids, ground_truth_from_records, read_test_annotation
from ..models.engine import encode_images_in_memory, encode_texts, similarity_matrix
from ..models.rerank import in_memory, rerank_topk
from ..runtime import Autocast
from ..scoring import evaluate
from ..sims import SimsMatrix


def evaluate_model(
    model: Any,
    annotation: Path,
    root: Path,
    device: torch.device,
    autocast: Autocast,
    *,
    batch_size: int = 64,
    rerank_k: int = 0,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Retrieval metrics of `model` (a CMP or X-VLM with its tokenizer set) on a test-format annotation under `root`.

    Images are `root/<image>`, pose maps `root/pose/<image>` (as `tpas infer --pose root/pose/...` finds them).
    `batch_size` is the engine's `--batch-size` (images, captions and re-rank pairs per forward).

    Returns {"itc": {R@1, R@5, R@10, mAP, mINP}} and, with rerank_k > 0, {"itm": ...} for the ITM re-ranked matrix
    (each query's top-k ITC candidates re-scored, then the family's `finalize_rerank`: CMP's final combination,
    X-VLM's -100 outside the top-k).
    """
    records = read_test_annotation(annotation)
    gt = ground_truth_from_records(records, annotation)
    first_image: dict[str, str] = {}
    for r in records:
        first_image.setdefault(r.gallery_id, r.image)
    gallery_ids = sorted(first_image)
    paths = [root / first_image[g] for g in gallery_ids]
    poses = [pose_path(p, root, root / "pose") for p in paths] if getattr(model.config, "pose", False) else None
    was_training = model.training
    model.eval()
    try:
        image = encode_images_in_memory(model, paths, poses, device, autocast, batch_size, num_workers)
        captions = [c for r in records for c in r.captions]
        text = encode_texts(model, captions, device, autocast, batch_size)
        itc = similarity_matrix(model, text["embed"], image["embed"], device)
        query_ids = annotation_query_ids(records)
        family = model.family
        out = {"itc": evaluate(SimsMatrix(query_ids, gallery_ids, scores=itc, source=f"{family}-itc"), gt).metrics()}
        if rerank_k:
            k = min(rerank_k, len(gallery_ids))
            reranked = rerank_topk(model, in_memory(image), text, itc, k, device, autocast, batch_size)
            final = model.finalize_rerank(reranked.filled, itc).float()
            final_sims = SimsMatrix(query_ids, gallery_ids, scores=final, source=f"{family}-itm")
            out["itm"] = evaluate(final_sims, gt).metrics()
        return out
    finally:
        model.train(was_training)
