"""Fixtures of the CLI tests: a tiny gallery and the toy family (the `cli` runner is in tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from PIL import Image


@pytest.fixture
def gallery(tmp_path: Path) -> SimpleNamespace:
    """Four one-colour images and three captions (a JSON list: ids "0", "1", "2")."""
    images = tmp_path / "gallery"
    images.mkdir()
    for i, rgb in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 20)]):
        Image.new("RGB", (8, 8), rgb).save(images / f"img{i}.png")
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps(["a red coat", "green trousers, a bag", "blue sky over a street"]))
    return SimpleNamespace(images=images, queries=queries)


@pytest.fixture
def toy_family() -> Iterator[ModuleType]:
    """The toy family of toy_family.py registered for one test (registration happens at the module's import)."""
    import toy_family as module

    from tpas.models import base, register

    register("toy")(module.ToyFamily)  # a no-op after the first import; again after an earlier test's clean-up
    yield module
    base._REGISTRY.pop("toy", None)
