"""evaluate(): ids, tie rules, top-K matrices, identity matching, breakdowns and the errors that name ids."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tpas.data.pab import load_ground_truth
from tpas.errors import TpasInputError
from tpas.ranking import Ties
from tpas.scoring import METRICS, evaluate
from tpas.sims import SimsMatrix


def brute_rank(row: list[float], col: int) -> int:
    return sorted(range(len(row)), key=lambda c: (-row[c], c)).index(col) + 1


def test_overall_and_per_query_match_brute_force(tiny_gt):
    t = tiny_gt(n_images=5, captions=2, distractors=4, seed=1, bonus=0.3)
    ev = evaluate(t.sims, t.gt)
    ranks = [
        brute_rank(row, t.gallery_ids.index(t.gt.relevant[q]))
        for q, row in zip(t.gt.query_ids, t.sims.scores.tolist(), strict=True)
    ]
    assert ev.per_query["rank"].tolist() == ranks
    assert ev.per_query["query_id"].tolist() == t.gt.query_ids
    assert math.isclose(ev.metrics()["mAP"], sum(1 / r for r in ranks) / len(ranks) * 100)
    assert math.isclose(ev.metrics()["R@1"], sum(r == 1 for r in ranks) / len(ranks) * 100)
    assert list(ev.metrics()) == list(METRICS)
    assert ev.overall.loc["all", "n"] == 10
    assert {"gallery_id", "behaviour", "action", "scene", "caption"} <= set(ev.per_query.columns)


def test_rows_in_another_order_and_extra_rows_are_handled_by_id(tiny_gt):
    t = tiny_gt(n_images=4, distractors=2)
    base = evaluate(t.sims, t.gt)
    extra = SimsMatrix(
        [*reversed(t.sims.query_ids), "extra:0"],
        t.gallery_ids,
        scores=torch.cat([t.sims.scores.flip(0), torch.zeros(1, len(t.gallery_ids))]),
    )
    ev = evaluate(extra, t.gt)
    assert ev.per_query["rank"].tolist() == base.per_query["rank"].tolist()
    assert ev.unscored_rows == 1
    shuffled = t.sims.select(gallery_ids=list(reversed(t.gallery_ids)))
    # Reordering columns changes only tie-breaking; random scores have no ties.
    assert evaluate(shuffled, t.gt).per_query["rank"].tolist() == base.per_query["rank"].tolist()


def test_ties_rules_bound_the_stable_result(tiny_gt):
    t = tiny_gt(n_images=4, distractors=3)
    flat = SimsMatrix(t.sims.query_ids, t.gallery_ids, scores=torch.zeros(t.sims.shape))
    stab, opt, pes = (evaluate(flat, t.gt, ties).per_query["rank"] for ties in Ties)
    g = len(t.gallery_ids)
    assert opt.tolist() == [1] * len(opt) and pes.tolist() == [g] * len(pes)
    # Stable = gallery position of the true image + 1.
    assert stab.tolist() == [t.gallery_ids.index(t.gt.relevant[q]) + 1 for q in t.gt.query_ids]


def test_topk_matrix_scores_like_its_dense_source_within_k(tiny_gt):
    t = tiny_gt(n_images=6, distractors=6, bonus=0.1)
    dense = evaluate(t.sims, t.gt).per_query["rank"]
    top = evaluate(t.sims.top_k(3), t.gt).per_query["rank"]
    assert [int(a) for a, b in zip(top, dense, strict=True) if b <= 3] == [int(b) for b in dense if b <= 3]
    assert all(b > 3 for a, b in zip(top, dense, strict=True) if a > 3)


def test_breakdown_by_behaviour_and_scene(tiny_gt):
    t = tiny_gt(n_images=4, captions=1, distractors=0)
    ranks = torch.tensor([1, 2, 1, 4])  # normal, anomaly, normal, anomaly
    scores = torch.zeros(4, 4)
    for r, rank in enumerate(ranks.tolist()):
        order = [c for c in range(4) if c != r]
        scores[r, r] = 10 - rank
        for pos, c in enumerate(order):
            scores[r, c] = 10 - (pos + 1 if pos + 1 < rank else pos + 2)
    sims = SimsMatrix(t.gt.query_ids, t.gallery_ids, scores=scores)
    ev = evaluate(sims, t.gt, by=["normal/anomaly", "scene"])
    assert ev.per_query["rank"].tolist() == [1, 2, 1, 4]
    assert ev.by == ("behaviour", "scene")
    b = ev.breakdown("normal/anomaly")
    assert b.loc["normal", "R@1"] == 100.0 and b.loc["anomaly", "R@1"] == 0.0
    assert math.isclose(b.loc["anomaly", "mAP"], (1 / 2 + 1 / 4) / 2 * 100)
    assert b.loc["normal", "n"] == 2
    assert list(ev.breakdown("scene").index) == ["park", "street"]
    with pytest.raises(TpasInputError, match=r"no ground-truth column 'colour'.*choose from"):
        evaluate(sims, t.gt, by=["colour"])


def test_identity_match_counts_every_image_of_the_identity(tmp_path):
    recs = [
        {"image": "test/a.jpg", "image_id": "p0", "caption": ["x"]},
        {"image": "test/b.jpg", "image_id": "p1", "caption": ["y"]},
    ]
    ann = tmp_path / "attr.json"
    ann.write_text(json.dumps(recs))
    gt = load_ground_truth(ann)
    gt.frame.loc["p1:0", "image_id"] = "p0"  # a second image of the same person
    sims = SimsMatrix(gt.query_ids, ["a", "b", "z"], scores=torch.tensor([[0.1, 0.9, 0.5], [0.9, 0.1, 0.5]]))
    by_image = evaluate(sims, gt).per_query["rank"].tolist()
    by_identity = evaluate(sims, gt, match="identity").per_query
    assert by_image == [3, 3]
    assert by_identity["rank"].tolist() == [1, 1]
    assert by_identity["AP"].tolist() == [(1 + 2 / 3) / 2] * 2


def test_missing_query_and_missing_gallery_image_name_the_id(tiny_gt):
    t = tiny_gt(n_images=3, distractors=1)
    fewer = t.sims.select(query_ids=t.sims.query_ids[1:])
    with pytest.raises(TpasInputError, match=r"ground-truth query 'p0:0' is not a row of the matrix \(1 of 6"):
        evaluate(fewer, t.gt)
    no_img = t.sims.select(gallery_ids=[g for g in t.gallery_ids if g != "1"])
    with pytest.raises(TpasInputError, match="query 'p1:0': its relevant image '1' is not a gallery id"):
        evaluate(no_img, t.gt)


def test_unknown_match_or_tie_rule_is_an_input_error(tiny_gt):
    t = tiny_gt()
    with pytest.raises(TpasInputError, match=r"--match: 'person' is not one of \['image', 'identity'\]"):
        evaluate(t.sims, t.gt, match="person")
    with pytest.raises(
        TpasInputError, match=r"--ties: 'random' is not one of \['stable', 'optimistic', 'pessimistic'\]"
    ):
        evaluate(t.sims, t.gt, ties="random")


def test_row_ranges_on_worker_threads_rank_as_one_call(tiny_gt, monkeypatch):
    # evaluate() ranks dense rows in ranges on worker threads; every row must come out as in one serial call, also
    # for a row subset (extra matrix rows) and with ties (quantised scores).
    t = tiny_gt(n_images=7, captions=2, distractors=9, seed=3)
    scores = (torch.cat([t.sims.scores, torch.rand(3, len(t.gallery_ids))]) * 4).round()
    sims = SimsMatrix([*t.sims.query_ids, "x:0", "y:0", "z:0"], t.gallery_ids, scores=scores)
    serial = evaluate(sims, t.gt).per_query["rank"].tolist()
    monkeypatch.setenv("TPAS_THREADS", "3")
    assert evaluate(sims, t.gt).per_query["rank"].tolist() == serial
    cols = [t.gallery_ids.index(t.gt.relevant[q]) for q in t.gt.query_ids]
    assert serial == [brute_rank(scores[i].tolist(), c) for i, c in enumerate(cols)]


def test_tables_are_built_on_demand_and_agree_with_the_metrics(tiny_gt):
    t = tiny_gt(n_images=5, captions=2, distractors=4, seed=2)
    gt = load_ground_truth(t.annotation)
    assert gt._frame is None  # reading the annotation builds no DataFrame (no pandas import)
    assert gt.columns == list(gt.frame.columns)
    ev = evaluate(t.sims, gt)
    assert ev.summary() == {"n": 10, **ev.overall.iloc[0].to_dict()}
    assert ev.metrics() == {k: float(ev.overall.loc["all", k]) for k in METRICS}
