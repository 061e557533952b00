"""tpas.io: atomic writes, the one YAML reader, dotted `--set` overrides, and packaged config presets."""

from __future__ import annotations

import pytest
import yaml

from tpas import io
from tpas.ensemble.config import load_config
from tpas.errors import TpasInputError
from tpas.io import apply_overrides, atomic_write, find_config, parse_override, read_config, read_yaml, set_key
from tpas.train.config import load_train_config


def test_atomic_write_creates_parents(tmp_path):
    out = atomic_write(tmp_path / "a" / "b" / "x.txt", lambda tmp: tmp.write_text("hi"))
    assert out.read_text() == "hi" and [p.name for p in out.parent.iterdir()] == ["x.txt"]


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    (tmp_path / "x.txt").write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.txt", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"] and (tmp_path / "x.txt").read_text() == "old"


def test_parse_override_errors():
    with pytest.raises(TpasInputError, match="expected key=value"):
        parse_override("fuse.weights")
    with pytest.raises(TpasInputError, match="expected key=value"):
        parse_override("fuse..weights=1")
    with pytest.raises(TpasInputError, match=r"--set fuse.weights: value '\[0.1' is not valid YAML"):
        parse_override("fuse.weights=[0.1")
    raw = {"fuse": {"weights": [0.1]}}
    with pytest.raises(TpasInputError, match="position 3 is outside"):
        set_key(raw, "fuse.weights.3", 0.2)
    with pytest.raises(TpasInputError, match="indexes a list"):
        set_key(raw, "fuse.weights.x", 0.2)
    with pytest.raises(TpasInputError, match=r"'fuse\.weights\.0' is a value, not a mapping or list"):
        set_key(raw, "fuse.weights.0.x", 0.2)


def test_overrides_read_values_as_yaml_and_index_lists():
    raw = {"fuse": {"weights": [0.1, 0.2]}, "post": [{"sca": {"tau": 0.0}}]}
    apply_overrides(raw, ["fuse.weights.1=0.75", "post.0.sca.depth=5", "new.key=[1, a]", "fuse.exact=", "x=true"])
    assert raw == {
        "fuse": {"weights": [0.1, 0.75], "exact": None},
        "post": [{"sca": {"tau": 0.0, "depth": 5}}],
        "new": {"key": [1, "a"]},
        "x": True,
    }


def test_read_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(TpasInputError, match=r"bad.yaml, line \d: not valid YAML"):
        read_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TpasInputError, match=r"bad\.yaml: expected a mapping of config keys, found list"):
        read_yaml(bad, expected="a mapping of config keys")
    with pytest.raises(TpasInputError, match=r"nope\.yaml: config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    bad.write_text("# only a comment\n")
    assert read_yaml(bad) == {}


def test_every_packaged_config_is_found_by_name_and_reads():
    for kind in io.CONFIG_KINDS:
        names = io.config_names(kind)
        assert names, kind
        for name in names:
            path = find_config(name, kind)
            assert path == find_config(f"{name}.yaml", kind) and path.name == f"{name}.yaml"
            assert read_yaml(path) == yaml.safe_load(path.read_text())
    assert set(io.config_names("ensemble")) >= {"www25_iterative", "www25_iterative_as_run"}


def test_a_path_wins_over_a_preset_and_unknown_names_list_the_presets(tmp_path, monkeypatch):
    own = tmp_path / "www25_iterative.yaml"
    own.write_text("inputs: {a: a.pt}\n")
    assert find_config(own, "ensemble") == own
    monkeypatch.chdir(tmp_path)
    assert find_config("www25_iterative.yaml", "ensemble").resolve() == own.resolve()  # a file here wins
    with pytest.raises(TpasInputError, match=r"wwww: file not found, nor a packaged ensemble config \(.*www25"):
        find_config("wwww", "ensemble")
    with pytest.raises(TpasInputError, match="file not found"):
        find_config("sub/www25_iterative.yaml", "ensemble")  # a path is never taken for a preset name
    assert read_config("cmp", "models", ["family=cmp2"])["family"] == "cmp2"


def test_named_presets_load_in_every_reader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("www25_iterative_as_run", ["fuse.weights.0=0.2"])
    # A packaged preset's relative inputs resolve as if it sat in ./configs/ensemble: ../../sims_score -> ./sims_score.
    assert cfg.inputs["beit3"].path.resolve() == (tmp_path / "sims_score" / "beit3.pt").resolve()
    assert cfg.fuse.weights == [0.2, 0.9, 0.9]
    train = load_train_config("cmp_tiny", ["train.epochs=1"])
    assert train["model"]["preset"] == "tiny" and train["train"]["epochs"] == 1
    with pytest.raises(TpasInputError, match=r"unknown config key 'train\.epoch'"):
        load_train_config("cmp_tiny", ["train.epoch=1"])
