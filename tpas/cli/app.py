"""The root `tpas` Typer app and the console-script entry point `main()`.

Each stage's commands live in their own module (thin: parse, call a library function, render); this module only
puts them under one app. `main` imports only the stage module of the command it runs: importing every stage and
building all their parameters would cost more than `tpas evaluate`'s scoring. `app` (every stage) is built on first
use, for tests and tools that drive the CLI in process.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from .common import console, run_app

# In the order `tpas --help` lists them, the pipeline's: score and submit, data, train, infer, fuse, the rest.
# Each: the stage module, the group name its commands sit under (None: at the top level), the top-level names it adds.
STAGES: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("scoring", None, ("evaluate", "compare", "submit", "validate", "import-run", "import-legacy")),
    ("synth", None, ("synth",)),
    ("train", "train", ("train",)),
    ("report", None, ("report",)),
    ("convert", "convert", ("convert",)),
    ("infer", "infer", ("infer",)),
    ("ensemble", None, ("ensemble", "tune")),
    ("pose", None, ("pose",)),
    ("demo", None, ("demo",)),
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        console.print(f"tpas {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """tpas: every model through one engine, every matrix with its ids, a valid leaderboard file."""


def build_app(stages: Sequence[tuple[str, str | None, tuple[str, ...]]] = STAGES) -> typer.Typer:
    """The root app with the commands of `stages` (default: all, in `tpas --help` order)."""
    root = typer.Typer(
        name="tpas",
        help="Text-based Person Anomaly Search: infer, fuse, tune, score and submit similarity matrices.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    root.callback()(_root)
    for module, group, _ in stages:
        stage = importlib.import_module(f".{module}", __package__).app
        root.add_typer(stage, name=group) if group else root.add_typer(stage)
    return root


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and exit with its code (as click does); any expected failure is one
    line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    # A known command needs its stage alone; anything else (--help, --version, a typo) gets every stage.
    stage = next((s for s in STAGES if args and args[0] in s[2]), None)
    sys.exit(run_app(build_app(STAGES if stage is None else (stage,)), args))


def __getattr__(name: str) -> Any:
    if name == "app":  # the full CLI, built once on first use
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
