"""Fixtures of the ensemble tests: running the CLI in-process."""

from __future__ import annotations

import pytest


@pytest.fixture
def cli(capsys):
    """Run `tpas ...` in-process through the console entry point: returns (exit code, stdout, stderr)."""
    from tpas.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
