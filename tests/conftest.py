"""Shared fixtures for generic helpers only (keep this small; module-specific fixtures live in their test files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tpas.data.pab import GroundTruth, load_ground_truth
from tpas.sims import SimsMatrix


@pytest.fixture
def cli(capsys):
    """Run `tpas ...` through `main()` in-process: returns (exit code, stdout, stderr)."""
    from tpas.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The suite runs on small shared machines: one intra-op thread everywhere (tests that need more set it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class TinyGT:
    """A tiny test annotation and a matching similarity matrix written under tmp_path."""

    annotation: Path
    gt: GroundTruth
    sims_path: Path
    sims: SimsMatrix
    gallery_ids: list[str]


@pytest.fixture
def tiny_gt(tmp_path):
    """Factory: `tiny_gt(n_images=4, captions=2, distractors=3, seed=0)` -> TinyGT.

    Records alternate normal/anomaly and two scenes; gallery = the test images ("0", "1", ...) then distractors
    ("d0", ...). Scores are random (seeded) plus a bonus on each caption's true image, so metrics are non-trivial.
    """

    def make(n_images: int = 4, captions: int = 2, distractors: int = 3, seed: int = 0, bonus: float = 0.5) -> TinyGT:
        records = []
        for i in range(n_images):
            rec = {
                "image": f"test/{i}.jpg",
                "image_id": f"p{i}",
                "caption": [f"person {i} c{k}" for k in range(captions)],
                "scene": "street" if i % 2 else "park",
            }
            rec["anomaly" if i % 2 else "normal"] = "Falling" if i % 2 else "Walking"
            records.append(rec)
        ann = tmp_path / "annotation" / "test" / "attr.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps(records))
        gt = load_ground_truth(ann)
        gallery = [str(i) for i in range(n_images)] + [f"d{j}" for j in range(distractors)]
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(len(gt.query_ids), len(gallery), generator=gen)
        for r, q in enumerate(gt.query_ids):
            scores[r, gallery.index(gt.relevant[q])] += bonus
        sims = SimsMatrix(gt.query_ids, gallery, scores=scores, source="tiny")
        path = sims.save(tmp_path / "sims_score" / "tiny.pt")
        return TinyGT(ann, gt, path, sims, gallery)

    return make
