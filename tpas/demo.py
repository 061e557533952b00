"""`tpas demo`: the whole tpas pipeline on a synthetic mini-PAB, on a CPU, in minutes, with no downloads.

Every step is a real `tpas` command, run in order with the arguments a user would type (the demo prints them):

1. `tpas synth`          a seeded mini-PAB in the real PAB layouts (train/val/test splits, pose maps, name-masked set);
2. `tpas train cmp` x2   two tiny pose-aware CMP models from `configs/train/cmp_tiny.yaml` with different seeds, trained
                         at once in two processes, so the ensemble has two independently trained models to fuse;
3. `tpas infer cmp`      ITC + ITM-re-ranked matrices of both models on the validation split, the labelled test split
                         and the name-masked test set;
4. `tpas tune`           the fusion weights on the validation split (never on test), K-fold cross-validated;
5. `tpas ensemble`       the tuned config applied to the test split and to the name-masked set (`--set inputs.X=...`);
6. `tpas evaluate`       every model and the ensemble on the test split (`--json`), which gives the demo's table;
   `tpas compare`        the ensemble against the best single matrix, query by query (is the gain beyond noise?);
7. `tpas submit`, `tpas validate`   the leaderboard file of the name-masked set;
8. `tpas report`         the HTML page of every model's top-5 per test query.

The name-masked set has no labels a user could score against (as in the challenge), so the scores come from the
labelled test split, whose images are the same; the masked set's matrices go to the leaderboard file.

`run_demo` plans and orders the steps and reads their outputs; it runs each one through a `run_command` callback that
the CLI provides (it prints the command and invokes the Typer app), so this module itself never prints. Re-running is
safe: the mini-PAB and the trained checkpoints are reused when the arguments that made them are unchanged (recorded in
`runs/demo/state.json`), everything else is recomputed and replaced atomically by the commands themselves.
`postprocess` is a reusable library shortcut for evaluate + submit + validate of any pair of matrices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .data.pab import load_ground_truth, read_gallery_ids, read_query_index
from .errors import TpasInputError, TpasRunError
from .scoring import Evaluation, evaluate
from .sims import SimsMatrix, atomic_write
from .submit import ValidationReport, validate_answer, write_ranking_file

METRICS = ("R@1", "R@5", "R@10", "mAP")
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------ post-processing
@dataclass
class PostprocessResult:
    """What `postprocess` produced: the evaluation, the files written and the validator's report."""

    evaluation: Evaluation
    written: list[Path]
    validation: ValidationReport


def postprocess(
    eval_sims: SimsMatrix | str | Path,
    gt: str | Path,
    submit_sims: SimsMatrix | str | Path,
    query_index: str | Path,
    answer: str | Path,
    *,
    gallery: str | Path | None = None,
    by: Sequence[str] = ("behaviour", "scene"),
    make_zip: bool = True,
    ties: str = "stable",
) -> PostprocessResult:
    """Evaluate `eval_sims` against `gt`, write the ranking file of `submit_sims` and validate it.

    Args:
        eval_sims: matrix whose rows are the annotation's query ids (`"{image_id}:{k}"`), or its file.
        gt: the test annotation (attr.json).
        submit_sims: matrix whose rows are the name-masked query ids, or its file.
        query_index: `query_index.txt` (line order of the answer).
        answer: ranking file to write (a zip holding `answer.txt` is written beside it when `make_zip`).
        gallery: gallery folder or ids file the submission's columns must match.
    """
    ev_m = eval_sims if isinstance(eval_sims, SimsMatrix) else SimsMatrix.load(eval_sims)
    sub_m = submit_sims if isinstance(submit_sims, SimsMatrix) else SimsMatrix.load(submit_sims)
    evaluation = evaluate(ev_m, load_ground_truth(gt), ties=ties, by=by)
    qids = read_query_index(query_index)
    gallery_ids = read_gallery_ids(gallery) if gallery is not None else None
    written = write_ranking_file(sub_m, qids, answer, gallery_ids=gallery_ids, make_zip=make_zip,
                                 query_source=query_index, gallery_source=gallery)  # fmt: skip
    report = validate_answer(written[0], qids, gallery_ids)
    return PostprocessResult(evaluation, written, report)


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class DemoModel:
    """One model the demo trains: a name and its `--set` overrides of `configs/train/cmp_tiny.yaml`."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class DemoSize:
    """How big the demo's data, models and searches are."""

    identities: int  # training identities (2 images each)
    val_identities: int
    test_identities: int
    distractors: int  # extra images in the name-masked gallery
    train_steps: int  # optimizer steps per model
    batch_size: int
    rerank_k: int  # ITM re-rank depth of `tpas infer cmp`
    folds: int
    report_queries: int | None  # queries shown in the HTML report (None: all)
    # Two independently trained pose-aware CMPs (different seeds: initialisation, batches, augmentation): models of
    # equal strength whose errors differ, the situation in which fusing helps. (A model without pose was tried: at
    # this scale it trails the pose-aware one so far that fusing it only adds noise.)
    models: tuple[DemoModel, ...] = (
        DemoModel("cmp_a", ("data.pose=true", "model.pose=true", "train.seed=0")),
        DemoModel("cmp_b", ("data.pose=true", "model.pose=true", "train.seed=1")),
    )


SIZES: dict[str, DemoSize] = {
    # `make demo`: a few minutes of training per model on a 2-core CPU.
    "default": DemoSize(
        identities=200,
        val_identities=60,
        test_identities=50,
        distractors=100,
        train_steps=200,
        batch_size=24,
        rerank_k=16,
        folds=3,
        report_queries=None,
    ),
    # `tpas demo --quick` (tests/test_demo.py): the same pipeline, small enough for a test.
    "quick": DemoSize(
        identities=40,
        val_identities=10,
        test_identities=10,
        distractors=10,
        train_steps=6,
        batch_size=8,
        rerank_k=4,
        folds=2,
        report_queries=10,
    ),
}


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Step:
    """One `tpas` command of the demo: what it does, its arguments, and the files it must leave."""

    title: str
    argv: tuple[str, ...]
    outputs: tuple[Path, ...] = ()
    reuse_key: str | None = None  # steps whose outputs are reused when the same argv made them before
    parallel: str | None = None  # consecutive steps of one group run at once, each in its own `tpas` process
    log: Path | None = None  # JSON-lines log whose last record's "step" tells a parallel step's progress
    total: int | None = None  # steps the log counts up to


@dataclass
class DemoResult:
    """What the demo measured and where it left its files."""

    root: Path
    table: pd.DataFrame  # test-split metrics (%), one row per model matrix and the ensemble
    ensemble: str  # row name of the ensemble in `table`
    best_single: str  # row name of the best single-model matrix by R@1 (then mAP)
    answer: Path
    report: Path
    tuned_config: Path
    sims: list[Path]
    steps: list[tuple[str, float, bool]] = field(default_factory=list)  # (title, seconds, reused)
    p_values: dict[str, float] = field(default_factory=dict)  # ensemble vs best single, paired randomization test

    @property
    def ensemble_gain(self) -> dict[str, float]:
        """Ensemble minus best single model, per metric (percentage points)."""
        return {m: float(self.table.loc[self.ensemble, m] - self.table.loc[self.best_single, m]) for m in METRICS}


def _find_train_config() -> Path:
    """`configs/train/cmp_tiny.yaml` of this checkout (the demo trains from the repository's own config)."""
    path = Path(__file__).resolve().parent.parent / "configs" / "train" / "cmp_tiny.yaml"
    if not path.is_file():
        raise TpasInputError("the demo trains from configs/train/cmp_tiny.yaml of a tpas checkout; not found", path)
    return path


class _Layout:
    """Every path the demo reads or writes, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data" / "demo" / "mini-pab"
        self.ckpt = root / "checkpoints" / "demo"
        self.sims = root / "sims_score" / "demo"
        self.predictions = root / "predictions" / "demo"
        self.report = root / "reports" / "demo" / "index.html"
        self.runs = root / "runs" / "demo"
        self.state = self.runs / "state.json"
        self.ensemble_config = self.runs / "ensemble.yaml"
        self.tuned = self.runs / "ensemble_tuned.yaml"
        self.trials = self.runs / "ensemble_tuned.trials.csv"
        self.metrics = self.runs / "metrics"
        self.cache = self.runs / "feature-cache"
        masked = self.data / "name-masked_test-set"
        # split -> (gallery folder, queries, pose folder)
        self.splits = {
            "val": (self.data / "val", self.data / "annotation" / "val" / "attr.json", self.data / "pose" / "val"),
            "test": (self.data / "test", self.data / "annotation" / "test" / "attr.json", self.data / "pose" / "test"),
            "masked": (masked / "gallery", masked / "query.json", self.data / "pose" / masked.name / "gallery"),
        }  # fmt: skip
        self.query_index = masked / "query_index.txt"
        self.answer = self.predictions / "answer.txt"

    def matrix(self, split: str, name: str, itc: bool = False) -> Path:
        return self.sims / f"{split}_{name}{'.itc' if itc else ''}.pt"


def _matrices(lay: _Layout, size: DemoSize, split: str) -> dict[str, Path]:
    """Every model matrix of a split by name: each model's ITM-re-ranked and ITC matrices."""
    out: dict[str, Path] = {}
    for m in size.models:
        out[f"{m.name}_itm"] = lay.matrix(split, m.name)
        out[f"{m.name}_itc"] = lay.matrix(split, m.name, itc=True)
    return out


def _fused(lay: _Layout, size: DemoSize, split: str) -> dict[str, Path]:
    """The ensemble's inputs: each model's ITC matrix.

    The ITM-re-ranked matrices are computed, scored and shown, but not fused: within the demo's training budget the
    tiny ITM head does not learn to say "match" (the training log's `itm_acc_pos` stays at 0), so the order it gives
    each query's top-k is noise, and fusing it only dilutes the two models' ITC rankings.
    """
    return {f"{m.name}_itc": lay.matrix(split, m.name, itc=True) for m in size.models}


def _ensemble_config(lay: _Layout, size: DemoSize) -> dict[str, Any]:
    """The demo's fusion: a weighted sum of the models' ITC matrices normalised per query; `tpas tune` picks the
    normalisation and the weights on the validation split.

    The weights range over [0.5, 1]: the models are trained the same way, so neither should be dropped, and on a
    validation split this small a wider range fits its noise rather than the models (an unrestricted search was
    tried and picked weights that did not carry over).
    """
    inputs = _fused(lay, size, "val")
    return {
        "inputs": {n: str(p.resolve()) for n, p in inputs.items()},
        "normalize": {"method": "zmuv", "scope": "query"},
        "fuse": {"method": "wsum", "weights": dict.fromkeys(inputs, 1.0)},
        "post": [],
        "tune": {
            "metric": "mAP",
            "space": {
                "normalize.method": ["min-max", "zmuv"],
                **{f"fuse.weights.{n}": {"low": 0.5, "high": 1.0, "step": 0.25} for n in inputs},
            },
        },
    }


def plan(root: str | Path = ".", *, size: str = "default", seed: int = 0) -> list[Step]:
    """The demo's commands, in order, for `size` ("default" or "quick") under `root`."""
    if size not in SIZES:
        raise TpasInputError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    sz = SIZES[size]
    lay = _Layout(Path(root))
    d = lay.data
    steps = [
        Step(
            "generate the synthetic mini-PAB",
            (
                "synth",
                "--out",
                str(d),
                "--seed",
                str(seed),
                "--identities",
                str(sz.identities),
                "--val-identities",
                str(sz.val_identities),
                "--test-identities",
                str(sz.test_identities),
                "--distractors",
                str(sz.distractors),
                "--overwrite",
            ),
            (d / "vocab.txt", lay.query_index),
            reuse_key="synth",
        )
    ]
    train_cfg = _find_train_config()
    for m in sz.models:
        out = lay.ckpt / m.name
        steps.append(
            Step(
                f"train {m.name} (tiny CMP, {sz.train_steps} steps)",
                (
                    "train",
                    "cmp",
                    "--config",
                    str(train_cfg),
                    "--set",
                    f"data.root={d}",
                    "--set",
                    f"data.vocab={d / 'vocab.txt'}",
                    "--set",
                    f"output.dir={out}",
                    "--set",
                    f"train.max_steps={sz.train_steps}",
                    "--set",
                    f"train.batch_size={sz.batch_size}",
                    "--set",
                    "train.epochs=1000",
                    "--set",
                    "eval.enabled=false",
                    "--set",
                    "data.num_workers=0",
                    "--set",
                    "train.log_every=5",
                    *(a for o in m.overrides for a in ("--set", o)),
                ),
                (out / "checkpoint_last.pth",),
                reuse_key=f"train/{m.name}",
                parallel="train",
                log=out / "train_log.jsonl",
                total=sz.train_steps,
            )
        )
    for split in ("val", "test", "masked"):
        images, queries, pose = lay.splits[split]
        for m in sz.models:
            pose_args = ("--pose", str(pose)) if "model.pose=true" in m.overrides else ()
            steps.append(
                Step(
                    f"infer {m.name} on the {split} split (ITC + ITM re-rank of the top {sz.rerank_k})",
                    (
                        "infer",
                        "cmp",
                        "--checkpoint",
                        str(lay.ckpt / m.name / "checkpoint_last.pth"),
                        "--images",
                        str(images),
                        "--queries",
                        str(queries),
                        *pose_args,
                        "--rerank-k",
                        str(sz.rerank_k),
                        "--device",
                        "cpu",
                        "--workers",
                        "0",
                        "--cache-dir",
                        str(lay.cache),
                        "--out",
                        str(lay.matrix(split, m.name)),
                    ),
                    (lay.matrix(split, m.name), lay.matrix(split, m.name, itc=True)),
                )
            )
    val_gt = lay.splits["val"][1]
    test_gt = lay.splits["test"][1]
    steps.append(
        Step(
            "tune the fusion weights on the validation split",
            (
                "tune",
                "--config",
                str(lay.ensemble_config),
                "--gt",
                str(val_gt),
                "--out",
                str(lay.tuned),
                "--search",
                "grid",
                "--folds",
                str(sz.folds),
                "--seed",
                str(seed),
            ),
            (lay.tuned, lay.trials),
        )
    )
    for split in ("test", "masked"):
        sets = [a for n, p in _fused(lay, sz, split).items() for a in ("--set", f"inputs.{n}={p.resolve()}")]
        steps.append(
            Step(
                f"apply the tuned ensemble to the {split} split",
                ("ensemble", "--config", str(lay.tuned), *sets, "--out", str(lay.matrix(split, "ensemble"))),
                (lay.matrix(split, "ensemble"),),
            )
        )
    names = [*_matrices(lay, sz, "test"), "ensemble"]
    files = [*_matrices(lay, sz, "test").values(), lay.matrix("test", "ensemble")]
    for name, f in zip(names, files, strict=True):
        by = ("--by", "normal/anomaly,scene") if name == "ensemble" else ()
        steps.append(
            Step(
                f"evaluate {name} on the test split",
                ("evaluate", str(f), "--gt", str(test_gt), *by, "--json", str(lay.metrics / f"{name}.json")),
                (lay.metrics / f"{name}.json",),
            )
        )
    masked_gallery = lay.splits["masked"][0]
    steps += [
        Step(
            "write the leaderboard file of the name-masked set",
            (
                "submit",
                str(lay.matrix("masked", "ensemble")),
                "--query-index",
                str(lay.query_index),
                "--gallery",
                str(masked_gallery),
                "--out",
                str(lay.answer),
                "--zip",
            ),
            (lay.answer,),
        ),
        Step(
            "validate it",
            ("validate", str(lay.answer), "--query-index", str(lay.query_index), "--gallery", str(masked_gallery)),
        ),
        Step(
            "write the HTML report of the test split",
            (
                "report",
                *map(str, files),
                "--names",
                ",".join(names),
                "--gt",
                str(test_gt),
                "--images",
                str(lay.splits["test"][0]),
                "--tuning-trials",
                str(lay.trials),
                "--out",
                str(lay.report),
                *(("--max-queries", str(sz.report_queries)) if sz.report_queries else ()),
            ),
            (lay.report,),
        ),
    ]
    return steps


# ------------------------------------------------------------------------------------------------ running it
def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("version") == STATE_VERSION else {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    state["version"] = STATE_VERSION
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(state, indent=1), encoding="utf-8"))


def run_parallel(
    steps: Sequence[Step], log_dir: Path, *, progress: Callable[[Step, int], None] | None = None, poll: float = 1.0
) -> None:
    """Run `steps` at once, each as its own `python -m tpas ...` process with one compute thread.

    Each process's console output goes to `log_dir/<n>.log`; progress is the "step" of the last record of each
    step's JSON-lines `log`. A failed process stops the others and raises TpasRunError quoting its last lines.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs: list[tuple[Step, subprocess.Popen, Path]] = []
    try:
        for n, step in enumerate(steps):
            console_log = log_dir / f"{n}-{step.argv[0]}.log"
            with console_log.open("w", encoding="utf-8") as f:
                proc = subprocess.Popen([sys.executable, "-m", "tpas", *step.argv], stdout=f, stderr=subprocess.STDOUT,
                                        env=env)  # fmt: skip
            procs.append((step, proc, console_log))
        while True:
            if progress is not None:
                for step, _, _ in procs:
                    progress(step, _last_step(step.log))
            failed = next(((s, p, c) for s, p, c in procs if p.poll() not in (None, 0)), None)
            if failed is not None:
                step, proc, console_log = failed
                tail = " | ".join(console_log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:])
                raise TpasRunError(f"`tpas {' '.join(step.argv[:2])}` failed (exit {proc.returncode}): {tail}",
                                   console_log)  # fmt: skip
            if all(p.poll() == 0 for _, p, _ in procs):
                return
            time.sleep(poll)
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def _last_step(log: Path | None) -> int:
    """The "step" of the last complete record of a JSON-lines log (0 when there is none yet)."""
    if log is None or not log.is_file():
        return 0
    for line in reversed(log.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            continue
    return 0


def run_demo(
    root: str | Path = ".",
    *,
    size: str = "default",
    seed: int = 0,
    fresh: bool = False,
    run_command: Callable[[Sequence[str]], None],
    progress: Callable[[int, int, Step, bool], None] | None = None,
    step_progress: Callable[[Step, int], None] | None = None,
) -> DemoResult:
    """Run the demo's commands (`plan`) under `root` and collect the test-split table.

    Args:
        root: folder under which data/, checkpoints/, sims_score/, predictions/, reports/ and runs/ `demo` go.
        size: "default" (`make demo`) or "quick" (tests).
        seed: seed of the mini-PAB, the training runs' base and the tuning search.
        fresh: regenerate the data and retrain even when reusable outputs exist.
        run_command: runs one `tpas` command line (the CLI invokes its own Typer app).
        progress: called before each step as progress(index, total, step, reused).
        step_progress: called about once a second while steps run in parallel, as step_progress(step, done).

    The two training runs go to two `tpas train cmp` processes at once, each with one thread: on a small CPU that
    trains both in about the time of one, and a single-threaded tiny model does not suffer when other jobs share the
    cores (two threads fighting over busy cores slow tiny kernels down many times).
    """
    steps = plan(root, size=size, seed=seed)  # rejects an unknown size
    lay, sz = _Layout(Path(root)), SIZES[size]
    state = {} if fresh else _load_state(lay.state)
    lay.runs.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float, bool]] = []
    i = 0
    while i < len(steps):
        group = [steps[i]]
        while steps[i].parallel and i + len(group) < len(steps) and steps[i + len(group)].parallel == steps[i].parallel:
            group.append(steps[i + len(group)])
        todo = []
        for j, step in enumerate(group):
            key = step.reuse_key
            reused = key is not None and state.get(key) == list(step.argv) and all(p.is_file() for p in step.outputs)
            if progress is not None:
                progress(i + j, len(steps) + 1, step, reused)
            if reused:
                timings.append((step.title, 0.0, True))
                continue
            todo.append(step)
            if key is not None:
                # Whatever an earlier, different run left is stale: forget it before making it anew.
                state.pop(key, None)
                if key.startswith("train/"):
                    shutil.rmtree(lay.ckpt / key.split("/", 1)[1], ignore_errors=True)
                if key == "synth":  # new data invalidates every trained model
                    for k in [k for k in state if k.startswith("train/")]:
                        state.pop(k)
                _save_state(lay.state, state)
            if step.argv[0] == "tune":
                cfg = _ensemble_config(lay, sz)
                atomic_write(lay.ensemble_config, lambda tmp, c=cfg: tmp.write_text(yaml.safe_dump(c, sort_keys=False)))
        t0 = time.perf_counter()
        if len(todo) > 1:
            run_parallel(todo, lay.runs / "logs", progress=step_progress)
        else:
            for step in todo:
                run_command(list(step.argv))
        for step in todo:
            timings.append((step.title, time.perf_counter() - t0, False))
            missing = next((p for p in step.outputs if not p.is_file()), None)
            if missing is not None:
                raise TpasInputError(f"demo step '{step.title}' finished without writing its output", missing)
            if step.reuse_key is not None:
                state[step.reuse_key] = list(step.argv)
                _save_state(lay.state, state)
        i += len(group)

    rows = {}
    for name in [*_matrices(lay, sz, "test"), "ensemble"]:
        metrics = json.loads((lay.metrics / f"{name}.json").read_text(encoding="utf-8"))
        rows[name] = {m: float(metrics[m]) for m in METRICS}
    table = pd.DataFrame.from_dict(rows, orient="index")[list(METRICS)]
    singles = table.drop(index="ensemble")
    best = str(singles.sort_values(["R@1", "mAP"], ascending=False).index[0])
    # Only now is the best single matrix known: test the ensemble against it, query by query.
    files = {**_matrices(lay, sz, "test"), "ensemble": lay.matrix("test", "ensemble")}
    compare_json = lay.metrics / "compare.json"
    step = Step(
        f"is the ensemble better than {best} beyond noise? (paired randomization test)",
        ("compare", str(files[best]), str(files["ensemble"]), "--gt", str(lay.splits["test"][1]),
         "--metrics", ",".join(METRICS), "--seed", str(seed), "--json", str(compare_json)),
        (compare_json,),
    )  # fmt: skip
    if progress is not None:
        progress(len(steps), len(steps) + 1, step, False)
    t0 = time.perf_counter()
    run_command(list(step.argv))
    timings.append((step.title, time.perf_counter() - t0, False))
    (result,) = json.loads(compare_json.read_text(encoding="utf-8")).values()
    p_values = {m: float(v["p_value"]) for m, v in result["metrics"].items()}
    return DemoResult(
        root=lay.root,
        table=table,
        ensemble="ensemble",
        best_single=best,
        p_values=p_values,
        answer=lay.answer,
        report=lay.report,
        tuned_config=lay.tuned,
        sims=sorted(lay.sims.glob("*.pt")),
        steps=timings,
    )
