"""DDP on CPU (gloo, 2 processes via torchrun): the gradient equals one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from ddp_grad_check import LOSS_CONFIG, build_model, global_batch

from tpas.train.losses import compute_losses

HERE = Path(__file__).parent


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node nproc ARGS` with one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_process_gradient_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    model = build_model()
    compute_losses(model, global_batch(), LOSS_CONFIG)["total"].backward()
    want = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    itc_model = build_model()
    compute_losses(itc_model, global_batch(), LOSS_CONFIG)["itc"].backward()
    itc = {name: p.grad for name, p in itc_model.named_parameters() if p.grad is not None}

    out = tmp_path / "grads.pt"
    run = torchrun(2, str(HERE / "ddp_grad_check.py"), str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2

    def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
        assert a.keys() == b.keys()
        for name, g in b.items():
            # Summation order differs between one process and two: allow float32 rounding, relative to the
            # gradient's size (plus a tiny floor for gradients that are zero in exact arithmetic, e.g. key biases).
            diff = float((a[name] - g).norm())
            assert diff <= 1e-4 * float(g.norm()) + 1e-6, (name, diff, float(g.norm()))

    close(got["grads"]["global"], want)
    # The ITC part really crossed ranks: without the gather the image projection's gradient would differ.
    assert float(want["vision_proj.2.weight"].abs().sum()) > 0
    # `paper` (the original's all-gather, whose backward keeps only this rank's slice): after DDP's mean, ITC's
    # gradient through the features is 1/world_size of the global batch's; the temperature's is the global one.
    half_itc = {n: g - 0.5 * itc[n] if n != "temp" and n in itc else g for n, g in want.items()}
    close(got["grads"]["paper"], half_itc)
    close(got["grads"]["paper"], got["grads"]["original"])
    assert float(itc["vision_proj.2.weight"].abs().sum()) > 0 and float(itc["temp"].abs()) > 0


def test_torchrun_trains_cmp_from_the_cli_with_rank0_checkpoints(tmp_path: Path) -> None:
    from tpas.data.synthetic import generate_mini_pab

    mini = generate_mini_pab(tmp_path / "pab", seed=1, n_identities=8, n_val_identities=1, n_test_identities=2,
                             n_distractors=0, image_size=(32, 64))  # fmt: skip
    out = tmp_path / "out"
    config = HERE.parents[1] / "configs" / "train" / "cmp_tiny.yaml"
    sets = [f"data.root={mini.root}", f"data.vocab={mini.vocab}", f"output.dir={out}", "train.batch_size=4",
            "train.epochs=1", "train.max_steps=2", "train.log_every=1"]  # fmt: skip
    run = torchrun(2, "-m", "tpas", "train", "cmp", "--config", str(config), *[a for s in sets for a in ("--set", s)])
    assert run.returncode == 0, run.stderr[-3000:]
    ck = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ck["step"] == 2 and ck["rng"]["cpu"].shape[0] == 2  # every rank's RNG state, for an exact resume
    assert ck["history"] and "itc" in ck["history"][0]  # rank 0 evaluated; the others waited
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2]  # logged once (rank 0), not per process
