"""The synthetic mini-PAB: PAB layouts every reader accepts, IHNM pairs, determinism, vocabulary, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tpas.cli import app
from tpas.data.pab import list_gallery, load_ground_truth, read_queries, read_query_index, read_train_annotation
from tpas.data.synthetic import MiniPab, generate_mini_pab
from tpas.errors import TpasInputError

SMALL = {"n_identities": 6, "n_val_identities": 2, "n_test_identities": 3, "n_distractors": 2, "image_size": (32, 64)}


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> MiniPab:
    return generate_mini_pab(tmp_path_factory.mktemp("a") / "pab", seed=3, **SMALL)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(mini: MiniPab, tmp_path: Path) -> None:
    again = generate_mini_pab(tmp_path / "b", seed=3, **SMALL)
    assert _tree(mini.root) == _tree(again.root)
    other = generate_mini_pab(tmp_path / "c", seed=4, **SMALL)
    assert _tree(other.root)["annotation/train/attr_0.json"] != _tree(mini.root)["annotation/train/attr_0.json"]


def test_train_records_form_identity_hard_negative_pairs(mini: MiniPab) -> None:
    records = read_train_annotation(mini.train_annotations)
    assert len(records) == mini.n_train_pairs == 6 * 2 * 2
    by_id = {r.image_id: r for r in records}
    for r in records:
        assert (mini.root / r.image).is_file()
        assert (mini.root / "pose" / r.image).is_file()
        # hard_i is relative to train/ (the original loader prefixes it), and so is its pose map.
        assert (mini.root / "train" / r.hard_i).is_file()
        assert (mini.root / "pose" / "train" / r.hard_i).is_file()
        partner = by_id[r.hard_i_id]
        assert partner.image == f"train/{r.hard_i}"
        assert partner.hard_i_id == r.image_id
        assert partner.is_anomaly != r.is_anomaly
        assert partner.scene == r.scene
        assert r.hard_c in {p.caption for p in records if p.image_id == r.hard_i_id}
        assert ("/goal/" in r.image) == (not r.is_anomaly)
    raw = json.loads(mini.train_annotations[0].read_text())
    fields = "image caption image_id hard_i hard_c hard_i_id source_id source_caption normal scene"
    assert set(raw[0]) == set(fields.split())


def test_eval_splits_load_as_ground_truth_with_both_behaviours(mini: MiniPab) -> None:
    for path, n in ((mini.test_annotation, mini.n_test_images), (mini.val_annotation, mini.n_val_images)):
        gt = load_ground_truth(path)
        assert len(set(gt.relevant.values())) == n
        assert set(gt.frame["behaviour"]) == {"normal", "anomaly"}
        assert "scene" in gt.frame and "person_id" in gt.frame
        split = path.parent.name
        for gid in gt.relevant.values():
            img = Image.open(mini.root / split / f"{gid}.jpg")
            pose = Image.open(mini.root / "pose" / split / f"{gid}.jpg")
            assert img.size == pose.size == (32, 64)


def test_name_masked_set_is_consistent(mini: MiniPab) -> None:
    queries = read_queries(mini.query_json)
    order = read_query_index(mini.query_index)
    assert [q.id for q in queries] == order
    assert all(len(q) == 15 and q.isupper() for q in order)
    gallery = list_gallery(mini.gallery_dir)
    assert len(gallery) == mini.n_gallery == 3 * 2 + 2
    assert all((mini.pose_dir / "name-masked_test-set" / "gallery" / g.path.name).is_file() for g in gallery)
    gt = load_ground_truth(mini.ground_truth)
    assert set(gt.relevant.values()) <= {g.id for g in gallery}
    # Each ground-truth record names its query; its caption is that query's caption.
    truth = {r["query_index"]: r for r in json.loads(mini.ground_truth.read_text())}
    assert set(truth) == set(order)
    assert all(truth[q.id]["caption"] == [q.caption] for q in queries)
    # Records name their query_index, so the ground truth's query ids are the matrix rows' ids (query.json).
    masked = load_ground_truth(mini.ground_truth)
    assert sorted(masked.query_ids) == sorted(order)
    assert masked.relevant == {q: Path(truth[q]["image"]).stem for q in order}
    assert list(masked.frame.index) == masked.query_ids and set(masked.frame["behaviour"]) == {"normal", "anomaly"}
    import torch

    from tpas.scoring import evaluate
    from tpas.sims import SimsMatrix

    gids = [g.id for g in gallery]
    perfect = torch.tensor([[float(g == masked.relevant[q]) for g in gids] for q in order])
    assert evaluate(SimsMatrix(order, gids, scores=perfect), masked).metrics()["R@1"] == 100.0


def test_vocab_is_bert_compatible_and_covers_the_captions(mini: MiniPab) -> None:
    from transformers import BertTokenizer

    lines = mini.vocab.read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizer(str(mini.vocab), do_lower_case=True)
    assert tok.pad_token_id == 0
    caption = read_train_annotation(mini.train_annotations)[0].caption
    ids = tok(caption)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert tok.unk_token_id not in tok("Zebra-crossing, 42 xylophones!")["input_ids"]


def test_refuses_a_non_empty_folder_and_bad_sizes(mini: MiniPab, tmp_path: Path) -> None:
    with pytest.raises(TpasInputError, match="not empty"):
        generate_mini_pab(mini.root, seed=3, **SMALL)
    with pytest.raises(TpasInputError, match="too small"):
        generate_mini_pab(tmp_path / "x", seed=0, n_identities=1, image_size=(8, 8))


def test_cli_synth_writes_the_layout_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["synth", "--out", str(tmp_path / "m"), "--identities", "3", "--val-identities", "1",
            "--test-identities", "2", "--distractors", "1", "--width", "32", "--height", "48"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "annotation" / "train" / "attr_0.json").is_file()
    assert len(list((tmp_path / "m" / "name-masked_test-set" / "gallery").glob("*.jpg"))) == 5
    from tpas.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    # --framing and the caption counts reach the generator: the same files as the library call writes.
    extra = ["--framing", "person", "--train-captions", "1", "--test-captions", "1"]
    result = runner.invoke(app, [*args[:2], str(tmp_path / "p"), *args[3:], *extra])
    assert result.exit_code == 0, result.output
    ref = generate_mini_pab(tmp_path / "ref", seed=0, n_identities=3, n_val_identities=1, n_test_identities=2,
                            n_distractors=1, image_size=(32, 48), framing="person", train_captions_per_image=1,
                            test_captions_per_image=1)  # fmt: skip
    for rel in ("annotation/test/attr.json", "annotation/train/attr_0.json", "test/0.jpg"):
        assert (tmp_path / "p" / rel).read_bytes() == (ref.root / rel).read_bytes()
    assert all(len(r["caption"]) == 1 for r in json.loads((ref.root / "annotation/test/attr.json").read_text()))
    with pytest.raises(SystemExit) as e:
        main([*args[:2], str(tmp_path / "w"), *args[3:], "--framing", "wide"])
    assert e.value.code == 2 and not (tmp_path / "w" / "vocab.txt").exists()


def test_person_framing_fills_the_frame_and_stays_inside_it() -> None:
    import numpy as np

    from tpas.data.synthetic import ACTION_LABELS, Person, render_sample

    person = Person("woman", "red", "blue", "coat", "skirt", "black", "average", 1, "lawn")
    for action in ACTION_LABELS:
        boxes = {}
        for framing in ("scene", "person"):
            img, pose, kp = render_sample(person, action, (64, 64), np.random.default_rng(0), framing)
            assert img.size == pose.size == (64, 64)
            assert (kp[:, :2] >= 0).all() and (kp[:, :2] <= 64).all()
            boxes[framing] = (kp[:, :2].max(axis=0) - kp[:, :2].min(axis=0)).max()
        # The person crop is the larger figure: its longer side spans most of the frame.
        assert boxes["person"] > boxes["scene"] and boxes["person"] > 0.6 * 64


def test_unknown_framing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TpasInputError, match="unknown framing"):
        generate_mini_pab(tmp_path / "x", seed=0, framing="wide", **SMALL)
