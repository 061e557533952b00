"""The one inference engine: any registered model family -> a SimsMatrix file.

`infer` lists the gallery (sorted ids), decodes and preprocesses images in DataLoader workers with the family's own
`preprocess` (batched there by its `image_collate` when items differ in size), encodes them in batches under
`torch.inference_mode` (autocast fp16/bf16 on CUDA; bf16 weights on a CPU with native bf16), and writes every
encoded batch to a feature store on disk, so a killed run resumes where it stopped. Texts are tokenized and encoded
in batches; the first-stage matrix is `model.similarity(text, image)`. Families with a matching head can re-rank each
query's top-k (by their own ITC, or by another model's matrix) with `model.match`, in batches of (query, image) pairs
gathered across queries; the per-image states `match` needs stay in the store on disk and are read back only for the
images a batch uses, so a 36,773-image gallery never has to sit in memory as cross-attention states.

Under `torchrun --nproc_per_node N`, each rank encodes a contiguous shard of the gallery into the shared store and a
shard of the queries, computes (and re-ranks) its own query rows against the full gallery, and rank 0 gathers the rows
and writes the files. Device, precision and the process group come from `tpas.runtime`; the re-rank itself is
`tpas.models.rerank`. The building blocks (`encode_image_batch`, `encode_images_in_memory`, `encode_texts`,
`similarity_matrix`) are public so the trainer's evaluation computes its numbers with this very code.

Feature contract: `encode_images`/`encode_texts` return `embed` (what `similarity` consumes) plus any states `match`
needs; `match` receives, per pair, the image's features (all keys, from the store) and the
text's `tokenize` output merged with its `encode_texts` output (the latter wins on a shared key).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.images import GalleryDataset, bad_image_error, gallery_loader, pose_path
from ..data.pab import Query, list_gallery, read_queries
from ..errors import TpasInputError
from ..resources import check_dense_fits, out_of_memory_hint
from ..runtime import Autocast, Distributed, distributed, precision_policy, resolve_device
from ..sims import STORAGE_DTYPES, SimsMatrix
from ..topk import topk_similarity
from .base import Features, RetrievalModel
from .cache import FeatureStore, cached_sha256, default_cache_dir, item_key
from .rerank import Reranked, final_on_kept, load_candidates, match_candidates, rerank_topk, to_device

# Elements of one [Q, G-block, ...] similarity intermediate; bounds memory for token-level (BLIP-2) similarity.
_SIM_BLOCK_ELEMS = 1 << 27


@dataclass(frozen=True)
class InferProgress:
    """One progress report. `stage` is "images", "texts" or "rerank"; `done`/`total` count items (images, queries
    or (query, image) pairs) including those taken from the cache (`cached`); `rate` is items/s over the items
    this run actually computed."""

    stage: str
    done: int
    total: int
    rate: float
    cached: int = 0


ProgressFn = Callable[[InferProgress], None]


def default_num_workers() -> int:
    """DataLoader workers: one per CPU core but one, at most 8 (decoding rarely needs more to keep a GPU busy)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def itc_path_for(out: Path) -> Path:
    """Where a re-ranked run writes its first-stage matrix: `<out stem>.itc.pt` beside `out`."""
    return out.with_name(f"{out.stem}.itc.pt")


def itm_path_for(out: Path) -> Path:
    """Where a re-ranked run writes the raw match scores of each query's top-k (top-K form): `<out stem>.itm.pt`.

    `--out` holds the family's final combination (CMP: global min-max + 0.002 x ITC); fusions that want the match
    scores alone, as the WWW'25 ensemble does, read this file instead.
    """
    return out.with_name(f"{out.stem}.itm.pt")


def model_fingerprint(model: RetrievalModel, cache_root: Path | None) -> str:
    """sha256 of the model's checkpoint file (set by `load_model`), or of its weights when it has none."""
    path = getattr(model, "checkpoint_path", None)
    if path is not None and Path(path).exists():
        return cached_sha256(Path(path), cache_root)
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_cpu(feats: Features) -> Features:
    """Detach to CPU; `embed` becomes float32 (scores are computed in fp32 whatever the encode precision)."""
    out = {}
    for k, v in feats.items():
        v = v.detach().to("cpu")
        out[k] = v.float() if k == "embed" and v.is_floating_point() else v
    return out


def _cat_padded(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; right-pad later dims with zeros when batches differ (e.g. pad-to-longest tokens)."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
    fixed = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            pad: list[int] = []
            for d in reversed(range(1, p.ndim)):
                pad += [0, shape[d - 1] - p.shape[d]]
            p = torch.nn.functional.pad(p, pad)
        fixed.append(p)
    return torch.cat(fixed)


@contextlib.contextmanager
def _loader_iter(loader: torch.utils.data.DataLoader[Any]) -> Iterator[Any]:
    """Iterate a DataLoader and stop its worker processes as soon as we leave, also on an exception (otherwise a
    traceback kept alive by the caller keeps the workers alive too)."""
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# ---------------------------------------------------------------------------------------------- the engine
_OWNER = "owner.txt"


def private_store(out: Path) -> Path:
    """A new `--no-cache` feature store `.<out name>.features-*` beside `out`, marked with its owner (host, pid).

    A run killed hard (SIGKILL, SIGTERM, a lost node) cannot remove its store; such leftovers of `out` are removed
    here first: those of this host whose owner process no longer exists. Stores of live or other-host runs stay.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.features-"
    host = os.uname().nodename
    for old in out.parent.glob(prefix + "*"):
        try:
            owner_host, pid = (old / _OWNER).read_text(encoding="utf-8").split()
            if owner_host == host and not _process_exists(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        except (OSError, ValueError):
            continue  # no readable owner (being created, or not ours): leave it
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    (path / _OWNER).write_text(f"{host} {os.getpid()}", encoding="utf-8")
    return path


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@dataclass(frozen=True)
class _Run:
    """What every step of one `infer` run shares."""

    model: RetrievalModel
    dev: torch.device
    autocast: Autocast
    batch_size: int
    progress: ProgressFn | None
    dist: Distributed


def infer(
    model: RetrievalModel,
    images_dir: str | Path,
    queries: str | Path | Sequence[Query],
    out: str | Path,
    *,
    pose_dir: str | Path | None = None,
    rerank_k: int | None = None,
    candidates: str | Path | SimsMatrix | None = None,
    keep_top: int | None = None,
    dtype: str | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    skip_bad_images: bool = False,
    progress: ProgressFn | None = None,
) -> SimsMatrix:
    """Score every query against every gallery image and write the SimsMatrix to `out`.

    Args:
        model: a loaded family (`tpas.models.load_model`).
        images_dir: gallery folder; ids are file stems, columns sorted by id.
        queries: a query file in any PAB format (`tpas.data.pab.read_queries`) or a list of `Query`.
        out: output `.pt` path; with `rerank_k`, the ITC matrix also goes to `<out stem>.itc.pt`.
        pose_dir: pose maps (same relative paths as the images) for pose-aware models (`model.needs_pose`).
        rerank_k: re-rank each query's top-k with the model's matching head.
        candidates: take each query's top-k from this matrix (another model's) instead of the model's own ITC.
        keep_top: write each query's top-K only (`tpas.topk`: gallery blocks, never the dense [Q, G]; exactly the
            dense matrix's top-K under the stable tie rule). With `rerank_k` (<= keep_top) each query's top-k of
            that top-K is re-ranked; every written matrix is then top-K (`final_on_kept`).
        dtype: score storage of the written files, "fp32" or "fp16" (`SimsMatrix.save`; recorded in meta as
            `dtype`); default: float32. The returned matrix keeps the float32 scores.
        batch_size: images / captions / (query, image) pairs per forward pass.
        num_workers: DataLoader worker processes for decoding (None: `default_num_workers()`; 0: in-process).
        device: "auto", "cpu", "cuda", "cuda:N" (`tpas.runtime.resolve_device`).
        precision: "fp32", or "fp16"/"bf16" autocast on CUDA; "bf16" on a CPU with native bf16 runs bf16 weights
            (restored afterwards; `tpas.runtime.precision_policy`).
        cache_dir: feature cache root (default `default_cache_dir()`).
        use_cache: False encodes everything afresh into a temporary store that is removed at the end.
        skip_bad_images: record unreadable images in meta (their column scores the row minimum) instead of stopping.
        progress: called after every batch with an `InferProgress`.

    Returns:
        The written matrix (the re-ranked one when re-ranking); every rank returns it under torchrun. Under torchrun
        the run joins the caller's process group, or creates one and destroys it before returning.
    """
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise TpasInputError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if getattr(model, "pair_reranker", False):  # VLM re-rankers score candidate pairs only (tpas.models.vlm)
        if dtype is not None:
            raise TpasInputError(f"--dtype does not apply to {model.family}: it writes top-k pair scores only")
        return model.rerank_pairs(images_dir, queries, out, pose_dir=pose_dir, rerank_k=rerank_k, candidates=candidates,
                                  batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                                  cache_dir=cache_dir, use_cache=use_cache, skip_bad_images=skip_bad_images,
                                  progress=progress)  # fmt: skip
    out = Path(out)
    _check_arguments(model, out, batch_size, rerank_k, candidates, pose_dir, keep_top)
    num_workers = default_num_workers() if num_workers is None else num_workers
    gallery = list_gallery(images_dir)
    qs = list(queries) if not isinstance(queries, (str, Path)) else read_queries(queries)
    if not qs:
        raise TpasInputError("no queries given")
    query_ids = [q.id for q in qs]
    gallery_ids = [g.id for g in gallery]
    cand = load_candidates(candidates, query_ids, gallery_ids, rerank_k) if candidates is not None else None
    dev = resolve_device(device)
    amp = precision_policy(dev, precision, cpu_bf16=True)
    if keep_top is None:
        check_dense_fits(len(qs), len(gallery), what="ITC score matrix")

    with distributed(dev) as dist, out_of_memory_hint(batch_size, dev):
        run = _Run(model, dev, amp.autocast, batch_size, progress, dist)
        model.to(dev).eval()
        with (
            _feature_store(run, out, cache_dir, use_cache, precision) as (store, sha),
            amp.cast_weights(model, model.bf16_modules),
        ):
            keys, poses = _gallery_keys(gallery, Path(images_dir), pose_dir)
            states = rerank_k is not None
            bad = _encode_gallery(run, store, gallery, keys, poses, num_workers, skip_bad_images, states)
            skipped: dict[int, str] = {}
            for part in dist.all_gather(bad):
                skipped.update(part)
            dist.barrier()
            store.scan()  # other ranks' chunks
            good = [i for i in range(len(gallery)) if i not in skipped]
            if not good:
                raise TpasInputError("no gallery image could be read", images_dir)
            q_rows = dist.shard(len(qs))
            first = None if cand is None else cand[q_rows.start : q_rows.stop]
            shard = _score_queries(run, store, keys, good, [qs[i].caption for i in q_rows], rerank_k, first, keep_top)
            parts = dist.all_gather(shard)
            meta = _meta(model, sha, precision, dev, images_dir, queries, gallery, skipped, dist.world)
            if keep_top is not None:
                meta["keep_top"] = keep_top
            if dtype is not None:
                meta["dtype"] = dtype
            if rerank_k is not None:
                meta.update(rerank_k=rerank_k, itc_file=itc_path_for(out).name)
                if candidates is not None:
                    meta["candidates"] = str(candidates) if isinstance(candidates, (str, Path)) else candidates.source
            matrices = _matrices(model, parts, query_ids, gallery_ids, meta)
            if dist.rank == 0:
                _save(matrices, out, dtype)
            dist.barrier()
            return matrices[0]


def _meta(
    model: RetrievalModel,
    sha: str,
    precision: str,
    dev: torch.device,
    images_dir: str | Path,
    queries: str | Path | Sequence[Query],
    gallery: Sequence[Any],
    skipped: dict[int, str],
    world: int,
) -> dict[str, Any]:
    """What a written matrix records about its run (checkpoint, model, inputs, skipped images)."""
    return {
        "family": model.family,
        "checkpoint": str(getattr(model, "checkpoint_path", None) or ""),
        "checkpoint_sha256": sha,
        "model": model.describe(),
        "precision": precision,
        "device": dev.type,
        "images": str(images_dir),
        "queries": str(queries) if isinstance(queries, (str, Path)) else "",
        "skipped_images": [
            {"id": gallery[i].id, "path": str(gallery[i].path), "error": msg} for i, msg in sorted(skipped.items())
        ],
        "world_size": world,
    }


def _check_arguments(
    model: RetrievalModel,
    out: Path,
    batch_size: int,
    rerank_k: int | None,
    candidates: object,
    pose_dir: str | Path | None,
    keep_top: int | None = None,
) -> None:
    """Refuse option combinations that cannot run, before any work."""
    if out.is_dir():
        raise TpasInputError("--out must be a file path, not a folder", out)
    if keep_top is not None:
        if keep_top < 1:
            raise TpasInputError(f"--keep-top must be >= 1, got {keep_top}")
        if rerank_k is not None and rerank_k > keep_top:
            raise TpasInputError(
                f"--rerank-k {rerank_k} re-ranks from the kept top-{keep_top}: it must be <= --keep-top"
            )
        if candidates is not None:
            raise TpasInputError("--keep-top re-ranks its own ITC top-K; --candidates needs the dense path")
    if batch_size < 1:
        raise TpasInputError(f"--batch-size must be >= 1, got {batch_size}")
    if rerank_k is not None:
        if rerank_k < 1:
            raise TpasInputError(f"--rerank-k must be >= 1, got {rerank_k}")
        if not model.has_match_head:
            raise TpasInputError(f"--rerank-k needs a model with a matching head; {model.family} has none")
    elif candidates is not None:
        raise TpasInputError("--candidates chooses what --rerank-k re-ranks; pass --rerank-k too")
    needs_pose = bool(getattr(model, "needs_pose", False))
    if needs_pose and pose_dir is None:
        raise TpasInputError(
            f"this {model.family} model uses pose maps: pass --pose DIR (same relative paths as the images)"
        )
    if pose_dir is not None:
        if not needs_pose:
            raise TpasInputError(f"--pose does not apply: this {model.family} model does not use pose maps")
        if not Path(pose_dir).is_dir():
            raise TpasInputError("pose folder not found", pose_dir)


@contextlib.contextmanager
def _feature_store(
    run: _Run, out: Path, cache_dir: str | Path | None, use_cache: bool, precision: str
) -> Iterator[tuple[FeatureStore, str]]:
    """The run's feature store and the model's fingerprint; a `--no-cache` store is removed when the run ends."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sha = model_fingerprint(run.model, root if use_cache else None)
    tmp_store: Path | None = None
    if not use_cache:
        # A private store beside the output (it may be large: match states), shared by all ranks, removed after.
        tmp_store = Path(run.dist.broadcast(str(private_store(out)) if run.dist.rank == 0 else None))
        root = tmp_store
    key = {
        "family": run.model.family,
        "checkpoint_sha256": sha,
        "model": run.model.describe(),
        "precision": precision,
        "device_type": run.dev.type,
        "pose": bool(getattr(run.model, "needs_pose", False)),
    }
    try:
        yield FeatureStore(root, key), sha
    finally:
        if tmp_store is not None and run.dist.rank == 0:
            shutil.rmtree(tmp_store, ignore_errors=True)


def _gallery_keys(
    gallery: Sequence[Any], images_root: Path, pose_dir: str | Path | None
) -> tuple[list[str], list[Path] | None]:
    """Each image's cache key (path, mtime, size; with its pose map's) and its pose map path (None: no poses)."""
    poses = [pose_path(g.path, images_root, Path(pose_dir)) for g in gallery] if pose_dir is not None else None
    try:
        keys = [item_key(g.path, poses[i] if poses and poses[i].is_file() else None) for i, g in enumerate(gallery)]
    except FileNotFoundError as e:  # deleted between listing and stat (a gallery being written to)
        raise TpasInputError("image vanished while the gallery was being read", e.filename) from None
    if poses is not None:
        # A missing pose map must not share a cache entry with its image alone; the dataset reports it.
        keys = [k if poses[i].is_file() else k + "||pose-missing" for i, k in enumerate(keys)]
    return keys, poses


def encode_image_batch(model: RetrievalModel, batch: Features, dev: torch.device, autocast: Autocast) -> Features:
    """`model.encode_images` of one collated batch under inference mode and `autocast`; the result on the CPU."""
    with torch.inference_mode(), autocast():
        feats = model.encode_images(to_device(batch, dev))
    return to_cpu(feats)


def _encode_gallery(
    run: _Run,
    store: FeatureStore,
    gallery: Sequence[Any],
    keys: list[str],
    poses: list[Path] | None,
    num_workers: int,
    skip_bad_images: bool,
    states: bool,
) -> dict[int, str]:
    """Encode this rank's shard of the gallery that the store does not hold yet; returns {index: error} skipped.

    With `states`, every feature `encode_images` returns is stored (re-ranking reads them back); otherwise only
    `embed`, so a run without re-ranking does not fill the disk with match states it never reads.
    """
    store.scan()
    mine = run.dist.shard(len(gallery))
    todo = [i for i in mine if not store.has(keys[i], complete=states)]
    cached = len(mine) - len(todo)
    total = len(mine)
    if run.progress:
        run.progress(InferProgress("images", cached, total, 0.0, cached))
    if not todo:
        return {}
    dataset = GalleryDataset(
        [gallery[i].path for i in todo],
        run.model.image_preprocessor,
        [poses[i] for i in todo] if poses is not None else None,
    )
    loader = gallery_loader(
        dataset, run.batch_size, num_workers, pin_memory=run.dev.type == "cuda", collate=run.model.image_collate
    )
    bad: dict[int, str] = {}
    done, encoded, t0 = cached, 0, time.perf_counter()
    with _loader_iter(loader) as batches:
        for batch in batches:
            for j, msg in batch.errors:
                if not skip_bad_images:
                    raise bad_image_error(msg)
                bad[todo[j]] = msg
            if batch.indices:
                feats = encode_image_batch(run.model, batch.features, run.dev, run.autocast)
                complete = states or set(feats) == {"embed"}
                kept = feats if complete else {"embed": feats["embed"]}
                store.write_chunk([keys[todo[j]] for j in batch.indices], kept, complete=complete)
                encoded += len(batch.indices)
            done += len(batch)
            if run.progress:
                rate = encoded / max(time.perf_counter() - t0, 1e-9)
                run.progress(InferProgress("images", done, total, rate, cached))
    return bad


def encode_images_in_memory(
    model: RetrievalModel,
    paths: Sequence[Path],
    poses: Sequence[Path] | None,
    dev: torch.device,
    autocast: Autocast,
    batch_size: int,
    num_workers: int = 0,
) -> Features:
    """Every image's features (all keys `encode_images` returns), rows in `paths` order, on the CPU.

    The engine's decoding and per-batch encoding without the feature store, for galleries that fit in memory (the
    trainer's evaluation split). An unreadable image raises the engine's error.
    """
    dataset = GalleryDataset(list(paths), model.image_preprocessor, poses)
    loader = gallery_loader(dataset, batch_size, num_workers, collate=model.image_collate)
    parts: list[Features] = []
    with _loader_iter(loader) as batches:
        for batch in batches:
            if batch.errors:
                raise bad_image_error(batch.errors[0][1])
            parts.append(encode_image_batch(model, batch.features, dev, autocast))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def encode_texts(
    model: RetrievalModel,
    captions: list[str],
    dev: torch.device,
    autocast: Autocast,
    batch_size: int,
    progress: ProgressFn | None = None,
) -> Features:
    """Tokenize + encode captions in batches; returns the tokens merged with the encodings, on CPU."""
    parts: list[Features] = []
    t0 = time.perf_counter()
    for s in range(0, len(captions), batch_size):
        tokens = model.tokenize(captions[s : s + batch_size])
        with torch.inference_mode(), autocast():
            enc = model.encode_texts(to_device(tokens, dev))
        parts.append({**{k: v.detach().to("cpu") for k, v in tokens.items()}, **to_cpu(enc)})
        if progress:
            n = s + len(captions[s : s + batch_size])
            progress(InferProgress("texts", n, len(captions), n / max(time.perf_counter() - t0, 1e-9)))
    if not parts:  # this rank got no queries (more ranks than queries)
        probe = model.tokenize(["x"])
        with torch.inference_mode(), autocast():
            enc = to_cpu(model.encode_texts(to_device(probe, dev)))
        return {k: v[:0] for k, v in {**probe, **enc}.items()}
    return {k: _cat_padded([p[k] for p in parts]) for k in parts[0]}


def similarity_matrix(
    model: RetrievalModel, text: torch.Tensor, image: torch.Tensor, dev: torch.device
) -> torch.Tensor:
    """[Q, G] = model.similarity in gallery blocks, so token-level similarities stay within a memory budget."""
    # The intermediate per image is [Q, tokens] (tokens = 1 for one vector per image, 32 for BLIP-2's queries).
    tokens = image[0].numel() // image.shape[-1] if len(image) else 1
    per_image = max(1, tokens) * max(1, text.shape[0])
    block = max(1, _SIM_BLOCK_ELEMS // per_image)
    t = text.to(dev)
    cols = []
    with torch.inference_mode():
        for s in range(0, image.shape[0], block):
            cols.append(model.similarity(t, image[s : s + block].to(dev)).float().cpu())
    return torch.cat(cols, dim=1) if cols else torch.empty(text.shape[0], 0)


def top_similarity(
    model: RetrievalModel, text: torch.Tensor, image: torch.Tensor, dev: torch.device, k: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each query's top-k of `similarity_matrix` (same blocks, same values) without holding [Q, G] (`tpas.topk`),
    and the minimum over all of [Q, G] (a family's final combination may min-max the whole ITC matrix)."""
    tokens = image[0].numel() // image.shape[-1] if len(image) else 1
    block = max(1, _SIM_BLOCK_ELEMS // (max(1, tokens) * max(1, text.shape[0])))
    t = text.to(dev)
    low = float("inf")

    def scores(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        nonlocal low
        s = model.similarity(q, g.to(dev)).float().cpu()
        low = min(low, float(s.min())) if s.numel() else low
        return s

    with torch.inference_mode():
        idx, vals = topk_similarity(t, image, k, scores, block)
    return idx, vals, low


def _fill_columns(scores: torch.Tensor, cols: list[int], n: int) -> torch.Tensor:
    """Place [Q, len(cols)] scores at columns `cols` of a [Q, n] matrix; other columns get each row's minimum."""
    if len(cols) == n:
        return scores
    base = scores.min(dim=1, keepdim=True).values if scores.shape[1] else torch.zeros(scores.shape[0], 1)
    full = base.expand(scores.shape[0], n).clone()
    full[:, torch.tensor(cols, dtype=torch.long)] = scores
    return full


def _score_queries(
    run: _Run,
    store: FeatureStore,
    keys: list[str],
    good: list[int],
    captions: list[str],
    rerank_k: int | None,
    first: torch.Tensor | None,
    keep_top: int | None = None,
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], Reranked | None]:
    """This rank's ITC rows [q, G] (with `keep_top`: their top-K (indices, values)) and, with `rerank_k`, their
    re-rank (of `first` when given, else of the ITC)."""
    n = len(keys)
    image_embed = store.load([keys[i] for i in good], names=["embed"])["embed"]
    text = encode_texts(run.model, captions, run.dev, run.autocast, run.batch_size, run.progress)

    def images(cols: torch.Tensor) -> Features:
        return store.load([keys[int(g)] for g in cols])

    if keep_top is not None:
        idx, vals, low = top_similarity(run.model, text["embed"], image_embed, run.dev, keep_top)
        cols = torch.tensor(good, dtype=torch.long)[idx]  # unreadable images are simply not kept
        if rerank_k is None:
            return (cols, vals, low), None
        # The first k of the stable top-K are the dense path's top-k (unreadable images never among them).
        top = cols[:, : min(rerank_k, cols.shape[1])]
        matched = match_candidates(
            run.model, images, text, top, run.dev, run.autocast, run.batch_size, _rerank_report(run)
        )
        return (cols, vals, low), Reranked(None, top, matched)
    itc = _fill_columns(similarity_matrix(run.model, text["embed"], image_embed, run.dev), good, n)
    if rerank_k is None:
        return itc, None
    # Cells a top-K candidates matrix lacks rank below its kept cells but stay eligible (if skipped images leave a
    # row short of k candidates); skipped images themselves can never be chosen (k <= readable images).
    masked = (itc if first is None else first).nan_to_num(neginf=torch.finfo(torch.float32).min)
    if len(good) < n:
        skipped = sorted(set(range(n)) - set(good))
        masked[:, skipped] = float("-inf")
    k = min(rerank_k, len(good))
    return itc, rerank_topk(
        run.model, images, text, masked, k, run.dev, run.autocast, run.batch_size, _rerank_report(run)
    )


def _rerank_report(run: _Run) -> Callable[[int, int], None]:
    """The re-rank's progress callback: pairs done, of all, and pairs per second since it was made."""
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        if run.progress:
            run.progress(InferProgress("rerank", done, total, done / max(time.perf_counter() - t0, 1e-9)))

    return report


def _matrices(
    model: RetrievalModel,
    parts: list[tuple[torch.Tensor, Reranked | None]],
    query_ids: list[str],
    gallery_ids: list[str],
    meta: dict[str, Any],
) -> tuple[SimsMatrix, SimsMatrix | None, SimsMatrix | None]:
    """(result, itc, raw itm) from every rank's rows: the ITC matrix alone, or the re-ranked one with both others."""
    base = {k: v for k, v in meta.items() if k not in ("rerank_k", "itc_file", "candidates")}
    itc_source = f"{model.family}-itc" if model.has_match_head else model.family
    reranked = [p[1] for p in parts if p[1] is not None]
    top = torch.cat([r.top for r in reranked]) if reranked else None
    matched = torch.cat([r.scores for r in reranked]).float() if reranked else None
    if isinstance(parts[0][0], tuple):  # keep_top: each rank's (indices, values, ITC minimum)
        idx, vals = torch.cat([p[0][0] for p in parts]), torch.cat([p[0][1] for p in parts])
        itc_m = SimsMatrix(query_ids, gallery_ids, indices=idx, values=vals, source=itc_source, meta=base)
        if matched is None:
            return itc_m, None, None
        # Global ITC minimum over every rank's rows, as the dense path's finalize_rerank sees it.
        final = final_on_kept(model, vals, min(p[0][2] for p in parts), matched)
        form: dict[str, torch.Tensor] = {"indices": idx, "values": final}
    else:
        itc_all = torch.cat([p[0] for p in parts])
        itc_m = SimsMatrix(query_ids, gallery_ids, scores=itc_all, source=itc_source, meta=base)
        if matched is None:
            return itc_m, None, None
        # On the whole matrix, never per shard: a family's final combination may normalise globally (CMP).
        filled = torch.cat([r.filled for r in reranked])
        form = {"scores": model.finalize_rerank(filled, itc_all, top).float().cpu()}
    result = SimsMatrix(query_ids, gallery_ids, **form, source=f"{model.family}-itm", meta=dict(meta))
    itm_m = SimsMatrix(
        query_ids,
        gallery_ids,
        indices=top,
        values=matched,
        source=f"{model.family}-itm-raw",
        meta=dict(meta, fill="unscored"),
    )
    return result, itc_m, itm_m


def _save(
    matrices: tuple[SimsMatrix, SimsMatrix | None, SimsMatrix | None], out: Path, dtype: str | None = None
) -> None:
    """Write the result to `out`; a re-ranked run's ITC and raw ITM files first, so a finished `out` has them."""
    result, itc_m, itm_m = matrices
    if itc_m is not None and itm_m is not None:
        itc_m.save(itc_path_for(out), dtype=dtype)
        itm_m.save(itm_path_for(out), dtype=dtype)
    result.save(out, dtype=dtype)
