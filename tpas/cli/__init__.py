"""The `tpas` command line: one Typer app, one module per stage (`tpas.cli.app` puts them together)."""

from typing import Any

from .app import main

# Importing the submodule bound `tpas.cli.app` to it; unbind it so the name means the Typer app, as it always has.
globals().pop("app")

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name == "app":  # the full Typer app, built on first use (`python -m tpas` needs only `main`)
        from .app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
