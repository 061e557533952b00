"""Scoring and submission commands: evaluate, compare, submit, validate, import-legacy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import TpasInputError
from .common import MATCH_HELP, TIES_HELP, choice, console, err_console, existing_file, policies, print_error

app = typer.Typer()


def _metrics_table(title: str, rows: dict[Any, dict[str, Any]], index_name: str) -> object:
    """A rich table of metric rows ({row name: {"n": ..., metric: percent}}), one column per key of the first row."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(index_name)
    for col in next(iter(rows.values()), {}):
        table.add_column(col, justify="right")
    for name, row in rows.items():
        table.add_row(str(name), *(str(int(v)) if c == "n" else f"{v:.2f}" for c, v in row.items()))
    return table


@app.command("evaluate")
def evaluate_cmd(
    sims: Annotated[Path, typer.Argument(help="SimsMatrix file (.pt).")],
    gt: Annotated[Path, typer.Option("--gt", help="Test annotation with the ground truth (attr.json / ucc.json).")],
    by: Annotated[
        str | None,
        typer.Option("--by", help="Comma-separated columns to break down by: normal/anomaly, scene, action, ..."),
    ] = None,
    per_query: Annotated[Path | None, typer.Option("--per-query", help="Write per-query results as CSV.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help='Write {"R@1","R@5","R@10","mAP","mINP"} in percent.')
    ] = None,
    ties: Annotated[str, typer.Option("--ties", help=TIES_HELP)] = "stable",
    match: Annotated[str, typer.Option("--match", help=MATCH_HELP)] = "image",
) -> None:
    """Score a matrix against PAB ground truth: R@1/5/10, mAP, mINP (and the leaderboard's top-10 mAP)."""
    import json as _json

    from ..data.pab import load_ground_truth
    from ..io import atomic_write
    from ..scoring import evaluate
    from ..sims import SimsMatrix

    match, ties = policies(match, ties)
    columns = [c.strip() for c in by.split(",") if c.strip()] if by else []
    matrix = SimsMatrix.load(existing_file(sims))
    truth = load_ground_truth(existing_file(gt))
    ev = evaluate(matrix, truth, ties=ties, by=columns, match=match)
    if per_query is not None:
        atomic_write(per_query, lambda tmp: ev.per_query.to_csv(tmp, index=False))
    if json_out is not None:
        atomic_write(json_out, lambda tmp: tmp.write_text(_json.dumps(ev.metrics(), indent=2) + "\n"))
    title = f"{sims.name} vs {gt.name} (ties: {ties}, match: {match})"
    console.print(_metrics_table(title, {"all": ev.summary()}, "queries"))  # the metrics alone need no pandas
    for col in ev.by:
        console.print(_metrics_table(f"by {col}", ev.breakdown(col).to_dict("index"), col))
    if ev.unscored_rows:
        console.print(f"note: {ev.unscored_rows} matrix rows are not ground-truth queries and were not scored")
    for path in (per_query, json_out):
        if path is not None:
            console.print(f"wrote {path}", highlight=False)


@app.command("compare")
def compare_cmd(
    baseline: Annotated[Path, typer.Argument(help="SimsMatrix file of the baseline system.")],
    models: Annotated[list[Path], typer.Argument(help="SimsMatrix files to compare with the baseline.")],
    gt: Annotated[Path, typer.Option("--gt", help="Test annotation with the ground truth (attr.json / ucc.json).")],
    metrics: Annotated[str, typer.Option("--metrics", help="Comma-separated: R@1,R@5,R@10,mAP,mINP,mAP@10.")] = (
        "R@1,R@5,R@10,mAP"
    ),
    resamples: Annotated[int, typer.Option(help="Randomization and bootstrap resamples.")] = 10_000,
    confidence: Annotated[float, typer.Option(help="Confidence level of the bootstrap interval.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every comparison table as JSON.")] = None,
    ties: Annotated[str, typer.Option("--ties", help=TIES_HELP)] = "stable",
    match: Annotated[str, typer.Option("--match", help=MATCH_HELP)] = "image",
) -> None:
    """Is a system really better than a baseline? Per metric: the difference, its bootstrap confidence interval and
    the p-value of a paired randomization test over queries."""
    import json as _json

    from rich.table import Table

    from ..data.pab import load_ground_truth
    from ..io import atomic_write
    from ..scoring import evaluate
    from ..scoring.compare import compare_evaluations
    from ..sims import SimsMatrix

    match, ties = policies(match, ties)
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    if len({baseline.name, *(m.name for m in models)}) != len(models) + 1:
        raise TpasInputError("compare distinct files: a file is given twice (or two share a name)")
    truth = load_ground_truth(existing_file(gt))
    base_ev = evaluate(SimsMatrix.load(existing_file(baseline)), truth, ties=ties, match=match)
    out = {}
    for path in models:
        ev = evaluate(SimsMatrix.load(existing_file(path)), truth, ties=ties, match=match)
        cmp = compare_evaluations(ev, base_ev, names, resamples=resamples, confidence=confidence, seed=seed)
        level = f"{100 * cmp.confidence:g}%"
        table = Table(title=f"{path.name} vs {baseline.name} ({cmp.n_queries} queries, {cmp.resamples} resamples)")
        for col in ("metric", "baseline", "model", "diff", f"{level} CI", "p"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for m, r in cmp.table.iterrows():
            style = "bold" if r["p_value"] < 0.05 else None
            table.add_row(str(m), f"{r['baseline']:.2f}", f"{r['model']:.2f}", f"{r['diff']:+.2f}",
                          f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]", f"{r['p_value']:.4f}", style=style)  # fmt: skip
        console.print(table)
        out[path.name] = {
            "baseline": baseline.name,
            "queries": cmp.n_queries,
            "resamples": cmp.resamples,
            "confidence": cmp.confidence,
            "seed": cmp.seed,
            "metrics": cmp.table.to_dict("index"),
        }
    console.print("diff and CI in percentage points; p: two-sided paired randomization test (bold: p < 0.05)")
    if json_out is not None:
        atomic_write(json_out, lambda tmp: tmp.write_text(_json.dumps(out, indent=2) + "\n"))
        console.print(f"wrote {json_out}", highlight=False)


@app.command("submit")
def submit_cmd(
    sims: Annotated[Path, typer.Argument(help="SimsMatrix file (.pt) whose rows are the name-masked queries.")],
    query_index: Annotated[Path, typer.Option("--query-index", help="query_index.txt: the line order.")],
    out: Annotated[Path, typer.Option("--out", help="Ranking file to write, e.g. predictions/answer.txt.")],
    make_zip: Annotated[bool, typer.Option("--zip", help="Also write <out stem>.zip holding answer.txt.")] = False,
    gallery: Annotated[
        Path | None,
        typer.Option("--gallery", help="Gallery folder or ids file: the matrix columns must be exactly these ids."),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Gallery ids per line.")] = 10,
) -> None:
    """Write the leaderboard file: per query (query_index.txt order) its k best gallery ids, stable tie rule."""
    from ..data.pab import read_gallery_ids, read_query_index
    from ..sims import SimsMatrix
    from ..submit.submission import write_submission

    qids = read_query_index(query_index)
    gallery_ids = read_gallery_ids(gallery) if gallery is not None else None
    matrix = SimsMatrix.load(existing_file(sims))
    written = write_submission(matrix, qids, out, k=k, gallery_ids=gallery_ids, make_zip=make_zip,
                               query_source=query_index, gallery_source=gallery)  # fmt: skip
    for path in written:  # each validated by write_submission
        console.print(f"wrote {path}: {len(qids)} lines x {k} ids (stable tie rule)", highlight=False)


@app.command("validate")
def validate_cmd(
    answer: Annotated[Path, typer.Argument(help="Ranking file (answer.txt) or a submission zip holding it.")],
    query_index: Annotated[Path, typer.Option("--query-index", help="query_index.txt: one line per query.")],
    gallery: Annotated[
        Path | None, typer.Option("--gallery", help="Gallery folder or ids file: every id must be in it.")
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Gallery ids per line.")] = 10,
) -> None:
    """Check a ranking file: line count and order, k unique ids per line, ids in the gallery, whitespace, BOM."""
    from ..submit import validate_answer

    report = validate_answer(answer, query_index, gallery, k=k)
    if not report.ok:
        for p in report.problems:
            print_error(f"{answer}, {p}")
        if report.truncated:
            err_console.print(f"(stopped after {len(report.problems)} problems)", highlight=False)
        raise typer.Exit(2)
    checked = "ids checked against the gallery" if report.gallery_checked else "gallery not checked (--gallery)"
    console.print(f"OK: {answer}: {report.n_lines} lines x {k} ids, {report.line_ending} line ends, {checked}",
                  highlight=False, soft_wrap=True)  # fmt: skip


@app.command("import-run")
def import_run_cmd(
    run: Annotated[Path, typer.Argument(help="Run file: TREC, CSV (query_id,gallery_id,score) or a ranking file.")],
    query_index: Annotated[
        Path, typer.Option("--query-index", help="query_index.txt: the query ids, and a ranking file's line order.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Top-K SimsMatrix file to write.")],
    gallery: Annotated[
        Path | None,
        typer.Option("--gallery", help="Gallery folder or ids file (default: the ids the run lists, sorted)."),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="trec | csv | ranking (default: from the suffix; a .txt is sniffed)."),
    ] = None,
    source: Annotated[str, typer.Option("--source", help="Source name stored in the matrix.")] = "",
    dtype: Annotated[str | None, typer.Option("--dtype", help="Score storage: fp32 | fp16.")] = None,
) -> None:
    """Turn another tool's run (ranx/TREC, CSV, a challenge ranking file) into a top-K SimsMatrix that tpas fuses."""
    from ..data.pab import read_gallery_ids, read_query_index
    from ..ensemble.external import import_run

    qids = read_query_index(query_index)
    gids = read_gallery_ids(gallery) if gallery is not None else None
    m = import_run(existing_file(run), qids, gids, fmt, source)
    m.save(out, dtype=dtype)
    q, g = m.shape
    ids_from = m.meta.get("ids_from", {}).get("gallery_ids", "--gallery")
    console.print(f"wrote {out}: {q} queries x {g} gallery images, top-{m.k} (gallery ids from {ids_from})",
                  highlight=False, soft_wrap=True)  # fmt: skip


@app.command("import-legacy")
def import_legacy_cmd(
    tensor: Annotated[Path, typer.Argument(help="Bare score tensor (.pt) or array (.npy) of the seed scripts.")],
    query_ids: Annotated[
        Path, typer.Option("--query-ids", help="Row ids: query_index.txt-style ids file, or a queries file.")
    ],
    gallery_ids: Annotated[
        Path, typer.Option("--gallery-ids", help="Column ids: an ids file, or a gallery folder (see --gallery-order).")
    ],
    out: Annotated[Path, typer.Option("--out", help="SimsMatrix file to write.")],
    transpose: Annotated[bool, typer.Option("--transpose", help="The tensor is gallery x query.")] = False,
    gallery_order: Annotated[
        str,
        typer.Option(
            "--gallery-order",
            help="Column order when --gallery-ids is a folder: sorted (by id) | listdir (the seed scripts' "
            "os.listdir order, valid only on the machine and folder that made the matrix).",
        ),
    ] = "sorted",
    source: Annotated[str, typer.Option("--source", help="Source name stored in the matrix.")] = "legacy",
) -> None:
    """Give a legacy bare-tensor matrix its ids: write a SimsMatrix (the tensor file is read safely, never executed)."""
    import os

    from ..data.pab import IMAGE_SUFFIXES, read_gallery_ids, read_queries, read_query_index
    from ..sims import SimsMatrix

    gallery_order = choice(gallery_order, ("sorted", "listdir"), "--gallery-order")
    if query_ids.suffix.lower() == ".txt":
        qids = read_query_index(query_ids)
    else:
        qids = [q.id for q in read_queries(query_ids)]
    if gallery_ids.is_dir() and gallery_order == "listdir":
        gids = [Path(n).stem for n in os.listdir(gallery_ids) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    else:
        gids = read_gallery_ids(gallery_ids)
    matrix = SimsMatrix.from_legacy(existing_file(tensor), qids, gids, source=source, transpose=transpose)
    matrix.save(out)
    q, g = matrix.shape
    console.print(f"wrote {out}: {q} queries x {g} gallery images (source {source!r})", highlight=False)
