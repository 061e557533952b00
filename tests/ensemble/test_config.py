"""The YAML config: relative paths, --set overrides (lists, positions), and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from ens_helpers import write_config

from tpas.ensemble.config import dump_config, load_config
from tpas.errors import TpasInputError

BASE = {
    "inputs": {"a": "m/a.pt", "b": {"path": "/abs/b.pt"}, "r": "runs/vlm.run"},
    "fuse": {"method": "iterative", "order": ["a", "b"], "weights": [0.5]},
}


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = load_config(write_config(tmp_path / "sub" / "c.yaml", BASE))
    assert cfg.inputs["a"].path == (tmp_path / "sub" / "m" / "a.pt").resolve()
    assert cfg.inputs["b"].path == Path("/abs/b.pt")
    assert cfg.inputs["r"].format == "trec" and cfg.inputs["a"].format == "sims"
    assert cfg.normalize["a"] == ("min-max", "global")


def test_set_overrides_lists_positions_and_new_keys(tmp_path):
    path = write_config(tmp_path / "c.yaml", BASE)
    cfg = load_config(path, ["fuse.weights=[0.25]", "normalize.scope=query", "inputs.a=other.pt"])
    assert cfg.fuse.weights == [0.25] and cfg.normalize["b"] == ("min-max", "query")
    assert cfg.inputs["a"].path == tmp_path.resolve() / "other.pt"
    cfg = load_config(path, ["fuse.weights.0=0.75", "post=[{sca: {tau: 0.1}}]", "post.0.sca.depth=5"])
    assert cfg.fuse.weights == [0.75] and cfg.post[0][1]["tau"] == 0.1 and cfg.post[0][1]["depth"] == 5


@pytest.mark.parametrize(
    "change,match",
    [
        ({"fuse": {"method": "iterative", "order": [], "weights": []}}, "fuse.order: the fusion list is empty"),
        ({"fuse": {"method": "iterative", "order": ["a", "b"], "weights": [1.2]}}, r"fuse.weights\[0\]"),
        ({"fuse": {"method": "iterative", "order": ["a", "x"], "weights": [0.2]}}, "unknown input 'x'"),
        ({"normalize": {"method": "l2"}}, "normalize.method"),
        ({"normalize_per_input": {"zz": "zmuv"}}, "normalize_per_input.zz"),
        ({"post": [{"dedupe": {}}]}, "post.0: unknown post step 'dedupe'"),
        ({"post": [{"sca": {"tau": "high"}}]}, "post.0.sca.tau"),
        (
            {"inputs": {"a": {"path": "a.pt", "fill": "median"}}, "fuse": {"order": ["a"], "weights": []}},
            "inputs.a.fill",
        ),
        ({"extra": 1}, "extra: unknown top-level key"),
    ],
)
def test_invalid_configs_name_the_key_and_file(tmp_path, change, match):
    path = write_config(tmp_path / "bad.yaml", {**BASE, **change})
    with pytest.raises(TpasInputError, match=match) as e:
        load_config(path)
    assert "bad.yaml" in str(e.value)


def test_dump_rebases_paths_for_the_new_location(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", BASE))
    text = dump_config(cfg.raw, cfg.base_dir, tmp_path / "out" / "tuned.yaml")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tuned.yaml").write_text(text)
    again = load_config(tmp_path / "out" / "tuned.yaml")
    assert again.inputs["a"].path.resolve() == cfg.inputs["a"].path.resolve()
