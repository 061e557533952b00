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


# --- scoring and submission: evaluate, submit, validate, import-legacy (issue 2) ---
_TIES_HELP = "Tie rule: stable (equal scores keep gallery order, as the ranking file) | optimistic | pessimistic."


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise TpasInputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _metrics_table(title: str, frame: object, index_name: str) -> object:
    from rich.table import Table

    table = Table(title=title)
    table.add_column(index_name)
    for col in frame.columns:
        table.add_column(col, justify="right")
    for name, row in frame.iterrows():
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
    ties: Annotated[str, typer.Option("--ties", help=_TIES_HELP)] = "stable",
    match: Annotated[
        str, typer.Option("--match", help="Relevant images: image (PAB protocol) | identity (same image_id).")
    ] = "image",
) -> None:
    """Score a matrix against PAB ground truth: R@1/5/10, mAP, mINP (and the leaderboard's top-10 mAP)."""
    import json as _json

    from .data.pab import load_ground_truth
    from .scoring import evaluate
    from .sims import SimsMatrix, atomic_write

    ties = _choice(ties, ("stable", "optimistic", "pessimistic"), "--ties")
    match = _choice(match, ("image", "identity"), "--match")
    columns = [c.strip() for c in by.split(",") if c.strip()] if by else []
    matrix = SimsMatrix.load(existing_file(sims))
    truth = load_ground_truth(existing_file(gt))
    ev = evaluate(matrix, truth, ties=ties, by=columns, match=match)
    if per_query is not None:
        atomic_write(per_query, lambda tmp: ev.per_query.to_csv(tmp, index=False))
    if json_out is not None:
        atomic_write(json_out, lambda tmp: tmp.write_text(_json.dumps(ev.metrics(), indent=2) + "\n"))
    console.print(_metrics_table(f"{sims.name} vs {gt.name} (ties: {ties}, match: {match})", ev.overall, "queries"))
    for col in ev.by:
        console.print(_metrics_table(f"by {col}", ev.breakdown(col), col))
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
    ties: Annotated[str, typer.Option("--ties", help=_TIES_HELP)] = "stable",
    match: Annotated[
        str, typer.Option("--match", help="Relevant images: image (PAB protocol) | identity (same image_id).")
    ] = "image",
) -> None:
    """Is a system really better than a baseline? Per metric: the difference, its bootstrap confidence interval and
    the p-value of a paired randomization test over queries."""
    import json as _json

    from rich.table import Table

    from .data.pab import load_ground_truth
    from .scoring import evaluate
    from .scoring.compare import compare_evaluations
    from .sims import SimsMatrix, atomic_write

    ties = _choice(ties, ("stable", "optimistic", "pessimistic"), "--ties")
    match = _choice(match, ("image", "identity"), "--match")
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
    from .data.pab import read_gallery_ids, read_query_index
    from .sims import SimsMatrix
    from .submit import validate_answer, write_ranking_file

    qids = read_query_index(query_index)
    gallery_ids = read_gallery_ids(gallery) if gallery is not None else None
    matrix = SimsMatrix.load(existing_file(sims))
    written = write_ranking_file(
        matrix, qids, out, k=k, gallery_ids=gallery_ids, make_zip=make_zip,
        query_source=query_index, gallery_source=gallery,
    )  # fmt: skip
    for path in written:
        validate_answer(path, qids, gallery_ids, k=k).raise_first()  # the writer's own output must always pass
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
    from .submit import validate_answer

    report = validate_answer(answer, query_index, gallery, k=k)
    if not report.ok:
        for p in report.problems:
            err_console.print(f"[bold red]error:[/] {answer}, {p}", highlight=False, soft_wrap=True)
        if report.truncated:
            err_console.print(f"(stopped after {len(report.problems)} problems)", highlight=False)
        raise typer.Exit(2)
    checked = "ids checked against the gallery" if report.gallery_checked else "gallery not checked (--gallery)"
    console.print(f"OK: {answer}: {report.n_lines} lines x {k} ids, {report.line_ending} line ends, {checked}",
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

    from .data.pab import IMAGE_SUFFIXES, read_gallery_ids, read_queries, read_query_index
    from .sims import SimsMatrix

    gallery_order = _choice(gallery_order, ("sorted", "listdir"), "--gallery-order")
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


# --- training data: synthetic mini-PAB (issue 7) ---
@app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (the mini-PAB root).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes byte-identical files.")] = 0,
    identities: Annotated[int, typer.Option(help="Training identities (2 images each: normal + anomalous).")] = 100,
    val_identities: Annotated[int, typer.Option(help="Validation identities (2 images each).")] = 20,
    test_identities: Annotated[int, typer.Option(help="Test identities (2 images each).")] = 30,
    distractors: Annotated[int, typer.Option(help="Extra distractor images in the name-masked gallery.")] = 40,
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 64,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 128,
    train_files: Annotated[int, typer.Option(help="Number of annotation/train/attr_K.json files.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Generate a synthetic mini-PAB (images, pose maps, annotations, name-masked set, vocab) in the PAB layouts."""
    from rich.progress import Progress

    from .data.synthetic import generate_mini_pab

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("drawing", total=None)
        mp = generate_mini_pab(
            out,
            seed=seed,
            n_identities=identities,
            n_val_identities=val_identities,
            n_test_identities=test_identities,
            n_distractors=distractors,
            image_size=(width, height),
            n_train_files=train_files,
            overwrite=overwrite,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(
        f"mini-PAB in {mp.root}: {mp.n_train_pairs} training pairs, {mp.n_val_images} val / {mp.n_test_images} test "
        f"images, name-masked gallery of {mp.n_gallery}; vocab {mp.vocab}"
    )


# --- train: the CMP trainer (issue 7); `torchrun --nproc_per_node N -m tpas train cmp ...` for DDP ---
train_app = typer.Typer(help="Train a model family (CMP).", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("cmp")
def train_cmp_cmd(
    config: Annotated[Path, typer.Option("--config", help="Training YAML (configs/train/cmp.yaml).")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint_last.pth.")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: --set train.epochs=3 (repeatable).")
    ] = None,
) -> None:
    """Train CMP (ITC + IHNM-enhanced ITM + MLM, pose-aware); evaluates each epoch, checkpoints atomically."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .train import distributed as du
    from .train.config import load_train_config
    from .train.trainer import train

    cfg = load_train_config(existing_file(config), set_ or [])
    main_proc = int(__import__("os").environ.get("RANK", "0")) == 0
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=err_console, disable=not main_proc) as bar:
        task = bar.add_task("training", total=None, status="")

        def on_event(event: dict) -> None:
            kind = event["kind"]
            if kind == "start":
                bar.update(task, total=event["total_steps"], completed=event["step"])
                bar.console.print(
                    f"{event['records']} pairs, {event['steps_per_epoch']} steps/epoch x {event['epochs']} epochs "
                    f"on {event['world_size']} process(es), {event['device']}",
                    highlight=False,
                )
            elif kind == "step":
                bar.update(task, completed=event["step"],
                           status=f"epoch {event['epoch']} loss {event['loss']:.3f} lr {event['lr']:.2e}")  # fmt: skip
            elif kind == "eval":
                parts = [f"{src} R@1 {m['R@1']:.2f} mAP {m['mAP']:.2f}" for src, m in event["metrics"].items()]
                bar.console.print(f"epoch {event['epoch']}: " + "; ".join(parts), highlight=False)
            elif kind == "info":
                bar.console.print(event["message"], highlight=False)

        result = train(cfg, resume=resume, progress=on_event if main_proc else None)
    if du.rank() == 0 and main_proc:
        console.print(
            f"done: {result.steps} steps, {result.epochs_done} epochs; last {result.last_checkpoint}, "
            f"best {result.best_checkpoint}",
            highlight=False,
        )


# --- report: static HTML page of every model's top-5 per query (issue 8) ---
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
    from rich.progress import Progress

    from .data.pab import load_ground_truth
    from .scoring.plots import read_trials
    from .scoring.report import build_report
    from .sims import SimsMatrix

    labels = [s.stem for s in sims] if names is None else [n.strip() for n in names.split(",")]
    if len(labels) != len(sims):
        raise TpasInputError(f"--names gives {len(labels)} names for {len(sims)} SIMS files")
    if len(set(labels)) != len(labels) or not all(labels):
        raise TpasInputError(f"display names must be unique and non-empty, got {labels} (use --names)")
    models = {label: SimsMatrix.load(existing_file(p)) for label, p in zip(labels, sims, strict=True)}
    truth = load_ground_truth(existing_file(gt))
    trials = read_trials(tuning_trials) if tuning_trials is not None else None
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("report", total=None)
        rep = build_report(
            models,
            truth,
            images,
            out,
            trials=trials,
            objective=objective,
            max_queries=max_queries,
            progress=lambda stage, done, total: bar.update(task, description=stage, completed=done, total=total),
        )
    from rich.table import Table

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


# --- convert: released checkpoints -> layouts tpas loads (issue 4, BLIP-2) ---
convert_app = typer.Typer(help="Convert released checkpoints into what `tpas infer` loads.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("blip2-lavis")
def convert_blip2_lavis_cmd(
    qformer: Annotated[Path, typer.Argument(help="LAVIS blip2_pretrained.pth / blip2_pretrained_vitL.pth.")],
    vit: Annotated[Path, typer.Option("--vit", help="The ViT weights: eva_vit_g.pth (pretrain) or clip_vit_L.pth.")],
    out: Annotated[Path, typer.Option("--out", help="transformers directory to create.")],
    vocab: Annotated[
        Path | None, typer.Option("--vocab", help="bert-base-uncased vocab.txt (default: the copy shipped with tpas).")
    ] = None,
    model_type: Annotated[
        str | None,
        typer.Option("--model-type", help="pretrain (EVA ViT-g) | pretrain_vitL (CLIP ViT-L); default: from the ViT."),
    ] = None,
    vit_layers: Annotated[
        int | None, typer.Option("--vit-layers", help="ViT blocks to keep (default as LAVIS: 39 EVA, 23 CLIP-L).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    trust_checkpoint: Annotated[
        bool, typer.Option("--trust-checkpoint", help="Allow full unpickling of the input files.")
    ] = False,
) -> None:
    """Convert a LAVIS BLIP-2 checkpoint + its ViT file into a transformers directory (config, weights, tokenizer)."""
    from .models.blip2_convert import MODEL_TYPES, convert_lavis

    if model_type is not None and model_type not in MODEL_TYPES:
        raise TpasInputError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    with err_console.status("converting"):
        summary = convert_lavis(
            existing_file(qformer),
            existing_file(vit),
            out,
            vocab=vocab,
            model_type=model_type,
            vit_layers=vit_layers,
            overwrite=overwrite,
            trust=trust_checkpoint,
        )
    vc = summary.config["vision_config"]
    console.print(
        f"{summary.out}: BLIP-2 {summary.model_type} ({vc['num_hidden_layers']} ViT blocks, width {vc['hidden_size']}),"
        f" {summary.hf_keys} tensors"
        + (f" + {', '.join(summary.extra_keys)}" if summary.extra_keys else "")
        + f"; {len(summary.dropped)} source keys dropped (unused at inference)"
    )


# --- infer: any registered model family -> a SimsMatrix file (issue 4, engine) ---
class _InferCommand(typer.core.TyperCommand):
    """`tpas infer --help` names every registered family; the registry is imported only when help is shown."""

    def format_help(self, ctx: typer.core._click.Context, formatter: typer.core._click.HelpFormatter) -> None:
        from .models import list_models

        families = ", ".join(list_models())
        self.help = (self.help or "").replace("{families}", families)
        for p in self.params:
            if getattr(p, "help", None):
                p.help = p.help.replace("{families}", families)
        super().format_help(ctx, formatter)


def _read_model_config(path: Path | None, family: str) -> dict | None:
    """A configs/models/*.yaml file as a dict (its optional `family` key must name this family)."""
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(existing_file(path).read_text())
    except yaml.YAMLError as e:
        raise TpasInputError(f"not valid YAML ({' '.join(str(e).split())})", path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TpasInputError(f"expected a mapping of config keys, found {type(data).__name__}", path)
    if data.get("family", family) != family:
        raise TpasInputError(f"is a config for {data['family']!r}, not {family!r}", path)
    return data


class _RichInferProgress:
    """Renders the engine's InferProgress reports as one rich progress bar per stage, with items/s."""

    def __init__(self, progress: object) -> None:
        self._labels = {"images": "encoding images", "texts": "encoding queries", "rerank": "re-ranking pairs"}
        self.progress = progress
        self.tasks: dict[str, object] = {}

    def __call__(self, ev: object) -> None:
        unit = {"images": "img/s", "texts": "queries/s", "rerank": "pairs/s"}.get(ev.stage, "/s")
        if ev.stage not in self.tasks:
            self.tasks[ev.stage] = self.progress.add_task(self._labels.get(ev.stage, ev.stage), total=ev.total, rate="")
        extra = f"{ev.rate:,.1f} {unit}" + (f" ({ev.cached} cached)" if ev.cached else "")
        self.progress.update(self.tasks[ev.stage], completed=ev.done, total=ev.total, rate=extra)


@app.command("infer", cls=_InferCommand)
def infer_cmd(
    family: Annotated[str, typer.Argument(help="Model family, one of: {families}.")],
    images: Annotated[Path, typer.Option("--images", help="Gallery folder (ids = file stems).")],
    queries: Annotated[Path, typer.Option("--queries", help="query.json, attr.json/ucc.json, JSON list or .txt.")],
    out: Annotated[Path, typer.Option("--out", help="Output SimsMatrix file, e.g. sims_score/clip.pt.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="Weights file or folder.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Architecture YAML (configs/models/).")] = None,
    pose: Annotated[
        Path | None, typer.Option("--pose", help="Pose maps, same relative paths (pose-aware models).")
    ] = None,
    rerank_k: Annotated[
        int | None, typer.Option("--rerank-k", help="Re-rank each query's top-k with the matching head.")
    ] = None,
    candidates: Annotated[
        Path | None, typer.Option("--candidates", help="Take the top-k to re-rank from this SimsMatrix.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | bf16 (autocast, CUDA only).")] = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images, captions or pairs per batch.")] = 32,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decoding worker processes (default: CPU cores - 1, max 8).")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Feature cache root (default $TPAS_CACHE_DIR or ~/.cache/tpas).")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Encode everything afresh; keep no features.")] = False,
    skip_bad_images: Annotated[
        bool, typer.Option("--skip-bad-images", help="Record unreadable images in meta instead of stopping.")
    ] = False,
    trust_checkpoint: Annotated[
        bool, typer.Option("--trust-checkpoint", help="Allow full unpickling of the checkpoint (trusted files only).")
    ] = False,
    vocab: Annotated[Path | None, typer.Option("--vocab", help="BERT vocab.txt (cmp, blip2).")] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="sentencepiece model (beit3).")] = None,
    arch: Annotated[
        str | None, typer.Option("--arch", help="open_clip architecture (clip); default: read from the checkpoint.")
    ] = None,
    itc_score: Annotated[
        str | None, typer.Option("--itc-score", help="max | first-token (blip2 ITC over query tokens).")
    ] = None,
) -> None:
    """Run a model family over a gallery and a query file; write a SimsMatrix (resumable: features are cached).

    Families: {families}.
    """
    import os
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .models import load_model
    from .models.engine import infer, itc_path_for, itm_path_for

    t0 = time.perf_counter()
    model_config = _read_model_config(config, family)
    model = load_model(
        family,
        checkpoint,
        model_config,
        arch=arch,
        vocab=vocab,
        tokenizer=tokenizer,
        itc_score=itc_score,
        trust_checkpoint=trust_checkpoint or None,
    )
    show = os.environ.get("RANK", "0") == "0"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=True, disable=not (show and err_console.is_terminal)) as bar:
        report = _RichInferProgress(bar)
        sims = infer(
            model,
            images,
            queries,
            out,
            pose_dir=pose,
            rerank_k=rerank_k,
            candidates=candidates,
            batch_size=batch_size,
            num_workers=workers,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            skip_bad_images=skip_bad_images,
            progress=report,
        )
    if not show:
        return
    q, g = sims.shape
    line = f"{out}: {q} queries x {g} gallery images ({sims.source}) in {time.perf_counter() - t0:.1f} s"
    if rerank_k is not None:
        line += f"; ITC matrix: {itc_path_for(out)}; raw ITM (top-{rerank_k}): {itm_path_for(out)}"
    skipped = sims.meta.get("skipped_images") or []
    if skipped:
        line += f"; {len(skipped)} unreadable image(s) skipped (listed in meta)"
    console.print(line, highlight=False, soft_wrap=True)


# --- ensemble and tune: fuse SimsMatrix files from a YAML config; tune its parameters (issue 3) ---
_SET_HELP = "Override a config key, e.g. --set fuse.weights=[0.1,0.9,0.9] --set inputs.clip=other.pt (repeatable)."


@app.command("ensemble")
def ensemble_cmd(
    config: Annotated[Path, typer.Option("--config", help="Ensemble config (YAML), see configs/ensemble/.")],
    out: Annotated[Path, typer.Option("--out", help="Fused SimsMatrix file to write.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
) -> None:
    """Fuse score matrices as a config says (normalise, fuse, post-process) and write one SimsMatrix."""
    import json as _json

    from rich.progress import Progress
    from rich.table import Table

    from .ensemble.config import load_config
    from .ensemble.pipeline import run_ensemble

    cfg = load_config(existing_file(config), set_ or [])
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("fusing", total=None)
        fused, steps = run_ensemble(
            cfg, progress=lambda what, done, total: bar.update(task, description=what, completed=done, total=total)
        )
        fused.save(out)
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
    line = f"{out}: {q} queries x {g} gallery images (fused)"
    if fused.meta.get("transductive"):
        line += "; transductive post-processing used (every test query informed every score; see README)"
    console.print(line, highlight=False, soft_wrap=True)


@app.command("tune")
def tune_cmd(
    config: Annotated[Path, typer.Option("--config", help="Ensemble config (YAML) with an optional `tune` space.")],
    gt: Annotated[Path, typer.Option("--gt", help="Test annotation with the ground truth (attr.json).")],
    out: Annotated[Path, typer.Option("--out", help="Tuned config to write (same schema); report and CSV beside.")],
    metric: Annotated[str, typer.Option(help="Objective: R@1, R@5, R@10, mAP, mINP, or a mix '0.5*R@1+0.5*mAP'.")] = "",
    search: Annotated[str, typer.Option(help="grid | coordinate | random | optuna")] = "coordinate",
    trials: Annotated[int, typer.Option(help="Trial budget (coordinate/random/optuna; grid is exhaustive).")] = 200,
    step: Annotated[float | None, typer.Option(help="Grid step of every weight without its own step.")] = None,
    folds: Annotated[int, typer.Option(help="K-fold cross-validation over queries (0: none).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same trials and folds.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help=_SET_HELP)] = None,
) -> None:
    """Tune fusion weights (and any other listed parameter) on a labelled split; write the tuned config + report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .data.pab import load_ground_truth
    from .ensemble.config import load_config
    from .ensemble.tune import tune, write_outputs

    cfg = load_config(existing_file(config), set_ or [])
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


# --- pose: OpenPose-style pose maps for CMP (issue 6) ---
@app.command("pose")
def pose_cmd(
    images: Annotated[Path, typer.Option("--images", help="Image folder (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: one map per image, same relative path.")],
    keypoints: Annotated[
        Path | None,
        typer.Option("--keypoints", help="OpenPose *_keypoints.json folder/file or a COCO keypoint annotation file."),
    ] = None,
    detector: Annotated[
        str | None, typer.Option("--detector", help="Detector backend for images without keypoints (keypointrcnn).")
    ] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local weights file of the detector.")] = None,
    device: Annotated[str, typer.Option("--device", help="Device for the detector (cpu, cuda).")] = "cpu",
    stick_width: Annotated[int, typer.Option("--stick-width", help="Limb half-width in pixels.")] = 4,
    radius: Annotated[int, typer.Option("--radius", help="Joint radius in pixels.")] = 4,
) -> None:
    """Render an OpenPose-style skeleton map (COCO-18, standard colours, on black, image size) for every image.

    Images with no person get an all-black map and are listed in OUT/pose_log.json.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .pose import get_detector, make_pose_maps

    if detector is None and weights is not None:
        raise TpasInputError("--weights needs --detector NAME")
    det = get_detector(detector, weights, device=device) if detector is not None else None
    columns = (TextColumn("pose maps"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("pose", total=None)
        report = make_pose_maps(
            images,
            out,
            keypoints=keypoints,
            detector=det,
            stick_width=stick_width,
            radius=radius,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(
        f"{out}: {report.images} pose maps, {report.with_person} with a person, {len(report.no_person)} all-black "
        f"(listed in {report.log_path})",
        highlight=False,
        soft_wrap=True,
    )


# --- demo: the whole pipeline on a synthetic mini-PAB (issue 8) ---
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
    import shlex
    import time

    from rich.table import Table

    from .demo import run_demo

    t0 = time.perf_counter()

    def run_command(argv: list[str]) -> None:
        code = app(args=list(argv), standalone_mode=False)
        if code not in (None, 0):
            raise TpasInputError(f"demo step `tpas {argv[0]}` exited with status {code}")

    bars: dict = {}  # one live progress display for the steps that run in parallel, a task per step

    def close_bars() -> None:
        if "live" in bars:
            bars.pop("live").stop()
        bars.clear()

    def progress(i: int, n: int, step: object, reused: bool) -> None:
        if not step.parallel:
            close_bars()
        console.rule(f"[{i + 1}/{n}] {step.title}" + (" (reused from the last run)" if reused else ""), style="cyan")
        if not reused:
            console.print("$ tpas " + shlex.join(step.argv), highlight=False, soft_wrap=True, style="dim")

    def step_progress(step: object, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if "live" not in bars:
            bars["live"] = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=err_console)  # fmt: skip
            bars["live"].start()
        if step.title not in bars:
            bars[step.title] = bars["live"].add_task(step.title, total=step.total)
        bars["live"].update(bars[step.title], completed=done)

    try:
        res = run_demo(root, size="quick" if quick else "default", seed=seed, fresh=fresh, run_command=run_command,
                       progress=progress, step_progress=step_progress)  # fmt: skip
    finally:
        close_bars()
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
        + ", ".join(f"{m} {v:+.2f} (p={res.p_values[m]:.2f})" for m, v in gain.items()),
        highlight=False,
    )
    console.print(
        f"leaderboard file: {res.answer}\nreport: {res.report}\ntuned ensemble: {res.tuned_config}\n"
        f"matrices: {len(res.sims)} files in {res.sims[0].parent if res.sims else '-'}\n"
        f"total {time.perf_counter() - t0:.0f} s",
        highlight=False,
        soft_wrap=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning input errors into one line and exit code 2."""
    try:
        app(args=argv)
    except TpasInputError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
