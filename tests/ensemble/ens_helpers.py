"""Helpers of the ensemble tests: id lists and matrix/config files."""

from __future__ import annotations

from pathlib import Path

import yaml

from tpas.sims import SimsMatrix


def ids(prefix: str, n: int) -> list[str]:
    """["p0", "p1", ...]."""
    return [f"{prefix}{i}" for i in range(n)]


def write_config(path: Path, cfg: dict) -> Path:
    """Write a config mapping as YAML."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def save(m: SimsMatrix, path: Path) -> Path:
    """Save a matrix and return its path."""
    m.save(path)
    return path
