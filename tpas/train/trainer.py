"""The training loop of CMP and X-VLM: set-up from the config, AMP, gradient checkpointing, DDP, per-epoch
evaluation, atomic checkpoints and bit-exact resume.

`train(cfg, kind=...)` runs one process; under `torchrun` every process runs it and rank 0 alone logs and writes
files. Device, precision and the process group come from `tpas.runtime` (the rule `tpas infer` follows too); what
differs between the kinds is in `kinds` (builder, loss switches, dataset views, checkpoint format), the model set-up
in `model_setup`, the optimiser's groups and schedule in `optim`, the evaluation in `evaluation`, the checkpoint
format in `checkpoints`. `tpas infer KIND --checkpoint OUT/checkpoint_best.pth` loads the weights (`vocab.txt` is
copied beside them).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TpasInputError, training_diverged
from ..resources import out_of_memory_hint
from ..runtime import Distributed, Precision, distributed, precision_policy, resolve_device
from .checkpoints import (
    BEST,
    LAST,
    load_training_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import KIND_DEFAULTS
from .data import AugmentConfig, CMPTrainDataset, TrainTransform, select_pairs
from .evaluation import evaluate_model
from .kinds import TrainKind, get_kind
from .losses import CMPLossModule
from .model_setup import BuiltModel, enable_gradient_checkpointing
from .optim import check_schedule, lr_factor, param_groups, set_lr, warmup_steps

Progress = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------------- logging
class RunLog:
    """Rank-0 JSON-lines log (`train_log.jsonl`) plus TensorBoard scalars when tensorboard is installed."""

    def __init__(self, out_dir: Path, tensorboard: bool) -> None:
        self.path = out_dir / "train_log.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        if isinstance(vv, (int, float)):
                            self.tb.add_scalar(f"{k}/{kk}", vv, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------- set-up
@dataclass
class TrainResult:
    """Where the run left its files and what it measured."""

    output_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    epochs_done: int
    steps: int
    history: list[dict[str, Any]]
    init: list[str]


@dataclass
class _Run:
    """What a training run built before its first step; fixed for the whole run."""

    cfg: dict[str, Any]
    kind: TrainKind
    dev: torch.device
    amp: Precision
    dist: Distributed
    emit: Progress
    out_dir: Path
    root: Path
    model: Any
    loss_module: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: CMPTrainDataset
    sampler: torch.utils.data.DistributedSampler
    records: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    init_notes: list[str]
    log: RunLog | None = None


@dataclass
class _State:
    """Where the run is: what a checkpoint saves and a resume restores."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _train_files(root: Path, entries: Any) -> list[Path]:
    from ..data.pab import train_annotation_files

    if isinstance(entries, (str, Path)):
        entries = [entries]
    files: list[Path] = []
    for e in entries:
        p = Path(e)
        p = p if p.is_absolute() else root / p
        files.extend(train_annotation_files(p) if p.is_dir() else [p])
    if not files:
        raise TpasInputError("no training annotation files found", root)
    return files


def _vocab(cfg: dict[str, Any]) -> Path:
    """The vocab file of `data.vocab`, checked."""
    vocab = Path(cfg["data"]["vocab"])
    if not vocab.is_file():
        raise TpasInputError("vocab file not found (data.vocab: the bert-base-uncased vocab.txt)", vocab)
    return vocab


def _copy_vocab(vocab: Path, out_dir: Path, dist: Distributed) -> None:
    """Copy the vocab into the output folder (where `tpas infer` looks beside the checkpoint), on rank 0."""
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / "vocab.txt").is_file() or (out_dir / "vocab.txt").read_bytes() != vocab.read_bytes():
            shutil.copyfile(vocab, out_dir / "vocab.txt")


def _build_model(run_kind: TrainKind, cfg: dict[str, Any], vocab: Path, out_dir: Path, dist: Distributed,
                 emit: Progress) -> BuiltModel:  # fmt: skip
    """The kind's model as the `model` and `init` sections say; init notes emitted, a pre-training load's key-by-key
    report written to OUT/init_report.txt (rank 0)."""
    built = run_kind.build(cfg, vocab)
    for note in built.notes:
        emit({"kind": "info", "message": "init " + note})
    if built.report and dist.rank == 0:
        from ..io import atomic_write

        atomic_write(out_dir / "init_report.txt", lambda tmp: tmp.write_text("\n".join(built.report) + "\n"))
        emit({"kind": "info", "message": f"init report (key by key): {out_dir / 'init_report.txt'}"})
    if cfg["train"]["grad_checkpointing"]:
        enable_gradient_checkpointing(built.model)
    return built


def _records(cfg: dict[str, Any], root: Path) -> list[Any]:
    """The training pairs: the annotation files, then `data.subset` (a list file of images), then `max_records`."""
    from ..data.pab import read_train_annotation

    data = cfg["data"]
    records = read_train_annotation(_train_files(root, data["train"]))
    if data.get("subset"):
        records = select_pairs(records, Path(data["subset"]))
    if data.get("max_records"):
        records = records[: int(data["max_records"])]
    return records


def _set_up(run_kind: TrainKind, cfg: dict[str, Any], dev: torch.device, amp: Precision, dist: Distributed,
            emit: Progress) -> _Run:  # fmt: skip
    """Model, loss, optimiser, data and step counts of a run (`torch.manual_seed` first: model init draws)."""
    data, tr, optim_cfg = cfg["data"], cfg["train"], cfg["optim"]
    seed = int(tr["seed"])
    torch.manual_seed(seed + dist.rank)
    out_dir, root = Path(cfg["output"]["dir"]), Path(data["root"])
    vocab = _vocab(cfg)
    records = _records(cfg, root)
    _copy_vocab(vocab, out_dir, dist)  # the first write: bad input above leaves no output folder behind
    built = _build_model(run_kind, cfg, vocab, out_dir, dist, emit)
    model = built.model
    model.to(dev)
    loss_module: nn.Module = CMPLossModule(model, run_kind.loss_config(cfg["loss"]))
    if dist.active:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    check_schedule(str(optim_cfg["schedule"]))
    optimizer = torch.optim.AdamW(
        param_groups(model, optim_cfg), lr=float(optim_cfg["lr"]), betas=tuple(optim_cfg["betas"]),
        eps=float(optim_cfg["eps"]),
    )  # fmt: skip
    mc = model.config
    transform = TrainTransform(mc.image_size, mc.image_mean, mc.image_std, AugmentConfig(**cfg["augment"]))
    dataset = CMPTrainDataset(records, root, built.tokenizer, transform, seed=seed, clean_caption=built.clean_caption,
                              **run_kind.dataset_options(cfg))  # fmt: skip
    batch_size = int(tr["batch_size"])
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch == 0:
        raise TpasInputError(
            f"{len(records)} training records give no full batch of {batch_size} per process on {dist.world} "
            "process(es)"
        )
    total_steps = int(tr["epochs"]) * steps_per_epoch
    if tr.get("max_steps"):
        total_steps = min(total_steps, int(tr["max_steps"]))
    warmup = warmup_steps(optim_cfg["warmup_steps"], total_steps)
    return _Run(cfg, run_kind, dev, amp, dist, emit, out_dir, root, model, loss_module, optimizer, amp.grad_scaler(),
                dataset, sampler, len(records), steps_per_epoch, total_steps, warmup, built.notes)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- checkpoints
def _resume(run: _Run) -> _State:
    """Model, optimiser, scaler, counters and RNG states from OUT/checkpoint_last.pth."""
    ck = load_training_checkpoint(run.out_dir / LAST, run.kind.checkpoint_format)
    run.model.load_state_dict(ck["model"], strict=True)
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scaler.load_state_dict(ck["scaler"])
    state = _State(int(ck["epoch"]), int(ck["step"]), int(ck["batch_in_epoch"]), dict(ck.get("best") or {}),
                   list(ck.get("history") or []))  # fmt: skip
    set_rng_state(ck["rng"], run.dev, run.dist)
    where = f"epoch {state.epoch}, step {state.step}"
    run.emit({"kind": "info", "message": f"resumed from {run.out_dir / LAST} at {where}"})
    return state


def _checkpoint(run: _Run, state: _State, metrics: dict[str, Any] | None = None, is_best: bool = False) -> None:
    """Write checkpoint_last.pth (and checkpoint_best.pth) on rank 0; every rank joins the RNG gather."""
    payload = {
        "format": run.kind.checkpoint_format,
        "model": run.model.state_dict(),
        "config": run.model.config.to_dict(),
        "train_config": json.loads(json.dumps(run.cfg)),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"step": state.step, "total_steps": run.total_steps,
                      "warmup_steps": run.warmup_steps},
        "scaler": run.scaler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "batch_in_epoch": state.batch_in_epoch,
        "rng": rng_state(run.dev, run.dist),
        "best": state.best,
        "history": state.history,
        "metrics": metrics or {},
    }  # fmt: skip
    if run.dist.rank == 0:
        save_checkpoint(run.out_dir / LAST, payload)
        if is_best:
            save_checkpoint(run.out_dir / BEST, payload)
    run.dist.barrier()


# ----------------------------------------------------------------------------------------------------- the loop
def train(
    cfg: dict[str, Any], *, kind: str = "cmp", resume: bool = False, progress: Progress | None = None
) -> TrainResult:
    """Train a model of `kind` (cmp | xvlm) as `cfg` (`load_train_config(..., kind=kind)`, defaults in
    `tpas.train.config.KIND_DEFAULTS`) says; resume from OUT/checkpoint_last.pth if asked.

    `progress` receives events: {"kind": "start", total_steps, ...}, {"kind": "step", step, epoch, loss, lr, ...},
    {"kind": "eval", epoch, metrics}, {"kind": "info", message}. Library code never prints.
    """
    emit: Progress = progress or (lambda event: None)
    run_kind = get_kind(kind)
    if set(cfg) != set(KIND_DEFAULTS[kind]):
        raise TpasInputError(f"the config's sections ({', '.join(sorted(cfg))}) are not those of a {kind} training "
                             f"config; load it with load_train_config(..., kind={kind!r})")  # fmt: skip
    dev = resolve_device(str(cfg["train"]["device"]), option="train.device")
    amp = precision_policy(dev, str(cfg["train"]["precision"]), option="train.precision")
    batch = int(cfg["train"]["batch_size"])
    with distributed(dev) as dist, out_of_memory_hint(batch, dev, option="--set train.batch_size"):
        run = _set_up(run_kind, cfg, dev, amp, dist, emit)
        state = _resume(run) if resume else _State()
        if dist.rank == 0:
            run.log = RunLog(run.out_dir, bool(cfg["output"].get("tensorboard")))
        try:
            emit({"kind": "start", "total_steps": run.total_steps, "step": state.step,
                  "steps_per_epoch": run.steps_per_epoch, "epochs": int(cfg["train"]["epochs"]),
                  "world_size": dist.world, "device": str(dev), "records": run.records})  # fmt: skip
            _loop(run, state)
        finally:
            if run.log is not None:
                run.log.close()
        return TrainResult(
            output_dir=run.out_dir,
            last_checkpoint=run.out_dir / LAST if (run.out_dir / LAST).is_file() else None,
            best_checkpoint=run.out_dir / BEST if (run.out_dir / BEST).is_file() else None,
            epochs_done=state.epoch,
            steps=state.step,
            history=state.history,
            init=run.init_notes,
        )


def _loop(run: _Run, state: _State) -> None:
    """Epochs until `train.epochs` or `train.max_steps`; evaluate and checkpoint at the end of each."""
    ev = run.cfg["eval"]
    clock = (time.time(), state.step)
    stopped = state.step >= run.total_steps
    run.loss_module.train()
    while state.epoch < int(run.cfg["train"]["epochs"]) and not stopped:
        stopped = _train_epoch(run, state, clock)
        finished_epoch = state.batch_in_epoch >= run.steps_per_epoch
        metrics, is_best = None, False
        if ev.get("enabled") and (finished_epoch or stopped) and _eval_due(run, state.epoch, stopped):
            metrics, is_best = _evaluate(run, state)
        if finished_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        _checkpoint(run, state, metrics, is_best=is_best or (not ev.get("enabled") and finished_epoch))


def _train_epoch(run: _Run, state: _State, clock: tuple[float, int]) -> bool:
    """The rest of the current epoch (from `state.batch_in_epoch`); True when the run reached its last step."""
    tr = run.cfg["train"]
    batch_size, seed = int(tr["batch_size"]), int(tr["seed"])
    run.dataset.set_epoch(state.epoch)
    run.sampler.set_epoch(state.epoch)
    order = list(run.sampler)[: run.steps_per_epoch * batch_size]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(run.dataset, order[state.batch_in_epoch * batch_size :]),
        batch_size=batch_size,
        shuffle=False,
        drop_last=True,
        num_workers=int(run.cfg["data"]["num_workers"]),
        pin_memory=run.dev.type == "cuda",
        # A private generator: creating the loader must not draw from the global RNG (bit-exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
    log_every = max(1, int(tr["log_every"]))
    save_every = int(tr.get("save_every_steps") or 0)
    for batch in loader:
        values, lr = _step(run, state, batch)
        elapsed = time.time() - clock[0]
        rate = (state.step - clock[1]) * batch_size * run.dist.world / max(1e-9, elapsed)
        event = {"kind": "step", "step": state.step, "epoch": state.epoch, "lr": lr, "loss": values["total"],
                 "total_steps": run.total_steps, "elapsed": elapsed, "temp": float(run.model.temp.detach()),
                 "samples_per_s": rate}  # fmt: skip
        if run.log is not None and (state.step % log_every == 0 or state.step == 1):
            run.log.write({**event, **{k: v for k, v in values.items() if k != "total"}})
        run.emit({**event, "losses": values})
        if state.step >= run.total_steps:
            return True
        if save_every and state.step % save_every == 0 and state.batch_in_epoch < run.steps_per_epoch:
            _checkpoint(run, state)
    return False


def _step(run: _Run, state: _State, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    """One optimiser step on `batch`; returns the loss values and the base learning rate it used."""
    optim_cfg = run.cfg["optim"]
    base_lr = float(optim_cfg["lr"])
    batch = {k: v.to(run.dev, non_blocking=True) for k, v in batch.items()}
    factor = lr_factor(state.step, run.total_steps, run.warmup_steps, base_lr, float(optim_cfg["lr_end"]),
                       str(optim_cfg["schedule"]))  # fmt: skip
    lr = set_lr(run.optimizer, base_lr, factor)
    with run.amp.autocast():
        losses = run.loss_module(batch)
    run.scaler.scale(losses["total"]).backward()
    clip = optim_cfg.get("grad_clip")
    if clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), float(clip))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batch_in_epoch += 1
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not all(math.isfinite(values[k]) for k in ("total", "itc", "itm", "mlm") if k in values):
        last = run.out_dir / LAST
        raise training_diverged(state.step, values, last if last.is_file() else None)
    return values, lr


def _eval_due(run: _Run, epoch: int, stopped: bool) -> bool:
    """Every `eval.every_epochs` epochs, after the last epoch, and when the run stops early."""
    epochs = int(run.cfg["train"]["epochs"])
    return (epoch + 1) % max(1, int(run.cfg["eval"]["every_epochs"])) == 0 or epoch + 1 == epochs or stopped


def _evaluate(run: _Run, state: _State) -> tuple[dict[str, Any], bool]:
    """Rank 0 evaluates (the others wait for its metrics); returns the metrics and whether they are the best yet."""
    ev = run.cfg["eval"]
    metrics = None
    if run.dist.rank == 0:
        eval_root = Path(ev.get("root") or run.root)
        ann = Path(ev["annotation"])
        ann = ann if ann.is_absolute() else eval_root / ann
        metrics = evaluate_model(
            run.model, ann, eval_root, run.dev, run.amp.autocast, batch_size=int(ev["batch_size"]),
            rerank_k=int(ev.get("rerank_k") or 0), num_workers=int(run.cfg["data"]["num_workers"]),
        )  # fmt: skip
    metrics = run.dist.broadcast(metrics)
    key = str(ev.get("select_by", "mAP"))
    score_src = metrics.get("itm", metrics["itc"])
    if key not in score_src:
        raise TpasInputError(f"eval.select_by {key!r} is not a metric; use one of {', '.join(score_src)}")
    score = float(score_src[key])
    is_best = not state.best or score > float(state.best["score"])
    if is_best:
        state.best = {"score": score, "metric": key, "epoch": state.epoch, "step": state.step}
    record = {"kind": "eval", "epoch": state.epoch, "step": state.step, **metrics}
    state.history.append(record)
    if run.log is not None:
        run.log.write(record)
    run.emit({**record, "metrics": metrics, "best": state.best})
    return metrics, is_best
