"""Whole processes at AICity'26 size (issue 20): `tpas ensemble` + submission and `tpas evaluate` vs the seed's scripts.

Files as each side keeps them: 4 dense 1,978 x 36,773 matrices + a top-128 ITM matrix (tpas: SimsMatrix v2 files,
the ITM one top-K; seed: five bare dense tensors, the ITM one 1000-sentinel-filled as CMP's evaluation wrote it).
Timed, each a fresh interpreter, best of `--repeat` after one warm-up run (files in the page cache):
- seed ensemble script: load 5 tensors, the row-by-row sentinel fill, global min-max, the nested combination, a numpy
  round trip, a full argsort, the top-10 file (the seed's single script, as in bench_ensemble.py);
- tpas, two processes: `tpas ensemble --config C --out fused.pt` then `tpas submit fused.pt --query-index ...`;
- tpas, one process: `tpas ensemble --config C --submit answer.txt --query-index ...` when the CLI has `--submit`,
  else a driver that imports the CLI and calls what it would (`load_config`, `run_ensemble`, `write_submission`);
- seed evaluation script (load a bare tensor, full argsort, cumsum metrics with Python loops) vs `tpas evaluate`.
Start-up is a process that only imports torch and numpy, the same for both sides (tpas's own imports, typer, pandas,
count against tpas); ratios are of the marginal times (wall - start-up), as the issue defines them.

    .venv/bin/python benchmarks/bench_processes.py [--repeat 3]
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
import yaml

from tpas.sims import SimsMatrix

Q, G, K = 1978, 36773, 128
NAMES = ["itm", "beit3", "blip2", "clip", "extra"]
WEIGHTS = [0.075, 0.9, 0.9, 0.9]

SEED_ENSEMBLE = """
import sys, numpy as np, torch
d = sys.argv[1]
score = torch.load(f"{d}/seed_itm.pt")
dense = [torch.load(f"{d}/seed_{n}.pt") for n in ("beit3", "blip2", "clip", "extra")]
weights = [0.075, 0.9, 0.9, 0.9]
min_values, _ = torch.min(score, dim=1)
replacement = min_values.view(-1, 1).expand(-1, score.size(1))
for i in range(score.size(0)):
    score[i][score[i] == 1000.0] = replacement[i][score[i] == 1000.0]
s = (score - score.min()) / (score.max() - score.min())
for x, w in zip(dense, weights):
    n = (x - x.min()) / (x.max() - x.min())
    s = s * w + (1 - w) * n
similarity = torch.tensor(s.numpy())
indices = torch.argsort(similarity, dim=1, descending=True)
gallery = open(f"{d}/gallery.txt").read().split()
with open(sys.argv[2], "w") as f:
    for row in indices[:, :10]:
        f.write(" ".join(gallery[i] for i in row) + "\\n")
"""

SEED_EVALUATE = """
import sys, json, torch
scores = torch.load(sys.argv[1])
gt = torch.load(sys.argv[2])
indices = torch.argsort(scores, dim=1, descending=True)
matches = torch.arange(scores.shape[1])[indices].eq(gt.view(-1, 1))
cmc = matches[:, :10].cumsum(1)
cmc[cmc > 1] = 1
cmc = cmc.float().mean(0) * 100
tmp = matches.cumsum(1)
inp = []
for i, row in enumerate(matches):
    last = row.nonzero()[-1]
    inp.append(tmp[i][last] / (last + 1.0))
prec = torch.stack([tmp[:, i] / (i + 1.0) for i in range(tmp.shape[1])], 1) * matches
ap = prec.sum(1) / matches.sum(1)
print(json.dumps({"R@1": float(cmc[0]), "mAP": float(ap.mean() * 100), "mINP": float(torch.cat(inp).mean() * 100)}))
"""

ONE_PROCESS = """
import sys
import tpas.cli  # the CLI's own start-up
from tpas.data.pab import read_query_index
from tpas.ensemble.config import load_config
from tpas.ensemble.pipeline import run_ensemble
from tpas.submit import write_submission
qids = read_query_index(sys.argv[2])
fused, _ = run_ensemble(load_config(sys.argv[1]))
write_submission(fused, qids, sys.argv[3])
"""


def make_files(d: Path, q: int = Q, g: int = G) -> None:
    """The five matrices for both sides, the config, query index, gallery ids and a test annotation."""
    Q, G = q, g  # the sizes, named as everywhere in this file
    gen = torch.Generator().manual_seed(0)
    qids, gids = [f"P{i}:0" for i in range(Q)], [f"G{j:014d}" for j in range(G)]
    gt = torch.randperm(G, generator=gen)[:Q]
    dense = []
    for name in NAMES[1:]:
        x = torch.rand(Q, G, generator=gen)
        x[torch.arange(Q), gt] += 0.3 * torch.rand(Q, generator=gen)
        SimsMatrix(qids, gids, scores=x, source=name).save(d / f"{name}.pt")
        torch.save(x, d / f"seed_{name}.pt")
        dense.append(x)
    itm_idx = dense[0].topk(K, dim=1).indices
    itm_val = torch.randn(Q, K, generator=gen) * 4
    SimsMatrix(qids, gids, indices=itm_idx, values=itm_val, source="cmp-itm").save(d / "itm.pt")
    torch.save(torch.full((Q, G), 1000.0).scatter_(1, itm_idx, itm_val), d / "seed_itm.pt")
    torch.save(gt, d / "gt.pt")
    cfg = {"inputs": {n: f"{n}.pt" for n in NAMES}, "fuse": {"method": "iterative", "order": NAMES, "weights": WEIGHTS}}
    (d / "ens.yaml").write_text(yaml.safe_dump(cfg))
    (d / "query_index.txt").write_text("\n".join(qids) + "\n")
    (d / "gallery.txt").write_text("\n".join(gids) + "\n")
    records = [{"image": f"test/{gids[int(c)]}.jpg", "image_id": f"P{i}", "caption": ["a person"]}
               for i, c in enumerate(gt.tolist())]  # fmt: skip
    (d / "attr.json").write_text(json.dumps(records))
    (d / "seed_ensemble.py").write_text(SEED_ENSEMBLE)
    (d / "seed_evaluate.py").write_text(SEED_EVALUATE)
    (d / "one_process.py").write_text(ONE_PROCESS)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmds: list[list[str]], repeat: int, env: dict[str, str]) -> tuple[float, float, str]:
    """Best wall time and best CPU time (user + sys, all threads) of running `cmds` one after another (after one
    warm-up), and the last command's stdout. CPU time is less sensitive to other jobs on shared cores."""
    out = ""
    best = best_cpu = float("inf")
    for i in range(repeat + 1):
        t0, c0 = time.perf_counter(), _children_cpu()
        for c in cmds:
            out = subprocess.run(c, check=True, capture_output=True, text=True, env=env).stdout
        if i:
            best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, _children_cpu() - c0)
    return best, best_cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--queries", type=int, default=Q)
    ap.add_argument("--gallery", type=int, default=G)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench_proc_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    make_files(d, args.queries, args.gallery)
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    tpas = [py, "-m", "tpas"]
    has_submit = "--submit" in subprocess.run([*tpas, "ensemble", "--help"], capture_output=True, text=True,
                                              env={**env, "COLUMNS": "200"}).stdout  # fmt: skip
    one = (
        [[*tpas, "ensemble", "--config", str(d / "ens.yaml"), "--submit", str(d / "one.txt"),
          "--query-index", str(d / "query_index.txt")]]
        if has_submit
        else [[py, str(d / "one_process.py"), str(d / "ens.yaml"), str(d / "query_index.txt"), str(d / "one.txt")]]
    )  # fmt: skip
    runs = {
        "start-up (import torch, numpy)": [[py, "-c", "import torch, numpy"]],
        "for reference: tpas --help (no torch import)": [[*tpas, "--help"]],
        "seed ensemble script": [[py, str(d / "seed_ensemble.py"), str(d), str(d / "seed.txt")]],
        "tpas ensemble --out, then tpas submit": [
            [*tpas, "ensemble", "--config", str(d / "ens.yaml"), "--out", str(d / "fused.pt")],
            [
                *tpas,
                "submit",
                str(d / "fused.pt"),
                "--query-index",
                str(d / "query_index.txt"),
                "--out",
                str(d / "two.txt"),
            ],
        ],
        "tpas ensemble + submission, one process" + ("" if has_submit else " (driver)"): one,
        "seed evaluation script": [[py, str(d / "seed_evaluate.py"), str(d / "seed_beit3.pt"), str(d / "gt.pt")]],
        "tpas evaluate": [
            [*tpas, "evaluate", str(d / "beit3.pt"), "--gt", str(d / "attr.json"), "--json", str(d / "metrics.json")]
        ],
    }
    res = {}
    for name, cmds in runs.items():
        res[name] = timed(cmds, args.repeat, env)
        print(f"{name}: {res[name][0]:.2f} s (CPU {res[name][1]:.2f} s)", flush=True)
    names = list(runs)
    start, start_cpu = res[names[0]][:2]
    print("\n| process | wall (s) | marginal (s) | CPU (s) | marginal CPU (s) |\n| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        wall, cpu = res[name][:2]
        print(f"| {name} | {wall:.2f} | {wall - start:.2f} | {cpu:.2f} | {cpu - start_cpu:.2f} |")
    for i, what in ((0, "wall"), (1, "CPU")):
        marg = {n: res[n][i] - res[names[0]][i] for n in names[2:]}
        print(f"{what}: ensemble + file: seed / tpas two processes {marg[names[2]] / marg[names[3]]:.1f}x, "
              f"seed / tpas one process {marg[names[2]] / marg[names[4]]:.1f}x (target >= 6x); "
              f"evaluate: seed / tpas {marg[names[5]] / marg[names[6]]:.1f}x (target >= 15x)")  # fmt: skip
    files = [(d / n).read_bytes() for n in ("seed.txt", "two.txt", "one.txt")]
    print(f"ranking files identical (seed, two processes, one process): {files[0] == files[1] == files[2]}")
    seed_m = json.loads(res[names[5]][2])
    ours = json.loads((d / "metrics.json").read_text())
    print("metrics (seed vs tpas): " + ", ".join(f"{k} {seed_m[k]:.3f} vs {ours[k]:.3f}" for k in seed_m))


if __name__ == "__main__":
    main()
