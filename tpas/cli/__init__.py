"""The `tpas` command line: one Typer app, one module per stage (`tpas.cli.app` puts them together)."""

from .app import app, main

__all__ = ["app", "main"]
