"""`tpas report`: a static HTML page of every model's top-5 per query, with plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import TpasInputError
from .common import console, existing_file, progress_bar

app = typer.Typer()


@app.command("report")
def report_cmd(
    sims: Annotated[list[Path], typer.Argument(help="SimsMatrix files: each model, and the ensemble.")],
    gt: Annotated[Path, typer.Option("--gt", help="Test annotation with the ground truth (attr.json).")],
    images: Annotated[Path, typer.Option("--images", help="Gallery image folder (ids = file stems).")],
    out: Annotated[Path, typer.Option("--out", help="The HTML page to write; its assets go beside it.")],
    names: Annotated[
        str | None, typer.Option("--names", help="Comma-separated display names, one per SIMS (default: stems).")
    ] = None,
    tuning_trials: Annotated[
        Path | None, typer.Option("--tuning-trials", help="Trials CSV of `tpas tune`: adds the tuning-surface plot.")
    ] = None,
    objective: Annotated[
        str | None, typer.Option("--objective", help="Objective column of the trials CSV (default: detected).")
    ] = None,
    max_queries: Annotated[
        int | None, typer.Option("--max-queries", help="Show at most N queries (disagreements first).")
    ] = None,
) -> None:
    """Write a static HTML report: per query the caption and each model's top-5 framed green/blue/red, plus plots."""
    from rich.table import Table

    from ..data.pab import load_ground_truth
    from ..scoring.plots import read_trials
    from ..scoring.report import build_report
    from ..sims import SimsMatrix

    labels = [s.stem for s in sims] if names is None else [n.strip() for n in names.split(",")]
    if len(labels) != len(sims):
        raise TpasInputError(f"--names gives {len(labels)} names for {len(sims)} SIMS files")
    if len(set(labels)) != len(labels) or not all(labels):
        raise TpasInputError(f"display names must be unique and non-empty, got {labels} (use --names)")
    models = {label: SimsMatrix.load(existing_file(p)) for label, p in zip(labels, sims, strict=True)}
    truth = load_ground_truth(existing_file(gt))
    trials = read_trials(tuning_trials) if tuning_trials is not None else None
    with progress_bar("report") as update:
        rep = build_report(
            models,
            truth,
            images,
            out,
            trials=trials,
            objective=objective,
            max_queries=max_queries,
            progress=lambda stage, done, total: update(done, total, stage),
        )
    table = Table(title=f"{rep.n_queries} queries ({rep.n_shown} shown, {rep.n_disagree} with differing top-1)")
    table.add_column("model")
    for m in rep.metrics.columns:
        table.add_column(m, justify="right")
    for name, row in rep.metrics.iterrows():
        table.add_row(str(name), *(f"{v:.2f}" for v in row))
    console.print(table)
    if rep.identity_source is None:
        console.print("[yellow]note:[/] the annotation has no identity information; no blue frames drawn")
    console.print(f"report: {rep.path} ({rep.n_thumbnails} thumbnails, {len(rep.plots)} plots in {rep.assets})")
