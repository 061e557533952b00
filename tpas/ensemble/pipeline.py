"""Run an ensemble config end to end: load and align inputs, normalise, fuse, post-process; report every step."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import TpasInputError
from ..sims import SimsMatrix
from .config import EnsembleConfig, InputSpec
from .external import parse_run, run_to_sims
from .fusion import Prepared, fuse_prepared, prepare
from .post import get_post_step
from .topk_fusion import fuse_topk

Progress = Callable[[str, int, int], None]


def load_inputs(
    cfg: EnsembleConfig, query_ids: Sequence[str] | None = None, gallery_ids: Sequence[str] | None = None
) -> dict[str, SimsMatrix]:
    """The inputs named in `fuse.order`, every one aligned by ids to the first SimsMatrix among them.

    Run files (TREC/CSV/ranking) are read over that reference's ids. A run-only ensemble takes its ids from
    `query_ids` / `gallery_ids` (the command line's `--query-index` / `--gallery`), else from the config's
    `ids.query_index` / `ids.gallery`, else from the union of the runs (queries in order of first appearance,
    gallery ids sorted); each run's `meta.ids_from` says which. Ranking files need the query index (their line
    order). Misaligned id sets raise TpasInputError naming ids.
    """
    specs = [cfg.inputs[n] for n in cfg.fuse.order]
    qindex, gallery, ids_from = _given_ids(cfg, query_ids, gallery_ids)
    runs = {s.name: parse_run(s.path, s.format, qindex) for s in specs if s.format != "sims"}
    sims_specs = [s for s in specs if s.format == "sims"]
    if sims_specs:
        ref = _load_sims(sims_specs[0])
        ref_qids, ref_gids = ref.query_ids, ref.gallery_ids
        ids_from = {"query_ids": f"input {sims_specs[0].name!r}", "gallery_ids": f"input {sims_specs[0].name!r}"}
    else:
        ref = None
        union_q = (q for r in runs.values() for q in r.query_ids())
        ref_qids = qindex if qindex is not None else list(dict.fromkeys(union_q))
        ref_gids = gallery if gallery is not None else sorted({g for r in runs.values() for g in r.gallery_ids()})
        ids_from.setdefault("query_ids", f"union of the runs ({len(ref_qids)} queries)")
        ids_from.setdefault("gallery_ids", f"union of the runs ({len(ref_gids)} gallery ids)")
    out: dict[str, SimsMatrix] = {}
    for s in specs:
        if ref is not None and s is sims_specs[0]:
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
            out[s.name] = run_to_sims(runs[s.name], ref_qids, ref_gids, source=s.name)
            out[s.name].meta["ids_from"] = dict(ids_from)
    return out


def _given_ids(
    cfg: EnsembleConfig, query_ids: Sequence[str] | None, gallery_ids: Sequence[str] | None
) -> tuple[list[str] | None, list[str] | None, dict[str, str]]:
    """The query index and gallery given by the caller or the config (None when neither), and where each came from."""
    from ..data.pab import read_gallery_ids, read_query_index

    ids_from: dict[str, str] = {}

    def pick(
        given: Sequence[str] | None, field: str, key: str, what: str, read: Callable[[Any], list[str]]
    ) -> list[str] | None:
        if given is not None:
            ids_from[field] = f"given ({what})"
            return [str(x) for x in given]
        if key in cfg.ids:
            ids_from[field] = f"ids.{key} {cfg.ids[key]}"
            return read(cfg.ids[key])
        return None

    qindex = pick(query_ids, "query_ids", "query_index", "query index", read_query_index)
    gallery = pick(gallery_ids, "gallery_ids", "gallery", "gallery", read_gallery_ids)
    return qindex, gallery, ids_from


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


def run_ensemble(
    cfg: EnsembleConfig,
    progress: Progress | None = None,
    query_ids: Sequence[str] | None = None,
    gallery_ids: Sequence[str] | None = None,
    keep_top: int | None = None,
) -> tuple[SimsMatrix, list[dict[str, Any]]]:
    """Fuse and post-process as the config says; returns the fused SimsMatrix and the step reports.

    `query_ids` / `gallery_ids` fix the ids of a run-only ensemble (see `load_inputs`). `keep_top` K makes the fused
    matrix top-K (exactly the dense fused matrix's top-K; see `topk_fusion`), never holding the dense [Q, G].
    """
    steps: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    matrices = load_inputs(cfg, query_ids, gallery_ids)
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
    if keep_top is None:
        form = {"scores": fuse_prepared(prepared, cfg.fuse, cb)}
    else:
        indices, values = fuse_topk(prepared, cfg.fuse, keep_top, cb)
        form = {"indices": indices, "values": values}
    spec = cfg.fuse
    fuse_rep: dict[str, Any] = {"step": "fuse", "method": spec.method, "order": list(spec.order)}
    if spec.method == "rrf":
        fuse_rep.update(k=float(spec.k), depth=int(spec.depth), weights=spec.weights or {})
    else:
        fuse_rep.update(weights=spec.weights, effective_weights=spec.effective_weights(), exact=spec.exact)
    if keep_top is not None:
        fuse_rep["keep_top"] = int(values.shape[1])
    fuse_rep["seconds"] = round(time.perf_counter() - t0, 4)
    steps.append(fuse_rep)
    ref = matrices[spec.order[0]]
    meta = {
        "ensemble": {"config": json.loads(json.dumps(cfg.raw, default=str)), "steps": json.loads(json.dumps(steps))},
        "inputs": {n: {"source": m.source, "path": str(cfg.inputs[n].path)} for n, m in matrices.items()},
        "transductive": False,
    }
    if "ids_from" in ref.meta:  # the first input is a run: say where the ids came from
        meta["ids_from"] = ref.meta["ids_from"]
    fused = SimsMatrix(ref.query_ids, ref.gallery_ids, **form, source="fused", meta=meta)
    if cfg.post:
        fused, post_reports = apply_post(fused, cfg)
        steps.extend(post_reports)
        fused.meta["ensemble"]["steps"] = json.loads(json.dumps(steps))
    return fused, steps
