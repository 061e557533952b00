"""The pair re-ranking run: candidates -> (query, image) pairs -> cached, sharded, batched VLM scores -> top-K file.

Pairs are the top-`rerank_k` of each query in `--candidates` (stable tie rule: equal scores keep gallery order),
ordered by image, so each distinct image is decoded and preprocessed once (DataLoader workers) and held only while
its pairs are being scored. Every scored batch is written to a score store on disk, keyed by the model folder's and
adapter's sha256, the score mode + prompt + answer tokens, the image settings and precision (the store's key) and,
per pair, the caption text and the image's path/mtime/size (the item key): a killed run re-scores only the pairs
that are missing, in the same batches, and ends with the identical matrix. Under torchrun each rank scores a
contiguous shard of the image-ordered pair list into the shared store; rank 0 writes the output.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...data.images import GalleryDataset, gallery_loader
from ...data.pab import Query, list_gallery, read_queries
from ...errors import TpasInputError
from ...ranking import topk_stable
from ...resources import out_of_memory_hint
from ...runtime import Distributed, distributed, precision_policy, resolve_device
from ...sims import SimsMatrix
from ..cache import FeatureStore, cached_sha256, default_cache_dir, item_key
from ..engine import InferProgress, ProgressFn, _loader_iter, default_num_workers, private_store
from .batching import (
    Features,
    PromptTokens,
    assemble,
    check_assembly,
    collate,
    reference_inputs,
    tokenize_prompt,
)
from .prompts import render

if TYPE_CHECKING:
    from .family import VLMReranker


@dataclass(frozen=True)
class Pair:
    """One (query row, gallery column) pair and its score-cache item key."""

    key: str
    row: int
    col: int


def candidate_columns(
    candidates: str | Path | SimsMatrix, query_ids: list[str], gallery_ids: list[str], k: int
) -> torch.Tensor:
    """Gallery columns [Q, k] of each query's top-k in `candidates`, best first, ties in gallery order."""
    where = candidates if isinstance(candidates, (str, Path)) else None
    m = candidates if isinstance(candidates, SimsMatrix) else SimsMatrix.load(candidates)
    if k > len(gallery_ids):
        raise TpasInputError(f"--rerank-k {k} is larger than the gallery ({len(gallery_ids)} images)")
    if not m.is_dense and (m.k or 0) < k:
        raise TpasInputError(f"--candidates keeps only the top-{m.k} per query; --rerank-k {k} needs {k}", where)
    rows = set(m.query_ids)
    missing = next((q for q in query_ids if q not in rows), None)
    if missing is not None:
        raise TpasInputError(f"--candidates has no row for query {missing!r}", where)
    cols = set(m.gallery_ids)
    missing = next((g for g in gallery_ids if g not in cols), None)
    if missing is not None:
        raise TpasInputError(f"--candidates has no column for gallery image {missing!r}", where)
    if m.is_dense:
        return topk_stable(m.select(query_ids, gallery_ids).scores, k)
    m = m.select(query_ids)
    pos = {g: i for i, g in enumerate(gallery_ids)}
    remap = torch.tensor([pos.get(g, -1) for g in m.gallery_ids], dtype=torch.long)
    indices = remap[m.indices.long()]
    if (indices < 0).any():
        r, j = (indices < 0).nonzero()[0].tolist()
        raise TpasInputError(
            f"candidate {m.gallery_ids[int(m.indices[r, j])]!r} of query {query_ids[r]!r} is not in the gallery", where
        )
    ours = SimsMatrix(query_ids, gallery_ids, indices=indices, values=m.values)
    return ours.top_k(k).indices.long()


def caption_digest(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:24]


def _pairs(qs: Sequence[Query], paths: list[Path], top: torch.Tensor) -> tuple[list[Pair], list[list[str]]]:
    """The unique pairs ordered by image then query (a repeated caption's pairs are scored once), and the item key
    of every cell of `top`."""
    image_keys: dict[int, str] = {}
    try:
        for c in top.unique().tolist():
            image_keys[c] = item_key(paths[c])
    except FileNotFoundError as e:
        raise TpasInputError("candidate image not found (vanished from the gallery?)", e.filename) from None
    seen: dict[str, Pair] = {}
    cells = []
    for r, cols in enumerate(top.tolist()):
        digest = caption_digest(qs[r].caption)
        cells.append([f"{digest}|{image_keys[c]}" for c in cols])
        for c, key in zip(cols, cells[-1], strict=True):
            seen.setdefault(key, Pair(key, r, c))
    return sorted(seen.values(), key=lambda p: (p.col, p.row)), cells


def _check_args(rerank_k: int | None, candidates: Any, batch_size: int, pose_dir: Any, skip_bad: bool) -> int:
    if candidates is None or rerank_k is None:
        raise TpasInputError("vlm re-ranks candidates: pass --candidates SIMS and --rerank-k K")
    if rerank_k < 1:
        raise TpasInputError(f"--rerank-k must be >= 1, got {rerank_k}")
    if batch_size < 1:
        raise TpasInputError(f"--batch-size must be >= 1, got {batch_size}")
    if pose_dir is not None:
        raise TpasInputError("--pose does not apply to vlm")
    if skip_bad:
        raise TpasInputError("--skip-bad-images does not apply to vlm: every candidate must be scored")
    return rerank_k


@dataclass
class Run:
    """What every score mode's run shares: the queries, gallery, candidate columns, device, model and score store."""

    model: VLMReranker
    qs: list[Query]
    query_ids: list[str]
    gallery_ids: list[str]
    paths: list[Path]
    top: torch.Tensor  # [Q, k] candidate columns in first-stage order
    dist: Distributed
    dev: torch.device
    dtype: torch.dtype
    net: torch.nn.Module
    store: FeatureStore
    sha: str
    adapter_sha: str | None
    batch_size: int
    num_workers: int
    progress: ProgressFn | None

    def load_images(self, cols: Sequence[int]) -> Iterator[tuple[int, Features]]:
        """(column, segment) of each of `cols` in that order, preprocessed in DataLoader workers."""
        loader = gallery_loader(
            GalleryDataset([self.paths[c] for c in cols], self.model.image_preprocessor), 1, self.num_workers
        )
        with _loader_iter(loader) as images:
            for c, item in zip(cols, images, strict=True):
                for _, msg in item.errors:
                    path, _, what = msg.partition(": ")
                    raise TpasInputError(f"{what}; fix or replace this candidate image", path)
                yield c, {name: v[0] for name, v in item.features.items()}

    def inputs(self, rows: list[tuple[Features, Features]]) -> Features:
        """One left-padded batch on the device, pixels in the model's dtype."""
        tok = self.model.processor.tokenizer
        pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        return {name: _to(v, self.dev, self.dtype) for name, v in collate(rows, pad_id).items()}


def rerank_candidates(
    model: VLMReranker,
    images_dir: str | Path,
    queries: str | Path | Sequence[Query],
    out: str | Path,
    *,
    rerank_k: int | None = None,
    candidates: str | Path | SimsMatrix | None = None,
    batch_size: int = 16,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    pose_dir: str | Path | None = None,
    skip_bad_images: bool = False,
) -> SimsMatrix:
    """Re-rank each query's top-`rerank_k` candidates with the VLM in its score mode (pointwise scores, pairwise
    pivot-promote or cloze); write and return a top-K SimsMatrix (higher = better). Arguments as
    `tpas.models.engine.infer`; `batch_size` counts pairs (pairwise: comparisons) per forward pass."""
    out = Path(out)
    if out.is_dir():
        raise TpasInputError("--out must be a file path, not a folder", out)
    k = _check_args(rerank_k, candidates, batch_size, pose_dir, skip_bad_images)
    gallery = list_gallery(images_dir)
    qs = list(queries) if not isinstance(queries, (str, Path)) else read_queries(queries)
    if not qs:
        raise TpasInputError("no queries given")
    query_ids, gallery_ids = [q.id for q in qs], [g.id for g in gallery]
    top = candidate_columns(candidates, query_ids, gallery_ids, k)
    paths = [g.path for g in gallery]

    dev = resolve_device(device)
    dtype = precision_policy(dev, precision, cpu_bf16=True).dtype  # checked for the device; weights load in it
    with distributed(dev) as dist, out_of_memory_hint(batch_size, dev):
        tmp_store: Path | None = None
        try:
            root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            memo = root if use_cache else None
            sha = cached_sha256(model.folder, memo)
            adapter_sha = cached_sha256(model.adapter, memo) if model.adapter is not None else None
            net = model.network(dev, dtype)  # an adapter for another base model fails here, before anything is written
            if not use_cache:
                tmp_store = Path(dist.broadcast(str(private_store(out)) if dist.rank == 0 else None))
                root = tmp_store
            key = {
                "family": "vlm",
                "checkpoint_sha256": sha,
                "adapter_sha256": adapter_sha,
                "model": model.describe(),
                "precision": precision,
                "device_type": dev.type,
            }
            store = FeatureStore(root, key)
            store.scan()
            workers = default_num_workers() if num_workers is None else num_workers
            run = Run(model, qs, query_ids, gallery_ids, paths, top, dist, dev, dtype, net, store, sha, adapter_sha,
                      batch_size, workers, progress)  # fmt: skip
            indices, values, extra = _rerank(run)
            meta = {**_meta(run, precision, images_dir, queries, candidates, k), **extra}
            result = SimsMatrix(query_ids, gallery_ids, indices=indices, values=values, source="vlm", meta=meta)
            if dist.rank == 0:
                result.save(out)
            dist.barrier()
            return result
        finally:
            if tmp_store is not None and dist.rank == 0:
                shutil.rmtree(tmp_store, ignore_errors=True)


def _rerank(run: Run) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(indices, values, extra meta) of the run's score mode."""
    if run.model.score == "pairwise":
        from .pairwise_run import rerank_pairwise

        return rerank_pairwise(run)
    if run.model.score == "cloze":
        from .cloze_run import rerank_cloze

        return rerank_cloze(run)
    pairs, cells = _pairs(run.qs, run.paths, run.top)
    texts = {p.row: run.qs[p.row].caption for p in pairs}

    def score(batch: Features) -> dict[str, torch.Tensor]:
        return {"score": run.model.score_batch(run.net, batch).float().cpu()}

    score_pairs(run, pairs, texts, score)
    by_key = dict(zip((p.key for p in pairs), run.store.load([p.key for p in pairs], ["score"])["score"].tolist(),
                      strict=True))  # fmt: skip
    values = torch.tensor([[by_key[key] for key in row] for row in cells], dtype=torch.float32)
    return run.top, values, {}


def score_pairs(
    run: Run, pairs: list[Pair], texts: dict[int, str], step: Callable[[Features], dict[str, torch.Tensor]]
) -> None:
    """Run `step` over this rank's share of the (image-ordered) `pairs` that the store lacks, in batches of
    `batch_size` one-image rows whose prompt holds `texts[row]`, writing each batch's outputs to the store; then
    wait for the other ranks and re-read the store."""
    mine = [pairs[i] for i in run.dist.shard(len(pairs))]
    todo = [p for p in mine if not run.store.has(p.key)]
    _score(run, todo, len(mine), texts, step)
    run.dist.barrier()
    run.store.scan()  # other ranks' chunks


def _score(
    run: Run, todo: list[Pair], total: int, texts: dict[int, str], step: Callable[[Features], dict[str, torch.Tensor]]
) -> None:
    cached = total - len(todo)
    if run.progress:
        run.progress(InferProgress("rerank", cached, total, 0.0, cached))
    if not todo:
        return
    model, processor = run.model, run.model.processor
    rendered = {r: render(processor, model.prompt.messages(texts[r])) for r in {p.row for p in todo}}
    prompts: dict[int, PromptTokens] = {
        r: tokenize_prompt(processor, t, model.placeholder) for r, t in rendered.items()
    }
    cols = list(dict.fromkeys(p.col for p in todo))  # distinct images in the order their pairs come
    with closing(run.load_images(cols)) as images:
        _score_batches(run, todo, total, cached, rendered, prompts, images, step)


def _score_batches(
    run: Run,
    todo: list[Pair],
    total: int,
    cached: int,
    rendered: dict[int, str],
    prompts: dict[int, PromptTokens],
    images: Iterator[tuple[int, Features]],
    step: Callable[[Features], dict[str, torch.Tensor]],
) -> None:
    processor = run.model.processor
    last_use = {p.col: i for i, p in enumerate(todo)}
    held: dict[int, Features] = {}
    t0, done = time.perf_counter(), cached
    for start in range(0, len(todo), run.batch_size):
        batch = todo[start : start + run.batch_size]
        while any(p.col not in held for p in batch):
            c, segment = next(images)
            held[c] = segment
        assembled = [assemble(prompts[p.row], [held[p.col]]) for p in batch]
        if start == 0:
            ref = reference_inputs(processor, rendered[batch[0].row], [run.paths[batch[0].col]])
            check_assembly(processor, ref, assembled[0])
        inputs = run.inputs(assembled)
        with torch.inference_mode():
            outputs = step(inputs)
        run.store.write_chunk([p.key for p in batch], outputs)
        for c in {p.col for p in batch}:
            if last_use[c] < start + run.batch_size:
                del held[c]
        done += len(batch)
        if run.progress:
            rate = (done - cached) / max(time.perf_counter() - t0, 1e-9)
            run.progress(InferProgress("rerank", done, total, rate, cached))


def _to(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """On the device; floating tensors (pixels) in the model's dtype."""
    return t.to(dev, dtype=dtype) if t.is_floating_point() else t.to(dev)


def _meta(run: Run, precision: str, images: Any, queries: Any, candidates: Any, k: int) -> dict[str, Any]:
    """The output's meta: what scored it and from which candidates."""
    model = run.model
    return {
        "family": "vlm",
        "checkpoint": str(model.folder),
        "checkpoint_sha256": run.sha,
        "adapter": str(model.adapter) if model.adapter is not None else None,
        "adapter_sha256": run.adapter_sha,
        "model": model.describe(),
        "score": model.score,
        "precision": precision,
        "device": run.dev.type,
        "images": str(images),
        "queries": str(queries) if isinstance(queries, (str, Path)) else "",
        "candidates": str(candidates) if isinstance(candidates, (str, Path)) else candidates.source,
        "rerank_k": k,
        "fill": "unscored",
        "world_size": run.dist.world,
    }
