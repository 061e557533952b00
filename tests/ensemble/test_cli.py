"""`tpas ensemble` and `tpas tune` through the command line: outputs, reports, and exit code 2 on bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from ens_helpers import ids, save, write_config

from tpas.sims import FORMAT, SimsMatrix


@pytest.fixture
def setup(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q, g = 8, 12
    qi, gi = [f"p{i}:0" for i in range(q)], [str(i) for i in range(q)] + ids("d", g - q)
    for name in ("a", "b"):
        s = torch.rand(q, g, generator=gen)
        s[torch.arange(q), torch.arange(q)] += 0.6
        save(SimsMatrix(qi, gi, scores=s), tmp_path / f"{name}.pt")
    save(SimsMatrix(qi, gi, scores=torch.rand(q, g, generator=gen)).top_k(3), tmp_path / "itm.pt")
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "inputs": {"itm": "itm.pt", "a": "a.pt", "b": "b.pt"},
            "fuse": {"method": "iterative", "order": ["itm", "a", "b"], "weights": [0.2, 0.5]},
            "post": [{"sca": {"confidence": "margin"}}],
        },
    )
    records = [
        {
            "image": f"test/{i}.jpg",
            "image_id": f"p{i}",
            "caption": [f"person {i}"],
            **({"anomaly": "Falling"} if i % 2 else {"normal": "Walking"}),
        }
        for i in range(q)
    ]
    (tmp_path / "attr.json").write_text(json.dumps(records))
    return tmp_path, cfg


def test_ensemble_writes_fused_matrix_and_reports_steps(setup, cli):
    tmp, cfg = setup
    code, out, err = cli(
        "ensemble", "--config", cfg, "--out", tmp / "out" / "fused.pt", "--set", "fuse.weights=[0.1,0.5]"
    )
    assert code == 0, err
    fused = SimsMatrix.load(tmp / "out" / "fused.pt")
    assert fused.source == "fused" and fused.shape == (8, 12) and fused.meta["transductive"] is True
    steps = [s["step"] for s in fused.meta["ensemble"]["steps"]]
    assert steps[:3] == ["load", "load", "load"] and "fuse" in steps and steps[-1] == "sca"
    assert fused.meta["ensemble"]["config"]["fuse"]["weights"] == [0.1, 0.5]
    for word in ("fuse", "sca", "collisions_before", "transductive"):
        assert word in out


def _raw_nan_file(path, like: SimsMatrix):
    s = like.scores.clone()
    s[2, 3] = float("nan")
    torch.save(
        {
            "format": FORMAT,
            "scores": s,
            "query_ids": like.query_ids,
            "gallery_ids": like.gallery_ids,
            "source": "x",
            "meta": {},
        },
        path,
    )


@pytest.mark.parametrize(
    "sets,match",
    [
        (["fuse.order=[]"], "fuse.order: the fusion list is empty"),
        (["fuse.weights=[0.2, 1.5]"], r"fuse.weights\[1\]: weight must be a number in \[0, 1\]"),
        (["inputs.b=missing.pt"], "missing.pt: file not found"),
        (["fuse.method=borda"], "fuse.method"),
        (["fuse.weights"], "expected key=value"),
    ],
)
def test_bad_configs_exit_2_with_one_line(setup, cli, sets, match):
    tmp, cfg = setup
    args = ["ensemble", "--config", cfg, "--out", tmp / "never.pt"]
    for s in sets:
        args += ["--set", s]
    code, _, err = cli(*args)
    assert code == 2 and "Traceback" not in err
    assert __import__("re").search(match, " ".join(err.split()))
    assert not (tmp / "never.pt").exists()


def test_nan_and_misaligned_inputs_exit_2(setup, cli):
    tmp, cfg = setup
    a = SimsMatrix.load(tmp / "a.pt")
    _raw_nan_file(tmp / "nan.pt", a)
    code, _, err = cli("ensemble", "--config", cfg, "--out", tmp / "x.pt", "--set", "inputs.b=nan.pt")
    assert code == 2 and "non-finite score nan" in err and "'p2:0'" in err
    other = SimsMatrix([*a.query_ids[:-1], "stranger"], a.gallery_ids, scores=a.scores)
    save(other, tmp / "other.pt")
    code, _, err = cli("ensemble", "--config", cfg, "--out", tmp / "x.pt", "--set", "inputs.b=other.pt")
    assert code == 2 and "'stranger'" in err and "'p7:0'" in err
    assert not (tmp / "x.pt").exists()


def test_tune_writes_config_report_and_trials(setup, cli):
    tmp, cfg = setup
    out = tmp / "tuned" / "t.yaml"
    code, stdout, err = cli(
        "tune",
        "--config",
        cfg,
        "--gt",
        tmp / "attr.json",
        "--out",
        out,
        "--search",
        "random",
        "--trials",
        "6",
        "--folds",
        "2",
        "--seed",
        "1",
        "--metric",
        "0.5*R@1+0.5*mAP",
        "--set",
        "post=[]",
    )
    assert code == 0, err
    assert "best 0.5*R@1 + 0.5*mAP" in " ".join(stdout.split()) and "2-fold CV" in stdout
    assert out.is_file() and (tmp / "tuned" / "t.report.md").is_file()
    trials = pd.read_csv(tmp / "tuned" / "t.trials.csv")
    assert (trials["search"] == "all").sum() == 6
    code, _, err = cli("ensemble", "--config", out, "--out", tmp / "again.pt")
    assert code == 0, err


def test_tune_bad_options_exit_2(setup, cli):
    tmp, cfg = setup
    base = ["tune", "--config", cfg, "--gt", tmp / "attr.json", "--out", tmp / "t.yaml"]
    assert cli(*base, "--search", "anneal")[0] == 2
    assert cli(*base, "--folds", "1")[0] == 2
    code, _, err = cli(*base, "--metric", "MRR")
    assert code == 2 and "unknown metric 'MRR'" in err


def test_one_process_submission_equals_ensemble_then_submit(setup, cli):
    tmp, cfg = setup
    qi = tmp / "query_index.txt"
    qi.write_text("".join(f"p{i}:0\n" for i in reversed(range(8))))
    code, _, err = cli("ensemble", "--config", cfg, "--out", tmp / "fused.pt")
    assert code == 0, err
    code, _, err = cli("submit", tmp / "fused.pt", "--query-index", qi, "--out", tmp / "two" / "answer.txt", "--k", 5)
    assert code == 0, err
    code, _, err = cli("ensemble", "--config", cfg, "--submit", tmp / "one" / "answer.txt", "--query-index", qi,
                         "--k", 5, "--zip")  # fmt: skip
    assert code == 0, err
    assert (tmp / "one" / "answer.txt").read_bytes() == (tmp / "two" / "answer.txt").read_bytes()
    assert (tmp / "one" / "answer.zip").is_file() and not list((tmp / "one").glob("*.pt"))
    code, _, err = cli("ensemble", "--config", cfg, "--submit", tmp / "x.txt")
    assert code == 2 and "--submit needs --query-index" in err
    code, _, err = cli("ensemble", "--config", cfg)
    assert code == 2 and "nothing to write" in err


def test_import_run_and_a_run_only_ensemble(setup, cli):
    tmp, _ = setup
    qi = tmp / "query_index.txt"
    qi.write_text("".join(f"p{i}:0\n" for i in range(8)))
    for name, shift in (("r1", 0), ("r2", 1)):
        lines = [
            f"p{i}:0 Q0 {(i + shift + j) % 12} {j + 1} {1.0 - j / 10:.2f} {name}\n" for i in range(8) for j in range(4)
        ]
        (tmp / f"{name}.trec").write_text("".join(lines))
    code, _, err = cli("import-run", tmp / "r1.trec", "--query-index", qi, "--out", tmp / "r1.pt")
    assert code == 0, err
    m = SimsMatrix.load(tmp / "r1.pt")
    assert m.k == 4 and m.query_ids == [f"p{i}:0" for i in range(8)]
    assert m.gallery_ids[int(m.indices[3, 0])] == "3"  # the run's first id of query p3:0
    cfg = write_config(tmp / "runs.yaml", {"inputs": {"r1": "r1.trec", "r2": "r2.trec"}, "fuse": {"method": "rrf"}})
    code, _, err = cli("ensemble", "--config", cfg, "--query-index", qi, "--submit", tmp / "answer.txt", "--k", 3)
    assert code == 0, err
    assert len((tmp / "answer.txt").read_text().splitlines()) == 8
    code, _, err = cli("validate", tmp / "answer.txt", "--query-index", qi, "--k", 3)
    assert code == 0, err
