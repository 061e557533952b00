"""Fuzz the YAML config readers (`tpas ensemble|tune --config`, `tpas train --config`) and their `--set` overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fuzzlib import fuzz_settings, json_objects_with, json_values, text_variants, valid_or_refused
from hypothesis import example, given
from hypothesis import strategies as st

from tpas.ensemble.config import load_config
from tpas.errors import TpasInputError
from tpas.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
ENSEMBLE = (ROOT / "configs/ensemble/www25_iterative.yaml").read_text()
TRAIN = (ROOT / "configs/train/cmp_tiny.yaml").read_text()

_keys = st.sampled_from(
    ["inputs", "inputs.a", "inputs.a.path", "inputs.a.format", "inputs.a.fill", "normalize", "normalize.method",
     "normalize.scope", "normalize_per_input.a", "fuse", "fuse.method", "fuse.order", "fuse.weights", "fuse.weights.0",
     "fuse.k", "fuse.depth", "fuse.exact", "post", "post.0", "post.0.sca", "post.0.sca.tau", "post.0.sca.depth",
     "post.0.assignment", "post.0.rescore", "tune", "tune.space", "train.epochs", "train.batch_size", "data",
     "data.root", "model", "model.preset", "x", "", "a..b", "post.9.x"]
)  # fmt: skip
_values = st.sampled_from(
    ["", "null", "1", "-1", "0.5", "nan", "1e999", "true", "[0.1, 0.9]", "[a, b]", "{}", "[]", "{a: 1}", "a.pt",
     "x.csv", "'[", "!!python/object:os.system {}", "iterative", "wsum", "rrf", "min-max", "zmuv", "global",
     "per-query"]
)  # fmt: skip
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", _keys, _values) | st.text(max_size=12), max_size=3)


def _yaml_files(valid: str) -> st.SearchStrategy[bytes]:
    """The shipped file mutated, or YAML dumps of half-right mappings built from its keys."""
    top = yaml.safe_load(valid)
    shaped = json_objects_with({k: json_values for k in top}).map(
        lambda v: yaml.safe_dump(v, allow_unicode=True).encode()
    )
    return text_variants(valid) | shaped


def _refused_or_config(read, path: Path, sets: list[str]):
    """A TpasInputError from a bad --set names no file; one from the file names it."""
    try:
        return read(path, sets)
    except TpasInputError as e:
        if str(path) not in str(e):
            assert str(e).startswith("--set") or any(s.split("=", 1)[0] in str(e) for s in sets), str(e)
        assert "\n" not in str(e).strip()
        return None


@fuzz_settings(200)
@given(content=_yaml_files(ENSEMBLE), sets=overrides)
def test_ensemble_configs_load_or_are_refused_in_one_line(content, sets, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-ensemble.yaml"
    path.write_bytes(content)
    _refused_or_config(load_config, path, sets)


@example(content=TRAIN.encode(), sets=["0=\x1f"])  # found: a --set value yaml's reader rejects (AttributeError)
@fuzz_settings(200)
@given(content=_yaml_files(TRAIN), sets=overrides)
def test_train_configs_load_or_are_refused_in_one_line(content, sets, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-train.yaml"
    path.write_bytes(content)
    _refused_or_config(load_train_config, path, sets)


@pytest.mark.parametrize("read", [load_config, load_train_config], ids=["ensemble", "train"])
@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[" * 2000 + b"]" * 2000], ids=["binary", "deep"])
def test_undecodable_or_deeply_nested_yaml_is_refused(read, content, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    assert valid_or_refused(lambda p: read(p, []), path) is None
