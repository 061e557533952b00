"""`tpas demo --quick`: the whole pipeline (synth, train x2, infer, tune, ensemble, evaluate, submit, validate,
report) at a test-sized scale, through the CLI, then a re-run that reuses the data and the trained models."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import typer.main

from tpas.cli import app, main
from tpas.data.pab import load_ground_truth, read_query_index
from tpas.data.synthetic import generate_mini_pab
from tpas.demo import SIZES, plan, scene_baseline, trap_share
from tpas.ensemble.config import load_config
from tpas.errors import TpasInputError
from tpas.sims import SimsMatrix
from tpas.submit import validate_answer
from tpas.train.config import load_train_config


def test_plan_names_real_commands_and_valid_training_overrides(tmp_path: Path) -> None:
    commands = set(typer.main.get_command(app).commands)
    steps = plan(tmp_path, size="quick")
    assert [s.argv[0] for s in steps[:3]] == ["synth", "train", "train"]
    assert {s.argv[0] for s in steps} <= commands
    for step in steps:
        if step.argv[0] == "train":
            argv = list(step.argv)
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            cfg = load_train_config(argv[argv.index("--config") + 1], sets)  # every override names a real key
            assert cfg["train"]["max_steps"] == SIZES["quick"].train_steps
            assert cfg["data"]["pose"] == cfg["model"]["pose"]
    # Tuning reads the validation split, never the test split it is scored on.
    tune = next(s for s in steps if s.argv[0] == "tune")
    assert "/val/" in tune.argv[tune.argv.index("--gt") + 1]
    with pytest.raises(TpasInputError, match="unknown demo size"):
        plan(tmp_path, size="huge")


def test_trap_share_counts_the_same_persons_other_image_and_the_scene_baseline_ranks_by_scene(tmp_path: Path) -> None:
    import torch

    mp = generate_mini_pab(tmp_path / "m", seed=1, n_identities=2, n_val_identities=1, n_test_identities=6,
                           n_distractors=1, image_size=(16, 16))  # fmt: skip
    gt = load_ground_truth(mp.test_annotation)
    gallery = sorted(set(gt.relevant.values()))
    person = {str(r["image_id"]): r["person_id"] for r in json.loads(mp.test_annotation.read_text())}
    right = torch.tensor([[float(g == gt.relevant[q]) for g in gallery] for q in gt.query_ids])
    # The same person's other image first, the right one second: every query falls into the trap.
    swapped = torch.tensor([[float(g != gt.relevant[q] and person[g] == person[gt.relevant[q]]) for g in gallery]
                            for q in gt.query_ids]) + 0.5 * right  # fmt: skip
    assert trap_share(SimsMatrix(gt.query_ids, gallery, scores=right), gt) == 0.0
    assert trap_share(SimsMatrix(gt.query_ids, gallery, scores=swapped), gt) == 100.0
    base = scene_baseline(gt, gallery, seed=0)
    scene = dict(zip(gt.frame["gallery_id"], gt.frame["scene"], strict=True))
    for q, row in zip(gt.query_ids, base.scores, strict=True):
        top = gallery[int(row.argmax())]
        assert scene[top] == gt.frame.loc[q, "scene"]  # the top-1 is always an image of the query's scene


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.slow
def test_quick_demo_leaves_every_artefact_valid_and_reruns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    code, out = _run(capsys, "demo", "--quick", "--root", tmp_path)
    first_run = time.perf_counter() - t0
    assert code == 0, out[-3000:]
    data = tmp_path / "data" / "demo" / "mini-pab"
    masked = data / "name-masked_test-set"

    # The leaderboard file (and its zip) validate against the name-masked query index and gallery.
    answer = tmp_path / "predictions" / "demo" / "answer.txt"
    assert validate_answer(answer, read_query_index(masked / "query_index.txt"), None).ok
    assert (tmp_path / "predictions" / "demo" / "answer.zip").is_file()

    # Every matrix loads safely with the ids of its split: test rows are the test annotation's queries, masked rows
    # the name-masked query ids; both models wrote an ITC matrix of each split.
    sims = {p.name: SimsMatrix.load(p) for p in (tmp_path / "sims_score" / "demo").glob("*.pt")}
    test_q = set(load_ground_truth(data / "annotation" / "test" / "attr.json").query_ids)
    masked_q = set(read_query_index(masked / "query_index.txt"))
    models = [m.name for m in SIZES["quick"].models]
    for split in ("val", "test", "masked"):
        assert all(f"{split}_{model}.pt" in sims for model in models)
    assert set(sims["test_ensemble.pt"].query_ids) == test_q
    assert sims[f"test_{models[0]}.pt"].source == "cmp-itc" and sims["test_ensemble.pt"].source == "fused"
    # The masked set's ensemble, also post-processed by SCA and by assignment (one query per image there): each
    # post step is recorded in the matrix, and the assignment leaves no gallery image the top-1 of two queries.
    for name in ("masked_ensemble.pt", "masked_ensemble_SCA.pt", "masked_ensemble_assignment.pt"):
        assert set(sims[name].query_ids) == masked_q
    assert [p["step"] for p in sims["masked_ensemble_assignment.pt"].meta["post"]] == ["assignment"]
    assert [p["step"] for p in sims["masked_ensemble_SCA.pt"].meta["post"]] == ["sca"]
    assert "collisions" in out and "ensemble + assignment" in out and "behaviour" in out

    # The tuned config is a valid ensemble config; its trials CSV fed the report's tuning surface.
    tuned = tmp_path / "runs" / "demo" / "ensemble_tuned.yaml"
    cfg = load_config(tuned)
    assert set(cfg.inputs) == set(models)
    report = tmp_path / "reports" / "demo" / "index.html"
    html = report.read_text(encoding="utf-8")
    assert html.count("<section class='query'") == SIZES["quick"].report_queries
    assert (report.parent / "index_files" / "plots" / "tuning_surface.png").is_file()
    thumbs = list((report.parent / "index_files" / "thumbs").glob("*.jpg"))
    assert thumbs and all(f"index_files/thumbs/{t.name}" in html for t in thumbs)

    # The printed table holds every model matrix and the ensemble, with the numbers `tpas evaluate --json` wrote.
    metrics = json.loads((tmp_path / "runs" / "demo" / "metrics" / "ensemble.json").read_text())
    assert set(metrics) >= {"R@1", "R@5", "R@10", "mAP"}
    assert "ensemble" in out and "best single" in out and f"{metrics['R@1']:.2f}" in out
    # The ensemble was tested against the best single matrix; its p-values are printed with the gains.
    compared = json.loads((tmp_path / "runs" / "demo" / "metrics" / "compare.json").read_text())
    (result,) = compared.values()
    assert set(result["metrics"]) == {"R@1", "R@5", "R@10", "mAP"} and result["baseline"].startswith("test_cmp_")
    assert all(0 < v["p_value"] <= 1 for v in result["metrics"].values()) and re.search(r"\(p[=<]0\.\d{3}\)", out)

    # Re-running reuses the mini-PAB and both trained models, and leaves valid artefacts again.
    t1 = time.perf_counter()
    code, out2 = _run(capsys, "demo", "--quick", "--root", tmp_path)
    assert code == 0, out2[-3000:]
    assert out2.count("reused from the last run") == 3
    assert validate_answer(answer, read_query_index(masked / "query_index.txt"), None).ok
    assert time.perf_counter() - t1 < first_run
