"""The one inference engine: any registered model family -> a SimsMatrix file.

`infer` lists the gallery (sorted ids), decodes and preprocesses images in DataLoader workers with the family's own
`preprocess`, encodes them in batches under `torch.inference_mode` (autocast fp16/bf16 on CUDA), and writes every
encoded batch to a feature store on disk, so a killed run resumes where it stopped. Texts are tokenized and encoded
in batches; the first-stage matrix is `model.similarity(text, image)`. Families with a matching head can re-rank each
query's top-k (by their own ITC, or by another model's matrix) with `model.match`, in batches of (query, image) pairs
gathered across queries; the per-image states `match` needs stay in the store on disk and are read back only for the
images a batch uses, so a 36,773-image gallery never has to sit in memory as cross-attention states.

Under `torchrun --nproc_per_node N`, each rank encodes a contiguous shard of the gallery into the shared store and a
shard of the queries, computes (and re-ranks) its own query rows against the full gallery, and rank 0 gathers the rows
and writes the files. Feature contract: `encode_images`/`encode_texts` return `embed` (what `similarity` consumes)
plus any states `match` needs; `match` receives, per pair, the image's features (all keys, from the store) and the
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
from ..sims import SimsMatrix
from .base import Features, RetrievalModel
from .cache import FeatureStore, cached_sha256, default_cache_dir, item_key

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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


# ---------------------------------------------------------------------------------------------- setup helpers
def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto` -> the CUDA device of this rank when CUDA is available, else CPU; other names are checked."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TpasInputError(f"--device {device!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TpasInputError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision not in PRECISIONS:
        raise TpasInputError(f"--precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise TpasInputError(f"--precision {precision} needs a CUDA device; on {device.type} tpas computes in fp32")
    return torch.autocast("cuda", dtype=PRECISIONS[precision])


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


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1); a no-op single process otherwise.

    An existing process group is joined and left alone; otherwise one is created for this run and destroyed at its
    end (so a program calling `infer` several times under torchrun should create the group itself, once).
    """

    def __init__(self, want_cuda: bool):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.created = False
        self.group = None
        if self.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
            self.created = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Python objects (feature rows, skipped lists) always travel over gloo on CPU, whatever the main backend.
        self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> range:
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _to_cpu(feats: Features) -> Features:
    """Detach to CPU; `embed` becomes float32 (scores are computed in fp32 whatever the encode precision)."""
    out = {}
    for k, v in feats.items():
        v = v.detach().to("cpu")
        out[k] = v.float() if k == "embed" and v.is_floating_point() else v
    return out


def _to_device(feats: Features, device: torch.device) -> Features:
    return {k: v.to(device, non_blocking=True) for k, v in feats.items()}


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


def infer(
    model: RetrievalModel,
    images_dir: str | Path,
    queries: str | Path | Sequence[Query],
    out: str | Path,
    *,
    pose_dir: str | Path | None = None,
    rerank_k: int | None = None,
    candidates: str | Path | SimsMatrix | None = None,
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
        batch_size: images / captions / (query, image) pairs per forward pass.
        num_workers: DataLoader worker processes for decoding (None: `default_num_workers()`; 0: in-process).
        device: "auto", "cpu", "cuda", "cuda:N".
        precision: "fp32", or "fp16"/"bf16" autocast (CUDA only).
        cache_dir: feature cache root (default `default_cache_dir()`).
        use_cache: False encodes everything afresh into a temporary store that is removed at the end.
        skip_bad_images: record unreadable images in meta (their column scores the row minimum) instead of stopping.
        progress: called after every batch with an `InferProgress`.

    Returns:
        The written matrix (the re-ranked one when re-ranking); every rank returns it under torchrun.
    """
    if getattr(model, "pair_reranker", False):  # VLM re-rankers score candidate pairs only (tpas.models.vlm)
        return model.rerank_pairs(images_dir, queries, out, pose_dir=pose_dir, rerank_k=rerank_k, candidates=candidates,
                                  batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
                                  cache_dir=cache_dir, use_cache=use_cache, skip_bad_images=skip_bad_images,
                                  progress=progress)  # fmt: skip
    out = Path(out)
    if out.is_dir():
        raise TpasInputError("--out must be a file path, not a folder", out)
    if batch_size < 1:
        raise TpasInputError(f"--batch-size must be >= 1, got {batch_size}")
    num_workers = default_num_workers() if num_workers is None else num_workers
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

    gallery = list_gallery(images_dir)
    qs = list(queries) if not isinstance(queries, (str, Path)) else read_queries(queries)
    if not qs:
        raise TpasInputError("no queries given")
    query_ids = [q.id for q in qs]
    gallery_ids = [g.id for g in gallery]
    cand = _load_candidates(candidates, query_ids, gallery_ids, rerank_k) if candidates is not None else None

    dist = _Dist(want_cuda=(device == "auto" and torch.cuda.is_available()) or device.startswith("cuda"))
    tmp_store: Path | None = None
    try:
        dev = resolve_device(device, dist.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        autocast = _autocast(dev, precision)
        model.to(dev).eval()

        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        sha = model_fingerprint(model, root if use_cache else None)
        if not use_cache:
            # A private store beside the output (it may be large: match states), shared by all ranks, removed after.
            name = None
            if dist.rank == 0:
                name = str(private_store(out))
            tmp_store = Path(dist.broadcast(name))
            root = tmp_store
        key = {
            "family": model.family,
            "checkpoint_sha256": sha,
            "model": model.describe(),
            "precision": precision,
            "device_type": dev.type,
            "pose": needs_pose,
        }
        store = FeatureStore(root, key)

        images_root = Path(images_dir)
        poses = [pose_path(g.path, images_root, Path(pose_dir)) for g in gallery] if pose_dir is not None else None
        try:
            keys = [item_key(g.path, poses[i] if poses and poses[i].is_file() else None) for i, g in enumerate(gallery)]
        except FileNotFoundError as e:  # deleted between listing and stat (a gallery being written to)
            raise TpasInputError("image vanished while the gallery was being read", e.filename) from None
        if poses is not None:
            # A missing pose map must not share a cache entry with its image alone; the dataset reports it.
            keys = [k if poses[i].is_file() else k + "||pose-missing" for i, k in enumerate(keys)]

        bad = _encode_gallery(
            model,
            store,
            gallery,
            keys,
            poses,
            dist,
            dev,
            autocast,
            batch_size,
            num_workers,
            skip_bad_images,
            progress,
            states=rerank_k is not None,
        )
        bad_all: dict[int, str] = {}
        for part in dist.all_gather(bad):
            bad_all.update(part)
        dist.barrier()
        store.scan()  # other ranks' chunks
        good = [i for i in range(len(gallery)) if i not in bad_all]
        if not good:
            raise TpasInputError("no gallery image could be read", images_dir)
        image_embed = store.load([keys[i] for i in good], names=["embed"])["embed"]

        q_rows = dist.shard(len(qs))
        text = _encode_texts(model, [qs[i].caption for i in q_rows], dev, autocast, batch_size, progress, len(qs))
        itc_good = _similarity(model, text["embed"], image_embed, dev)
        itc = _fill_columns(itc_good, good, len(gallery))

        reranked = top = matched = None
        if rerank_k is not None:
            first = itc if cand is None else cand[q_rows.start : q_rows.stop]
            # Cells a top-K candidates matrix lacks rank below its kept cells but stay eligible (if skipped images
            # leave a row short of k candidates); skipped images themselves can never be chosen (k <= readable).
            masked = first.nan_to_num(neginf=torch.finfo(torch.float32).min)
            if bad_all:
                masked[:, sorted(bad_all)] = float("-inf")
            reranked, top, matched = _rerank(
                model, store, keys, text, masked, min(rerank_k, len(good)), dev, autocast, batch_size, progress
            )

        parts = dist.all_gather((itc, reranked, top, matched))
        itc_all = torch.cat([p[0] for p in parts])
        final_all = itm_m = None
        if rerank_k is not None:
            # On the whole matrix, never per shard: a family's final combination may normalise globally (CMP).
            final_all = model.finalize_rerank(torch.cat([p[1] for p in parts]), itc_all).float().cpu()

        meta: dict[str, Any] = {
            "family": model.family,
            "checkpoint": str(getattr(model, "checkpoint_path", None) or ""),
            "checkpoint_sha256": sha,
            "model": model.describe(),
            "precision": precision,
            "device": dev.type,
            "images": str(images_dir),
            "queries": str(queries) if isinstance(queries, (str, Path)) else "",
            "skipped_images": [
                {"id": gallery[i].id, "path": str(gallery[i].path), "error": msg} for i, msg in sorted(bad_all.items())
            ],
            "world_size": dist.world,
        }
        itc_source = f"{model.family}-itc" if model.has_match_head else model.family
        itc_m = SimsMatrix(query_ids, gallery_ids, scores=itc_all, source=itc_source, meta=dict(meta))
        if final_all is None:
            result = itc_m
        else:
            rmeta = dict(meta, rerank_k=rerank_k, itc_file=itc_path_for(out).name)
            if isinstance(candidates, (str, Path)):
                rmeta["candidates"] = str(candidates)
            elif candidates is not None:
                rmeta["candidates"] = candidates.source
            result = SimsMatrix(query_ids, gallery_ids, scores=final_all, source=f"{model.family}-itm", meta=rmeta)
            itm_m = SimsMatrix(
                query_ids,
                gallery_ids,
                indices=torch.cat([p[2] for p in parts]),
                values=torch.cat([p[3] for p in parts]).float(),
                source=f"{model.family}-itm-raw",
                meta=dict(rmeta, fill="unscored"),
            )
        if dist.rank == 0:
            if itm_m is not None:
                # Before `out`, so a finished `out` always has its ITC and raw ITM files beside it.
                itc_m.save(itc_path_for(out))
                itm_m.save(itm_path_for(out))
            result.save(out)
        dist.barrier()
        return result
    finally:
        if tmp_store is not None and dist.rank == 0:
            shutil.rmtree(tmp_store, ignore_errors=True)
        dist.close()


def _load_candidates(
    candidates: str | Path | SimsMatrix, query_ids: list[str], gallery_ids: list[str], k: int | None
) -> torch.Tensor:
    """Dense [Q, G] first-stage scores from another model's matrix, aligned to our ids (cells it lacks: -inf)."""
    m = candidates if isinstance(candidates, SimsMatrix) else SimsMatrix.load(candidates)
    where = candidates if isinstance(candidates, (str, Path)) else None
    if not m.is_dense and k is not None and (m.k or 0) < k:
        raise TpasInputError(
            f"--candidates keeps only the top-{m.k} per query; --rerank-k {k} needs at least {k}", where
        )
    try:
        m = m.align(query_ids=query_ids, gallery_ids=gallery_ids)
    except TpasInputError as e:
        raise TpasInputError(f"--candidates does not match this gallery/query set: {e.message}", where) from None
    return m.to_dense(fill=float("-inf")).float()


def _encode_gallery(
    model: RetrievalModel,
    store: FeatureStore,
    gallery: Sequence[Any],
    keys: list[str],
    poses: list[Path] | None,
    dist: _Dist,
    dev: torch.device,
    autocast: contextlib.AbstractContextManager[Any],
    batch_size: int,
    num_workers: int,
    skip_bad_images: bool,
    progress: ProgressFn | None,
    states: bool,
) -> dict[int, str]:
    """Encode this rank's shard of the gallery that the store does not hold yet; returns {index: error} skipped.

    With `states`, every feature `encode_images` returns is stored (re-ranking reads them back); otherwise only
    `embed`, so a run without re-ranking does not fill the disk with match states it never reads.
    """
    store.scan()
    mine = dist.shard(len(gallery))
    todo = [i for i in mine if not store.has(keys[i], complete=states)]
    cached = len(mine) - len(todo)
    total = len(mine)
    if progress:
        progress(InferProgress("images", cached, total, 0.0, cached))
    if not todo:
        return {}
    dataset = GalleryDataset(
        [gallery[i].path for i in todo],
        model.image_preprocessor,
        [poses[i] for i in todo] if poses is not None else None,
    )
    loader = gallery_loader(dataset, batch_size, num_workers, pin_memory=dev.type == "cuda")
    bad: dict[int, str] = {}
    done, encoded, t0 = cached, 0, time.perf_counter()
    with _loader_iter(loader) as batches:
        for batch in batches:
            for j, msg in batch.errors:
                if not skip_bad_images:
                    raise bad_image_error(msg)
                bad[todo[j]] = msg
            if batch.indices:
                with torch.inference_mode(), autocast:
                    feats = model.encode_images(_to_device(batch.features, dev))
                feats = _to_cpu(feats)
                complete = states or set(feats) == {"embed"}
                kept = feats if complete else {"embed": feats["embed"]}
                store.write_chunk([keys[todo[j]] for j in batch.indices], kept, complete=complete)
                encoded += len(batch.indices)
            done += len(batch)
            if progress:
                progress(InferProgress("images", done, total, encoded / max(time.perf_counter() - t0, 1e-9), cached))
    return bad


def _encode_texts(
    model: RetrievalModel,
    captions: list[str],
    dev: torch.device,
    autocast: contextlib.AbstractContextManager[Any],
    batch_size: int,
    progress: ProgressFn | None,
    total_all: int,
) -> Features:
    """Tokenize + encode captions in batches; returns the tokens merged with the encodings, on CPU."""
    parts: list[Features] = []
    t0 = time.perf_counter()
    for s in range(0, len(captions), batch_size):
        tokens = model.tokenize(captions[s : s + batch_size])
        with torch.inference_mode(), autocast:
            enc = model.encode_texts(_to_device(tokens, dev))
        parts.append({**{k: v.detach().to("cpu") for k, v in tokens.items()}, **_to_cpu(enc)})
        if progress:
            n = s + len(captions[s : s + batch_size])
            progress(InferProgress("texts", n, len(captions), n / max(time.perf_counter() - t0, 1e-9)))
    if not parts:  # this rank got no queries (more ranks than queries)
        probe = model.tokenize(["x"])
        with torch.inference_mode(), autocast:
            enc = _to_cpu(model.encode_texts(_to_device(probe, dev)))
        return {k: v[:0] for k, v in {**probe, **enc}.items()}
    return {k: _cat_padded([p[k] for p in parts]) for k in parts[0]}


def _similarity(model: RetrievalModel, text: torch.Tensor, image: torch.Tensor, dev: torch.device) -> torch.Tensor:
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


def _fill_columns(scores: torch.Tensor, cols: list[int], n: int) -> torch.Tensor:
    """Place [Q, len(cols)] scores at columns `cols` of a [Q, n] matrix; other columns get each row's minimum."""
    if len(cols) == n:
        return scores
    base = scores.min(dim=1, keepdim=True).values if scores.shape[1] else torch.zeros(scores.shape[0], 1)
    full = base.expand(scores.shape[0], n).clone()
    full[:, torch.tensor(cols, dtype=torch.long)] = scores
    return full


def _rerank(
    model: RetrievalModel,
    store: FeatureStore,
    keys: list[str],
    text: Features,
    first: torch.Tensor,
    k: int,
    dev: torch.device,
    autocast: contextlib.AbstractContextManager[Any],
    batch_size: int,
    progress: ProgressFn | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match scores of each row's top-k of `first`.

    Returns the filled [q, G] matrix (every other cell gets the row minimum of the k scores), the top-k columns
    [q, k] and their match scores [q, k].
    """
    from ..ranking import topk_stable

    q = first.shape[0]
    out = torch.empty(q, first.shape[1])
    if q == 0:
        return out, torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    top = topk_stable(first, k)  # [q, k] gallery columns
    rows = torch.arange(q).repeat_interleave(k)
    cols = top.reshape(-1)
    # Pairs ordered by image, so a batch reads few images (and few chunks) from the store.
    order = torch.argsort(cols * q + rows)
    rows, cols = rows[order], cols[order]
    scores = torch.empty(len(rows))
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch_size):
        r, c = rows[s : s + batch_size], cols[s : s + batch_size]
        uniq, inverse = torch.unique(c, return_inverse=True)
        images = store.load([keys[int(g)] for g in uniq])
        image_pairs = {name: v[inverse] for name, v in images.items()}
        text_pairs = {name: v[r] for name, v in text.items()}
        with torch.inference_mode(), autocast:
            m = model.match(_to_device(text_pairs, dev), _to_device(image_pairs, dev))
        scores[s : s + len(r)] = m.detach().float().cpu().reshape(-1)
        if progress:
            n = s + len(r)
            progress(InferProgress("rerank", n, len(rows), n / max(time.perf_counter() - t0, 1e-9)))
    matched = torch.empty(q * k)
    matched[order] = scores  # back to (row, rank) order
    matched = matched.view(q, k)
    out[:] = matched.min(dim=1, keepdim=True).values
    out.scatter_(1, top, matched)
    return out, top, matched
