"""`tpas infer FAMILY`: any registered model family over a gallery and a query file -> a SimsMatrix file.

No family is named here. Each family's command is built when it is asked for, from the engine's options (the
keyword parameters of `infer_family`) plus the `FamilyOption`s the family declares in its own module, shown in a help
panel of their own. `tpas infer --help` lists every registered family (built-in or from a `tpas.families` entry
point); `tpas infer clip` imports the clip module alone.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import TpasInputError
from .common import NoSuchOption, console, err_console

if TYPE_CHECKING:
    from ..models.base import FamilyOption, RetrievalModel


def _read_model_config(path: Path | None, family: str) -> dict | None:
    """A model config (a packaged preset such as `cmp`, or a YAML file) as a dict; its optional `family` key must
    name this family."""
    if path is None:
        return None
    from ..io import read_config

    data = read_config(path, "models", expected="a mapping of config keys")
    if data.get("family", family) != family:
        raise TpasInputError(f"is a config for {data['family']!r}, not {family!r}", path)
    return data


class RichInferProgress:
    """Renders the engine's InferProgress reports as one rich progress bar per stage, with items/s."""

    def __init__(self, progress: Any) -> None:
        self._labels = {"images": "encoding images", "texts": "encoding queries", "rerank": "re-ranking pairs"}
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, ev: Any) -> None:
        unit = {"images": "img/s", "texts": "queries/s", "rerank": "pairs/s"}.get(ev.stage, "/s")
        if ev.stage not in self.tasks:
            self.tasks[ev.stage] = self.progress.add_task(self._labels.get(ev.stage, ev.stage), total=ev.total, rate="")
        extra = f"{ev.rate:,.1f} {unit}" + (f" ({ev.cached} cached)" if ev.cached else "")
        self.progress.update(self.tasks[ev.stage], completed=ev.done, total=ev.total, rate=extra)


def infer_family(
    family: str,
    family_options: dict[str, Any],
    *,
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
    precision: Annotated[
        str, typer.Option("--precision", help="fp32 | fp16 | bf16 (CUDA autocast; bf16 also on a bf16-capable CPU).")
    ] = "fp32",
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
    keep_top: Annotated[
        int | None,
        typer.Option(
            "--keep-top",
            help="Keep each query's top-K only (gallery in blocks, never the dense [Q, G]); with --rerank-k k <= K "
            "the top-k of it are re-ranked and every matrix written is top-K.",
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Score storage of the written matrices: fp32 | fp16 (in meta).")
    ] = None,
) -> None:
    """Build `family` with its own options, run the engine, print where the matrices went (rank 0 only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..models import load_model
    from ..models.engine import infer, itc_path_for, itm_path_for

    t0 = time.perf_counter()
    model = load_model(family, checkpoint, _read_model_config(config, family), **family_options)
    show = os.environ.get("RANK", "0") == "0"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=True, disable=not (show and err_console.is_terminal)) as bar:
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
            progress=RichInferProgress(bar),
            keep_top=keep_top,
            dtype=dtype,
        )
    if not show:
        return
    q, g = sims.shape
    line = f"{out}: {q} queries x {g} gallery images ({sims.source}) in {time.perf_counter() - t0:.1f} s"
    if getattr(model, "pair_reranker", False):
        line += f"; top-{rerank_k} scores of the candidates in {candidates}"
    elif rerank_k is not None:
        line += f"; ITC matrix: {itc_path_for(out)}; raw ITM (top-{rerank_k}): {itm_path_for(out)}"
    skipped = sims.meta.get("skipped_images") or []
    if skipped:
        line += f"; {len(skipped)} unreadable image(s) skipped (listed in meta)"
    console.print(line, highlight=False, soft_wrap=True)


def _engine_parameters() -> list[inspect.Parameter]:
    """The options every family's command takes: the keyword-only parameters of `infer_family`."""
    params = inspect.signature(infer_family, eval_str=True).parameters.values()
    return [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _family_parameter(option: FamilyOption, family: str) -> inspect.Parameter:
    """A FamilyOption as the typed parameter Typer turns into a command-line option."""
    help_text = option.help + (f" One of: {', '.join(option.choices)}." if option.choices else "")
    # A flag that defaults to on needs its off switch: --x/--no-x.
    decl = f"{option.flag}/--no-{option.flag[2:]}" if option.type is bool and option.default else option.flag
    info = typer.Option(decl, help=help_text, rich_help_panel=f"{family} options",
                        show_default=option.default not in (None, False))  # fmt: skip
    if option.type is bool:
        annotation, default = bool, bool(option.default)
    else:
        annotation = option.type if option.default is not None else option.type | None
        default = option.default
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])  # fmt: skip


def _summary(cls: type[RetrievalModel]) -> str:
    first = (inspect.getdoc(cls) or cls.__name__).split("\n\n")[0].replace("\n", " ")
    return first.split(". ")[0].rstrip(".") + "."


class FamilyCommand(typer.core.TyperCommand):
    """One family's `tpas infer` command: an option that belongs to other families is refused by name."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as e:
            from ..models import get_model_class, list_models

            owners = [n for n in list_models() if any(o.flag == e.option_name for o in get_model_class(n).options)]
            if not owners:
                raise
            raise TpasInputError(
                f"{e.option_name} is an option of {', '.join(owners)}, not of {ctx.info_name} "
                f"(see tpas infer {ctx.info_name} --help)"
            ) from None


def family_command(family: str) -> Any:
    """The click command of `tpas infer FAMILY`: the engine's options plus the family's own."""
    from ..models import get_model_class

    cls = get_model_class(family)
    engine = _engine_parameters()
    clash = {o.name for o in cls.options} & {p.name for p in engine}
    if clash:
        raise ValueError(f"model family {family!r} redeclares engine option(s) {sorted(clash)}")

    def run(**values: Any) -> None:
        infer_family(family, {o.name: values.pop(o.name) for o in cls.options}, **values)

    run.__signature__ = inspect.Signature([*engine, *(_family_parameter(o, family) for o in cls.options)])
    one = typer.Typer(add_completion=False)
    one.command(
        family,
        cls=FamilyCommand,
        short_help=_summary(cls),
        help=f"Run {family} over a gallery and a query file; write a SimsMatrix (resumable: features are cached).\n\n"
        f"{_summary(cls)}",
    )(run)
    return typer.main.get_command(one)


class FamilyGroup(typer.core.TyperGroup):
    """`tpas infer`: a subcommand per registered family, each built on demand."""

    def list_commands(self, ctx: Any) -> list[str]:
        from ..models import list_models

        return list_models()

    def get_command(self, ctx: Any, name: str) -> Any:
        return family_command(name)


app = typer.Typer(
    cls=FamilyGroup,
    no_args_is_help=True,
    short_help="Run a model family over a gallery and a query file; write a SimsMatrix.",
    help="Run a model family over a gallery and a query file; write a SimsMatrix (resumable: features are cached). "
    "`tpas infer FAMILY --help` shows the engine's options and the family's own.",
)
