"""Post-processing benchmark (issue 2): metrics and the top-10 ranking file on an AICity'26-sized matrix.

Compares, in the same run, the seed repos' approach (a full argsort of every row; metrics from `cumsum` over the
sorted match matrix with per-query and per-column Python loops, as their `mAP()` does; the ranking file from the
same full argsort) with tpas (rank of the true image by chunked counting, no sort; `topk_stable` for the file).

Each measurement runs in a fresh child process so its peak RSS (`ru_maxrss`) minus the RSS just before the step is
that step's extra memory; the matrix itself is 1,978 x 36,773 x 4 B = 291 MB.

    .venv/bin/python benchmarks/bench_postprocess.py [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

Q, G = 1978, 36773
MB = 1 << 20


def make_matrix(fp16: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-like random scores with each query's true image lifted (so ranks are realistic), optionally rounded
    to fp16 (what fused/fp16 matrices look like: many ties)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.empty(Q, G).normal_(0.2, 0.05, generator=gen)
    gt = torch.randint(0, G, (Q,), generator=gen)
    scores[torch.arange(Q), gt] += torch.empty(Q).uniform_(0.0, 0.3, generator=gen)
    if fp16:
        # In place, chunk by chunk, so building the matrix does not itself need a second full copy.
        # (16-row chunks: ru_maxrss is a lifetime peak, so building the matrix must not leave a peak of its own.)
        for r0 in range(0, Q, 16):
            scores[r0 : r0 + 16] = scores[r0 : r0 + 16].half().float()
    return scores, gt


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------ seed approach
def seed_metrics(scores: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """The seed repos' evaluation: full argsort, match matrix, cumsum, Python loops over queries and columns."""
    indices = torch.argsort(scores, dim=1, descending=True)
    gallery_labels = torch.arange(scores.shape[1])  # one image per gallery id: the label is the column
    matches = gallery_labels[indices].eq(gt.view(-1, 1))
    cmc = matches[:, :10].cumsum(1)
    cmc[cmc > 1] = 1
    cmc = cmc.float().mean(0) * 100
    num_rel = matches.sum(1)
    tmp = matches.cumsum(1)
    inp = []
    for i, row in enumerate(matches):
        last = row.nonzero()[-1]
        inp.append(tmp[i][last] / (last + 1.0))
    minp = torch.cat(inp).mean() * 100
    prec = torch.stack([tmp[:, i] / (i + 1.0) for i in range(tmp.shape[1])], 1) * matches
    ap = prec.sum(1) / num_rel
    return {"R@1": float(cmc[0]), "R@5": float(cmc[4]), "R@10": float(cmc[9]), "mAP": float(ap.mean() * 100),
            "mINP": float(minp)}  # fmt: skip


def seed_ranking_file(scores: torch.Tensor, query_ids: list[str], gallery_ids: list[str], out: Path) -> None:
    """The seed scripts' answer file: full argsort per row, first 10 columns, one line per query."""
    indices = torch.argsort(scores, dim=1, descending=True)
    with open(out, "w") as f:
        for i in range(len(query_ids)):
            f.write(" ".join(gallery_ids[j] for j in indices[i, :10].tolist()) + "\n")


# ------------------------------------------------------------------------------------------------ tpas
def tpas_metrics(scores: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    from tpas.ranking import gt_ranks
    from tpas.scoring import metrics_from_ranks

    return metrics_from_ranks(gt_ranks(scores, gt))


def ids() -> tuple[list[str], list[str]]:
    return [f"Q{i:014d}" for i in range(Q)], [f"G{j:014d}" for j in range(G)]


# ------------------------------------------------------------------------------------------------ one measurement
def measure(step: str, fp16: bool, repeat: int) -> dict:
    """Run one step `repeat` times in this process; report best/median seconds and peak extra RSS."""
    # Import everything first, so module imports (pandas, ...) do not count as the step's memory.
    import pandas as pd

    from tpas.data.pab import GroundTruth
    from tpas.scoring import evaluate
    from tpas.sims import SimsMatrix
    from tpas.submit import write_ranking_file

    scores, gt = make_matrix(fp16)
    qids, gids = ids()
    tmp = Path(tempfile.mkdtemp(prefix="bench_pp_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the matrices saved there are GBs
    if step in ("tpas_evaluate", "tpas_file", "load", "bare_load"):
        sims = SimsMatrix(qids, gids, scores=scores, source="bench")
    if step == "tpas_evaluate":
        rel = {q: gids[c] for q, c in zip(qids, gt.tolist(), strict=True)}
        frame = pd.DataFrame({"caption": "", "gallery_id": [rel[q] for q in qids], "image_id": qids,
                              "behaviour": ["anomaly" if i % 3 == 0 else "normal" for i in range(Q)],
                              "action": "", "scene": ""}, index=pd.Index(qids, name="query_id"))  # fmt: skip
        gtruth = GroundTruth(qids, rel, frame)
    if step in ("load", "bare_load"):
        sims.save(tmp / "m.pt")
        torch.save(scores, tmp / "bare.pt")
        del sims
    tpas_metrics(scores[:2], gt[:2])  # warm-up: first-call allocations of torch kernels are not the step's
    base = rss_mb()
    times, cpu, result = [], [], None
    for _ in range(repeat):
        c0 = time.process_time()
        t0 = time.perf_counter()
        if step == "seed_metrics":
            result = seed_metrics(scores, gt)
        elif step == "tpas_metrics":
            result = tpas_metrics(scores, gt)
        elif step == "tpas_evaluate":
            result = evaluate(sims, gtruth, by=["behaviour"]).metrics()
        elif step == "seed_file":
            seed_ranking_file(scores, qids, gids, tmp / "seed.txt")
        elif step == "tpas_file":
            write_ranking_file(sims, qids, tmp / "answer.txt")
        elif step == "load":
            m = SimsMatrix.load(tmp / "m.pt")
            del m
        elif step == "bare_load":
            t = torch.load(tmp / "bare.pt", weights_only=True)
            del t
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    extra = peak_mb() - base
    if step == "seed_file":
        result = (tmp / "seed.txt").read_text()
    if step == "tpas_file":
        result = (tmp / "answer.txt").read_text()
    times.sort()
    return {"step": step, "fp16": fp16, "best_s": times[0], "median_s": times[len(times) // 2],
            "cpu_s": min(cpu), "extra_peak_mb": extra, "result": result}  # fmt: skip


def run_child(step: str, fp16: bool, repeat: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--repeat", str(repeat)]
    if fp16:
        cmd.append("--fp16")
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.fp16, args.repeat)))
        return

    print(f"matrix {Q} x {G} float32 ({Q * G * 4 / MB:.0f} MB), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")  # fmt: skip
    seed_rep = max(1, min(args.repeat, 2))  # the seed steps take seconds each
    rows = {}
    for fp16 in (False, True):
        tag = "fp16-rounded" if fp16 else "float32"
        r = {s: run_child(s, fp16, seed_rep if s.startswith("seed") else args.repeat, args.threads)
             for s in ("seed_metrics", "tpas_metrics", "tpas_evaluate", "seed_file", "tpas_file")}  # fmt: skip
        same_metrics = all(abs(r["seed_metrics"]["result"][k] - r["tpas_metrics"]["result"][k]) < 1e-3
                           for k in r["seed_metrics"]["result"])  # fmt: skip
        same_evaluate = all(abs(r["tpas_evaluate"]["result"][k] - r["tpas_metrics"]["result"][k]) < 1e-9
                            for k in r["tpas_metrics"]["result"])  # fmt: skip
        same_file = r["seed_file"]["result"] == r["tpas_file"]["result"]
        rows[tag] = r
        print(f"\n[{tag}] metrics equal to the seed's: {same_metrics} (evaluate() agrees: {same_evaluate}); "
              f"ranking files identical: {same_file}")  # fmt: skip
        if not same_file:
            print(
                "  (files differ only where scores tie: argsort's order among equal scores is unspecified, tpas "
                "keeps gallery order)"
            )
        print(f"  {'step':<16}{'best s':>10}{'median s':>10}{'CPU s':>10}{'extra peak MB':>15}")
        for s, v in r.items():
            print(f"  {s:<16}{v['best_s']:>10.4f}{v['median_s']:>10.4f}{v['cpu_s']:>10.4f}{v['extra_peak_mb']:>15.1f}")
        seed_s = r["seed_metrics"]["best_s"]
        print(f"  metrics speed-up (seed / tpas gt_ranks+metrics): {seed_s / r['tpas_metrics']['best_s']:.0f}x;"
              f" vs full evaluate(): {seed_s / r['tpas_evaluate']['best_s']:.0f}x")  # fmt: skip
        print(f"  ranking file speed-up: {r['seed_file']['best_s'] / r['tpas_file']['best_s']:.0f}x")
        cpu_m = r["seed_metrics"]["cpu_s"] / r["tpas_metrics"]["cpu_s"]
        cpu_f = r["seed_file"]["cpu_s"] / r["tpas_file"]["cpu_s"]
        print(f"  in CPU time (less sensitive to other jobs): metrics {cpu_m:.0f}x, file {cpu_f:.0f}x")
    ld = {s: run_child(s, False, args.repeat, args.threads) for s in ("load", "bare_load")}
    print(f"\nSimsMatrix.load {ld['load']['best_s']:.4f} s (median {ld['load']['median_s']:.4f}) vs bare torch.load "
          f"{ld['bare_load']['best_s']:.4f} s (median {ld['bare_load']['median_s']:.4f})")  # fmt: skip


if __name__ == "__main__":
    main()
