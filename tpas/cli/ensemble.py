"""`tpas ensemble` (fuse SimsMatrix files as a YAML config says) and `tpas tune` (choose its parameters)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import TpasInputError
from .common import MATCH_HELP, SET_HELP, TIES_HELP, console, err_console, existing_file, policies, progress_bar

app = typer.Typer()


@app.command("ensemble")
def ensemble_cmd(
    config: Annotated[
        Path,
        typer.Option("--config", help="Ensemble config: a packaged preset (www25_iterative, ...) or a YAML file."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Fused SimsMatrix file to write (optional with --submit).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    submit: Annotated[
        Path | None,
        typer.Option("--submit", help="Write the ranking file from the fused scores; no fused matrix file is needed."),
    ] = None,
    query_index: Annotated[
        Path | None,
        typer.Option(
            "--query-index", help="query_index.txt: line order of --submit; query ids of a run-only ensemble."
        ),
    ] = None,
    gallery: Annotated[
        Path | None,
        typer.Option("--gallery", help="Gallery folder or ids file (run-only ensembles; --submit checks the columns)."),
    ] = None,
    make_zip: Annotated[bool, typer.Option("--zip", help="With --submit: also write <stem>.zip (answer.txt).")] = False,
    k: Annotated[int, typer.Option("--k", help="Gallery ids per line of --submit.")] = 10,
    keep_top: Annotated[
        int | None, typer.Option("--keep-top", help="Fused matrix in top-K form (exactly the dense result's top-K).")
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Score storage of --out: fp32 | fp16.")] = None,
) -> None:
    """Fuse score matrices as a config says (normalise, fuse, post-process); write the fused SimsMatrix (--out) and/or
    the leaderboard file (--submit) in the same process."""
    import json as _json

    from rich.table import Table

    from ..data.pab import read_gallery_ids, read_query_index
    from ..ensemble.config import load_config
    from ..ensemble.pipeline import run_ensemble
    from ..submit.submission import write_submission

    if out is None and submit is None:
        raise TpasInputError("nothing to write: pass --out FUSED.pt and/or --submit answer.txt")
    if submit is not None and query_index is None:
        raise TpasInputError("--submit needs --query-index (the line order of the ranking file)")
    cfg = load_config(config, set_ or [])
    qids = read_query_index(query_index) if query_index is not None else None
    gids = read_gallery_ids(gallery) if gallery is not None else None
    with progress_bar("fusing") as update:
        fused, steps = run_ensemble(cfg, progress=lambda what, done, total: update(done, total, what), query_ids=qids,
                                    gallery_ids=gids, keep_top=keep_top)  # fmt: skip
        written = [fused.save(out, dtype=dtype)] if out is not None else []
        if submit is not None:
            written += write_submission(fused, qids, submit, k=k, gallery_ids=gids, make_zip=make_zip,
                                        query_source=query_index, gallery_source=gallery)  # fmt: skip
    table = Table(title=f"ensemble: {config}", show_lines=False)
    for col in ("step", "what", "seconds"):
        table.add_column(col)
    for s in steps:
        details = {k: v for k, v in s.items() if k not in ("step", "seconds", "params", "transductive")}
        if "params" in s:
            details = {"params": s["params"], **details}
        table.add_row(s["step"], _json.dumps(details, default=str), str(s.get("seconds", "")))
    console.print(table)
    q, g = fused.shape
    line = f"{', '.join(map(str, written))}: {q} queries x {g} gallery images (fused)"
    if fused.meta.get("transductive"):
        line += "; transductive post-processing used (every test query informed every score; see README)"
    console.print(line, highlight=False, soft_wrap=True)


@app.command("tune")
def tune_cmd(
    config: Annotated[
        Path,
        typer.Option("--config", help="Ensemble config (packaged preset or YAML file) with an optional `tune` space."),
    ],
    gt: Annotated[Path, typer.Option("--gt", help="Test annotation with the ground truth (attr.json).")],
    out: Annotated[Path, typer.Option("--out", help="Tuned config to write (same schema); report and CSV beside.")],
    metric: Annotated[str, typer.Option(help="Objective: R@1, R@5, R@10, mAP, mINP, or a mix '0.5*R@1+0.5*mAP'.")] = "",
    search: Annotated[str, typer.Option(help="grid | coordinate | random | optuna")] = "coordinate",
    trials: Annotated[int, typer.Option(help="Trial budget (coordinate/random/optuna; grid is exhaustive).")] = 200,
    step: Annotated[float | None, typer.Option(help="Grid step of every weight without its own step.")] = None,
    folds: Annotated[int, typer.Option(help="K-fold cross-validation over queries (0: none).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same trials and folds.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    ties: Annotated[str, typer.Option("--ties", help=TIES_HELP)] = "stable",
    match: Annotated[str, typer.Option("--match", help=MATCH_HELP)] = "image",
) -> None:
    """Tune fusion weights (and any other listed parameter) on a labelled split; write the tuned config + report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..data.pab import load_ground_truth
    from ..ensemble.config import load_config
    from ..ensemble.tune import tune, write_outputs

    match, ties = policies(match, ties)
    cfg = load_config(config, set_ or [])
    truth = load_ground_truth(existing_file(gt))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("tuning", total=None, best="-")

        def report(stage: str, done: int, total: int | None, best: float | None) -> None:
            shown = "-" if best is None else f"{best:.3f}"
            bar.update(task, description=stage, completed=done, total=total, best=shown)

        result = tune(
            cfg,
            truth,
            match=match,
            ties=ties,
            metric=metric or None,
            search=search,
            trials=trials,
            step=step,
            folds=folds,
            seed=seed,
            progress=report,
        )
    paths = write_outputs(result, cfg, out)
    console.print(result.summary(), highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False, soft_wrap=True)
