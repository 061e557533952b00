"""Run an ensemble config end to end: load and align inputs, normalise, fuse, post-process; report every step."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..errors import TpasInputError
from ..sims import SimsMatrix
from .config import EnsembleConfig, InputSpec
from .external import read_run
from .fusion import Prepared, fuse_prepared, prepare
from .post import get_post_step

Progress = Callable[[str, int, int], None]


def load_inputs(cfg: EnsembleConfig) -> dict[str, SimsMatrix]:
    """The inputs named in `fuse.order`, every one aligned by ids to the first SimsMatrix among them.

    Run files (TREC/CSV) are read over that reference's ids. Misaligned id sets raise TpasInputError naming ids.
    """
    names = cfg.fuse.order
    specs = [cfg.inputs[n] for n in names]
    sims_specs = [s for s in specs if s.format == "sims"]
    if not sims_specs:
        raise TpasInputError(
            "inputs: at least one input must be a SimsMatrix file (it fixes the query and gallery ids that run "
            "files are read against)"
        )
    ref = _load_sims(sims_specs[0])
    out: dict[str, SimsMatrix] = {}
    for s in specs:
        if s is sims_specs[0]:
            out[s.name] = ref
        elif s.format == "sims":
            m = _load_sims(s)
            try:
                out[s.name] = m.align(ref)
            except TpasInputError as e:
                raise TpasInputError(
                    f"input {s.name!r} does not cover the same ids as {sims_specs[0].name!r}: {e.message}", s.path
                ) from None
        else:
            out[s.name] = read_run(s.path, ref.query_ids, ref.gallery_ids, s.format, source=s.name)
    return out


def _load_sims(spec: InputSpec) -> SimsMatrix:
    m = SimsMatrix.load(spec.path)
    if m.is_dense and spec.fill != "row-min":
        raise TpasInputError(
            f"inputs.{spec.name}.fill: a fill applies to top-K matrices; this one is dense (its unscored cells were "
            "filled when it was written)",
            spec.path,
        )
    return m


def prepare_inputs(cfg: EnsembleConfig, matrices: dict[str, SimsMatrix]) -> list[Prepared]:
    """Each input of `fuse.order` wrapped with its normalisation (no normalised copies for affine methods)."""
    return [prepare(n, matrices[n], *cfg.normalize[n], fill=cfg.inputs[n].fill) for n in cfg.fuse.order]


def apply_post(sims: SimsMatrix, cfg: EnsembleConfig, inplace: bool = True) -> tuple[SimsMatrix, list[dict]]:
    """Apply the config's post steps in order; returns the matrix and one report per step."""
    reports = []
    for i, (name, params) in enumerate(cfg.post):
        t0 = time.perf_counter()
        sims, rep = get_post_step(name, f"post.{i}").run(sims, params, inplace=inplace)
        rep["seconds"] = round(time.perf_counter() - t0, 4)
        reports.append(rep)
    return sims, reports


def run_ensemble(cfg: EnsembleConfig, progress: Progress | None = None) -> tuple[SimsMatrix, list[dict[str, Any]]]:
    """Fuse and post-process as the config says; returns the fused SimsMatrix and the step reports."""
    steps: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    matrices = load_inputs(cfg)
    for n, m in matrices.items():
        steps.append(
            {
                "step": "load",
                "input": n,
                "path": str(cfg.inputs[n].path),
                "form": "dense" if m.is_dense else f"top-{m.k} (fill {cfg.inputs[n].fill})",
                "source": m.source,
                "shape": list(m.shape),
            }
        )
    steps.append({"step": "align", "seconds": round(time.perf_counter() - t0, 4)})
    t0 = time.perf_counter()
    prepared = prepare_inputs(cfg, matrices)
    steps.append(
        {
            "step": "normalize",
            "normalize": {p.name: f"{p.method}/{p.scope}" for p in prepared},
            "seconds": round(time.perf_counter() - t0, 4),
        }
    )
    t0 = time.perf_counter()
    cb = None if progress is None else (lambda done, total: progress("fuse", done, total))
    scores = fuse_prepared(prepared, cfg.fuse, cb)
    spec = cfg.fuse
    fuse_rep: dict[str, Any] = {"step": "fuse", "method": spec.method, "order": list(spec.order)}
    if spec.method == "rrf":
        fuse_rep.update(k=float(spec.k), depth=int(spec.depth), weights=spec.weights or {})
    else:
        fuse_rep.update(weights=spec.weights, effective_weights=spec.effective_weights(), exact=spec.exact)
    fuse_rep["seconds"] = round(time.perf_counter() - t0, 4)
    steps.append(fuse_rep)
    ref = matrices[spec.order[0]]
    meta = {
        "ensemble": {"config": json.loads(json.dumps(cfg.raw, default=str)), "steps": json.loads(json.dumps(steps))},
        "inputs": {n: {"source": m.source, "path": str(cfg.inputs[n].path)} for n, m in matrices.items()},
        "transductive": False,
    }
    fused = SimsMatrix(ref.query_ids, ref.gallery_ids, scores=scores, source="fused", meta=meta)
    if cfg.post:
        fused, post_reports = apply_post(fused, cfg)
        steps.extend(post_reports)
        fused.meta["ensemble"]["steps"] = json.loads(json.dumps(steps))
    return fused, steps
