"""`tpas report`: page structure, frame colours, filters' data, assets, errors, and a real headless-browser render."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tpas.cli import app, main
from tpas.data.pab import load_ground_truth
from tpas.errors import TpasInputError
from tpas.scoring.plots import recall_at_k_curve, tuning_columns
from tpas.scoring.report import THUMB_BOX, build_report, identity_map
from tpas.sims import SimsMatrix

# Three identities, each with a normal and an anomalous image (ids 0..5), plus two distractors (d0, d1).
N_ID = 3
GALLERY = [str(i) for i in range(2 * N_ID)] + ["d0", "d1"]
# Thumbnail colours kept far from the frame colours so the screenshot check cannot confuse the two.
COLOURS = [(250, 250, 120), (120, 250, 250), (250, 120, 250), (60, 60, 60), (180, 180, 180), (250, 200, 150),
           (110, 90, 20), (20, 90, 110)]  # fmt: skip


@pytest.fixture()
def pab(tmp_path: Path) -> dict:
    """A tiny test annotation (one caption per image, identities in `person_id`) and a gallery of small images."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for gid, colour in zip(GALLERY, COLOURS, strict=True):
        Image.new("RGB", (40, 80), colour).save(gallery / f"{gid}.jpg")
    records = []
    for i in range(2 * N_ID):
        behaviour = "normal" if i % 2 == 0 else "anomaly"
        records.append(
            {
                "image": f"test/{i}.jpg",
                "image_id": str(i),
                "caption": [f"person {i // 2} is {'walking' if behaviour == 'normal' else 'falling'} <b>here</b>"],
                behaviour: "Walking" if behaviour == "normal" else "Falling",
                "scene": "lawn" if i < 4 else "gym",
                "person_id": f"p{i // 2}",
            }
        )
    ann = tmp_path / "attr.json"
    ann.write_text(json.dumps(records))
    return {"gallery": gallery, "ann": ann, "gt": load_ground_truth(ann), "root": tmp_path}


def _matrix(gt, tops: dict[str, list[str]], source: str) -> SimsMatrix:
    """A dense matrix whose ranking of each query starts with the given gallery ids, then the rest in gallery order."""
    scores = torch.zeros(len(gt.query_ids), len(GALLERY))
    for r, q in enumerate(gt.query_ids):
        order = tops.get(q, [])
        order = order + [g for g in GALLERY if g not in order]
        for pos, g in enumerate(order):
            scores[r, GALLERY.index(g)] = float(len(GALLERY) - pos)
    return SimsMatrix(list(gt.query_ids), GALLERY, scores=scores, source=source)


def _models(gt) -> dict[str, SimsMatrix]:
    q = gt.query_ids  # "0:0" .. "5:0"; relevant image of "i:0" is gallery "i"; its identity partner is i ^ 1
    a = _matrix(gt, {q[0]: ["0"], q[1]: ["0", "1"], q[2]: ["d0", "2"]}, "model-a")  # green, blue, red
    b = _matrix(gt, {q[0]: ["0"], q[1]: ["1"], q[2]: ["2"]}, "model-b")  # agrees with a on q0 only
    fused = _matrix(gt, {q[0]: ["0"], q[1]: ["1"], q[2]: ["2"]}, "fused")
    return {"a": a, "b": b, "ensemble": fused}


class _Page(HTMLParser):
    """Collect query sections -> model lines -> hits (frame class, gallery id, src) and every img src."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self.srcs: list[str] = []
        self._hit: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "section" and "query" in cls:
            self.sections.append(
                {
                    "behaviour": a["data-behaviour"],
                    "disagree": a["data-disagree"],
                    "hidden": "hidden" in cls,
                    "lines": {},
                }
            )
        elif tag == "div" and "line" in cls:
            self.sections[-1]["lines"][a["data-model"]] = []
            self._line = self.sections[-1]["lines"][a["data-model"]]
        elif tag == "div" and "hit" in cls:
            self._hit = next(c for c in cls if c != "hit")
        elif tag == "img":
            self.srcs.append(a["src"])
            if self._hit is not None and self.sections and self.sections[-1]["lines"]:
                self._line.append((self._hit, a["data-gallery-id"], a["src"]))
            self._hit = None


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_report_structure_frames_and_assets(pab: dict) -> None:
    gt = pab["gt"]
    out = pab["root"] / "rep" / "index.html"
    trials = pd.DataFrame(
        {"trial": range(12), "w_beit3": np.repeat([0.1, 0.5, 0.9], 4), "w_clip": np.tile([0.2, 0.4, 0.6, 0.8], 3)}
    )
    trials["mAP"] = 50 + 10 * trials["w_beit3"] - 5 * (trials["w_clip"] - 0.4) ** 2
    rep = build_report(_models(gt), gt, pab["gallery"], out, trials=trials)

    page = _parse(out)
    assert len(page.sections) == len(gt.query_ids) == rep.n_queries == rep.n_shown
    for sec in page.sections:
        assert list(sec["lines"]) == ["a", "b", "ensemble"]
        assert all(len(hits) == 5 for hits in sec["lines"].values())
    s0, s1, s2 = page.sections[:3]
    # Constructed cases: correct -> green class, same person other action -> blue, other person -> red.
    assert s0["lines"]["a"][0][:2] == ("correct", "0")
    assert s1["lines"]["a"][0][:2] == ("same-identity", "0")  # query 1 (person 0, anomaly) -> image 0 = same person
    assert s1["lines"]["a"][1][:2] == ("correct", "1")
    assert s2["lines"]["a"][0][:2] == ("wrong", "d0")
    assert s2["lines"]["a"][1][:2] == ("correct", "2")
    # Filters read these attributes: behaviour from the annotation, disagreement = differing top-1.
    assert [s["behaviour"] for s in page.sections] == ["normal", "anomaly"] * N_ID
    assert [s["disagree"] for s in page.sections[:3]] == ["0", "1", "1"]
    assert rep.n_disagree == 2
    assert rep.identity_source == "person_id"
    # Caption text is escaped, never injected as markup.
    html = out.read_text(encoding="utf-8")
    assert "&lt;b&gt;here&lt;/b&gt;" in html and "<b>here</b>" not in html
    # Every image reference is relative, inside the page's own folder, and exists as a small JPEG / PNG.
    assert page.srcs
    for src in page.srcs:
        assert not src.startswith(("/", "file:", "http")) and ".." not in src
        f = out.parent / src
        assert f.is_file(), src
        if src.endswith(".jpg"):
            with Image.open(f) as im:
                assert im.format == "JPEG" and im.width <= THUMB_BOX[0] and im.height <= THUMB_BOX[1]
    assert str(pab["root"]) not in html
    assert set(rep.plots) >= {"Recall at K", "By normal / anomaly", "By scene", "Ensemble tuning surface"}
    assert all(p.is_file() and p.read_bytes()[:4] == b"\x89PNG" for p in rep.plots.values())
    # Metrics through tpas.scoring: model b ranks queries 0-2 first; queries 3-5 fall back to gallery order (ranks 4-6).
    assert rep.metrics.loc["b", "R@1"] == pytest.approx(100.0 * 3 / 6)
    assert list(rep.metrics.index) == ["a", "b", "ensemble"]


def test_rerun_overwrites_cleanly_and_max_queries_prefers_disagreements(pab: dict) -> None:
    gt = pab["gt"]
    out = pab["root"] / "index.html"
    build_report(_models(gt), gt, pab["gallery"], out)
    rep = build_report(_models(gt), gt, pab["gallery"], out, max_queries=2)
    page = _parse(out)
    assert rep.n_shown == 2 and len(page.sections) == 2
    assert [s["disagree"] for s in page.sections] == ["1", "1"]
    # No temp folders left beside the page, and the old run's assets are gone.
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    shown_thumbs = {src for src in page.srcs if "/thumbs/" in src}
    assert {f"index_files/thumbs/{p.name}" for p in (out.parent / "index_files" / "thumbs").iterdir()} == shown_thumbs


def test_no_identity_information_means_no_blue_frames(pab: dict, tmp_path: Path) -> None:
    records = json.loads(pab["ann"].read_text())
    for r in records:
        del r["person_id"]
    ann = tmp_path / "plain.json"
    ann.write_text(json.dumps(records))
    gt = load_ground_truth(ann)
    assert identity_map(gt) == ({}, None)
    out = tmp_path / "plain" / "r.html"
    rep = build_report(_models(gt), gt, pab["gallery"], out)
    assert rep.identity_source is None
    kinds = {h[0] for s in _parse(out).sections for hits in s["lines"].values() for h in hits}
    assert "same-identity" not in kinds and {"correct", "wrong"} <= kinds


def test_identity_from_hard_negative_pair_field(pab: dict, tmp_path: Path) -> None:
    records = json.loads(pab["ann"].read_text())
    for i, r in enumerate(records):
        del r["person_id"]
        r["hard_i"] = f"test/{i ^ 1}.jpg"
    ann = tmp_path / "pairs.json"
    ann.write_text(json.dumps(records))
    ids, source = identity_map(load_ground_truth(ann))
    assert source == "hard_i"
    assert ids["0"] == ids["1"] != ids["2"] == ids["3"]


def test_plot_values() -> None:
    np.testing.assert_allclose(recall_at_k_curve(np.array([1, 2, 2, 30]), 3), [25.0, 75.0, 75.0])
    trials = pd.DataFrame({"trial": [0, 1, 2], "fold": [0, 0, 0], "w": [0.1, 0.2, 0.3], "R@1": [1, 2, 3.0]})
    trials["mAP"] = [3.0, 2.0, 1.0]
    assert tuning_columns(trials) == ("mAP", ["w"])
    assert tuning_columns(trials, "R@1") == ("R@1", ["w"])
    with pytest.raises(TpasInputError):
        tuning_columns(trials.drop(columns=["w"]))
    # `tpas tune`'s CSV layout: marked parameter columns win over other numeric ones.
    tuned = pd.DataFrame({"search": ["all"] * 3, "trial": [0, 1, 2], "param:fuse.weights.0": [0.1, 0.2, 0.3],
                          "objective": [1.0, 2.0, 3.0], "R@1": [5.0, 6.0, 7.0], "extra": [1, 2, 3]})  # fmt: skip
    assert tuning_columns(tuned) == ("objective", ["param:fuse.weights.0"])


def test_library_errors(pab: dict) -> None:
    gt = pab["gt"]
    models = _models(gt)
    out = pab["root"] / "x" / "r.html"
    with pytest.raises(TpasInputError, match="no row"):
        build_report({"a": models["a"].select(gt.query_ids[:3])}, gt, pab["gallery"], out)
    other = SimsMatrix(gt.query_ids, [*GALLERY[:-1], "zz"], scores=models["b"].scores, source="b")
    with pytest.raises(TpasInputError, match="gallery ids differ"):
        build_report({"a": models["a"], "b": other}, gt, pab["gallery"], out)
    with pytest.raises(TpasInputError, match=r"\.html"):
        build_report(models, gt, pab["gallery"], out.with_suffix(".txt"))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _save_models(pab: dict) -> list[str]:
    paths = []
    for name, m in _models(pab["gt"]).items():
        p = pab["root"] / "sims" / f"{name}.pt"
        m.save(p)
        paths.append(str(p))
    return paths


def test_cli_report_and_errors(pab: dict, capsys: pytest.CaptureFixture[str]) -> None:
    runner = CliRunner()
    sims = _save_models(pab)
    out = pab["root"] / "cli" / "index.html"
    trials = pab["root"] / "trials.csv"
    pd.DataFrame({"w_a": [0.1, 0.2, 0.3, 0.1], "w_b": [0.5, 0.5, 0.9, 0.9], "objective": [1.0, 2.0, 3.0, 2.5]}).to_csv(
        trials, index=False
    )
    base = [*sims, "--gt", str(pab["ann"]), "--images", str(pab["gallery"]), "--out", str(out)]
    res = runner.invoke(app, ["report", *base, "--names", "A,B,fusion", "--tuning-trials", str(trials)])
    assert res.exit_code == 0, res.output
    assert "fusion" in res.output and "R@1" in res.output
    assert (out.parent / "index_files" / "plots" / "tuning_surface.png").is_file()
    assert list(_parse(out).sections[0]["lines"]) == ["A", "B", "fusion"]

    # User mistakes: one line, exit 2, nothing written (through the console-script entry point `main`).
    bad_out = pab["root"] / "bad" / "index.html"
    bad = [*sims, "--gt", str(pab["ann"]), "--images", str(pab["gallery"]), "--out", str(bad_out)]
    (pab["gallery"] / "d0.jpg").unlink()  # a top-5 hit's image is missing from the folder
    for extra, expect in (
        (["--names", "A,B"], "2 names for 3"),
        (["--max-queries", "0"], "at least 1"),
        (["--tuning-trials", str(pab["root"] / "none.csv")], "none.csv"),
        ([], "'d0'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["report", *bad, *extra])
        assert exc.value.code == 2, extra
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not bad_out.exists() and not any(p.name.startswith(".") for p in bad_out.parent.glob("*"))
    # The installed console script behaves the same.
    res = subprocess.run([str(Path(sys.executable).parent / "tpas"), "report", *bad], capture_output=True, text=True)
    assert res.returncode == 2 and "'d0'" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------- real browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(pab: dict, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed, and CI=true requires the browser test to run (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium); CI installs it and runs this test")
    gt = pab["gt"]
    out = tmp_path / "browser" / "index.html"
    rep = build_report(_models(gt), gt, pab["gallery"], out, max_queries=3)
    url = out.resolve().as_uri()

    # The page's own script records how many <img> decoded (naturalWidth > 0) once the load event fired.
    dom = _browser(binary, tmp_path / "profile1", "--virtual-time-budget=10000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = _parse_body_attrs(dom.stdout)
    total = int(body["data-images-total"])
    assert total == 3 * (1 + 3 * 5) + len(rep.plots)  # per query: relevant image + 3 models x top-5; plus plots
    assert int(body["data-images-loaded"]) == total

    # Filters: the URL fragment selects anomaly queries where models disagree; everything else gets hidden.
    dom = _browser(binary, tmp_path / "profile3", "--virtual-time-budget=10000", "--dump-dom",
                   url + "#behaviour=anomaly&disagree=1")  # fmt: skip
    visible = [s for s in _parse(_write(tmp_path / "filtered.html", dom.stdout)).sections if not s["hidden"]]
    assert [(s["behaviour"], s["disagree"]) for s in visible] == [("anomaly", "1")]
    assert 'id="count">1<' in dom.stdout

    shot = tmp_path / "shot.png"
    res = _browser(binary, tmp_path / "profile2", "--window-size=1400,3000", "--hide-scrollbars",
                   f"--screenshot={shot}", url)  # fmt: skip
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    keep = os.environ.get("TPAS_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int).reshape(-1, 3)

    def count(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(px - np.array(rgb)).sum(1) < 14).sum())

    # The three frame colours are drawn, and so are thumbnails: pixels of the gallery images' own colours.
    assert count((0x1E, 0xA0, 0x1E)) > 500, "no green frames rendered"
    assert count((0x15, 0x65, 0xC0)) > 500, "no blue frames rendered"
    assert count((0xD3, 0x2F, 0x2F)) > 500, "no red frames rendered"
    assert count(COLOURS[6]) > 500, "distractor thumbnail d0 not rendered"


def _parse_body_attrs(dom: str) -> dict[str, str]:
    found: dict[str, str] = {}

    class Body(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag == "body":
                found.update({k: v or "" for k, v in attrs})

    Body().feed(dom)
    assert "data-images-total" in found, "the page's load script did not run"
    return found
