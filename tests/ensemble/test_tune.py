"""Tuning: integer-arithmetic grids, planted weights recovered by every search, CV on held-out folds, outputs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from ens_helpers import ids, save, write_config

from tpas.data.pab import GroundTruth
from tpas.ensemble.config import load_config
from tpas.ensemble.tune import decimal_range, parse_objective, stratified_folds, tune, write_outputs
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix

Q, G, W_TRUE = 120, 150, 0.3


@pytest.fixture
def planted(tmp_path):
    """Two matrices whose noise cancels only at w = 0.3: fused = 0.3*a + 0.7*b = one-hot ground truth."""
    gen = torch.Generator().manual_seed(0)
    gt_cols = torch.randint(0, G, (Q,), generator=gen)
    onehot = torch.zeros(Q, G)
    onehot[torch.arange(Q), gt_cols] = 1.0
    a = torch.randn(Q, G, generator=gen) * 10
    b = (onehot - W_TRUE * a) / (1 - W_TRUE)
    qi, gi = ids("q", Q), ids("g", G)
    save(SimsMatrix(qi, gi, scores=a), tmp_path / "a.pt")
    save(SimsMatrix(qi, gi, scores=b), tmp_path / "b.pt")
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "inputs": {"a": "a.pt", "b": "b.pt"},
            "normalize": {"method": "none"},
            "fuse": {"method": "iterative", "order": ["a", "b"], "weights": [0.8]},
            "tune": {"space": {"fuse.weights.0": {"low": 0.0, "high": 1.0, "step": 0.05}}},
        },
    )
    frame = pd.DataFrame(
        {
            "gallery_id": [gi[int(c)] for c in gt_cols],
            "behaviour": ["anomaly" if i % 3 == 0 else "normal" for i in range(Q)],
        },
        index=qi,
    )
    gt = GroundTruth(qi, dict(zip(qi, frame["gallery_id"], strict=True)), frame)
    return cfg, gt


def test_decimal_range_has_no_float_drift():
    vals = decimal_range(0.0, 0.3, 0.025)
    assert len(vals) == 13 and vals[3] == 0.075 and vals[-1] == 0.3
    assert decimal_range(0.7, 1.0, 0.1) == [0.7, 0.8, 0.9, 1.0]


def test_objective_parsing():
    assert parse_objective(None) == {"mAP": 1.0}
    assert parse_objective("0.5*R@1 + 0.5*mAP") == {"R@1": 0.5, "mAP": 0.5}
    with pytest.raises(TpasInputError, match="unknown metric 'MRR'"):
        parse_objective("MRR")


@pytest.mark.parametrize("search", ["grid", "coordinate", "random", "optuna"])
def test_every_search_recovers_the_planted_weight(planted, search):
    cfg_path, gt = planted
    res = tune(load_config(cfg_path), gt, search=search, trials=21, seed=3)
    assert res.params == {"fuse.weights.0": W_TRUE}
    assert res.best.metrics["R@1"] == 100.0
    assert res.start is not None and res.start.score < res.best.score


def test_cv_reports_held_out_scores_and_is_deterministic(planted):
    cfg_path, gt = planted
    res = tune(load_config(cfg_path), gt, search="coordinate", trials=30, folds=3, seed=7)
    cv = res.cv_summary()
    assert len(res.folds) == 3 and sum(f["n_held_out"] for f in res.folds) == Q
    assert all(f["params"] == {"fuse.weights.0": W_TRUE} for f in res.folds)
    assert cv["held_out_mean"] == pytest.approx(100.0) and cv["gap"] == pytest.approx(0.0)
    again = tune(load_config(cfg_path), gt, search="coordinate", trials=30, folds=3, seed=7)
    assert [t.params for t in again.trials] == [t.params for t in res.trials]


def test_folds_are_stratified_and_balanced():
    strata = ["anomaly"] * 10 + ["normal"] * 20
    f = stratified_folds(strata, 5, seed=0)
    for k in range(5):
        assert (f[:10] == k).sum() == 2 and (f[10:] == k).sum() == 4
    assert (stratified_folds(strata, 5, seed=0) == f).all()


def test_outputs_same_schema_report_and_csv(planted, tmp_path):
    cfg_path, gt = planted
    cfg = load_config(cfg_path)
    res = tune(cfg, gt, search="grid", folds=2, seed=0)
    out_yaml, report, csv_path = write_outputs(res, cfg, tmp_path / "tuned" / "best.yaml")
    tuned = load_config(out_yaml)
    assert tuned.fuse.weights == [W_TRUE]
    assert tuned.inputs["a"].path.resolve() == cfg.inputs["a"].path.resolve()
    text = report.read_text()
    assert "Chosen parameters" in text and "held-out" in text.lower() and "| 0 |" in text
    rows = pd.read_csv(csv_path)
    assert set(rows["search"]) == {"all", "fold-0", "fold-1"} and (rows["search"] == "all").sum() == 21
    assert yaml.safe_load(out_yaml.read_text())["fuse"]["weights"] == [W_TRUE]


def test_exact_config_is_tuned_in_the_linear_form_and_keeps_exact(tmp_path):
    gen = torch.Generator().manual_seed(7)
    qi, gi = ids("q", 40), ids("g", 90)
    for n in ("a", "b"):
        save(SimsMatrix(qi, gi, scores=torch.randn(40, 90, generator=gen)), tmp_path / f"{n}.pt")
    path = write_config(tmp_path / "c.yaml", {
        "inputs": {"a": "a.pt", "b": "b.pt"},
        "fuse": {"method": "iterative", "order": ["a", "b"], "weights": [0.5], "exact": True},
        "tune": {"space": {"fuse.weights.0": [0.2, 0.5, 0.7]}},
    })  # fmt: skip
    cfg = load_config(path)
    gt = GroundTruth(qi, {q: gi[(3 * i) % 90] for i, q in enumerate(qi)}, None)
    res = tune(cfg, gt, search="grid")
    from tpas.ensemble.pipeline import run_ensemble
    from tpas.ensemble.tune import metrics_of
    from tpas.ranking import gt_ranks

    best = load_config(path, [f"fuse.weights=[{res.params['fuse.weights.0']}]"])
    fused, _ = run_ensemble(best)  # exact float operations, as `tpas ensemble` runs the tuned config
    assert fused.meta["ensemble"]["config"]["fuse"]["exact"] is True
    cols = torch.tensor([(3 * i) % 90 for i in range(40)])
    assert metrics_of(gt_ranks(fused.scores, cols)) == pytest.approx(res.best.metrics, abs=1e-9)
    out_yaml, _, _ = write_outputs(res, cfg, tmp_path / "tuned.yaml")
    assert load_config(out_yaml).fuse.exact is True


def test_tuning_with_post_steps_and_categorical_keys(planted):
    cfg_path, gt = planted
    cfg = load_config(
        cfg_path,
        [
            "post=[{sca: {tau: 0.0}}]",
            "tune.space={fuse.weights.0: [0.2, 0.3], normalize.method: [none, zmuv], post.0.sca.tau: [0.0, 1.0]}",
        ],
    )
    res = tune(cfg, gt, search="grid")
    assert res.params["fuse.weights.0"] == W_TRUE and res.best.metrics["R@1"] == 100.0
    assert len(res.trials) == 8


def test_gt_without_matching_queries_is_a_clear_error(planted):
    cfg_path, gt = planted
    with pytest.raises(TpasInputError, match="--ties: 'random' is not one of"):
        tune(load_config(cfg_path), gt, ties="random")
    gt = GroundTruth(["x:0"], {"x:0": "g0"}, pd.DataFrame({"gallery_id": ["g0"]}, index=["x:0"]))
    with pytest.raises(TpasInputError, match="no query of the matrices has a ground truth"):
        tune(load_config(cfg_path), gt)


@pytest.mark.parametrize("post", [[], [{"sca": {"depth": 5}}]])
def test_tuning_top_k_inputs_reports_what_the_tuned_ensemble_scores(tmp_path, post):
    from tpas.ensemble.pipeline import run_ensemble
    from tpas.scoring import evaluate

    gen = torch.Generator().manual_seed(4)
    qi, gi = ids("q", 40), ids("g", 90)
    gt_cols = torch.randint(0, 90, (40,), generator=gen)
    for n in ("a", "b"):
        s = torch.rand(40, 90, generator=gen)
        s[torch.arange(40), gt_cols] += 0.4 * torch.rand(40, generator=gen)
        save(SimsMatrix(qi, gi, scores=s).top_k(15), tmp_path / f"{n}.pt")
    cfg = write_config(tmp_path / "c.yaml", {
        "inputs": {"a": "a.pt", "b": "b.pt"}, "fuse": {"method": "iterative", "order": ["a", "b"], "weights": [0.5]},
        "post": post, "tune": {"space": {"fuse.weights.0": {"low": 0.0, "high": 1.0, "step": 0.25}}}})  # fmt: skip
    frame = pd.DataFrame({"gallery_id": [gi[int(c)] for c in gt_cols], "image_id": qi}, index=pd.Index(qi))
    gt = GroundTruth(qi, dict(zip(qi, frame["gallery_id"], strict=True)), frame)
    res = tune(load_config(cfg), gt, search="grid")
    w = res.params["fuse.weights.0"]
    fused, _ = run_ensemble(load_config(cfg, [f"fuse.weights=[{w}]"]), keep_top=30)
    assert fused.k == 30
    assert evaluate(fused, gt).metrics()["mAP"] == pytest.approx(res.best.metrics["mAP"], abs=1e-9)


@pytest.mark.parametrize(
    "match,ties", [("image", "stable"), ("identity", "stable"), ("identity", "optimistic"), ("image", "pessimistic")]
)
def test_tune_scores_each_trial_as_evaluate_does_with_match_and_ties(tmp_path, match, ties):
    from tpas.ensemble.pipeline import run_ensemble
    from tpas.scoring import evaluate

    # Integer scores fused with weights 0, 0.5, 1 tie often and exactly; identities pair query i with i ^ 1's image.
    n, g = 30, 40
    gen = torch.Generator().manual_seed(3)
    qi, gi = ids("q", n), ids("g", g)
    for name in ("a", "b"):
        save(SimsMatrix(qi, gi, scores=torch.randint(0, 4, (n, g), generator=gen).float()), tmp_path / f"{name}.pt")
    path = write_config(tmp_path / "c.yaml", {
        "inputs": {"a": "a.pt", "b": "b.pt"},
        "normalize": {"method": "none"},
        "fuse": {"method": "iterative", "order": ["a", "b"], "weights": [0.5]},
        "tune": {"space": {"fuse.weights.0": [0.0, 0.5, 1.0]}},
    })  # fmt: skip
    frame = pd.DataFrame(
        {"gallery_id": gi[:n], "image_id": [f"p{i // 2}" for i in range(n)], "behaviour": ["normal"] * n}, index=qi
    )
    gt = GroundTruth(qi, dict(zip(qi, gi[:n], strict=True)), frame)
    res = tune(load_config(path), gt, search="grid", match=match, ties=ties)
    assert len(res.trials) == 3 and f"({match} match, {ties} ties)" in res.report_markdown()
    for t in res.trials:
        fused, _ = run_ensemble(load_config(path, [f"fuse.weights=[{t.params['fuse.weights.0']}]"]))
        expected = evaluate(fused, gt, ties=ties, match=match).metrics()
        assert {k: t.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    # Both options change the scores (so the comparison above is not vacuous).
    flip_match = "image" if match == "identity" else "identity"
    flip_ties = "pessimistic" if ties == "optimistic" else "optimistic"
    other_match = tune(load_config(path), gt, search="grid", match=flip_match, ties=ties)
    other_ties = tune(load_config(path), gt, search="grid", match=match, ties=flip_ties)
    for other in (other_match, other_ties):
        assert [t.metrics for t in other.trials] != [t.metrics for t in res.trials]
