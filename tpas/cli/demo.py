"""`tpas demo`: the whole pipeline on a synthetic mini-PAB, each step the `tpas` command it prints."""

from __future__ import annotations

import itertools
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import TpasError, TpasRunError
from .common import console, err_console

app = typer.Typer()


def step_name(argv: Sequence[str]) -> str:
    """`tpas train cmp` for a step's argv: its leading command words, without paths or options."""
    words = itertools.takewhile(lambda a: re.fullmatch(r"[a-z][a-z0-9-]*", a) is not None, argv[:2])
    return " ".join(["tpas", *words])


def run_step(argv: Sequence[str]) -> None:
    """Run one demo step in this process through the root app; any failure is a TpasRunError naming the step."""
    from .app import app as root

    try:
        code = root(args=list(argv), prog_name="tpas", standalone_mode=False)
    except TpasError as e:
        raise TpasRunError(f"demo step `{step_name(argv)}` failed: {e}") from e
    if code not in (None, 0):
        raise TpasRunError(f"demo step `{step_name(argv)}` exited with status {code}")


class _StepDisplay:
    """A rule and the command line per step; one live display with a bar per step for steps run in parallel."""

    def __init__(self) -> None:
        self.live: Any = None
        self.tasks: dict[str, Any] = {}

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
        self.live, self.tasks = None, {}

    def start(self, i: int, n: int, step: Any, reused: bool) -> None:
        if not step.parallel:
            self.close()
        console.rule(f"[{i + 1}/{n}] {step.title}" + (" (reused from the last run)" if reused else ""), style="cyan")
        if not reused:
            console.print("$ tpas " + shlex.join(step.argv), highlight=False, soft_wrap=True, style="dim")

    def advance(self, step: Any, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.live is None:
            self.live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err_console)  # fmt: skip
            self.live.start()
        if step.title not in self.tasks:
            self.tasks[step.title] = self.live.add_task(step.title, total=step.total)
        self.live.update(self.tasks[step.title], completed=done)


def _p_text(p: float) -> str:
    """'=0.031' or '<0.001' (a randomization test's p-value is bounded below by its resample count)."""
    return "<0.001" if p < 0.001 else f"={p:.3f}"


def _print_result(res: Any, seconds: float) -> None:
    from rich.table import Table

    table = Table(title="demo: test split of the mini-PAB (%)")
    table.add_column("model")
    for m in res.table.columns:
        table.add_column(m, justify="right")
    for name, row in res.table.iterrows():
        label = f"{name} (best single)" if name == res.best_single else str(name)
        style = "bold green" if name == res.ensemble else None
        table.add_row(label, *(f"{v:.2f}" for v in row), style=style)
    console.rule("result", style="cyan")
    console.print(table)
    gain = res.ensemble_gain
    console.print(
        f"ensemble vs best single model ({res.best_single}): "
        + ", ".join(f"{m} {v:+.2f} (p{_p_text(res.p_values[m])})" for m, v in gain.items()),
        highlight=False,
    )
    if res.masked is not None:
        masked = Table(
            title="name-masked set, one caption per image: post steps that resolve top-1 collisions (%; "
            "collisions: gallery images that are the top-1 of 2+ queries)"
        )
        masked.add_column("matrix")
        for m in res.masked.columns:
            masked.add_column(m, justify="right")
        for name, row in res.masked.iterrows():
            masked.add_row(str(name), *(f"{v:.2f}" for v in row.iloc[:-1]), f"{row.iloc[-1]:.0f}")
        console.print(masked)
    console.print(
        f"leaderboard file: {res.answer}\nreport: {res.report}\ntuned ensemble: {res.tuned_config}\n"
        f"matrices: {len(res.sims)} files in {res.sims[0].parent if res.sims else '-'}\ntotal {seconds:.0f} s",
        highlight=False,
        soft_wrap=True,
    )


@app.command("demo")
def demo_cmd(
    root: Annotated[
        Path, typer.Option("--root", help="Folder under which data/, checkpoints/, sims_score/, ... demo/ go.")
    ] = Path("."),
    seed: Annotated[int, typer.Option(help="Seed of the mini-PAB, the training runs and the tuning search.")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="A much smaller run of the same pipeline (tests).")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Regenerate the data and retrain even if reusable.")] = False,
) -> None:
    """Run the whole pipeline on a synthetic mini-PAB on the CPU: synth, train 2 tiny CMPs, infer, tune, ensemble,
    evaluate, submit, validate, report. Each step is the `tpas` command it prints."""
    from ..demo import run_demo

    t0 = time.perf_counter()
    display = _StepDisplay()
    try:
        res = run_demo(root, size="quick" if quick else "default", seed=seed, fresh=fresh, run_command=run_step,
                       progress=display.start, step_progress=display.advance)  # fmt: skip
    finally:
        display.close()
    _print_result(res, time.perf_counter() - t0)
