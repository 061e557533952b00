"""CMP training throughput on CPU: the tiny config on a synthetic mini-PAB, with and without gradient checkpointing.

Each variant runs `tpas.train.trainer.train` (the real loop: data loading, augmentation, EDA, masking, all losses,
AdamW step) in its own process, so peak RSS is per variant. Steps after the first `--warmup` are timed.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--batch 16] [--threads 1]

No GPU is lent to this task, so there are no full-size bf16 numbers here; on a GPU run
`tpas train cmp --config configs/train/cmp.yaml --set train.max_steps=50` and read samples_per_s from the log.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from tpas.train.config import load_train_config
    from tpas.train.trainer import train

    stamps: list[float] = []

    def on_event(event: dict) -> None:
        if event["kind"] == "step":
            stamps.append(time.perf_counter())

    cfg = load_train_config(
        REPO / "configs" / "train" / "cmp_tiny.yaml",
        [f"data.root={args.data}", f"data.vocab={args.data}/vocab.txt", f"output.dir={args.out}",
         f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "eval.enabled=false",
         f"train.grad_checkpointing={'true' if args.ckpt else 'false'}", "train.log_every=1000"],
    )  # fmt: skip
    train(cfg, progress=on_event)
    timed = stamps[args.warmup :]
    seconds = timed[-1] - stamps[args.warmup - 1]
    samples = len(timed) * args.batch
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples_per_s": samples / seconds, "s_per_step": seconds / len(timed), "peak_rss_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from tpas.data.synthetic import generate_mini_pab

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mini"
        generate_mini_pab(data, seed=0, n_identities=60, n_val_identities=1, n_test_identities=1, n_distractors=0)
        results = {}
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--child", "--data", str(data), "--out", str(Path(tmp) / f"o{ckpt}"),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--threads", str(args.threads)] + (["--ckpt"] if ckpt else [])  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[ckpt] = json.loads(run.stdout.strip().splitlines()[-1])
    base, ck = results[False], results[True]
    print(f"tiny CMP, batch {args.batch}, {args.threads} thread(s), {args.steps - args.warmup} timed steps, CPU")
    print(f"{'variant':<28}{'samples/s':>10}{'s/step':>9}{'peak RSS MB':>13}")
    for name, r in (("no checkpointing", base), ("gradient checkpointing", ck)):
        print(f"{name:<28}{r['samples_per_s']:>10.2f}{r['s_per_step']:>9.2f}{r['peak_rss_mb']:>13.0f}")
    print(f"throughput ratio (checkpointing / none): {ck['samples_per_s'] / base['samples_per_s']:.2f}x")
    print(f"peak RSS ratio (checkpointing / none): {ck['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
