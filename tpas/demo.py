"""`tpas demo`: the post-processing half of the pipeline on synthetic data (no models, no downloads, seconds on CPU).

It writes a small synthetic test split in the real PAB layouts (test `attr.json`, a name-masked `query.json`,
`query_index.txt`, gallery ids), two score matrices with the same scores under the two id schemes (annotation ids to
evaluate, name-masked ids to submit), then evaluates, writes the leaderboard file and validates it.
`postprocess` is the reusable part: evaluate + submit + validate for any matrices.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.pab import load_ground_truth, read_gallery_ids, read_query_index
from .scoring import Evaluation, evaluate
from .sims import SimsMatrix, atomic_write
from .submit import ValidationReport, validate_answer, write_ranking_file

_ACTIONS = {"normal": ["Walking", "Running", "Sitting", "Talking"], "anomaly": ["Falling", "Fighting", "Climbing"]}
_SCENES = ["street", "parking lot", "office", "park"]
_CLOTHES = ["red jacket", "black shirt", "white dress", "blue jeans", "grey hoodie", "green coat"]


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


@dataclass
class DemoResult:
    """Paths of everything the demo wrote, plus the post-processing result."""

    annotation: Path
    query_json: Path
    query_index: Path
    gallery_ids: Path
    eval_sims: Path
    submit_sims: Path
    result: PostprocessResult
    r1_by_ties: dict[str, float]


def _masked_id(rng: random.Random, taken: set[str]) -> str:
    """A 15-character upper-case/digit id like the AICity'26 name-masked files (sometimes all digits)."""
    alphabet = string.digits if rng.random() < 0.2 else string.ascii_uppercase + string.digits
    while True:
        s = "".join(rng.choice(alphabet) for _ in range(15))
        if s not in taken:
            taken.add(s)
            return s


def write_synthetic_split(
    root: str | Path, *, seed: int = 0, n_images: int = 60, captions: int = 2, distractors: int = 240
) -> tuple[Path, Path, Path, Path, dict[str, str]]:
    """Write a synthetic test split under `root` in the PAB layouts.

    Returns (attr.json, query.json, query_index.txt, gallery_ids.txt, {annotation query id: name-masked query id}).
    """
    rng = random.Random(seed)
    root = Path(root)
    taken: set[str] = set()
    records, masked_rows, mapping = [], [], {}
    for i in range(n_images):
        gid = _masked_id(rng, taken)
        behaviour = "anomaly" if i % 3 == 0 else "normal"
        action = rng.choice(_ACTIONS[behaviour])
        scene = rng.choice(_SCENES)
        caps = [f"A person in a {rng.choice(_CLOTHES)} is {action.lower()} in the {scene}." for _ in range(captions)]
        records.append({"image": f"test/{gid}.jpg", "image_id": f"{i}", "caption": caps, behaviour: action,
                        "scene": scene})  # fmt: skip
        for k, cap in enumerate(caps):
            qid = _masked_id(rng, taken)
            mapping[f"{i}:{k}"] = qid
            masked_rows.append({"query_index": qid, "caption": cap})
    gallery = sorted([r["image"][5:-4] for r in records] + [_masked_id(rng, taken) for _ in range(distractors)])
    rng.shuffle(masked_rows)  # the challenge re-orders the queries
    ann = root / "annotation" / "test" / "attr.json"
    masked = root / "name-masked_test-set"
    query_json, query_index, gallery_file = (
        masked / "query.json",
        masked / "query_index.txt",
        masked / "gallery_ids.txt",
    )
    atomic_write(ann, lambda tmp: tmp.write_text(json.dumps(records, indent=1)))
    atomic_write(query_json, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in masked_rows)))
    atomic_write(query_index, lambda tmp: tmp.write_text("".join(r["query_index"] + "\n" for r in masked_rows)))
    atomic_write(gallery_file, lambda tmp: tmp.write_text("\n".join(gallery) + "\n"))
    return ann, query_json, query_index, gallery_file, mapping


def synthetic_scores(
    query_ids: Sequence[str],
    relevant: Sequence[str],
    gallery_ids: Sequence[str],
    *,
    seed: int = 0,
    signal: float = 2.5,
    hard: Sequence[bool] | None = None,
) -> torch.Tensor:
    """Cosine-like scores where each query's relevant image gets a Gaussian bonus (`signal` noise units, halved for
    `hard` queries), rounded to float16 so ties occur as in real fp16 matrices."""
    gen = torch.Generator().manual_seed(seed)
    col = {g: i for i, g in enumerate(gallery_ids)}
    s = torch.randn(len(query_ids), len(gallery_ids), generator=gen)
    bonus = signal * (1 + 0.5 * torch.randn(len(query_ids), generator=gen))
    if hard is not None:
        bonus = torch.where(torch.tensor(list(hard)), bonus / 2, bonus)
    rows = torch.arange(len(query_ids))
    cols = torch.tensor([col[g] for g in relevant])
    s[rows, cols] += bonus
    # Cosine-like range (about 0.3 +- 0.02 per unit) before the fp16 rounding, as a real fp16 matrix would be.
    return (0.3 + 0.02 * s).half().float()


def run_demo(
    root: str | Path = ".",
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Write the synthetic split under `root/data/demo`, matrices under `root/sims_score/demo`, the answer under
    `root/predictions/demo`; evaluate, submit and validate."""
    root = Path(root)
    say = progress or (lambda _msg: None)
    say("writing a synthetic test split")
    ann, query_json, query_index, gallery_file, mapping = write_synthetic_split(root / "data" / "demo", seed=seed)
    gt = load_ground_truth(ann)
    gallery = read_gallery_ids(gallery_file)
    say("scoring it with a synthetic model")
    hard = (gt.frame["behaviour"] == "anomaly").tolist()  # anomalous actions are the harder queries in PAB
    scores = synthetic_scores(gt.query_ids, [gt.relevant[q] for q in gt.query_ids], gallery, seed=seed, hard=hard)
    meta = {"demo": True, "seed": seed}
    eval_path = SimsMatrix(gt.query_ids, gallery, scores=scores, source="demo", meta=dict(meta)).save(
        root / "sims_score" / "demo" / "test.pt"
    )
    masked_ids = [mapping[q] for q in gt.query_ids]
    submit_path = SimsMatrix(masked_ids, gallery, scores=scores, source="demo", meta=dict(meta)).save(
        root / "sims_score" / "demo" / "name_masked.pt"
    )
    say("evaluating, writing and validating the ranking file")
    result = postprocess(eval_path, ann, submit_path, query_index, root / "predictions" / "demo" / "answer.txt",
                         gallery=gallery_file)  # fmt: skip
    # The fp16 rounding makes ties: show how far the other tie rules would move R@1 (the stable rule is what the
    # written file scores).
    m = SimsMatrix.load(eval_path)
    r1 = {t: evaluate(m, gt, ties=t).metrics()["R@1"] for t in ("optimistic", "stable", "pessimistic")}
    return DemoResult(ann, query_json, query_index, gallery_file, eval_path, submit_path, result, r1)
