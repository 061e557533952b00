"""compare: paired randomization test and bootstrap interval, library and `tpas compare`."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from tpas.cli import main
from tpas.scoring import evaluate
from tpas.scoring.compare import compare_evaluations, paired_test
from tpas.sims import SimsMatrix


def test_randomization_p_value_equals_the_exact_enumeration():
    d = np.array([0.5, 1.0, -0.25, 0.75, 0.0, 1.0, -0.5, 0.25])
    observed = abs(d.mean())
    flips = [abs((np.array(s) * d).mean()) >= observed - 1e-12 for s in itertools.product([-1, 1], repeat=len(d))]
    exact = np.mean(flips)  # all 256 sign patterns
    p, low, high = paired_test(d, resamples=40_000, rng=np.random.default_rng(1))
    assert p == pytest.approx(exact, abs=0.01)
    assert low < d.mean() < high


def test_no_difference_gives_p_one_and_a_zero_interval():
    p, low, high = paired_test(np.zeros(30), resamples=500)
    assert p == 1.0 and low == high == 0.0


def test_clear_gain_is_significant_and_an_equal_system_is_not(tiny_gt):
    t = tiny_gt(n_images=40, captions=2, distractors=20, seed=3, bonus=0.2)
    base = evaluate(t.sims, t.gt)
    gen = torch.Generator().manual_seed(9)
    better = t.sims.scores.clone()
    for r, q in enumerate(t.gt.query_ids):
        better[r, t.gallery_ids.index(t.gt.relevant[q])] += 0.8  # the true image moves to the top
    # An equally good system: same recipe as the fixture (uniform noise + the same bonus), other random draws.
    noisy = torch.rand(t.sims.shape, generator=gen)
    for r, q in enumerate(t.gt.query_ids):
        noisy[r, t.gallery_ids.index(t.gt.relevant[q])] += 0.2
    strong = compare_evaluations(evaluate(SimsMatrix(t.sims.query_ids, t.gallery_ids, scores=better), t.gt), base)
    weak = compare_evaluations(evaluate(SimsMatrix(t.sims.query_ids, t.gallery_ids, scores=noisy), t.gt), base)
    assert strong.significant("R@1") and strong.table.loc["mAP", "ci_low"] > 0
    assert not weak.significant("mAP") and not weak.significant("R@1")
    assert strong.table.loc["R@1", "diff"] == pytest.approx(
        strong.table.loc["R@1", "model"] - strong.table.loc["R@1", "baseline"]
    )
    again = compare_evaluations(evaluate(SimsMatrix(t.sims.query_ids, t.gallery_ids, scores=noisy), t.gt), base)
    assert again.table.equals(weak.table)  # seeded: reproducible


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_compare_prints_writes_json_and_rejects_bad_input(tiny_gt, tmp_path, capsys):
    t = tiny_gt(n_images=10, distractors=5, seed=2)
    other = SimsMatrix(t.sims.query_ids, t.gallery_ids, scores=t.sims.scores.flip(1)).save(tmp_path / "other.pt")
    out = tmp_path / "cmp.json"
    args = ["compare", str(t.sims_path), str(other), "--gt", str(t.annotation), "--resamples", "200"]
    code, stdout, _ = _main(capsys, *args, "--json", str(out), "--metrics", "R@1,mAP")
    assert code == 0
    assert "other.pt vs tiny.pt" in stdout and "95% CI" in stdout
    data = json.loads(out.read_text())
    assert set(data["other.pt"]["metrics"]) == {"R@1", "mAP"} and data["other.pt"]["queries"] == 20
    for extra, needle in (
        (["--metrics", "R@3"], "unknown metric 'R@3'"),
        (["--confidence", "1.5"], "--confidence must lie in (0, 1)"),
        (["--resamples", "0"], "--resamples must be >= 1"),
    ):
        code, _, err = _main(capsys, *args, *extra, "--json", str(tmp_path / "no.json"))
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
        assert not (tmp_path / "no.json").exists()
    code, _, err = _main(capsys, "compare", str(t.sims_path), str(t.sims_path), "--gt", str(t.annotation))
    assert code == 2 and "given twice" in err
