"""`tpas train cmp|xvlm`: the trainer; `torchrun --nproc_per_node N -m tpas train KIND ...` runs it with DDP."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .common import console, err_console

app = typer.Typer(help="Train a model family (CMP, X-VLM).", no_args_is_help=True)

Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint_last.pth.")]
Sets = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set train.epochs=3 (repeatable).")
]


@app.command("cmp")
def train_cmp_cmd(
    config: Annotated[
        Path, typer.Option("--config", help="Training config: a packaged preset (cmp, cmp_tiny) or a YAML file.")
    ],
    resume: Resume = False,
    set_: Sets = None,
) -> None:
    """Train CMP (ITC + IHNM-enhanced ITM + MLM, pose-aware); evaluates each epoch, checkpoints atomically."""
    _run("cmp", config, resume, set_ or [])


@app.command("xvlm")
def train_xvlm_cmd(
    config: Annotated[
        Path, typer.Option("--config", help="Training config: a packaged preset (xvlm_hfut) or a YAML file.")
    ],
    resume: Resume = False,
    set_: Sets = None,
) -> None:
    """Fine-tune X-VLM (in-batch ITC + ITM with hard negatives, HFUT-LMC's recipe); evaluates each epoch."""
    _run("xvlm", config, resume, set_ or [])


def _run(kind: str, config: Path, resume: bool, sets: list[str]) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..runtime import rank
    from ..train.config import load_train_config
    from ..train.trainer import train

    cfg = load_train_config(config, sets, kind=kind)
    main_proc = int(os.environ.get("RANK", "0")) == 0
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

        result = train(cfg, kind=kind, resume=resume, progress=on_event if main_proc else None)
    if rank() == 0 and main_proc:
        console.print(
            f"done: {result.steps} steps, {result.epochs_done} epochs; last {result.last_checkpoint}, "
            f"best {result.best_checkpoint}",
            highlight=False,
        )
