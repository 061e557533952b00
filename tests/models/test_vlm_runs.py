"""vlm runs: resume after a kill, --no-cache, adapters, torchrun sharding, the output through ensemble + evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.vlm_models import make_vlm_gallery, random_candidates
from tpas.errors import TpasInputError
from tpas.models.engine import InferProgress, infer
from tpas.models.vlm import VLMReranker
from tpas.sims import SimsMatrix

REPO = Path(__file__).resolve().parents[2]
K = 4


@pytest.fixture
def gallery(tmp_path: Path):
    g = make_vlm_gallery(tmp_path / "data")
    random_candidates(g, tmp_path / "cand.pt")
    return g


def _infer(model: VLMReranker, g, tmp_path: Path, out: str = "vlm.pt", **kw) -> SimsMatrix:
    args = {"rerank_k": K, "candidates": tmp_path / "cand.pt", "batch_size": 3, "num_workers": 0, **kw}
    return infer(model, g.images, g.queries, tmp_path / out, **args)


class _Kill(Exception):
    pass


def _count_pairs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every forward pass."""
    sizes: list[int] = []
    real = VLMReranker.score_batch

    def counting(self, net, batch):
        sizes.append(int(batch["input_ids"].shape[0]))
        return real(self, net, batch)

    monkeypatch.setattr(VLMReranker, "score_batch", counting)
    return sizes


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_rescores_only_missing_pairs(vlm_dirs, gallery, tmp_path, monkeypatch, workers) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"])
    reference = _infer(model, gallery, tmp_path, "ref.pt", use_cache=False)
    cache = tmp_path / "cache"

    def die_after_two_batches(ev: InferProgress) -> None:
        if ev.done >= 6:
            raise _Kill

    with pytest.raises(_Kill):
        _infer(model, gallery, tmp_path, cache_dir=cache, num_workers=workers, progress=die_after_two_batches)
    assert not (tmp_path / "vlm.pt").exists()
    sizes = _count_pairs(monkeypatch)
    events: list[InferProgress] = []
    resumed = _infer(model, gallery, tmp_path, cache_dir=cache, num_workers=workers, progress=events.append)
    assert sum(sizes) == 5 * K - 6  # only the 14 missing pairs
    assert events[0] == InferProgress("rerank", 6, 20, 0.0, 6) and events[-1].done == 20 and events[-1].rate > 0
    assert torch.equal(resumed.values, reference.values) and torch.equal(resumed.indices, reference.indices)
    sizes.clear()
    again = _infer(model, gallery, tmp_path, cache_dir=cache)
    assert sizes == [] and torch.equal(again.values, reference.values)
    # Another prompt is another score: nothing is taken from the cache.
    other = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], prompt="Is this {caption}?")
    _infer(other, gallery, tmp_path, cache_dir=cache)
    assert sum(sizes) == 20


def test_no_cache_leaves_nothing_behind(vlm_dirs, gallery, tmp_path) -> None:
    model = VLMReranker.from_checkpoint(vlm_dirs["idefics3"])
    _infer(model, gallery, tmp_path, use_cache=False, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.pt", "data", "vlm.pt"]


def test_cpu_bf16_loads_bf16_weights_and_scores_close_to_fp32(vlm_dirs, gallery, tmp_path) -> None:
    from tpas.runtime import cpu_has_bf16

    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"])
    if not cpu_has_bf16():
        with pytest.raises(TpasInputError, match="needs native bf16"):
            _infer(model, gallery, tmp_path, device="cpu", precision="bf16")
        return
    fp32 = _infer(model, gallery, tmp_path, "fp32.pt", device="cpu", use_cache=False)
    bf16 = _infer(model, gallery, tmp_path, "bf16.pt", device="cpu", precision="bf16", use_cache=False)
    assert bf16.meta["precision"] == "bf16" and torch.equal(bf16.indices, fp32.indices)
    assert 0 < (bf16.values - fp32.values).abs().max() < 0.15  # logit margins of about +-2; bf16 keeps ~3 digits


# ---------------------------------------------------------------------------------------------- adapters
def _lora(base_dir: Path, out: Path, scale: float | None) -> Path:
    """A LoRA on the text attention of the model in `base_dir`; `scale` None keeps peft's zero-initialised B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    if scale is not None:
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, scale)
    peft.save_pretrained(out)
    return out


def test_adapter_changes_scores_only_when_it_is_not_zero(vlm_dirs, gallery, tmp_path) -> None:
    folder = vlm_dirs["qwen2_vl"]
    plain = _infer(VLMReranker.from_checkpoint(folder), gallery, tmp_path, "plain.pt")
    zero = _lora(folder, tmp_path / "zero_lora", None)
    with_zero = _infer(VLMReranker.from_checkpoint(folder, adapter=zero), gallery, tmp_path, "zero.pt")
    torch.testing.assert_close(with_zero.values, plain.values, atol=1e-6, rtol=0)
    lora = _lora(folder, tmp_path / "lora", 0.5)
    tuned = _infer(VLMReranker.from_checkpoint(folder, adapter=lora), gallery, tmp_path, "tuned.pt")
    assert (tuned.values - plain.values).abs().max() > 1e-2
    assert tuned.meta["adapter"] == str(lora) and len(tuned.meta["adapter_sha256"]) == 64
    merged = _infer(VLMReranker.from_checkpoint(folder, adapter=lora, merge_adapter=True), gallery, tmp_path, "m.pt")
    torch.testing.assert_close(merged.values, tuned.values, atol=1e-4, rtol=0)


def test_adapter_for_another_base_model_is_refused(vlm_dirs, gallery, tmp_path) -> None:
    foreign = _lora(vlm_dirs["idefics3"], tmp_path / "foreign", 0.5)
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"], adapter=foreign)
    with pytest.raises(TpasInputError, match="another base") as e:
        _infer(model, gallery, tmp_path)
    assert "foreign" in str(e.value)
    assert not (tmp_path / "vlm.pt").exists()


# ---------------------------------------------------------------------------------------------- torchrun
# Through the CLI, as a user runs `torchrun -m tpas infer vlm ...`.
_DIST_SCRIPT = """
import sys
from tpas.cli import main

folder, images, queries, cand, out = sys.argv[1:6]
try:
    main(["infer", "vlm", "--checkpoint", folder, "--images", images, "--queries", queries, "--candidates", cand,
          "--rerank-k", "4", "--batch-size", "3", "--workers", "0", "--device", "cpu", "--no-cache", "--out", out])
except SystemExit as e:
    assert e.code in (0, None), e.code
"""


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process(vlm_dirs, gallery, tmp_path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun is not installed beside this python")
    folder = vlm_dirs["qwen3_vl"]
    single = _infer(VLMReranker.from_checkpoint(folder), gallery, tmp_path, "single.pt", use_cache=False)
    script = tmp_path / "dist_run.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(folder), str(gallery.images),
         str(gallery.queries), str(tmp_path / "cand.pt"), str(tmp_path / "dist.pt")],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    dist = SimsMatrix.load(tmp_path / "dist.pt")
    assert dist.meta["world_size"] == 2
    assert torch.equal(dist.indices, single.indices)
    torch.testing.assert_close(dist.values, single.values, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- downstream
def test_output_is_fused_by_the_ensemble_and_scored(vlm_dirs, gallery, tmp_path) -> None:
    from tpas.data.pab import load_ground_truth, read_queries
    from tpas.ensemble.config import load_config
    from tpas.ensemble.pipeline import run_ensemble
    from tpas.scoring.evaluate import evaluate

    # A test annotation over the gallery: one caption per image, so every query has its relevant image.
    records = [{"image": f"test/{gid}.jpg", "image_id": f"p{i}", "caption": [c]}
               for i, (gid, c) in enumerate(zip(gallery.gallery_ids, gallery.captions, strict=False))]  # fmt: skip
    ann = tmp_path / "attr.json"
    ann.write_text(json.dumps(records))
    qids = [q.id for q in read_queries(ann)]
    gen = torch.Generator().manual_seed(1)
    pool = SimsMatrix(qids, gallery.gallery_ids, scores=torch.rand(len(qids), 8, generator=gen), source="pool")
    pool.save(tmp_path / "pool.pt")
    model = VLMReranker.from_checkpoint(vlm_dirs["qwen2_vl"])
    infer(model, gallery.images, ann, tmp_path / "qwen.pt", rerank_k=K, candidates=tmp_path / "pool.pt",
          batch_size=4, num_workers=0)  # fmt: skip
    cfg = tmp_path / "fuse.yaml"
    cfg.write_text(
        "inputs: {pool: pool.pt, qwen: {path: qwen.pt, fill: row-min}}\n"
        "normalize: {method: zmuv, scope: query}\n"
        "fuse: {method: wsum, order: [pool, qwen], weights: {pool: 0.5, qwen: 1.0}}\n"
    )
    fused, steps = run_ensemble(load_config(cfg))
    assert fused.shape == (len(qids), 8) and fused.is_dense
    assert any(s.get("form") == f"top-{K} (fill row-min)" for s in steps)
    metrics = evaluate(fused, load_ground_truth(ann)).metrics()
    assert set(metrics) == {"R@1", "R@5", "R@10", "mAP", "mINP"} and 0 <= metrics["mAP"] <= 100
