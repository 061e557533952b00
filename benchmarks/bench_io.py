"""SimsMatrix file I/O (issue 20): loading an AICity'26-sized matrix against a bare `torch.load` of its tensor.

1,978 x 36,773 float32 (277 MiB) with 15-character ids, as the name-masked set has. Measured, best of `--repeat`
after one warm-up read (the file is in the page cache for every variant, as it is when a pipeline re-reads it):
- bare `torch.load(weights_only=True)` of the tensor alone (the reference);
- `SimsMatrix.load` of a `tpas-sims/2` file (packed ids, memory-mapped scores, full validation), and its parts:
  the memory-mapped read + id decoding alone, and `validate()` (unique ids, one `aminmax` pass for NaN/inf that
  also pages the mapped scores in);
- `SimsMatrix.load` of the same matrix as a `tpas-sims/1` file (ids as pickled lists of str);
- the fp16 file: size, load time, and what rounding to fp16 changes (ties, top-10 lines, R@1/mAP).

    .venv/bin/python benchmarks/bench_io.py [--queries 1978 --gallery 36773 --repeat 5]
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

from tpas.ranking import gt_ranks, topk_stable
from tpas.scoring import metrics_from_ranks
from tpas.sims import FORMAT_V1, SimsMatrix, _safe_torch_load, unpack_ids


def best_of(fn, repeat: int) -> float:
    """Fastest wall time of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make(q: int, g: int) -> tuple[SimsMatrix, torch.Tensor]:
    """Cosine-like scores with each query's true image lifted (as bench_postprocess.py), ids like the challenge's."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.empty(q, g).normal_(0.2, 0.05, generator=gen)
    gt = torch.randint(0, g, (q,), generator=gen)
    scores[torch.arange(q), gt] += torch.empty(q).uniform_(0.0, 0.3, generator=gen)
    qids = [f"Q{i:014d}" for i in range(q)]
    gids = [f"G{j:014d}" for j in range(g)]
    return SimsMatrix(qids, gids, scores=scores, source="bench"), gt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1978)
    ap.add_argument("--gallery", type=int, default=36773)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    m, gt = make(args.queries, args.gallery)
    tmp = Path(tempfile.mkdtemp(prefix="bench_io_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    torch.save(m.scores, tmp / "bare.pt")
    m.save(tmp / "v2.pt")
    m.save(tmp / "v2_fp16.pt", dtype="fp16")
    torch.save({"format": FORMAT_V1, "query_ids": m.query_ids, "gallery_ids": m.gallery_ids, "scores": m.scores,
                "source": m.source, "meta": m.meta}, tmp / "v1.pt")  # fmt: skip
    mb = m.scores.numel() * 4 / 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.queries} x {args.gallery} float32 = {mb:.0f} MiB")  # fmt: skip

    def read_only():
        obj = _safe_torch_load(tmp / "v2.pt", mmap=True)
        return unpack_ids(obj["query_ids"]), unpack_ids(obj["gallery_ids"]), obj["scores"]

    def validate_fresh():
        # validate() on freshly mapped scores, so the pass pays for paging them in, as in a real load
        qids, gids, scores = read_only()
        probe = SimsMatrix.__new__(SimsMatrix)  # the fields without __post_init__, so validate() runs once, here
        probe.__dict__.update(query_ids=qids, gallery_ids=gids, scores=scores, indices=None, values=None, meta={})
        probe._range = None
        t0 = time.perf_counter()
        probe.validate()
        return time.perf_counter() - t0

    bare = best_of(lambda: torch.load(tmp / "bare.pt", weights_only=True), args.repeat)
    v2 = best_of(lambda: SimsMatrix.load(tmp / "v2.pt"), args.repeat)
    v1 = best_of(lambda: SimsMatrix.load(tmp / "v1.pt"), args.repeat)
    fp16 = best_of(lambda: SimsMatrix.load(tmp / "v2_fp16.pt"), args.repeat)
    read = best_of(read_only, args.repeat)
    validate_fresh()
    val = min(validate_fresh() for _ in range(args.repeat))
    print("\n| read | seconds | vs bare torch.load |\n| --- | ---: | ---: |")
    for name, t in (
        ("bare `torch.load` of the tensor", bare),
        ("`SimsMatrix.load`, tpas-sims/2 (validated)", v2),
        ("  of which: mapped read + id decoding", read),
        ("  of which: `validate()` incl. paging the scores in", val),
        ("`SimsMatrix.load`, tpas-sims/1 (validated)", v1),
        ("`SimsMatrix.load`, tpas-sims/2 fp16 (validated)", fp16),
    ):
        print(f"| {name} | {t:.4f} | {t / bare:.2f}x |")
    sizes = {n: (tmp / f"{n}.pt").stat().st_size / 2**20 for n in ("bare", "v1", "v2", "v2_fp16")}
    print("file sizes (MiB): " + ", ".join(f"{n} {s:.1f}" for n, s in sizes.items()))

    # What fp16 storage does to rankings: ties created by rounding, broken by gallery order.
    half = SimsMatrix.load(tmp / "v2_fp16.pt")
    top32, top16 = topk_stable(m.scores, 10), topk_stable(half.scores, 10)
    changed = int((top32 != top16).any(dim=1).sum())
    sampled = range(0, args.queries, max(1, args.queries // 20))
    distinct = sum(len(torch.unique(half.scores[r])) for r in sampled) / len(sampled)
    r32, r16 = metrics_from_ranks(gt_ranks(m.scores, gt)), metrics_from_ranks(gt_ranks(half.scores, gt))
    print(
        f"fp16: {distinct:.0f} distinct values per row of {args.gallery} (sampled rows); top-10 line changed "
        f"for {changed} of {args.queries} queries; R@1 {r32['R@1']:.2f} -> {r16['R@1']:.2f}, "
        f"mAP {r32['mAP']:.3f} -> {r16['mAP']:.3f}"
    )


if __name__ == "__main__":
    main()
