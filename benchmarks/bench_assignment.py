"""One-to-one assignment methods compared on a PAB-like simulation (accuracy, not speed).

The simulated protocol is AICity'26's: every query describes exactly one gallery image and no image answers two
queries. Gallery = `identities` people x 2 images (a normal and an anomalous behaviour, the PAB trap: the other image
of the same person scores almost as high) + distractors. Score of (query, image) = noise + `true` on its image +
`twin` on the same person's other image + `scene` on images of the same scene. Each method post-processes the same
matrix; R@1 and mAP@10 are averaged over seeds.

    .venv/bin/python benchmarks/bench_assignment.py [--identities 800] [--distractors 4000] [--seeds 5]
                                                    [--true 0.5] [--twin 0.4]
"""

from __future__ import annotations

import argparse
import time

import torch

from tpas.ensemble.assignment import assign
from tpas.ensemble.sca import resolve_conflicts
from tpas.ranking import gt_ranks
from tpas.scoring.metrics import aggregate, per_query_metrics
from tpas.sims import SimsMatrix


def simulate(identities: int, distractors: int, seed: int, true: float, twin: float, scene: float, scenes: int):
    """(matrix, true column per query): one query per image of the identities' pairs."""
    gen = torch.Generator().manual_seed(seed)
    g = 2 * identities + distractors
    q = 2 * identities
    scene_of = torch.randint(scenes, (g,), generator=gen)
    scene_of[1 : 2 * identities : 2] = scene_of[0 : 2 * identities : 2]  # a person's two images share the scene
    scores = torch.randn(q, g, generator=gen) * 0.1
    rows = torch.arange(q)
    scores += scene * (scene_of[:q, None] == scene_of[None, :]).float()
    scores[rows, rows] += true
    scores[rows, rows ^ 1] += twin  # the same person in the other behaviour
    sims = SimsMatrix([f"q{i}" for i in range(q)], [f"g{j}" for j in range(g)], scores=scores, source="sim")
    return sims, rows


def score(sims: SimsMatrix, truth: torch.Tensor) -> dict[str, float]:
    ranks = gt_ranks(sims.to_dense("row-min"), truth)
    return aggregate(per_query_metrics(ranks), ("R@1", "mAP@10"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=800)
    ap.add_argument("--distractors", type=int, default=4000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--true", type=float, default=0.50)
    ap.add_argument("--twin", type=float, default=0.40)
    ap.add_argument("--scene", type=float, default=0.05)
    ap.add_argument("--scenes", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    methods = {
        "none": lambda m: m,
        "sca (margin, tau 0)": lambda m: resolve_conflicts(m, {"confidence": "margin", "tau": 0.0})[0],
        "assignment matching (k 10)": lambda m: assign(m, {"k": 10})[0],
        "assignment greedy (k 10, T 0.05)": lambda m: assign(m, {"k": 10, "method": "greedy"})[0],
        "assignment flow (top-2, slack 1.0)": lambda m: assign(m, {"k": 10, "method": "flow"})[0],
    }
    totals = {name: {"R@1": 0.0, "mAP@10": 0.0, "s": 0.0} for name in methods}
    for seed in range(args.seeds):
        sims, truth = simulate(args.identities, args.distractors, seed, args.true, args.twin, args.scene, args.scenes)
        for name, run in methods.items():
            t0 = time.perf_counter()
            out = run(sims)
            dt = time.perf_counter() - t0
            for metric, value in score(out, truth).items():
                totals[name][metric] += value / args.seeds
            totals[name]["s"] += dt / args.seeds
    q, g = 2 * args.identities, 2 * args.identities + args.distractors
    print(f"{q} queries x {g} images, {args.seeds} seeds, true +{args.true}, twin +{args.twin}, scene +{args.scene}")
    print(f"{'method':38s} {'R@1':>7s} {'mAP@10':>7s} {'s':>6s}")
    for name, t in totals.items():
        print(f"{name:38s} {t['R@1']:7.2f} {t['mAP@10']:7.2f} {t['s']:6.2f}")


if __name__ == "__main__":
    main()
