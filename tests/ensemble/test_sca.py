"""SCA on constructed collisions: it resolves them, respects tau and the text gate, and leaves the rest alone."""

from __future__ import annotations

import json

import pytest
import torch
from ens_helpers import ids

from tpas.ensemble.sca import CaptionSimilarity, resolve_conflicts, tfidf_matrix
from tpas.errors import TpasInputError
from tpas.ranking import topk_stable
from tpas.sims import SimsMatrix


def _collision_case():
    # q0 and q1 have near-duplicate captions; their true images are g0 and g1; both rank g0 first.
    # q2 has no collision and must keep its ranking untouched.
    scores = torch.tensor(
        [
            [0.95, 0.50, 0.10, 0.20, 0.05],  # q0: confident in g0 (margin 0.45)
            [0.80, 0.78, 0.10, 0.30, 0.05],  # q1: g0 barely ahead of g1 (margin 0.02)
            [0.10, 0.20, 0.90, 0.40, 0.30],  # q2: g2, alone
        ]
    )
    return SimsMatrix(ids("q", 3), ids("g", 5), scores=scores)


def test_collision_is_resolved_and_other_rows_untouched():
    m = _collision_case()
    out, rep = resolve_conflicts(m, {"confidence": "margin", "tau": 0.0, "depth": 3})
    top = topk_stable(out.scores, 3)
    assert top[0].tolist() == [0, 1, 3]  # winner keeps its ranking
    assert top[1].tolist()[:2] == [1, 0]  # loser moved to g1, g0 kept right after
    assert torch.equal(out.scores[2], m.scores[2]) and torch.equal(out.scores[0], m.scores[0])
    assert rep["collisions_before"] == {"images": 1, "queries": 2}
    assert rep["collisions_after"] == {"images": 0, "queries": 0}
    assert out.meta["post"][-1]["rows_changed"] == 1 and out.meta["transductive"] is True
    json.dumps(out.meta)  # plain values only
    assert torch.equal(m.scores, _collision_case().scores)  # input not modified


def test_no_collision_means_no_change():
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(6, 6, generator=gen)
    s += torch.eye(6) * 2  # every query a different top-1
    m = SimsMatrix(ids("q", 6), ids("g", 6), scores=s)
    for conf in ("top1", "margin", "softmax"):
        out, rep = resolve_conflicts(m, {"confidence": conf})
        assert torch.equal(out.scores, m.scores) and rep["rows_changed"] == 0


def test_tau_keeps_close_contenders():
    m = _collision_case()
    # winner's margin 0.45 vs loser's 0.02: a gap of 0.43, so tau 0.5 keeps both on g0.
    out, rep = resolve_conflicts(m, {"confidence": "margin", "tau": 0.5})
    assert torch.equal(out.scores, m.scores) and rep["collisions_after"]["images"] == 1


def test_top1_confidence_and_claimed_candidates_are_skipped():
    # q0, q1, q2 all want g0; q1's next choice g1 is q3's top-1 (claimed) so it moves to g2 instead.
    s = torch.tensor(
        [
            [0.9, 0.1, 0.1, 0.0],
            [0.8, 0.7, 0.6, 0.0],
            [0.7, 0.0, 0.1, 0.6],
            [0.0, 0.9, 0.0, 0.1],
        ]
    )
    m = SimsMatrix(ids("q", 4), ids("g", 4), scores=s)
    out, rep = resolve_conflicts(m, {"confidence": "top1", "depth": 4})
    firsts = topk_stable(out.scores, 1)[:, 0].tolist()
    assert firsts == [0, 2, 3, 1]
    assert rep["collisions_after"]["images"] == 0


def test_text_gate_with_tfidf_captions(tmp_path):
    m = _collision_case()
    qfile = tmp_path / "queries.json"
    lines = [
        {"query_index": "q0", "caption": "a man in a red coat falls on the stairs"},
        {"query_index": "q1", "caption": "a man in a red coat is falling on stairs"},
        {"query_index": "q2", "caption": "a woman rides a bicycle"},
    ]
    qfile.write_text("\n".join(json.dumps(x) for x in lines))
    out, _ = resolve_conflicts(m, {"text_sim_min": 0.3, "captions": str(qfile)})
    assert topk_stable(out.scores, 1)[1, 0] == 1  # similar captions: they compete, the collision is resolved
    out, rep = resolve_conflicts(m, {"text_sim_min": 0.99, "captions": str(qfile)})
    assert torch.equal(out.scores, m.scores) and rep["collisions_after"]["images"] == 1


def test_text_gate_with_feature_file(tmp_path):
    m = _collision_case()
    path = tmp_path / "text_feats.pt"
    torch.save({"query_ids": ["q2", "q1", "q0"], "features": torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0]])}, path)
    out, _ = resolve_conflicts(m, {"text_sim_min": 0.9, "text_features": str(path)})
    assert topk_stable(out.scores, 1)[1, 0] == 1


@pytest.mark.parametrize("content,match", [(None, "not found"), (b"<html>login</html>", "HTML")])
def test_text_feature_file_not_tensors(tmp_path, content, match):
    path = tmp_path / "text_feats.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TpasInputError, match=match):
        resolve_conflicts(_collision_case(), {"text_sim_min": 0.9, "text_features": str(path)})


def test_tfidf_cosine():
    t = tfidf_matrix(["red coat", "red coat", "blue hat"])
    sim = CaptionSimilarity(t)
    assert sim.to(0, [1, 2]) == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize(
    "params,match",
    [
        ({"confidence": "max"}, "sca.confidence"),
        ({"tau": -1}, "sca.tau"),
        ({"depth": 1}, "sca.depth"),
        ({"text_sim_min": 0.5}, "needs `text_features` or `captions`"),
        ({"bogus": 1}, "sca.bogus"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(TpasInputError, match=match):
        resolve_conflicts(_collision_case(), params)


def _popular_images(q: int = 40, g: int = 300, seed: int = 0) -> SimsMatrix:
    """Scores where a few popular gallery images top many queries: plenty of collisions to resolve."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(q, g, generator=gen) * 0.5
    scores[:, :5] += torch.rand(q, 5, generator=gen) * 0.6  # images 0-4 are everybody's favourites
    return SimsMatrix(ids("q", q), ids("g", g), scores=scores)


@pytest.mark.parametrize("confidence", ["top1", "margin", "softmax"])
def test_sca_on_a_topk_matrix_stays_topk_and_ranks_as_on_its_densified_form(confidence):
    from tpas.submit import top_gallery_ids

    dense = _popular_images()
    top = dense.top_k(30)
    # Scramble the kept slots: ties and order must come from gallery columns, not storage order.
    perm = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i)) for i in range(40)])
    top = SimsMatrix(top.query_ids, top.gallery_ids, indices=top.indices.gather(1, perm),
                     values=top.values.gather(1, perm))  # fmt: skip
    params = {"confidence": confidence, "depth": 10, "temperature": 0.1}
    out_k, rep_k = resolve_conflicts(top, params)
    densified = SimsMatrix(top.query_ids, top.gallery_ids, scores=top.to_dense("row-min"))
    out_d, rep_d = resolve_conflicts(densified, params)
    assert out_k.k == 30 and rep_k["collisions_before"]["images"] > 0
    assert {k: rep_k[k] for k in ("collisions_before", "collisions_after", "rows_changed", "rounds")} == {
        k: rep_d[k] for k in ("collisions_before", "collisions_after", "rows_changed", "rounds")
    }
    assert top_gallery_ids(out_k, dense.query_ids, k=20) == top_gallery_ids(out_d, dense.query_ids, k=20)
    if confidence != "softmax":  # only the top depth + 1 matter: the same as on the full dense matrix
        out_full, _ = resolve_conflicts(dense, params)
        assert top_gallery_ids(out_k, dense.query_ids) == top_gallery_ids(out_full, dense.query_ids)
