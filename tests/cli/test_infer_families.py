"""`tpas infer FAMILY` is built from the registry: each family's own options, from its module or an entry point."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tpas.errors import TpasError
from tpas.models import FamilyOption, base, get_model_class, list_models, load_model
from tpas.sims import SimsMatrix

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _infer(cli, gallery, out: Path, *extra: object) -> tuple[int, str, str]:
    return cli("infer", "toy", "--images", gallery.images, "--queries", gallery.queries, "--out", out,
               "--workers", "0", "--no-cache", *extra)  # fmt: skip


def test_toy_option_reaches_the_family_and_changes_the_scores(cli, gallery, toy_family, tmp_path):
    code, out, err = _infer(cli, gallery, tmp_path / "one.pt")
    assert code == 0, err
    assert "3 queries x 4 gallery images (toy)" in out
    code, _, err = _infer(cli, gallery, tmp_path / "two.pt", "--toy-scale", "2")
    assert code == 0, err
    one, two = SimsMatrix.load(tmp_path / "one.pt"), SimsMatrix.load(tmp_path / "two.pt")
    assert one.meta["model"]["scale"] == 1.0 and two.meta["model"]["scale"] == 2.0
    assert one.scores.abs().min() > 0
    torch.testing.assert_close(two.scores, 2 * one.scores, rtol=1e-6, atol=0)
    code, _, err = _infer(cli, gallery, tmp_path / "raw.pt", "--toy-norm", "none")
    assert code == 0, err
    assert not torch.allclose(SimsMatrix.load(tmp_path / "raw.pt").scores, one.scores)


def test_toy_help_lists_its_options_and_the_engines(cli, toy_family):
    code, out, _ = cli("infer", "toy", "--help")
    assert code == 0
    for flag in ("--toy-scale", "--toy-norm", "toy options", "--images", "--batch-size", "--rerank-k"):
        assert flag in out, flag
    assert "One of: l2, none." in out and "--arch" not in out and "--vocab" not in out
    code, out, _ = cli("infer", "--help")
    assert code == 0
    assert all(name in out for name in ("toy", "clip", "cmp", "beit3", "blip2"))
    assert "A colour-histogram toy" in out  # the family's summary is its class docstring's first sentence


def test_each_builtin_family_shows_its_own_options_only(cli):
    own = {"clip": {"--arch", "--tokenizer", "--tta"}, "cmp": {"--vocab", "--tta"}, "beit3": {"--tokenizer", "--tta"},
           "blip2": {"--vocab", "--itc-score", "--tta"}}  # fmt: skip
    every = set().union(*own.values())
    for family, flags in own.items():
        code, out, _ = cli("infer", family, "--help")
        assert code == 0
        assert "--trust-checkpoint" in out and "--images" in out and f"{family} options" in out
        for flag in every:
            assert (flag in out) == (flag in flags), (family, flag)


def test_an_option_of_another_family_is_refused_in_one_line(cli, gallery, toy_family, tmp_path):
    code, _, err = cli("infer", "clip", "--images", gallery.images, "--queries", gallery.queries,
                         "--out", tmp_path / "o.pt", "--toy-scale", "2")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --toy-scale is an option of toy, not of clip")
    code, _, err = _infer(cli, gallery, tmp_path / "o.pt", "--itc-score", "max")
    assert code == 2 and "--itc-score is an option of blip2, not of toy" in err
    code, _, err = _infer(cli, gallery, tmp_path / "o.pt", "--toy-norm", "l1")
    assert code == 2 and "--toy-norm must be one of l2, none, got 'l1'" in err
    code, _, err = _infer(cli, gallery, tmp_path / "o.pt", "--toy-scale", "big")
    assert code == 2 and err.splitlines() == [err.splitlines()[0], "Try 'tpas infer toy --help' for help."], err
    assert err.startswith("error: Invalid value for '--toy-scale'")
    assert not (tmp_path / "o.pt").exists()


def test_load_model_fills_defaults_and_refuses_undeclared_options(toy_family):
    assert load_model("toy", None).describe() == {"family": "toy", "scale": 1.0, "norm": "l2"}
    assert load_model("toy", None, toy_scale=3.0).scale == 3.0
    with pytest.raises(TpasError, match="--vocab do not apply to toy"):
        load_model("toy", None, vocab=Path("v.txt"))


def test_register_refuses_a_malformed_option_declaration(toy_family):
    class Bad(toy_family.ToyFamily):
        options = ("toy_scale",)

    class Twice(toy_family.ToyFamily):
        options = (toy_family.ToyFamily.options[0],) * 2

    with pytest.raises(ValueError, match="FamilyOption"):
        base.register("bad")(Bad)
    with pytest.raises(ValueError, match="declares an option twice"):
        base.register("bad")(Twice)
    assert "bad" not in base._REGISTRY


def test_entry_points_register_a_class_or_name_what_went_wrong(monkeypatch, toy_family):
    def installed(*points: tuple[str, str]) -> None:
        eps = [importlib.metadata.EntryPoint(name=n, value=v, group=base.ENTRY_POINT_GROUP) for n, v in points]
        monkeypatch.setattr(base, "_entry_points", lambda: eps)

    installed(("toy2", "toy_family:UnregisteredToy"))
    monkeypatch.delitem(base._REGISTRY, "toy2", raising=False)
    try:
        assert get_model_class("toy2") is toy_family.UnregisteredToy  # registered under the entry point's name
        assert "toy2" in list_models() and toy_family.UnregisteredToy.family == "toy2"
    finally:
        base._REGISTRY.pop("toy2", None)
    installed(("empty", "json"))
    with pytest.raises(TpasError, match=r"entry point empty = json \(group tpas.families\) registered no model family"):
        get_model_class("empty")
    installed(("broken", "no_such_module_anywhere"))
    with pytest.raises(TpasError, match=r"broken = no_such_module_anywhere .* failed to load: ModuleNotFoundError"):
        list_models()


def _run(args: list[str], site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(site), str(HERE), str(REPO)])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_a_family_from_an_installed_distribution_runs_through_the_real_cli(gallery, tmp_path):
    """A fake distribution (a dist-info folder on sys.path) declares `toy` in the `tpas.families` group."""
    site = tmp_path / "site"
    dist = site / "tpas_toy-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tpas-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{base.ENTRY_POINT_GROUP}]\ntoy = toy_family\n")
    out = tmp_path / "toy.pt"
    run = _run(["-m", "tpas", "infer", "toy", "--images", str(gallery.images), "--queries", str(gallery.queries),
                "--out", str(out), "--workers", "0", "--no-cache", "--toy-scale", "3"], site)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert SimsMatrix.load(out).meta["model"]["scale"] == 3.0
    # `tpas --help` imports no model code; `tpas infer clip --help` imports clip's module and no other family's.
    probe = textwrap.dedent("""
        import sys
        from tpas.cli import main
        FAMILIES = ("tpas.models.clip", "tpas.models.cmp", "tpas.models.beit3", "tpas.models.blip2", "toy_family")
        def run(*argv):
            try:
                main(list(argv))
            except SystemExit:
                pass
        run("--help")
        print("after-root", "torch" in sys.modules, "tpas.models" in sys.modules)
        run("infer", "clip", "--help")
        print("after-clip", [m for m in FAMILIES if m in sys.modules])
        run("infer", "--help")
    """)
    run = _run(["-c", probe], site)
    assert run.returncode == 0, run.stderr
    assert "after-root False False" in run.stdout
    assert "after-clip ['tpas.models.clip']" in run.stdout
    clip_help, infer_help = run.stdout.split("after-root")[1].split("after-clip")
    assert "--arch" in clip_help and "--toy-scale" not in clip_help
    assert "A colour-histogram toy" in infer_help  # `tpas infer --help` lists the installed family


def test_a_flag_that_defaults_to_on_can_be_turned_off(cli, gallery, toy_family, tmp_path, monkeypatch):
    class Shifted(toy_family.ToyFamily):
        """The toy plus one on every score unless --no-toy-shift."""

        options = (
            *toy_family.ToyFamily.options,
            FamilyOption("toy_shift", bool, "Add 1 to every score.", default=True),
        )

        @classmethod
        def from_checkpoint(cls, path, config=None, **options):
            model = super().from_checkpoint(path, config, **options)
            model.shift = options["toy_shift"]
            return model

        def describe(self):
            return {**super().describe(), "shift": self.shift}

        def similarity(self, text_embed, image_embed):
            return super().similarity(text_embed, image_embed) + float(self.shift)

    monkeypatch.setitem(base._REGISTRY, "shifted", Shifted)
    code, out, _ = cli("infer", "shifted", "--help")
    assert code == 0 and "--toy-shift" in out and "--no-toy-shift" in out
    runs = {}
    for name, extra in (("on", ()), ("off", ("--no-toy-shift",))):
        code, _, err = cli("infer", "shifted", "--images", gallery.images, "--queries", gallery.queries,
                           "--out", tmp_path / f"{name}.pt", "--workers", "0", "--no-cache", *extra)  # fmt: skip
        assert code == 0, err
        runs[name] = SimsMatrix.load(tmp_path / f"{name}.pt")
    assert runs["on"].meta["model"]["shift"] is True and runs["off"].meta["model"]["shift"] is False
    torch.testing.assert_close(runs["on"].scores - 1.0, runs["off"].scores)
