"""Gallery images as a torch Dataset: decoding and a model's own preprocessing, run inside DataLoader workers.

A bad image never raises inside a worker (DataLoader would re-wrap the error with a worker traceback); the item
carries the error text instead, and the engine decides whether to stop with a clear message or skip the image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import TpasInputError

POSE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

Preprocess = Callable[[Image.Image, "Image.Image | None"], dict[str, torch.Tensor]]


def pose_path(image: Path, images_root: Path, pose_root: Path) -> Path:
    """The pose map of `image`: `pose_root/<its path relative to images_root>`, or the same stem with another
    image suffix when only that exists (pose tools often write PNG beside JPEG images)."""
    rel = image.relative_to(images_root)
    exact = pose_root / rel
    if exact.is_file():
        return exact
    for suffix in POSE_SUFFIXES:
        alt = exact.with_suffix(suffix)
        if alt.is_file():
            return alt
    return exact


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image in its stored mode (the model's preprocessing converts it, in its own order:
    CLIP resizes before converting to RGB, and converting first changes the pixels of RGBA/P/1 images)."""
    im = Image.open(path)
    try:
        im.load()  # decode now, so a truncated file fails here and not inside the transform
    except BaseException:
        im.close()
        raise
    return im


@dataclass
class GalleryItem:
    """One decoded and preprocessed image (or the reason it could not be read)."""

    index: int
    features: dict[str, torch.Tensor] | None
    error: str | None


class GalleryDataset(torch.utils.data.Dataset):
    """Images (by path) -> `preprocess(image, pose)` tensors; index is the position in `paths`.

    Args:
        paths: image files.
        preprocess: the model's test-time preprocessing; called in worker processes.
        pose_paths: one pose map per image for pose-aware models, else None.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, pose_paths: Sequence[Path] | None = None):
        if pose_paths is not None and len(pose_paths) != len(paths):
            raise ValueError("one pose path per image expected")
        self.paths = list(paths)
        self.preprocess = preprocess
        self.pose_paths = None if pose_paths is None else list(pose_paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> GalleryItem:
        path = self.paths[i]
        try:
            image = _open_image(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return GalleryItem(i, None, f"{path}: cannot be read as an image ({e})")
        pose = None
        if self.pose_paths is not None:
            pp = self.pose_paths[i]
            try:
                pose = _open_image(pp)
            except FileNotFoundError:
                return GalleryItem(i, None, f"{pp}: pose map of {path.name} not found")
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                return GalleryItem(i, None, f"{pp}: pose map cannot be read as an image ({e})")
        try:
            feats = self.preprocess(image, pose)
        except (OSError, ValueError) as e:  # e.g. an image whose pixel data is corrupt past the header
            return GalleryItem(i, None, f"{path}: cannot be preprocessed ({e})")
        return GalleryItem(i, feats, None)


@dataclass
class GalleryBatch:
    """A collated batch: dataset indices and stacked features of the good items, plus the bad ones."""

    indices: list[int]
    features: dict[str, torch.Tensor]
    errors: list[tuple[int, str]]

    def __len__(self) -> int:
        return len(self.indices) + len(self.errors)


# A family's own batching of its per-item features (e.g. padding variable-length items only as far as the batch
# needs); it must be picklable, since it runs in the DataLoader workers.
Collate = Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]


def collate_gallery(items: list[GalleryItem], collate: Collate | None = None) -> GalleryBatch:
    """Batch the readable items' features (`collate`, default: stack each key); keep (index, message) for the
    others."""
    good = [it for it in items if it.features is not None]
    errors = [(it.index, it.error or "unreadable") for it in items if it.features is None]
    feats: dict[str, torch.Tensor] = {}
    if good and collate is not None:
        feats = collate([it.features for it in good])  # type: ignore[misc]  # good items have features
    elif good:
        for key in good[0].features:
            feats[key] = torch.stack([it.features[key] for it in good])
    return GalleryBatch([it.index for it in good], feats, errors)


def bad_image_error(message: str) -> TpasInputError:
    """The error that stops a run on an unreadable image (`message` starts with the file's path)."""
    path, _, what = message.partition(": ")
    return TpasInputError(f"{what}; fix or remove it, or pass --skip-bad-images to record and skip it", path)


def gallery_loader(
    dataset: GalleryDataset,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    collate: Collate | None = None,
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader in dataset order with worker processes for decoding and preprocessing (and `collate`, the
    family's batching, when given).

    Workers are forked where the platform can (Linux): the preprocess callable is usually a bound method of the
    model, and forking shares it instead of pickling the model's weights into every worker.
    """
    import multiprocessing as mp

    ctx = None
    if num_workers > 0 and "fork" in mp.get_all_start_methods():
        ctx = mp.get_context("fork")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_gallery if collate is None else functools.partial(collate_gallery, collate=collate),
        pin_memory=pin_memory,
        multiprocessing_context=ctx,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
