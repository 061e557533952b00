"""City-scale gallery (issue 20): 2,000 queries x 1,000,000 gallery items, four models, never a dense [Q, G] matrix.

Synthetic features, no images: gallery item j of model m is normalise(z_j + noise_mj), query i is
normalise(z_gt(i) + noise_mi), with z, the noises and gt fixed by the seed; gallery features are generated block by
block (never all at once). Pipeline, in one process, as a user would run it:
1. per model: `tpas.topk.topk_similarity` (gallery blocks, stable top-100) -> top-K SimsMatrix -> file (v2);
2. `run_ensemble(cfg, keep_top=...)`: load the four files, iterative fusion of the four top-K inputs (sparse path),
   SCA (margin, depth 10) on the top-K fused matrix;
3. `write_submission`: the ranking file (top-10 per query, validated).
Reports wall time per stage and the process's peak RSS (VmHWM) after each; checks the result against the dense
path on a sub-gallery (`--check`, default on: the first 20,000 gallery items, dense top-K == blocked top-K).

    .venv/bin/python benchmarks/bench_scale.py [--queries 2000 --gallery 1000000 --dim 256 --k 100]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from tpas.ensemble.config import load_config
from tpas.ensemble.pipeline import run_ensemble
from tpas.ranking import topk_stable
from tpas.sims import SimsMatrix
from tpas.submit import write_submission
from tpas.topk import block_cols, topk_similarity

MODELS = ("m0", "m1", "m2", "m3")
NOISE = (1.4, 1.5, 1.6, 1.8)  # per model: how far its features sit from the shared latent (R@1 well below 100)


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def _gen(*seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(seed) % (2**62))


def latent_block(b: int, start: int, stop: int, dim: int) -> torch.Tensor:
    """Shared latents z of gallery items [start, stop) (block index b: the same numbers every time)."""
    return torch.randn(stop - start, dim, generator=_gen(0, b))


def gallery_blocks(model: int, n: int, dim: int, step: int):
    """Model `model`'s gallery features, one block of `step` items at a time."""
    for b, start in enumerate(range(0, n, step)):
        stop = min(n, start + step)
        z = latent_block(b, start, stop, dim)
        z.add_(torch.randn(stop - start, dim, generator=_gen(1, model, b)), alpha=NOISE[model])
        yield torch.nn.functional.normalize(z, dim=1)


def query_feats(gt: torch.Tensor, n_gallery: int, dim: int, step: int) -> list[torch.Tensor]:
    """Each model's query features: the latent of the query's true item plus that model's own noise."""
    z = torch.empty(len(gt), dim)
    for b, start in enumerate(range(0, n_gallery, step)):
        stop = min(n_gallery, start + step)
        rows = ((gt >= start) & (gt < stop)).nonzero().flatten()
        if len(rows):
            z[rows] = latent_block(b, start, stop, dim)[gt[rows] - start]
    out = []
    for m in range(len(MODELS)):
        noisy = z + NOISE[m] * torch.randn(z.shape, generator=_gen(2, m))
        out.append(torch.nn.functional.normalize(noisy, dim=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--check", type=int, default=20_000, help="sub-gallery size of the dense check (0: none)")
    ap.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temp folder)")
    args = ap.parse_args()
    q, g, d, k = args.queries, args.gallery, args.dim, args.k
    tmp = args.out or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    if args.out is None:
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    step = block_cols(q, k)
    dense_gb = q * g * 4 / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {q} queries x {g:,} "
          f"gallery x dim {d}, top-{k}, gallery blocks of {step}; a dense float32 matrix would be {dense_gb:.1f} GB "
          f"per model ({4 * dense_gb:.0f} GB for four, + {dense_gb:.0f} GB fused)")  # fmt: skip
    t_all = time.perf_counter()
    gt = torch.randint(0, g, (q,), generator=_gen(3))
    qids = [f"Q{i:014d}" for i in range(q)]
    gids = [f"G{j:014d}" for j in range(g)]
    feats = query_feats(gt, g, d, step)
    rows = []
    for m, name in enumerate(MODELS):
        t0 = time.perf_counter()
        idx, val = topk_similarity(feats[m], gallery_blocks(m, g, d, step), k)
        SimsMatrix(qids, gids, indices=idx, values=val, source=name).save(tmp / f"{name}.pt")
        hits = float((idx[:, 0] == gt).float().mean() * 100)
        rows.append((f"{name}: blocked top-{k} + save", time.perf_counter() - t0, *rss_mb(), f"R@1 {hits:.1f}"))
        print(rows[-1], flush=True)
    cfg_raw = {
        "inputs": {n: f"{n}.pt" for n in MODELS},
        "fuse": {"method": "iterative", "order": list(MODELS), "weights": [0.5, 0.6, 0.7]},
        "post": [{"sca": {"confidence": "margin", "depth": 10}}],
    }
    (tmp / "ens.yaml").write_text(yaml.safe_dump(cfg_raw))
    t0 = time.perf_counter()
    fused, steps = run_ensemble(load_config(tmp / "ens.yaml"), keep_top=len(MODELS) * k)
    sca = next(s for s in steps if s["step"] == "sca")
    r1 = float((fused.top_k(1).indices[:, 0] == gt).float().mean() * 100)
    rows.append(("ensemble: load 4 + top-K fusion + SCA", time.perf_counter() - t0, *rss_mb(),
                 f"top-{fused.k}, R@1 {r1:.1f}, collisions {sca['collisions_before']['images']} -> "
                 f"{sca['collisions_after']['images']}"))  # fmt: skip
    print(rows[-1], flush=True)
    (tmp / "query_index.txt").write_text("\n".join(qids) + "\n")
    t0 = time.perf_counter()
    write_submission(fused, qids, tmp / "answer.txt", make_zip=True)
    rows.append(("ranking file + zip (validated)", time.perf_counter() - t0, *rss_mb(), ""))
    total = time.perf_counter() - t_all
    print("\n| stage | wall (s) | RSS after (MiB) | peak RSS so far (MiB) | notes |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, t, cur, peak, note in rows:
        print(f"| {name} | {t:.1f} | {cur:,.0f} | {peak:,.0f} | {note} |")
    peak = rss_mb()[1]
    verdict = "met" if peak * 2**20 < 8e9 else "NOT met"
    print(f"\ntotal {total:.1f} s; peak RSS {peak / 1024:.2f} GiB (bound 8 GB: {verdict})")
    if args.check:
        sub = min(args.check, g)
        blocks = list(gallery_blocks(0, sub, d, step))
        dense = feats[0] @ torch.cat(blocks).T
        idx, val = topk_similarity(feats[0], iter(blocks), k, block=None)
        same = torch.equal(idx, topk_stable(dense, k)) and torch.equal(val, dense.gather(1, idx))
        print(f"check on the first {sub:,} gallery items: blocked top-{k} == dense top-{k}: {same}")


if __name__ == "__main__":
    main()
