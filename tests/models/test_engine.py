"""The inference engine: ids, feature cache and resume, invalidation, bad input, pose, re-ranking, torchrun sharding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tpas.cli import app, main
from tpas.errors import TpasInputError
from tpas.models import load_model
from tpas.models.base import Features, RetrievalModel
from tpas.models.engine import InferProgress, infer, itc_path_for, itm_path_for
from tpas.ranking import topk_stable
from tpas.sims import SimsMatrix

if TYPE_CHECKING:
    from tests.models.conftest import TinyGallery

REPO = Path(__file__).resolve().parents[2]


def _pixels(image: Image.Image) -> torch.Tensor:
    data = list(image.convert("RGB").resize((4, 4)).get_flattened_data())
    return torch.tensor(data, dtype=torch.float32).T.reshape(3, 4, 4) / 255


class ToyMatchModel(RetrievalModel):
    """A deterministic model with a matching head whose score is a known function of the ITC score:
    match(q, g) = -2.5 * itc(q, g) + 0.001 * len(caption q). It reads per-image states (`tokens`) and the text's
    tokenizer output (`mask`, padded to the longest caption of its batch), so wrong gathering shows in the values."""

    family = "toy"
    has_match_head = True

    def __init__(self, use_pose: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.img = torch.nn.Parameter(torch.randn(48, 16, generator=g), requires_grad=False)
        self.txt = torch.nn.Parameter(torch.randn(97, 16, generator=g), requires_grad=False)
        self.needs_pose = use_pose
        self.image_calls = 0

    def describe(self) -> dict:
        return {"family": "toy", "pose": self.needs_pose}

    def preprocess(self, image: Image.Image, pose: Image.Image | None = None) -> Features:
        px = _pixels(image)
        if pose is not None:
            px = px + _pixels(pose)
        return {"pixels": px}

    def tokenize(self, texts: Sequence[str]) -> Features:
        n = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        mask = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor([ord(c) % 97 for c in t])
            mask[i, : len(t)] = 1
        return {"input_ids": ids, "mask": mask}

    def encode_images(self, batch: Features) -> Features:
        self.image_calls += 1
        e = torch.nn.functional.normalize(batch["pixels"].flatten(1) @ self.img, dim=-1)
        return {"embed": e, "tokens": e[:, None, :] * torch.arange(1.0, 5.0)[None, :, None] / 2.5}

    def encode_texts(self, tokens: Features) -> Features:
        counts = torch.zeros(len(tokens["input_ids"]), 97).scatter_add_(1, tokens["input_ids"], tokens["mask"].float())
        return {"embed": torch.nn.functional.normalize(counts @ self.txt, dim=-1)}

    def match(self, text: Features, image: Features) -> torch.Tensor:
        # tokens.mean(1) equals the image embed, so this is -2.5 * itc + 0.001 * caption length.
        itc = (text["embed"] * image["tokens"].mean(1)).sum(-1)
        return -2.5 * itc + 0.001 * text["mask"].sum(-1).float()


def _expected_rerank(itc: torch.Tensor, captions: list[str], k: int, first: torch.Tensor | None = None) -> torch.Tensor:
    first = itc if first is None else first
    out = torch.empty_like(itc)
    top = topk_stable(first, k)
    for r in range(itc.shape[0]):
        vals = -2.5 * itc[r, top[r]] + 0.001 * len(captions[r])
        out[r] = vals.min()
        out[r, top[r]] = vals
    return out


def _clip(path: Path):
    return load_model("clip", path)


def _count_image_batches(model: RetrievalModel) -> list[int]:
    calls: list[int] = []
    orig = model.encode_images

    def counting(batch: Features) -> Features:
        calls.append(len(next(iter(batch.values()))))
        return orig(batch)

    model.encode_images = counting  # instance attribute shadows the method
    return calls


# ---------------------------------------------------------------------------------------------- ids and values
def test_ids_order_and_values(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path, tmp_path: Path) -> None:
    model = _clip(tiny_clip_checkpoint)
    out = tmp_path / "sims" / "clip.pt"
    sims = infer(model, tiny_gallery.images, tiny_gallery.queries, out, batch_size=3, num_workers=0,
                 cache_dir=tmp_path / "cache")  # fmt: skip
    assert sims.gallery_ids == tiny_gallery.gallery_ids  # sorted stems, incl. the one in a sub-folder
    assert sims.query_ids == tiny_gallery.query_ids and sims.query_ids[1] == "000000000000001"
    assert sims.source == "clip" and sims.shape == (5, 8)
    loaded = SimsMatrix.load(out)
    assert torch.equal(loaded.scores, sims.scores) and loaded.gallery_ids == sims.gallery_ids
    assert loaded.meta["checkpoint_sha256"] and loaded.meta["model"]["arch"] == "custom"
    assert loaded.meta["precision"] == "fp32" and loaded.meta["skipped_images"] == []
    # One image at a time, by id, gives the same numbers (seed approach, but ordered by id).
    with torch.inference_mode():
        paths = {p.stem: p for p in tiny_gallery.images.rglob("*.jpg")}
        pixels = [model.preprocess(Image.open(paths[g]))["pixels"][None] for g in tiny_gallery.gallery_ids]
        img = torch.cat([model.encode_images({"pixels": p})["embed"] for p in pixels])
        txt = model.encode_texts(model.tokenize(tiny_gallery.captions))["embed"]
    torch.testing.assert_close(sims.scores, txt @ img.T, atol=1e-5, rtol=0)


def test_worker_processes_give_the_same_matrix(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    model = _clip(tiny_clip_checkpoint)
    out = tmp_path / "out"
    a = infer(model, tiny_gallery.images, tiny_gallery.queries, out / "a.pt", batch_size=4, num_workers=0,
              use_cache=False)  # fmt: skip
    b = infer(model, tiny_gallery.images, tiny_gallery.queries, out / "b.pt", batch_size=4, num_workers=2,
              use_cache=False)  # fmt: skip
    assert torch.equal(a.scores, b.scores)
    assert sorted(p.name for p in out.iterdir()) == ["a.pt", "b.pt"]  # --no-cache leaves no feature store


def test_no_cache_removes_stores_of_dead_runs_only(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    import os
    import subprocess

    done = subprocess.Popen(["true"])
    done.wait()  # a pid that no longer exists
    host = os.uname().nodename
    owners = {"dead": f"{host} {done.pid}", "live": f"{host} {os.getpid()}", "other-host": f"elsewhere {done.pid}"}
    out = tmp_path / "out"
    for name, owner in owners.items():
        (out / f".a.pt.features-{name}").mkdir(parents=True)
        (out / f".a.pt.features-{name}" / "owner.txt").write_text(owner)
    (out / ".a.pt.features-unmarked").mkdir()
    (out / ".b.pt.features-x").mkdir()  # another output's store
    (out / ".b.pt.features-x" / "owner.txt").write_text(owners["dead"])
    infer(_clip(tiny_clip_checkpoint), tiny_gallery.images, tiny_gallery.queries, out / "a.pt", batch_size=4,
          num_workers=0, use_cache=False)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        ".a.pt.features-live", ".a.pt.features-other-host", ".a.pt.features-unmarked", ".b.pt.features-x", "a.pt"
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- cache and resume
class _Kill(Exception):
    pass


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_with_only_the_remaining_batches(
    tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path, tmp_path: Path, workers: int
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out.pt"
    model = _clip(tiny_clip_checkpoint)
    reference = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "ref.pt", batch_size=2,
                      num_workers=0, use_cache=False)  # fmt: skip
    seen: list[InferProgress] = []

    def die_after_two(ev: InferProgress) -> None:
        seen.append(ev)
        if ev.stage == "images" and ev.done >= 4:
            raise _Kill

    with pytest.raises(_Kill):
        infer(model, tiny_gallery.images, tiny_gallery.queries, out, batch_size=2, num_workers=workers,
              cache_dir=cache, progress=die_after_two)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".out.pt*"))  # nothing half-written

    calls = _count_image_batches(model)
    events: list[InferProgress] = []
    resumed = infer(model, tiny_gallery.images, tiny_gallery.queries, out, batch_size=2, num_workers=workers,
                    cache_dir=cache, progress=events.append)  # fmt: skip
    assert calls == [2, 2]  # images 5..8 only
    assert events[0] == InferProgress("images", 4, 8, 0.0, 4)
    assert events[-1].stage == "texts" and events[-1].done == 5 and events[-1].rate > 0
    assert torch.equal(resumed.scores, reference.scores)

    calls.clear()
    again = infer(model, tiny_gallery.images, tiny_gallery.queries, out, batch_size=2, num_workers=workers,
                  cache_dir=cache)  # fmt: skip
    assert calls == [] and torch.equal(again.scores, reference.scores)


def test_changed_image_is_reencoded_alone(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path,
                                          tmp_path: Path) -> None:  # fmt: skip
    model = _clip(tiny_clip_checkpoint)
    kw = {"batch_size": 4, "num_workers": 0, "cache_dir": tmp_path / "cache"}
    first = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt", **kw)
    target = next(tiny_gallery.images.glob("*.jpg"))
    Image.new("RGB", (40, 40), (255, 0, 0)).save(target)
    calls = _count_image_batches(model)
    second = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt", **kw)
    assert calls == [1]
    col = second.gallery_ids.index(target.stem)
    assert not torch.equal(first.scores[:, col], second.scores[:, col])
    others = [i for i in range(8) if i != col]
    assert torch.equal(first.scores[:, others], second.scores[:, others])


def test_cache_invalidated_when_the_checkpoint_changes(tiny_gallery: TinyGallery, tmp_path: Path,
                                                       clip_kit: SimpleNamespace) -> None:  # fmt: skip
    ckpt = tmp_path / "w.pt"
    torch.save(clip_kit.openai_release_state(clip_kit.state(seed=0)), ckpt)
    cache = tmp_path / "cache"
    kw = {"batch_size": 4, "num_workers": 0, "cache_dir": cache}
    a = infer(_clip(ckpt), tiny_gallery.images, tiny_gallery.queries, tmp_path / "a.pt", **kw)
    torch.save(clip_kit.openai_release_state(clip_kit.state(seed=1)), ckpt)  # same path, new weights
    model = _clip(ckpt)
    calls = _count_image_batches(model)
    b = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "b.pt", **kw)
    assert calls == [4, 4]
    assert not torch.allclose(a.scores, b.scores)
    assert a.meta["checkpoint_sha256"] != b.meta["checkpoint_sha256"]
    fresh = infer(_clip(ckpt), tiny_gallery.images, tiny_gallery.queries, tmp_path / "c.pt", use_cache=False,
                  batch_size=4, num_workers=0)  # fmt: skip
    assert torch.equal(fresh.scores, b.scores)


# ---------------------------------------------------------------------------------------------- bad input
def _corrupt_one(g: TinyGallery) -> Path:
    bad = sorted(g.images.glob("*.jpg"))[2]
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return bad


def test_unreadable_image_stops_cleanly_naming_it(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    bad = _corrupt_one(tiny_gallery)
    out = tmp_path / "out" / "o.pt"
    with pytest.raises(TpasInputError, match="--skip-bad-images") as e:
        infer(_clip(tiny_clip_checkpoint), tiny_gallery.images, tiny_gallery.queries, out, batch_size=4,
              num_workers=2, cache_dir=tmp_path / "cache")  # fmt: skip
    assert e.value.path == bad
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_skip_bad_images_records_them(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path, tmp_path: Path) -> None:
    bad = _corrupt_one(tiny_gallery)
    sims = infer(_clip(tiny_clip_checkpoint), tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt",
                 batch_size=4, num_workers=0, cache_dir=tmp_path / "cache", skip_bad_images=True)  # fmt: skip
    skipped = sims.meta["skipped_images"]
    assert [s["id"] for s in skipped] == [bad.stem] and str(bad) in skipped[0]["path"]
    assert sims.shape == (5, 8)  # the column stays, scored at each row's minimum
    col = sims.gallery_ids.index(bad.stem)
    others = [i for i in range(8) if i != col]
    torch.testing.assert_close(sims.scores[:, col], sims.scores[:, others].min(dim=1).values)


def test_cli_bad_image_exits_2_with_one_line(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = _corrupt_one(tiny_gallery)
    out = tmp_path / "out" / "o.pt"
    with pytest.raises(SystemExit) as e:
        main(["infer", "clip", "--images", str(tiny_gallery.images), "--queries", str(tiny_gallery.queries),
              "--checkpoint", str(tiny_clip_checkpoint), "--out", str(out), "--workers", "0"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and bad.name in err.replace("\n", "") and "Traceback" not in err
    assert not out.exists()


def test_argument_errors(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path, tmp_path: Path) -> None:
    model = _clip(tiny_clip_checkpoint)
    args = (model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt")
    with pytest.raises(TpasInputError, match="CUDA"):
        infer(*args, device="cpu", precision="fp16", num_workers=0)
    with pytest.raises(TpasInputError, match="precision"):
        infer(*args, precision="fp8", num_workers=0)
    with pytest.raises(TpasInputError, match="matching head"):
        infer(*args, rerank_k=3, num_workers=0)
    with pytest.raises(TpasInputError, match="pose"):
        infer(*args, pose_dir=tmp_path, num_workers=0)
    with pytest.raises(TpasInputError, match="gallery folder not found"):
        infer(model, tmp_path / "nope", tiny_gallery.queries, tmp_path / "o.pt")
    if not torch.cuda.is_available():
        with pytest.raises(TpasInputError, match="no CUDA device"):
            infer(*args, device="cuda", num_workers=0)
    assert not (tmp_path / "o.pt").exists()


# ---------------------------------------------------------------------------------------------- pose maps
def test_pose_maps_by_relative_path(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    pose = tmp_path / "pose"
    for p in tiny_gallery.images.rglob("*.jpg"):
        dst = pose / p.relative_to(tiny_gallery.images).with_suffix(".png")  # another suffix is accepted
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(p.stem) * 7 % 255, 0, 200)).save(dst)
    model = ToyMatchModel(use_pose=True)
    with pytest.raises(TpasInputError, match="--pose DIR"):
        infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt", num_workers=0)
    with_pose = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt", pose_dir=pose,
                      num_workers=0, cache_dir=tmp_path / "cache")  # fmt: skip
    plain = infer(ToyMatchModel(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "p.pt", num_workers=0,
                  cache_dir=tmp_path / "cache")  # fmt: skip
    assert not torch.allclose(with_pose.scores, plain.scores)
    missing = next(pose.rglob("*.png"))
    missing.unlink()
    with pytest.raises(TpasInputError, match="pose map"):
        infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o2.pt", pose_dir=pose, num_workers=0,
              cache_dir=tmp_path / "cache")  # fmt: skip


# ---------------------------------------------------------------------------------------------- re-ranking
def test_rerank_fills_row_minimum_and_writes_itc(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    model = ToyMatchModel()
    out = tmp_path / "toy.pt"
    sims = infer(model, tiny_gallery.images, tiny_gallery.queries, out, rerank_k=3, batch_size=4, num_workers=0,
                 cache_dir=tmp_path / "cache")  # fmt: skip
    itc = SimsMatrix.load(itc_path_for(out))
    assert itc_path_for(out).name == "toy.itc.pt" and itc.source == "toy-itc" and sims.source == "toy-itm"
    assert sims.meta["rerank_k"] == 3
    expected = _expected_rerank(itc.scores, tiny_gallery.captions, 3)
    torch.testing.assert_close(SimsMatrix.load(out).scores, expected, atol=1e-6, rtol=0)
    # The raw match scores of each top-k, in top-K form: exactly the cells the filled matrix scored.
    raw = SimsMatrix.load(itm_path_for(out))
    assert itm_path_for(out).name == "toy.itm.pt" and raw.k == 3 and raw.source == "toy-itm-raw"
    assert torch.equal(raw.indices, topk_stable(itc.scores, 3))
    torch.testing.assert_close(raw.to_dense("row-min"), expected, atol=1e-6, rtol=0)
    # Without --rerank-k a model with a matching head writes its ITC matrix, named as such.
    plain = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "p.pt", batch_size=4, num_workers=0,
                  cache_dir=tmp_path / "cache")  # fmt: skip
    assert plain.source == "toy-itc" and torch.equal(plain.scores, itc.scores)


def test_rerank_candidates_from_another_matrix(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    model = ToyMatchModel()
    kw = {"batch_size": 5, "num_workers": 0, "cache_dir": tmp_path / "cache"}
    itc = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "itc.pt", **kw).scores
    # Another model's matrix, with rows and columns in a different order: aligned by id.
    other_scores = -itc
    other = SimsMatrix(tiny_gallery.query_ids, tiny_gallery.gallery_ids, scores=other_scores, source="other")
    shuffled = other.select(list(reversed(other.query_ids)), list(reversed(other.gallery_ids)))
    shuffled.save(tmp_path / "other.pt")
    sims = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "r.pt", rerank_k=2,
                 candidates=tmp_path / "other.pt", **kw)  # fmt: skip
    expected = _expected_rerank(itc, tiny_gallery.captions, 2, first=other_scores)
    torch.testing.assert_close(sims.scores, expected, atol=1e-6, rtol=0)
    assert sims.meta["candidates"] == str(tmp_path / "other.pt")
    # A top-K candidates matrix works when it keeps enough cells; fewer is an error.
    other.top_k(2).save(tmp_path / "top2.pt")
    topk = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "r2.pt", rerank_k=2,
                 candidates=tmp_path / "top2.pt", **kw)  # fmt: skip
    torch.testing.assert_close(topk.scores, expected, atol=1e-6, rtol=0)
    with pytest.raises(TpasInputError, match="top-2"):
        infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "r3.pt", rerank_k=3,
              candidates=tmp_path / "top2.pt", **kw)  # fmt: skip
    wrong = other.select(other.query_ids[:-1])
    wrong.save(tmp_path / "wrong.pt")
    with pytest.raises(TpasInputError, match="query ids differ"):
        infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "r4.pt", rerank_k=2,
              candidates=tmp_path / "wrong.pt", **kw)  # fmt: skip


def test_rerank_skips_bad_images_and_reads_states_from_disk(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    bad = _corrupt_one(tiny_gallery)
    model = ToyMatchModel()
    sims = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt", rerank_k=7, batch_size=3,
                 num_workers=0, use_cache=False, skip_bad_images=True)  # fmt: skip
    col = sims.gallery_ids.index(bad.stem)
    itc = SimsMatrix.load(tmp_path / "o.itc.pt").scores
    first = itc.clone()
    first[:, col] = float("-inf")
    torch.testing.assert_close(sims.scores, _expected_rerank(itc, tiny_gallery.captions, 7, first=first), atol=1e-6,
                               rtol=0)  # fmt: skip
    # Top-2 candidates that include the unreadable image: it is never matched; the next column fills in.
    cand = itc.clone()
    cand[:, col] = 10.0
    SimsMatrix(sims.query_ids, sims.gallery_ids, scores=cand).top_k(2).save(tmp_path / "cand.pt")
    with_bad = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "c.pt", rerank_k=2, batch_size=3,
                     num_workers=0, use_cache=False, skip_bad_images=True, candidates=tmp_path / "cand.pt")  # fmt: skip
    kept = SimsMatrix(sims.query_ids, sims.gallery_ids, scores=cand).top_k(2).to_dense(fill=float("-inf"))
    kept = kept.nan_to_num(neginf=torch.finfo(torch.float32).min)
    kept[:, col] = float("-inf")
    torch.testing.assert_close(with_bad.scores, _expected_rerank(itc, tiny_gallery.captions, 2, first=kept),
                               atol=1e-6, rtol=0)  # fmt: skip


def test_match_states_are_stored_only_by_reranking_runs(tiny_gallery: TinyGallery, tmp_path: Path) -> None:
    from safetensors import safe_open

    model = ToyMatchModel()
    kw = {"batch_size": 4, "num_workers": 0, "cache_dir": tmp_path / "cache"}
    plain = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "a.pt", **kw)
    assert model.image_calls == 2
    for chunk in (tmp_path / "cache").rglob("chunk-*.safetensors"):
        with safe_open(str(chunk), framework="pt") as fh:
            assert set(fh.keys()) == {"embed"}  # no match states without --rerank-k
    infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "b.pt", rerank_k=2, **kw)
    assert model.image_calls == 4  # re-ranking needs the states: encoded once more, now kept
    again = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "c.pt", **kw)
    infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "d.pt", rerank_k=3, **kw)
    assert model.image_calls == 4 and torch.equal(again.scores, plain.scores)


def test_cli_rerank_with_a_registered_family(tiny_gallery: TinyGallery, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from tpas.models import base

    class CliToy(ToyMatchModel):
        @classmethod
        def from_checkpoint(cls, path, config=None, **options):
            return cls()

    base.list_models()  # load the real families first, then add the toy one for this test only
    monkeypatch.setitem(base._REGISTRY, "toy", CliToy)
    out = tmp_path / "toy.pt"
    r = CliRunner().invoke(app, ["infer", "toy", "--images", str(tiny_gallery.images), "--queries",
                                 str(tiny_gallery.queries), "--rerank-k", "2", "--out", str(out), "--workers", "0",
                                 "--no-cache"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "5 queries x 8 gallery images (toy-itm)" in r.output
    assert "toy.itc.pt" in r.output and "toy.itm.pt" in r.output
    assert SimsMatrix.load(out).shape == (5, 8) and itc_path_for(out).is_file()
    help_text = CliRunner().invoke(app, ["infer", "--help"]).output
    assert "toy" in help_text and "clip" in help_text
    r = CliRunner().invoke(app, ["infer", "toy", "--images", str(tiny_gallery.images), "--queries",
                                 str(tiny_gallery.queries), "--arch", "x", "--out", str(out)])  # fmt: skip
    assert isinstance(r.exception, TpasInputError) and "--arch" in str(r.exception)


# ---------------------------------------------------------------------------------------------- torchrun
class GlobalToy(ToyMatchModel):
    """A final combination that normalises over the whole matrix (as CMP's does): shards must not apply it alone."""

    def finalize_rerank(self, reranked: torch.Tensor, itc: torch.Tensor, top: object = None) -> torch.Tensor:
        return (reranked - reranked.min()) / (reranked.max() - reranked.min()) + 0.01 * itc


# One torchrun launch covers the real CLI (`tpas infer clip`), a re-ranking model with a global final step, and the
# process-group life cycle: the first two runs each create their own group and destroy it at their end (so infer()
# can be called again in the same process); the third joins the script's own group and leaves it alone.
_DIST_SCRIPT = """
import sys
import torch.distributed as dist
from tests.models.test_engine import GlobalToy
from tpas.cli import main
from tpas.models.engine import infer

images, queries, out_dir, ckpt = sys.argv[1:5]
try:
    main(["infer", "clip", "--images", images, "--queries", queries, "--checkpoint", ckpt, "--batch-size", "2",
          "--workers", "0", "--device", "cpu", "--out", out_dir + "/dist.pt", "--cache-dir", out_dir + "/cache"])
except SystemExit as e:
    assert e.code in (0, None), e.code
assert not dist.is_initialized()
infer(GlobalToy(), images, queries, out_dir + "/toy_dist.pt", rerank_k=3, batch_size=2, num_workers=0,
      device="cpu", use_cache=False)
assert not dist.is_initialized()
dist.init_process_group("gloo")
infer(GlobalToy(), images, queries, out_dir + "/toy_joined.pt", rerank_k=3, batch_size=2, num_workers=0,
      device="cpu", use_cache=False)
assert dist.is_initialized()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun is not installed beside this python")
    args = [
        "infer",
        "clip",
        "--images",
        str(tiny_gallery.images),
        "--queries",
        str(tiny_gallery.queries),
        "--checkpoint",
        str(tiny_clip_checkpoint),
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    single = tmp_path / "single.pt"
    r = CliRunner().invoke(app, [*args, "--out", str(single), "--no-cache"])
    assert r.exit_code == 0, r.output
    toy_single = infer(GlobalToy(), tiny_gallery.images, tiny_gallery.queries, tmp_path / "toy.pt", rerank_k=3,
                       batch_size=2, num_workers=0, use_cache=False)  # fmt: skip
    script = tmp_path / "dist_run.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tiny_gallery.images),
         str(tiny_gallery.queries), str(tmp_path), str(tiny_clip_checkpoint)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = SimsMatrix.load(single), SimsMatrix.load(tmp_path / "dist.pt")
    assert b.meta["world_size"] == 2
    assert a.query_ids == b.query_ids and a.gallery_ids == b.gallery_ids
    assert torch.equal(a.scores, b.scores)
    assert run.stdout.count("5 queries x 8 gallery") == 1  # rank 0 alone reports
    toy_dist = SimsMatrix.load(tmp_path / "toy_dist.pt")
    torch.testing.assert_close(toy_dist.scores, toy_single.scores, atol=1e-6, rtol=0)
    assert torch.equal(SimsMatrix.load(tmp_path / "toy_joined.pt").scores, toy_dist.scores)
    torch.testing.assert_close(SimsMatrix.load(tmp_path / "toy_dist.itc.pt").scores,
                               SimsMatrix.load(tmp_path / "toy.itc.pt").scores, atol=0, rtol=0)  # fmt: skip


def test_model_fingerprint_without_checkpoint_file_hashes_weights_including_scalars():
    """A model built in memory (no checkpoint file) is keyed by its weights; 0-dim tensors (logit scales) count."""
    from tpas.models.engine import model_fingerprint

    class Scalar(torch.nn.Module):
        def __init__(self, v: float):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(v))

    a, b = model_fingerprint(Scalar(1.0), None), model_fingerprint(Scalar(2.0), None)
    assert a != b and a == model_fingerprint(Scalar(1.0), None)


def test_out_of_memory_names_the_batch_size_and_writes_nothing(
    tiny_gallery: TinyGallery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tpas.errors import TpasResourceError

    model = ToyMatchModel()

    def no_memory(batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 1 GiB free")

    monkeypatch.setattr(model, "encode_images", no_memory)
    out = tmp_path / "toy.pt"
    with pytest.raises(TpasResourceError, match=r"--batch-size 8 does not fit; lower it, e.g. --batch-size 4") as e:
        infer(model, tiny_gallery.images, tiny_gallery.queries, out, batch_size=8, num_workers=0, use_cache=False)
    assert "Tried to allocate 20.00 GiB" in str(e.value) and not out.exists()


def test_a_dense_matrix_that_cannot_fit_is_refused_before_encoding(
    tiny_gallery: TinyGallery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tpas.errors import TpasResourceError

    monkeypatch.setenv("TPAS_MEMORY_AVAILABLE", "64")  # bytes: far less than queries x gallery x 4
    model = ToyMatchModel()
    with pytest.raises(TpasResourceError, match=r"dense ITC score matrix .* top-K"):
        infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "o.pt", num_workers=0, use_cache=False)
    assert model.image_calls == 0 and not (tmp_path / "o.pt").exists()


def test_keep_top_equals_the_dense_paths_top_k(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import tpas.models.engine as engine

    model = _clip(tiny_clip_checkpoint)
    kw = {"batch_size": 3, "num_workers": 0, "cache_dir": tmp_path / "cache"}
    dense = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "dense.pt", **kw)
    want = dense.top_k(4)
    top = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "top.pt", keep_top=4, **kw)
    assert top.k == 4 and top.meta["keep_top"] == 4 and top.gallery_ids == dense.gallery_ids
    assert torch.equal(top.indices, want.indices) and torch.equal(top.values, want.values)  # same blocks: same bits
    assert torch.equal(SimsMatrix.load(tmp_path / "top.pt").indices, want.indices)
    # Blocks of 3 images: the merge across blocks; the matmul's rounding may change with the block width.
    monkeypatch.setattr(engine, "_SIM_BLOCK_ELEMS", 5 * 3)
    small = infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "small.pt", keep_top=4, **kw)
    assert torch.equal(small.indices, want.indices)
    torch.testing.assert_close(small.values, want.values, atol=1e-6, rtol=0)
    with pytest.raises(TpasInputError, match="--keep-top must be >= 1"):
        infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "x.pt", keep_top=0, **kw)
    with pytest.raises(TpasInputError, match="--dtype must be one of fp32, fp16"):
        infer(model, tiny_gallery.images, tiny_gallery.queries, tmp_path / "x.pt", keep_top=4, dtype="bf16", **kw)


def test_cli_keep_top_equals_the_dense_runs_top_k(tiny_gallery: TinyGallery, tiny_clip_checkpoint: Path,
                                                   tmp_path: Path) -> None:  # fmt: skip
    dense = infer(_clip(tiny_clip_checkpoint), tiny_gallery.images, tiny_gallery.queries, tmp_path / "dense.pt",
                  num_workers=0, use_cache=False)  # fmt: skip
    out = tmp_path / "top.pt"
    with pytest.raises(SystemExit) as e:
        main(["infer", "clip", "--images", str(tiny_gallery.images), "--queries", str(tiny_gallery.queries),
              "--checkpoint", str(tiny_clip_checkpoint), "--out", str(out), "--workers", "0", "--no-cache",
              "--keep-top", "3"])  # fmt: skip
    assert e.value.code == 0
    top = SimsMatrix.load(out)
    want = dense.top_k(3)
    assert top.k == 3 and torch.equal(top.indices, want.indices)
    torch.testing.assert_close(top.values, want.values, atol=1e-6, rtol=0)
