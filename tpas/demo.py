"""`tpas demo`: the whole tpas pipeline on a synthetic mini-PAB, on a CPU, in minutes, with no downloads.

Every step is a real `tpas` command, run in order with the arguments a user would type (the demo prints them):

1. `tpas synth`          a seeded mini-PAB in the real PAB layouts (train/val/test splits, pose maps, name-masked set),
                         person-framed (the figure fills the frame, as PAB's detector crops do);
2. `tpas train cmp` x2   two tiny CMP dual encoders (packaged preset `cmp_demo`, contrastive loss only) with different
                         seeds, trained at once in two processes, so the ensemble has two independently trained
                         models to fuse;
3. `tpas infer cmp`      the ITC matrix of both models on the validation split, the labelled test split and the
                         name-masked test set;
4. `tpas tune`           the fusion weights on the validation split (never on test), K-fold cross-validated;
5. `tpas ensemble`       the tuned config applied to the test split and to the name-masked set (`--set inputs.X=...`),
                         there also with SCA and with one-to-one assignment as post-processing (`--set post=...`);
6. `tpas evaluate`       every model and the ensemble on the test split (`--json`), which gives the demo's table, and
                         the masked set's three matrices (its ground truth is written by `tpas synth`);
   `tpas compare`        the ensemble against the best single matrix, query by query (is the gain beyond noise?);
7. `tpas submit`, `tpas validate`   the leaderboard file of the name-masked set (the ensemble + assignment);
8. `tpas report`         the HTML page of every model's top-5 per test query.

The test split has two captions per image, so two queries rightly share a top-1 there and collision-resolving post
steps (SCA, assignment: one query per image) do not apply. The name-masked set has one caption per image, as the
challenge: that is where the demo shows what they change (collisions and metrics before/after).

`run_demo` plans and orders the steps and reads their outputs; it runs each one through a `run_command` callback that
the CLI provides (it prints the command and invokes the Typer app), so this module itself never prints. Re-running is
safe: the mini-PAB and the trained checkpoints are reused when the arguments that made them are unchanged (recorded in
`runs/demo/state.json`), everything else is recomputed and replaced atomically by the commands themselves.
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

from .data.pab import GroundTruth, load_ground_truth
from .errors import TpasInputError, TpasRunError
from .io import atomic_write
from .sims import SimsMatrix

METRICS = ("R@1", "R@5", "R@10", "mAP")
BASELINE = "scene only (baseline)"  # the table's row of `scene_baseline`
TRAIN_PRESET = "cmp_demo"  # the packaged configs/train/cmp_demo.yaml (`tpas train cmp --config cmp_demo`)
STATE_VERSION = 1
# The collision-resolving post steps the demo runs on the name-masked set (`tpas ensemble --set post=...`), by name.
MASKED_POSTS = {"SCA": "[{sca: {}}]", "assignment": "[{assignment: {}}]"}


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class DemoModel:
    """One model the demo trains: a name and its `--set` overrides of the `cmp_demo` preset."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class DemoSize:
    """How big the demo's data, models and searches are."""

    identities: int  # training identities (2 images each)
    val_identities: int
    test_identities: int
    distractors: int  # extra images in the name-masked gallery
    width: int  # image size of the mini-PAB (the tiny model resizes to 64 x 64)
    height: int
    train_steps: int  # optimizer steps per model
    batch_size: int
    folds: int
    report_queries: int | None  # queries shown in the HTML report (None: all)
    framing: str = "person"  # `tpas synth --framing`: the figure fills the frame
    # Two CMPs of the `cmp_demo` recipe with different seeds (initialisation and batch order). Stopped early in the
    # phase where a tiny dual encoder is still discovering which words go with which pixels, they have learned
    # different things, so their errors differ: on the validation split fusing two such models gained ~+10 mAP
    # (p < 0.001). A pose-aware model would add a different input, but at this budget it learns far more slowly
    # (R@1 10-15 against 28-41) and would only add noise.
    models: tuple[DemoModel, ...] = (
        DemoModel("cmp_a", ("train.seed=0",)),
        DemoModel("cmp_b", ("train.seed=1",)),
    )


SIZES: dict[str, DemoSize] = {
    # `make demo`: a few minutes of training per model on a 2-core CPU.
    "default": DemoSize(
        identities=4000,
        val_identities=60,
        test_identities=100,
        distractors=100,
        width=64,
        height=64,
        train_steps=900,
        batch_size=24,
        folds=3,
        report_queries=None,
    ),
    # `tpas demo --quick` (tests/test_demo.py): the same pipeline, small enough for a test.
    "quick": DemoSize(
        identities=40,
        val_identities=10,
        test_identities=10,
        distractors=10,
        width=32,
        height=32,
        train_steps=6,
        batch_size=8,
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
    table: pd.DataFrame  # test split (%): METRICS, trap, behaviour (`_results`) of each matrix and the baseline
    ensemble: str  # row name of the ensemble in `table`
    best_single: str  # row name of the best single-model matrix by R@1 (then mAP)
    answer: Path
    report: Path
    tuned_config: Path
    sims: list[Path]
    steps: list[tuple[str, float, bool]] = field(default_factory=list)  # (title, seconds, reused)
    p_values: dict[str, float] = field(default_factory=dict)  # ensemble vs best single, paired randomization test
    masked: pd.DataFrame | None = None  # name-masked set: the ensemble without / with SCA / with assignment

    @property
    def ensemble_gain(self) -> dict[str, float]:
        """Ensemble minus best single model, per metric (percentage points)."""
        return {m: float(self.table.loc[self.ensemble, m] - self.table.loc[self.best_single, m]) for m in METRICS}


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
        self.masked_gt = masked / "ground_truth.json"
        self.answer = self.predictions / "answer.txt"

    def matrix(self, split: str, name: str) -> Path:
        return self.sims / f"{split}_{name}.pt"


def _matrices(lay: _Layout, size: DemoSize, split: str) -> dict[str, Path]:
    """Every model matrix of a split by model name: the ensemble's inputs.

    Only ITC matrices: `cmp_demo` trains the contrastive loss alone (no ITM head to re-rank with; see the preset).
    """
    return {m.name: lay.matrix(split, m.name) for m in size.models}


def _ensemble_config(lay: _Layout, size: DemoSize) -> dict[str, Any]:
    """The demo's fusion: a weighted sum of the models' ITC matrices normalised per query; `tpas tune` picks the
    normalisation and the weights on the validation split.

    The weights range over [0.5, 1]: the models are trained the same way, so neither should be dropped, and on a
    validation split this small a wider range fits its noise rather than the models (an unrestricted search was
    tried and picked weights that did not carry over).
    """
    inputs = _matrices(lay, size, "val")
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


def command(*words: str | Path, **options: Any) -> tuple[str, ...]:
    """One `tpas` argv: `command("infer", "cmp", rerank_k=4, set=["a=1"])` -> ("infer", "cmp", "--rerank-k", "4",
    "--set", "a=1"). A True option is a bare flag; None and False are left out; a list repeats its option."""
    argv = [str(w) for w in words]
    for name, value in options.items():
        flag = "--" + name.rstrip("_").replace("_", "-")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is True:
                argv.append(flag)
            elif v is not None and v is not False:
                argv += [flag, str(v)]
    return tuple(argv)


def _synth_step(lay: _Layout, sz: DemoSize, seed: int) -> Step:
    argv = command("synth", out=lay.data, seed=seed, identities=sz.identities, val_identities=sz.val_identities,
                   test_identities=sz.test_identities, distractors=sz.distractors, width=sz.width, height=sz.height,
                   framing=sz.framing, overwrite=True)  # fmt: skip
    return Step("generate the synthetic mini-PAB", argv, (lay.data / "vocab.txt", lay.query_index), reuse_key="synth")


def _train_steps(lay: _Layout, sz: DemoSize) -> list[Step]:
    steps = []
    for m in sz.models:
        out = lay.ckpt / m.name
        sets = [f"data.root={lay.data}", f"data.vocab={lay.data / 'vocab.txt'}", f"output.dir={out}",
                f"train.max_steps={sz.train_steps}", f"train.batch_size={sz.batch_size}", "train.epochs=1000",
                "eval.enabled=false", "data.num_workers=0", "train.log_every=5", *m.overrides]  # fmt: skip
        steps.append(
            Step(
                f"train {m.name} (tiny CMP, {sz.train_steps} steps)",
                command("train", "cmp", config=TRAIN_PRESET, set_=sets),
                (out / "checkpoint_last.pth",),
                reuse_key=f"train/{m.name}",
                parallel="train",
                log=out / "train_log.jsonl",
                total=sz.train_steps,
            )
        )
    return steps


def _infer_steps(lay: _Layout, sz: DemoSize) -> list[Step]:
    steps = []
    for split in ("val", "test", "masked"):
        images, queries, pose = lay.splits[split]
        for m in sz.models:
            out = lay.matrix(split, m.name)
            argv = command("infer", "cmp", checkpoint=lay.ckpt / m.name / "checkpoint_last.pth", images=images,
                           queries=queries, pose=pose if "model.pose=true" in m.overrides else None,
                           device="cpu", workers=0, cache_dir=lay.cache, out=out)  # fmt: skip
            steps.append(Step(f"infer {m.name} on the {split} split (ITC similarities)", argv, (out,)))
    return steps


def _fusion_steps(lay: _Layout, sz: DemoSize, seed: int) -> list[Step]:
    """Tune on val, then apply the tuned config to the test split and the name-masked set."""
    tune = command("tune", config=lay.ensemble_config, gt=lay.splits["val"][1], out=lay.tuned, search="grid",
                   folds=sz.folds, seed=seed)  # fmt: skip
    steps = [Step("tune the fusion weights on the validation split", tune, (lay.tuned, lay.trials))]
    for split in ("test", "masked"):
        sets = [f"inputs.{n}={p.resolve()}" for n, p in _matrices(lay, sz, split).items()]
        out = lay.matrix(split, "ensemble")
        argv = command("ensemble", config=lay.tuned, set_=sets, out=out)
        steps.append(Step(f"apply the tuned ensemble to the {split} split", argv, (out,)))
    for name, post in MASKED_POSTS.items():
        out = lay.matrix("masked", f"ensemble_{name}")
        argv = command("ensemble", config=lay.tuned, set_=[*sets, f"post={post}"], out=out)
        steps.append(Step(f"the same on the masked set, then {name} (one query per image)", argv, (out,)))
    return steps


def _masked_matrices(lay: _Layout) -> dict[str, Path]:
    """The name-masked set's ensemble matrices by row name: without and with each post step."""
    return {"ensemble": lay.matrix("masked", "ensemble"),
            **{f"ensemble + {n}": lay.matrix("masked", f"ensemble_{n}") for n in MASKED_POSTS}}  # fmt: skip


def _test_matrices(lay: _Layout, sz: DemoSize) -> dict[str, Path]:
    """Every matrix the demo scores on the test split, by row name: the models' and the ensemble."""
    return {**_matrices(lay, sz, "test"), "ensemble": lay.matrix("test", "ensemble")}


def _scoring_steps(lay: _Layout, sz: DemoSize) -> list[Step]:
    """Evaluate every test matrix, write and validate the leaderboard file, write the HTML report."""
    test_gt, masked_gallery = lay.splits["test"][1], lay.splits["masked"][0]
    files = _test_matrices(lay, sz)
    steps = []
    for name, f in files.items():
        out = lay.metrics / f"{name}.json"
        by = "normal/anomaly,scene" if name == "ensemble" else None
        steps.append(Step(f"evaluate {name} on the test split", command("evaluate", f, gt=test_gt, by=by, json=out),
                          (out,)))  # fmt: skip
    for name, f in _masked_matrices(lay).items():
        out = _masked_metrics(lay, name)
        steps.append(Step(f"evaluate {name} on the name-masked set", command("evaluate", f, gt=lay.masked_gt, json=out),
                          (out,)))  # fmt: skip
    submit = command("submit", lay.matrix("masked", "ensemble_assignment"), query_index=lay.query_index,
                     gallery=masked_gallery, out=lay.answer, zip=True)  # fmt: skip
    validate = command("validate", lay.answer, query_index=lay.query_index, gallery=masked_gallery)
    report = command("report", *files.values(), names=",".join(files), gt=test_gt, images=lay.splits["test"][0],
                     tuning_trials=lay.trials, out=lay.report, max_queries=sz.report_queries)  # fmt: skip
    return [
        *steps,
        Step("write the leaderboard file of the name-masked set", submit, (lay.answer,)),
        Step("validate it", validate),
        Step("write the HTML report of the test split", report, (lay.report,)),
    ]


def _masked_metrics(lay: _Layout, name: str) -> Path:
    return lay.metrics / f"masked_{name.replace(' + ', '_')}.json"


def plan(root: str | Path = ".", *, size: str = "default", seed: int = 0) -> list[Step]:
    """The demo's commands, in order, for `size` ("default" or "quick") under `root`."""
    if size not in SIZES:
        raise TpasInputError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    sz, lay = SIZES[size], _Layout(Path(root))
    return [
        _synth_step(lay, sz, seed),
        *_train_steps(lay, sz),
        *_infer_steps(lay, sz),
        *_fusion_steps(lay, sz, seed),
        *_scoring_steps(lay, sz),
    ]


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


def _groups(steps: Sequence[Step]) -> list[list[Step]]:
    """Consecutive steps of one `parallel` group together; every other step alone."""
    groups: list[list[Step]] = []
    for step in steps:
        if groups and step.parallel and groups[-1][-1].parallel == step.parallel:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def _forget(step: Step, lay: _Layout, state: dict[str, Any]) -> None:
    """A reusable step about to run anew: whatever an earlier, different run left is stale."""
    key = step.reuse_key
    if key is None:
        return
    state.pop(key, None)
    if key.startswith("train/"):
        shutil.rmtree(lay.ckpt / key.split("/", 1)[1], ignore_errors=True)
    if key == "synth":  # new data invalidates every trained model
        for k in [k for k in state if k.startswith("train/")]:
            state.pop(k)
    _save_state(lay.state, state)


def trap_share(sims: SimsMatrix, gt: GroundTruth) -> float:
    """Share (%) of queries whose top-1 is the same person in the other behaviour: PAB's identity trap.

    A model that knows the person but not what they do falls into it about as often as it is right; one that knows
    only the scene falls into it about as rarely as it is right.
    """
    from .ranking import topk_stable
    from .scoring.report import identity_map

    ident, _ = identity_map(gt)
    rows = [sims.query_ids.index(q) for q in gt.query_ids]
    first = topk_stable(sims.scores, 1) if sims.is_dense else sims.top_k(1).indices
    top = first[rows, 0].tolist()
    trapped = 0
    for q, col in zip(gt.query_ids, top, strict=True):
        got, want = sims.gallery_ids[col], gt.relevant[q]
        trapped += got != want and ident.get(got) is not None and ident.get(got) == ident.get(want)
    return 100.0 * trapped / max(1, len(gt.query_ids))


def scene_baseline(gt: GroundTruth, gallery_ids: Sequence[str], seed: int) -> SimsMatrix:
    """A scene-only model: 1 for every gallery image of the query's scene, 0 otherwise, ties in a seeded random order
    (what a model that learned the scene and nothing else ranks like)."""
    import torch

    scene_of = dict(zip(gt.frame["gallery_id"], gt.frame["scene"], strict=True))
    g_scene = [scene_of.get(g) for g in gallery_ids]
    q_scene = list(gt.frame.loc[gt.query_ids, "scene"])
    scores = torch.tensor([[float(qs == gs) for gs in g_scene] for qs in q_scene])
    noise = torch.rand(scores.shape, generator=torch.Generator().manual_seed(seed)) * 1e-3
    return SimsMatrix(list(gt.query_ids), list(gallery_ids), scores=scores + noise, source="scene-baseline")


def _results(lay: _Layout, sz: DemoSize, seed: int) -> tuple[pd.DataFrame, str]:
    """The test-split table (one row per matrix, then the scene-only baseline) and the best single matrix by R@1,
    then mAP. Columns: METRICS, `trap` (the share of queries whose top-1 is the same person's other image) and
    `behaviour` (of the queries whose top-1 is the right person, the share where it is also the right behaviour:
    R@1 / (R@1 + trap); chance 50 %, as each person has one image per behaviour)."""
    from .scoring import evaluate

    gt = load_ground_truth(lay.splits["test"][1])
    rows = {}
    gallery: list[str] = []
    for name, path in _test_matrices(lay, sz).items():
        metrics = json.loads((lay.metrics / f"{name}.json").read_text(encoding="utf-8"))
        sims = SimsMatrix.load(path)
        gallery = sims.gallery_ids
        rows[name] = {**{m: float(metrics[m]) for m in METRICS}, "trap": trap_share(sims, gt)}
    table = pd.DataFrame.from_dict(rows, orient="index")[[*METRICS, "trap"]]
    singles = table.drop(index="ensemble")
    best = str(singles.sort_values(["R@1", "mAP"], ascending=False).index[0])
    baseline = scene_baseline(gt, gallery, seed)
    table.loc[BASELINE] = {**evaluate(baseline, gt).metrics(), "trap": trap_share(baseline, gt)}
    person = table["R@1"] + table["trap"]
    table["behaviour"] = (100.0 * table["R@1"] / person.where(person > 0)).fillna(0.0)
    return table, best


def _masked_results(lay: _Layout) -> pd.DataFrame:
    """The name-masked set's table: the ensemble without and with each post step. Columns: METRICS and
    `collisions`, the gallery images that are the top-1 of more than one query (each image has one query here)."""
    from .ensemble.reorder import top1_collisions
    from .ranking import topk_stable

    rows = {}
    for name, path in _masked_matrices(lay).items():
        metrics = json.loads(_masked_metrics(lay, name).read_text(encoding="utf-8"))
        sims = SimsMatrix.load(path)
        first = topk_stable(sims.scores, 1) if sims.is_dense else sims.top_k(1).indices
        collisions = top1_collisions(first[:, 0], len(sims.gallery_ids))["images"]
        rows[name] = {**{m: float(metrics[m]) for m in METRICS}, "collisions": float(collisions)}
    return pd.DataFrame.from_dict(rows, orient="index")[[*METRICS, "collisions"]]


def _compare_step(lay: _Layout, sz: DemoSize, best: str, seed: int) -> Step:
    """`tpas compare` of the ensemble against the best single matrix (known only once the table exists)."""
    files = _test_matrices(lay, sz)
    out = lay.metrics / "compare.json"
    argv = command("compare", files[best], files["ensemble"], gt=lay.splits["test"][1], metrics=",".join(METRICS),
                   seed=seed, json=out)  # fmt: skip
    return Step(f"is the ensemble better than {best} beyond noise? (paired randomization test)", argv, (out,))


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
    n_done, n_all = 0, len(steps) + 1  # + the comparison, planned once the table is known
    for group in _groups(steps):
        todo = []
        for step in group:
            reused = step.reuse_key is not None and state.get(step.reuse_key) == list(step.argv)
            reused = reused and all(p.is_file() for p in step.outputs)
            if progress is not None:
                progress(n_done, n_all, step, reused)
            n_done += 1
            if reused:
                timings.append((step.title, 0.0, True))
                continue
            todo.append(step)
            _forget(step, lay, state)
            if step.argv[0] == "tune":
                cfg = _ensemble_config(lay, sz)
                atomic_write(lay.ensemble_config, lambda tmp, c=cfg: tmp.write_text(yaml.safe_dump(c, sort_keys=False)))
        timings += _run_group(todo, lay, state, run_command, step_progress)

    table, best = _results(lay, sz, seed)
    masked = _masked_results(lay)
    compare = _compare_step(lay, sz, best, seed)
    if progress is not None:
        progress(n_done, n_all, compare, False)
    timings += _run_group([compare], lay, state, run_command, step_progress)
    (result,) = json.loads(compare.outputs[0].read_text(encoding="utf-8")).values()
    return DemoResult(
        root=lay.root,
        table=table,
        ensemble="ensemble",
        best_single=best,
        p_values={m: float(v["p_value"]) for m, v in result["metrics"].items()},
        masked=masked,
        answer=lay.answer,
        report=lay.report,
        tuned_config=lay.tuned,
        sims=sorted(lay.sims.glob("*.pt")),
        steps=timings,
    )


def _run_group(
    todo: Sequence[Step],
    lay: _Layout,
    state: dict[str, Any],
    run_command: Callable[[Sequence[str]], None],
    step_progress: Callable[[Step, int], None] | None,
) -> list[tuple[str, float, bool]]:
    """Run steps (in parallel processes when several), check their outputs, record reusable ones in the state."""
    t0 = time.perf_counter()
    if len(todo) > 1:
        run_parallel(todo, lay.runs / "logs", progress=step_progress)
    else:
        for step in todo:
            run_command(list(step.argv))
    timings = []
    for step in todo:
        timings.append((step.title, time.perf_counter() - t0, False))
        missing = next((p for p in step.outputs if not p.is_file()), None)
        if missing is not None:
            raise TpasRunError(f"demo step '{step.title}' finished without writing its output {missing}")
        if step.reuse_key is not None:
            state[step.reuse_key] = list(step.argv)
            _save_state(lay.state, state)
    return timings
