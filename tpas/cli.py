"""The `tpas` command line: one Typer app. Thin by design: parse, call a library function, print.

Every command's user mistakes surface as TpasInputError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import TpasInputError

app = typer.Typer(
    name="tpas",
    help="Text-based Person Anomaly Search: infer, fuse, tune, score and submit similarity matrices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"tpas {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """tpas: every model through one engine, every matrix with its ids, a valid leaderboard file."""


def existing_file(path: Path) -> Path:
    """Resolve a CLI path argument that must be an existing file (TpasInputError otherwise)."""
    if not path.is_file():
        raise TpasInputError("file not found", path)
    return path


# Commands are defined below, grouped by stage: scoring/submission, ensemble, inference, training, demo.


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning input errors into one line and exit code 2."""
    try:
        app(args=argv)
    except TpasInputError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
