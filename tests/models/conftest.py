"""Shared fixtures for model tests: a tiny gallery + query file, and tiny CLIP checkpoints in every accepted format.

Other model families' tests can reuse `tiny_gallery` (and `make_tiny_gallery` for custom sizes).
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

# Tiny ViT CLIP in open_clip's model_cfg form: 32 px images, 8 px patches, widths 64 (1 head, OpenAI's width/64 rule).
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
OPENAI_META = {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}
# Tensors that OpenAI's clip.model.convert_weights stores in fp16.
_FP16_SUFFIXES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight", "c_fc.bias",
                  "c_proj.weight", "c_proj.bias")  # fmt: skip


@dataclass
class TinyGallery:
    """A gallery folder (one image in a sub-folder), a name-masked query.json, and their ids."""

    root: Path
    images: Path
    queries: Path
    gallery_ids: list[str]  # sorted, as tpas orders columns
    query_ids: list[str]  # file order
    captions: list[str]


def make_tiny_gallery(root: Path, n_images: int = 8, n_queries: int = 5, seed: int = 0) -> TinyGallery:
    """Write `n_images` small JPEGs (distinct colours + noise, varied sizes) and a query.json under `root`."""
    rng = random.Random(seed)
    images = root / "gallery"
    (images / "sub").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_images):
        gid = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(15))
        ids.append(gid)
        w, h = 32 + 8 * (i % 3), 48 + 4 * (i % 4)
        im = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        px = im.load()
        for _ in range(60):
            px[rng.randrange(w), rng.randrange(h)] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        folder = images / "sub" if i == n_images - 1 else images
        im.save(folder / f"{gid}.jpg", quality=90)
    words = ["man", "woman", "red", "shirt", "falling", "running", "bag", "fighting", "street", "black"]
    qids, caps = [], []
    for i in range(n_queries):
        # One numeric-looking id with a leading zero: ids are strings, never numbers.
        qids.append(f"{i:015d}" if i == 1 else "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(15)))
        caps.append("A " + " ".join(rng.choice(words) for _ in range(6 + i)) + ".")
    queries = root / "query.json"
    lines = [json.dumps({"query_index": q, "caption": c}) + "\n" for q, c in zip(qids, caps, strict=True)]
    queries.write_text("".join(lines))
    return TinyGallery(root, images, queries, sorted(ids), qids, caps)


@pytest.fixture
def tiny_gallery(tmp_path: Path) -> TinyGallery:
    """~8 small JPEGs (one in a sub-folder) + a 5-line name-masked query.json."""
    return make_tiny_gallery(tmp_path / "data")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test writes to the user's ~/.cache/tpas."""
    monkeypatch.setenv("TPAS_CACHE_DIR", str(tmp_path_factory.mktemp("tpas-cache")))


# ---------------------------------------------------------------------------------------------- tiny CLIP files
def tiny_clip_state(seed: int = 0, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """Random weights of the tiny CLIP (open_clip/OpenAI key names, fp32). Normal-init scale so features differ."""
    from tpas.models.clip import build_open_clip

    torch.manual_seed(seed)
    model = build_open_clip(cfg or TINY_CLIP_CFG)
    return {k: v.clone() for k, v in model.state_dict().items()}


def openai_release_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As OpenAI ships it: conv/attention/MLP/projection tensors fp16, LayerNorms fp32, plus 3 int64 metadata keys."""
    out = {}
    for k, v in state.items():
        fp16 = k.endswith(_FP16_SUFFIXES) or k in ("visual.conv1.weight", "visual.proj", "text_projection")
        out[k] = v.half() if fp16 else v
    out.update({k: torch.tensor(v) for k, v in OPENAI_META.items()})
    return out


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript_archive(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A real TorchScript archive (torch.jit.save) whose state_dict() is exactly `state` (nested module names)."""
    root = _Holder()
    for key, v in state.items():
        *mods, leaf = key.split(".")
        mod = root
        for name in mods:
            if not hasattr(mod, name):
                mod.add_module(name, _Holder())
            mod = getattr(mod, name)
        if v.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, v.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; OpenAI's release format still needs it
        torch.jit.save(torch.jit.script(root), str(path))
    return path


@pytest.fixture
def tiny_clip_checkpoint(tmp_path: Path) -> Path:
    """The tiny CLIP as an OpenAI-layout state dict with the metadata keys (architecture readable from shapes)."""
    path = tmp_path / "tiny_clip_openai.pt"
    torch.save(openai_release_state(tiny_clip_state()), path)
    return path


@pytest.fixture(scope="session")
def clip_kit() -> SimpleNamespace:
    """The helpers above for test modules (conftest modules are not imported by name)."""
    return SimpleNamespace(
        cfg=TINY_CLIP_CFG,
        meta=OPENAI_META,
        state=tiny_clip_state,
        openai_release_state=openai_release_state,
        save_torchscript_archive=save_torchscript_archive,
        make_tiny_gallery=make_tiny_gallery,
    )


# ---------------------------------------------------------------------------------------------- tiny VLM folders
@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random VLM folders (model + processor, tests/models/vlm_models.py), built once per session."""
    from tests.models.vlm_models import BUILDERS

    root = tmp_path_factory.mktemp("vlm-models")
    return {name: build(root / name) for name, build in BUILDERS.items()}
