"""The CMP trainer: model and optimiser set-up, the training loop (AMP, gradient checkpointing, DDP), per-epoch
evaluation through `tpas.scoring`, atomic checkpoints and bit-exact resume.

`train(cfg)` runs one process; under `torchrun` every process runs it and rank 0 alone logs and writes files.
Checkpoints hold only tensors and plain values, so `torch.load(..., weights_only=True)` opens them and
`tpas infer cmp --checkpoint OUT/checkpoint_best.pth` loads the weights (`vocab.txt` is copied beside them).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TpasInputError
from . import distributed as du
from .data import AugmentConfig, CMPTrainDataset, EvalImages, TrainTransform
from .losses import CMPLossModule, LossConfig
from .masking import MaskingConfig

Progress = Callable[[dict[str, Any]], None]
CHECKPOINT_FORMAT = "tpas-cmp-train/1"
LAST, BEST = "checkpoint_last.pth", "checkpoint_best.pth"


# ----------------------------------------------------------------------------------------------------- model set-up
def build_model_config(model_section: dict[str, Any], vocab_size: int) -> Any:
    """CMPConfig from the `model` section (`preset: base|tiny` + field overrides); vocab size from the vocab file."""
    from ..models.cmp import CMPConfig

    section = dict(model_section)
    preset = section.pop("preset", "base")
    section.setdefault("vocab_size", vocab_size)
    try:
        if preset == "tiny":
            return CMPConfig.tiny(**section)
        if preset == "base":
            return CMPConfig.from_dict(section)
    except (TypeError, ValueError) as e:
        raise TpasInputError(f"invalid model config: {e}") from None
    raise TpasInputError(f"model.preset must be 'base' or 'tiny', not {preset!r}")


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file or folder (HF folder: model.safetensors or pytorch_model.bin), weights_only."""
    from ..models.checkpoint import extract_state_dict, load_checkpoint, strip_prefix

    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise TpasInputError("no model.safetensors or pytorch_model.bin in this folder", path)
    if not path.is_file():
        raise TpasInputError("initialisation weights not found", path)
    state = extract_state_dict(load_checkpoint(path), path)
    return strip_prefix(state, "module.")


@dataclass
class InitSummary:
    """What an initialisation loaded: counts and the names that did not fit (strict=False semantics)."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: loaded / missing / unexpected / shape-mismatched counts with a few example keys."""

        def ex(keys: list[str]) -> str:
            return f" (e.g. {', '.join(keys[:3])})" if keys else ""

        return (
            f"{self.source}: loaded {self.loaded} tensors; missing {len(self.missing)}{ex(self.missing)}; "
            f"unexpected {len(self.unexpected)}{ex(self.unexpected)}; shape-mismatched {len(self.mismatched)}"
            f"{ex(self.mismatched)}"
        )


def load_partial(model: nn.Module, state: dict[str, torch.Tensor], source: str, prefix: str = "") -> InitSummary:
    """Copy every tensor whose (prefixed) name and shape match into `model` (strict=False); report the rest.

    `missing` lists model keys under `prefix` that the file did not provide.
    """
    own = model.state_dict()
    summary = InitSummary(source)
    fitting = {}
    for k, v in state.items():
        key = prefix + k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key not in own:
            summary.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(v.shape):
            summary.mismatched.append(f"{key} {tuple(v.shape)}->{tuple(own[key].shape)}")
        else:
            fitting[key] = v
    model.load_state_dict(fitting, strict=False)
    summary.loaded = len(fitting)
    summary.missing = [k for k in own if k.startswith(prefix) and k not in fitting]
    return summary


def initialise(model: nn.Module, init: dict[str, Any]) -> list[InitSummary]:
    """Initialise from an APTM/X-VLM-style checkpoint, or from separate Swin and BERT weights (local files)."""
    out = []
    if init.get("checkpoint"):
        out.append(load_partial(model, _state_dict_of(Path(init["checkpoint"])), str(init["checkpoint"])))
    if init.get("swin"):
        state = {k: v for k, v in _state_dict_of(Path(init["swin"])).items() if not k.startswith("head.")}
        out.append(load_partial(model, state, str(init["swin"]), prefix="vision_encoder."))
    if init.get("bert"):
        state = _state_dict_of(Path(init["bert"]))
        # Plain BERT checkpoints name the encoder `bert.*`; a bare BertModel has no prefix.
        if not any(k.startswith("bert.") for k in state):
            state = {f"bert.{k}": v for k, v in state.items()}
        out.append(load_partial(model, state, str(init["bert"]), prefix="text_encoder."))
    return out


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute every Swin block and BERT layer in the backward pass instead of storing activations.

    Uses non-reentrant `torch.utils.checkpoint`, which restores the RNG state so dropout/drop-path masks match.
    Returns the number of wrapped modules.
    """
    from torch.utils.checkpoint import checkpoint

    from ..models.cmp.bert import BertLayer
    from ..models.cmp.swin import SwinBlock

    n = 0
    for m in model.modules():
        if isinstance(m, (SwinBlock, BertLayer)) and not getattr(m, "_tpas_checkpointed", False):
            forward = m.forward

            def wrapped(*args: Any, _f: Callable = forward, _m: nn.Module = m, **kwargs: Any) -> Any:
                if _m.training and torch.is_grad_enabled():
                    return checkpoint(_f, *args, use_reentrant=False, **kwargs)
                return _f(*args, **kwargs)

            m.forward = wrapped  # type: ignore[method-assign]
            m._tpas_checkpointed = True  # type: ignore[attr-defined]
            n += 1
    return n


def param_groups(model: nn.Module, optim: dict[str, Any]) -> list[dict[str, Any]]:
    """AdamW groups: (new parts: lr x lr_mult) x (weight decay except on biases, norms and scalars)."""
    patterns = [re.compile(p) for p in optim.get("new_param_patterns") or []]
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        new = any(pat.search(name) for pat in patterns)
        decay = p.ndim >= 2
        groups.setdefault((new, decay), []).append(p)
    out = []
    for (new, decay), params in sorted(groups.items()):
        mult = float(optim["lr_mult"]) if new else 1.0
        out.append(
            {
                "params": params,
                "lr": float(optim["lr"]) * mult,
                "lr_mult": mult,
                "weight_decay": float(optim["weight_decay"]) if decay else 0.0,
                "name": f"{'new' if new else 'pretrained'}_{'decay' if decay else 'no_decay'}",
            }
        )
    return out


def lr_factor(step: int, total: int, warmup: int, lr: float, lr_end: float) -> float:
    """Linear warm-up from 0 over `warmup` steps, then linear decay from lr to lr_end at `total` (as a factor of lr)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    end = lr_end / lr if lr > 0 else 0.0
    return end + (1.0 - end) * (1.0 - progress)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Apply `factor` to every group (times its lr_mult); returns the base group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_mult", 1.0)
    return base_lr * factor


# ----------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(
    model: Any,
    tokenizer: Any,
    annotation: Path,
    root: Path,
    device: torch.device,
    *,
    batch_size: int = 64,
    rerank_k: int = 0,
    num_workers: int = 0,
    autocast: Any = nullcontext,
) -> dict[str, Any]:
    """Retrieval metrics of `model` on a test-format annotation, scored by `tpas.scoring.evaluate` (PAB protocol).

    Returns {"itc": {R@1, R@5, R@10, mAP, mINP}} and, with rerank_k > 0, {"itm": ...} for the ITM re-ranked matrix
    (each query's top-k ITC candidates re-scored, others at the row minimum, then the CMP final combination).
    """
    from ..data.pab import annotation_query_ids, ground_truth_from_records, read_test_annotation
    from ..models.cmp import cmp_final_scores
    from ..scoring import evaluate
    from ..sims import SimsMatrix

    records = read_test_annotation(annotation)
    gt = ground_truth_from_records(records, annotation)
    was_training = model.training
    model.eval()
    try:
        loader = torch.utils.data.DataLoader(
            EvalImages(records, root, model.image_preprocessor, bool(model.config.pose)),
            batch_size=batch_size,
            num_workers=num_workers,
        )
        feats, tokens = [], []
        for batch in loader:
            pose = batch.get("pose")
            with autocast():
                t = model.encode_image_tokens(batch["image"].to(device), None if pose is None else pose.to(device))
                feats.append(model.image_feat(t).float())
            if rerank_k:
                tokens.append(t)
        image_feat = torch.cat(feats)
        captions = [c for r in records for c in r.captions]
        text_feat, states, masks = [], [], []
        for i in range(0, len(captions), batch_size):
            tok = tokenizer(captions[i : i + batch_size])
            ids, att = tok["input_ids"].to(device), tok["attention_mask"].to(device)
            with autocast():
                s = model.encode_text_tokens(ids, att)
                text_feat.append(model.text_feat(s).float())
            if rerank_k:
                states.append(s)
                masks.append(att)
        itc = (torch.cat(text_feat) @ image_feat.T).cpu()
        qids, gids = annotation_query_ids(records), [r.gallery_id for r in records]
        out = {"itc": evaluate(SimsMatrix(qids, gids, scores=itc, source="cmp-itc"), gt).metrics()}
        if rerank_k:
            k = min(rerank_k, itc.shape[1])
            top = itc.topk(k, dim=1).indices
            image_tokens, text_states, text_masks = torch.cat(tokens), torch.cat(states), torch.cat(masks)
            scores = torch.empty(top.shape)
            for q in range(top.shape[0]):
                with autocast():
                    cls = model.cross_cls(
                        text_states[q : q + 1].expand(k, -1, -1),
                        text_masks[q : q + 1].expand(k, -1),
                        image_tokens[top[q].to(device)],
                    )
                    scores[q] = model.itm_logits(cls)[:, 1].float().cpu()
            filled = scores.min(dim=1, keepdim=True).values.expand(-1, itc.shape[1]).clone()
            filled.scatter_(1, top, scores)
            final = cmp_final_scores(filled, itc)
            out["itm"] = evaluate(SimsMatrix(qids, gids, scores=final, source="cmp-itm"), gt).metrics()
        return out
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------- checkpoints
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's torch RNG states as tensors (weights_only-loadable); all ranks' when distributed."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if du.is_distributed():
        state = {k: du.all_gather_no_grad(v.unsqueeze(0)) for k, v in state.items()}
    else:
        state = {k: v.unsqueeze(0) for k, v in state.items()}
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    r = du.rank()
    if state["cpu"].shape[0] != du.world_size():
        raise TpasInputError(
            f"the checkpoint was written by {state['cpu'].shape[0]} process(es); resume with the same number "
            f"(now {du.world_size()}) to continue bit-for-bit"
        )
    torch.set_rng_state(state["cpu"][r].clone())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"][r].clone(), device)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temp file beside `path`, then rename (never a half-written checkpoint)."""
    from ..sims import atomic_write

    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Open a training checkpoint with weights_only=True; TpasInputError if it is not one."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TpasInputError("no checkpoint to resume from", path) from None
    except Exception as e:
        raise TpasInputError(f"cannot load training checkpoint ({e})", path) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise TpasInputError(f"not a tpas training checkpoint (expected format {CHECKPOINT_FORMAT!r})", path)
    return obj


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


# ----------------------------------------------------------------------------------------------------- training
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


def _autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision == "fp32":
        return nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise TpasInputError(f"train.precision must be fp32, bf16 or fp16, not {precision!r}")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


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


def train(cfg: dict[str, Any], *, resume: bool = False, progress: Progress | None = None) -> TrainResult:
    """Train CMP as `cfg` (see `tpas.train.config.DEFAULTS`) says; resume from OUT/checkpoint_last.pth if asked.

    `progress` receives events: {"kind": "start", total_steps, ...}, {"kind": "step", step, epoch, loss, lr, ...},
    {"kind": "eval", epoch, metrics}, {"kind": "info", message}. Library code never prints.
    """
    from ..data.pab import read_train_annotation
    from ..models.cmp import CMP, CMPTokenizer

    emit: Progress = progress or (lambda event: None)
    data, tr, optim_cfg, ev = cfg["data"], cfg["train"], cfg["optim"], cfg["eval"]
    device = du.setup(str(tr["device"]))
    try:
        rank, world = du.rank(), du.world_size()
        seed = int(tr["seed"])
        torch.manual_seed(seed + rank)
        out_dir = Path(cfg["output"]["dir"])
        root = Path(data["root"])
        vocab = Path(data["vocab"])
        if not vocab.is_file():
            raise TpasInputError("vocab file not found (data.vocab: the bert-base-uncased vocab.txt)", vocab)
        if du.is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            if not (out_dir / "vocab.txt").is_file() or (out_dir / "vocab.txt").read_bytes() != vocab.read_bytes():
                shutil.copyfile(vocab, out_dir / "vocab.txt")  # `tpas infer cmp` finds it beside the checkpoint
        records = read_train_annotation(_train_files(root, data["train"]))
        if data.get("max_records"):
            records = records[: int(data["max_records"])]
        model_cfg_probe = build_model_config(cfg["model"], vocab_size=0)
        tokenizer = CMPTokenizer(vocab, model_cfg_probe.max_tokens, model_cfg_probe.max_words)
        model_cfg = build_model_config(cfg["model"], vocab_size=tokenizer.vocab_size)
        if model_cfg.vocab_size != tokenizer.vocab_size:
            raise TpasInputError(
                f"model.vocab_size {model_cfg.vocab_size} differs from the vocab file's {tokenizer.vocab_size} tokens",
                vocab,
            )
        if bool(data["pose"]) != bool(model_cfg.pose):
            raise TpasInputError(f"data.pose={data['pose']} but model pose={model_cfg.pose}; they must agree")
        model = CMP(model_cfg)
        init_notes = [s.describe() for s in initialise(model, cfg["init"])]
        for note in init_notes:
            emit({"kind": "info", "message": "init " + note})
        if tr["grad_checkpointing"]:
            enable_gradient_checkpointing(model)
        model.to(device)
        loss_module: nn.Module = CMPLossModule(model, LossConfig(**cfg["loss"]))
        if du.is_distributed():
            loss_module = nn.parallel.DistributedDataParallel(
                loss_module, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = torch.optim.AdamW(
            param_groups(model, optim_cfg), lr=float(optim_cfg["lr"]), betas=tuple(optim_cfg["betas"]),
            eps=float(optim_cfg["eps"]),
        )  # fmt: skip
        precision = str(tr["precision"])
        autocast = _autocast_factory(device, precision)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        transform = TrainTransform(
            model_cfg.image_size, model_cfg.image_mean, model_cfg.image_std, AugmentConfig(**cfg["augment"])
        )
        dataset = CMPTrainDataset(
            records, root, tokenizer, transform, pose=bool(data["pose"]), masking=MaskingConfig(**cfg["masking"]),
            seed=seed, ihnm=bool(cfg["loss"]["ihnm"]),
        )  # fmt: skip
        batch_size = int(tr["batch_size"])
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        steps_per_epoch = len(sampler) // batch_size
        if steps_per_epoch == 0:
            raise TpasInputError(
                f"{len(records)} training records give no full batch of {batch_size} per process on {world} process(es)"
            )
        epochs = int(tr["epochs"])
        total_steps = epochs * steps_per_epoch
        if tr.get("max_steps"):
            total_steps = min(total_steps, int(tr["max_steps"]))

        epoch, step, batch_in_epoch = 0, 0, 0
        best: dict[str, Any] = {}
        history: list[dict[str, Any]] = []
        if resume:
            ck = load_training_checkpoint(out_dir / LAST)
            model.load_state_dict(ck["model"], strict=True)
            optimizer.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            epoch, step, batch_in_epoch = int(ck["epoch"]), int(ck["step"]), int(ck["batch_in_epoch"])
            best, history = dict(ck.get("best") or {}), list(ck.get("history") or [])
            _set_rng_state(ck["rng"], device)
            emit({"kind": "info", "message": f"resumed from {out_dir / LAST} at epoch {epoch}, step {step}"})

        log = RunLog(out_dir, bool(cfg["output"].get("tensorboard"))) if du.is_main() else None
        emit({"kind": "start", "total_steps": total_steps, "step": step, "steps_per_epoch": steps_per_epoch,
              "epochs": epochs, "world_size": world, "device": str(device), "records": len(records)})  # fmt: skip

        def payload(ep: int, bie: int, metrics: dict[str, Any] | None) -> dict[str, Any]:
            return {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "config": model_cfg.to_dict(),
                "train_config": json.loads(json.dumps(cfg)),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"step": step, "total_steps": total_steps, "warmup_steps": int(optim_cfg["warmup_steps"])},
                "scaler": scaler.state_dict(),
                "epoch": ep,
                "step": step,
                "batch_in_epoch": bie,
                "rng": _rng_state(device),
                "best": best,
                "history": history,
                "metrics": metrics or {},
            }

        def checkpoint(ep: int, bie: int, metrics: dict[str, Any] | None = None, is_best: bool = False) -> None:
            data_ = payload(ep, bie, metrics)  # every rank joins the RNG all_gather
            if du.is_main():
                save_checkpoint(out_dir / LAST, data_)
                if is_best:
                    save_checkpoint(out_dir / BEST, data_)
            du.barrier()

        base_lr, lr_end = float(optim_cfg["lr"]), float(optim_cfg["lr_end"])
        warmup = int(optim_cfg["warmup_steps"])
        clip = optim_cfg.get("grad_clip")
        log_every = max(1, int(tr["log_every"]))
        save_every = int(tr.get("save_every_steps") or 0)
        start_time = time.time()
        start_step = step
        stopped = step >= total_steps
        loss_module.train()
        while epoch < epochs and not stopped:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)[: steps_per_epoch * batch_size]
            remaining = order[batch_in_epoch * batch_size :]
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, remaining),
                batch_size=batch_size,
                shuffle=False,
                drop_last=True,
                num_workers=int(data["num_workers"]),
                pin_memory=device.type == "cuda",
                # A private generator: creating the loader must not draw from the global RNG (bit-exact resume).
                generator=torch.Generator().manual_seed(seed),
            )
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                lr = set_lr(optimizer, base_lr, lr_factor(step, total_steps, warmup, base_lr, lr_end))
                with autocast():
                    losses = loss_module(batch)
                scaler.scale(losses["total"]).backward()
                if clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_in_epoch += 1
                values = {k: float(v.detach()) for k, v in losses.items()}
                if not all(math.isfinite(values[k]) for k in ("total", "itc", "itm", "mlm")):
                    raise FloatingPointError(f"non-finite loss at step {step}: {values}")
                elapsed = time.time() - start_time
                event = {"kind": "step", "step": step, "epoch": epoch, "lr": lr, "loss": values["total"],
                         "total_steps": total_steps, "elapsed": elapsed, "temp": float(model.temp.detach()),
                         "samples_per_s": (step - start_step) * batch_size * world / max(1e-9, elapsed)}  # fmt: skip
                if log is not None and (step % log_every == 0 or step == 1):
                    log.write({**event, **{k: v for k, v in values.items() if k != "total"}})
                emit({**event, "losses": values})
                if step >= total_steps:
                    stopped = True
                if save_every and step % save_every == 0 and not stopped and batch_in_epoch < steps_per_epoch:
                    checkpoint(epoch, batch_in_epoch)
                if stopped:
                    break
            finished_epoch = batch_in_epoch >= steps_per_epoch
            metrics = None
            is_best = False
            if (
                ev.get("enabled")
                and (finished_epoch or stopped)
                and ((epoch + 1) % max(1, int(ev["every_epochs"])) == 0 or epoch + 1 == epochs or stopped)
            ):
                if du.is_main():
                    eval_root = Path(ev.get("root") or root)
                    ann = Path(ev["annotation"])
                    ann = ann if ann.is_absolute() else eval_root / ann
                    metrics = evaluate_model(
                        model, tokenizer, ann, eval_root, device, batch_size=int(ev["batch_size"]),
                        rerank_k=int(ev.get("rerank_k") or 0), autocast=autocast, num_workers=int(data["num_workers"]),
                    )  # fmt: skip
                metrics = du.broadcast_object(metrics)  # type: ignore[assignment]
                assert metrics is not None
                key = str(ev.get("select_by", "mAP"))
                score_src = metrics.get("itm", metrics["itc"])
                if key not in score_src:
                    raise TpasInputError(f"eval.select_by {key!r} is not a metric; use one of {', '.join(score_src)}")
                score = float(score_src[key])
                is_best = not best or score > float(best["score"])
                if is_best:
                    best = {"score": score, "metric": key, "epoch": epoch, "step": step}
                record = {"kind": "eval", "epoch": epoch, "step": step, **metrics}
                history.append(record)
                if log is not None:
                    log.write(record)
                emit({**record, "metrics": metrics, "best": best})
            if finished_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            checkpoint(epoch, batch_in_epoch, metrics, is_best=is_best or (not ev.get("enabled") and finished_epoch))
        if log is not None:
            log.close()
        return TrainResult(
            output_dir=out_dir,
            last_checkpoint=out_dir / LAST if (out_dir / LAST).is_file() else None,
            best_checkpoint=out_dir / BEST if (out_dir / BEST).is_file() else None,
            epochs_done=epoch,
            steps=step,
            history=history,
            init=init_notes,
        )
    finally:
        du.cleanup()
