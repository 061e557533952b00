"""The wheel: it holds every package, every config (as `tpas.configs`) and the BERT vocab, and an installed copy reads
its configs from its own package data, never from a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "tpas", "configs")


def _package_folders() -> set[str]:
    """Dotted names of every folder under tpas/ and configs/ (configs/ is the package tpas.configs)."""
    names = set()
    for top, name in (("tpas", "tpas"), ("configs", "tpas.configs")):
        for d in [REPO / top, *(p for p in (REPO / top).rglob("*") if p.is_dir())]:
            if d.name == "__pycache__" or not any(f.is_file() for f in d.iterdir()):
                continue
            names.add(".".join([name, *d.relative_to(REPO / top).parts]))
    return names


def test_pyproject_lists_every_package_folder():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(_package_folders() - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml, or the wheel lacks them"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (so the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (built,) = tmp.glob("tpas-*.whl")
    return built


def test_wheel_holds_every_module_config_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = REPO / "configs"
    expected = {f"tpas/configs/{p.relative_to(configs).as_posix()}" for p in configs.rglob("*.yaml")}
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "tpas").rglob("*.py")}
    expected |= {"tpas/configs/__init__.py", "tpas/models/data/bert-base-uncased-vocab.txt", "tpas/py.typed"}
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "tpas" / "scoring" / "templates").iterdir()}
    assert len(expected) > 60 and not sorted(expected - names)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as an installed copy (a site-packages folder), outside the checkout."""
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(site)
    return site


def _run_installed(site: Path, code: str, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_an_installed_copy_reads_configs_from_its_package_data(installed, tmp_path):
    code = """
import json, tpas
from tpas import io
from tpas.ensemble.config import load_config
from tpas.models.beit3 import PRESETS_FILE, load_presets
from tpas.train.config import load_train_config
names = {k: io.config_names(k) for k in io.CONFIG_KINDS}
files = [str(io.find_config(n, k)) for k, ns in names.items() for n in ns]
cfg = load_config("www25_iterative")
print(json.dumps({"tpas": tpas.__file__, "root": str(io.configs_root()), "files": files, "names": names,
                  "beit3": sorted(load_presets()), "presets_file": str(PRESETS_FILE),
                  "tiny": load_train_config("cmp_tiny")["model"]["preset"], "inputs": str(cfg.inputs["beit3"].path)}))
"""
    out = _run_installed(installed, code, tmp_path)
    site = str(installed)
    assert out["tpas"].startswith(site) and out["root"] == str(installed / "tpas" / "configs")
    assert all(f.startswith(site) for f in [*out["files"], out["presets_file"]])
    assert {n: sorted(p.stem for p in (REPO / "configs" / n).glob("*.yaml")) for n in out["names"]} == out["names"]
    assert "beit3_large_patch16_384" in out["beit3"] and out["tiny"] == "tiny"
    assert Path(out["inputs"]).resolve() == (tmp_path / "sims_score" / "beit3.pt").resolve()


def test_the_demo_of_an_installed_copy_trains_from_package_data(installed, tmp_path):
    code = """
import json
from tpas import io
from tpas.demo import plan
steps = plan("demo-root", size="quick")
configs = [str(io.find_config(s.argv[s.argv.index("--config") + 1], "train")) for s in steps if s.argv[0] == "train"]
print(json.dumps({"configs": configs}))
"""
    out = _run_installed(installed, code, tmp_path)
    assert out["configs"] and all(c.startswith(str(installed)) for c in out["configs"])
