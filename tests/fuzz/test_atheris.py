"""Run the coverage-guided harness (atheris_harness.py) for a few seconds, seeded, from one valid file per reader.

atheris is optional outside CI (`pip install atheris`); CI installs the `test` extra, so there it must be present.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tpas.sims import SimsMatrix

HARNESS = Path(__file__).with_name("atheris_harness.py")
ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("atheris") is None and not os.environ.get("CI"):
    pytest.skip("atheris is not installed (pip install atheris)", allow_module_level=True)


def _seeds() -> list[bytes]:
    """One valid input per reader, in the harness's READERS order (first byte = reader index)."""
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("answer.txt", "g1 g2\ng2 g1\n")
    sims, ckpt = io.BytesIO(), io.BytesIO()
    torch.save(SimsMatrix(["q1", "q2"], ["g1", "g2"], scores=torch.rand(2, 2)).to_dict(), sims)
    torch.save({"model": {"w": torch.ones(2)}}, ckpt)
    files = [
        b'{"query_index": "q1", "caption": "a man"}\n',
        json.dumps([{"image": "test/0.jpg", "image_id": "p0", "caption": ["a man"], "normal": "walk"}]).encode(),
        json.dumps([{"image": "a.jpg", "caption": "c", "image_id": "1", "anomaly": "fall"}]).encode(),
        b"q1\nq2\n",
        b"g1 g2\ng2 g1\n",
        zbuf.getvalue(),
        b"q1 Q0 g1 1 0.5 run\nq2 Q0 g2 1 0.4 run\n",
        b"query_id,gallery_id,score\nq1,g1,0.5\nq2,g2,0.1\n",
        json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 54}]}).encode(),
        sims.getvalue(),
        ckpt.getvalue(),
    ]
    return [bytes([i]) + f for i, f in enumerate(files)]


def test_coverage_guided_fuzzing_finds_no_crash(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(_seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, str(HARNESS), str(work), str(corpus), "-runs=3000", "-seed=1", "-max_len=4096",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert r.returncode == 0 and not crashes, r.stderr[-3000:]
    assert "Done 3000 runs" in r.stderr
