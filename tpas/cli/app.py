"""The root `tpas` Typer app and the console-script entry point `main()`.

Each stage's commands live in their own module (thin: parse, call a library function, render); this module only
puts them under one app.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .. import __version__
from . import convert, demo, ensemble, infer, pose, report, scoring, synth, train
from .common import console, run_app

app = typer.Typer(
    name="tpas",
    help="Text-based Person Anomaly Search: infer, fuse, tune, score and submit similarity matrices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


# In the order `tpas --help` lists them, the pipeline's: score and submit, data, train, infer, fuse, the rest.
app.add_typer(scoring.app)
app.add_typer(synth.app)
app.add_typer(train.app, name="train")
app.add_typer(report.app)
app.add_typer(convert.app, name="convert")
app.add_typer(infer.app, name="infer")
app.add_typer(ensemble.app)
app.add_typer(pose.app)
app.add_typer(demo.app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and exit with its code (as click does); any expected failure is one
    line on stderr and exit code 2."""
    sys.exit(run_app(app, argv))
