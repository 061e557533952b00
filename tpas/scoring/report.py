"""`tpas report`: a static HTML page showing what each model (and the ensemble) retrieves, query by query.

Like the qualitative figures of the CMP paper, each query shows its caption and every model's top-5 gallery images as
thumbnails framed green (the relevant image), blue (the same identity in the other action: right person, wrong
behaviour) or red (wrong). Plain-JS filters select normal/anomaly queries and queries whose models disagree on the
top-1. Summary plots (R@K curves, breakdowns by normal/anomaly and scene, the ensemble tuning surface) are PNGs.

The page needs no server and no network: everything it references lives beside it, under relative paths
(`<page stem>_files/thumbs/*.jpg`, `<page stem>_files/plots/*.png`). The page and its folder are built in a temporary
folder and moved into place at the end, so an interrupted run never leaves a half-written report. The page itself is
`templates/report.html` (package data, with its CSS and JS), filled in with `string.Template`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import shutil
import string
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..errors import TpasInputError
from ..sims import SimsMatrix
from .relevance import join_ground_truth

if TYPE_CHECKING:
    from ..data.pab import GroundTruth

# progress(stage, done, total)
Progress = Callable[[str, int, int], None]

METRICS = ("R@1", "R@5", "R@10", "mAP", "mINP")
THUMB_BOX = (96, 128)  # max width x height of a thumbnail; person crops are taller than wide
CORRECT, SAME_IDENTITY, WRONG = "correct", "same-identity", "wrong"
# Sources / names that mark a matrix as the output of `tpas ensemble`.
_ENSEMBLE_HINTS = ("fused", "ensemble")
# Test-record fields that name the other-action image of the same person (the IHNM pair), when an annotation has them.
_PAIR_FIELDS = ("hard_i", "hard_i_id")
_IDENTITY_FIELDS = ("identity", "person_id", "pid", "identity_id")


@dataclass
class Report:
    """What `build_report` wrote and measured."""

    path: Path
    assets: Path
    models: list[str]
    metrics: pd.DataFrame  # models x METRICS, percent, over every ground-truth query
    n_queries: int
    n_shown: int
    n_disagree: int
    n_thumbnails: int
    plots: dict[str, Path] = field(default_factory=dict)
    identity_source: str | None = None  # where blue frames come from; None when the annotation has no identity info


# ------------------------------------------------------------------------------------------------- identities
def identity_map(gt: GroundTruth) -> tuple[dict[str, str], str | None]:
    """Map each ground-truth gallery id to an identity key, and say where the identities came from.

    In PAB every person appears twice, once per action (the identity-based hard-negative pair). The annotation may say
    so in one of three ways, tried in order: an explicit identity column (`identity`, `person_id`, ...); a pair field
    (`hard_i`, an image path, or `hard_i_id`, an `image_id`) naming the counterpart image, joined transitively; or
    `image_id` shared by several images (`GroundTruth.identity_groups`). Returns ({}, None) when no source links two
    different images, in which case the report cannot draw blue frames and says so.
    """
    frame = gt.frame
    per_image = frame.drop_duplicates("gallery_id").set_index("gallery_id")
    for col in _IDENTITY_FIELDS:
        if col in per_image.columns:
            ids = {g: str(v) for g, v in per_image[col].items() if str(v) not in ("", "nan", "None")}
            if len(set(ids.values())) < len(ids):
                return ids, col

    parent = {g: g for g in per_image.index}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    by_image_id = {str(v): g for g, v in per_image["image_id"].items()}
    from ..data.pab import image_stem

    for col in _PAIR_FIELDS:
        if col not in per_image.columns:
            continue
        linked = False
        for g, v in per_image[col].items():
            v = str(v)
            other = by_image_id.get(v) if col == "hard_i_id" else image_stem(v) if v not in ("", "nan") else None
            if other is not None and other in parent and other != g:
                parent[find(g)] = find(other)
                linked = True
        if linked:
            return {g: find(g) for g in parent}, col

    groups = gt.identity_groups() if hasattr(gt, "identity_groups") else {}
    if any(len(members) > 1 for members in groups.values()):
        return {g: str(image_id) for image_id, members in groups.items() for g in members}, "image_id"
    return {}, None


# ------------------------------------------------------------------------------------------------- helpers
def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return keep.strip("-") or "model"


def _is_ensemble(name: str, m: SimsMatrix) -> bool:
    return any(h in (m.source or "").lower() or h in name.lower() for h in _ENSEMBLE_HINTS)


def _top_indices(m: SimsMatrix, k: int) -> torch.Tensor:
    """Gallery columns [Q, k] of each row's k best scores under the stable tie rule (tpas.ranking)."""
    if m.is_dense:
        from ..ranking import topk_stable

        return topk_stable(m.scores, min(k, m.shape[1]))
    return m.top_k(min(k, m.k or 0)).indices.long()


def _top_scores(m: SimsMatrix, idx: torch.Tensor) -> torch.Tensor:
    if m.is_dense:
        return m.scores.gather(1, idx)
    return m.top_k(idx.shape[1]).values


def _select_queries(query_ids: Sequence[str], disagree: np.ndarray, max_queries: int | None) -> list[int]:
    """Row positions to show: all, or up to `max_queries` giving priority to disagreements, in ground-truth order.

    Disagreements are where models differ and so what a reader of the report most wants to see; the rest are filled
    in evenly spread over the ground-truth order so both behaviours and all scenes stay represented.
    """
    n = len(query_ids)
    if max_queries is None or max_queries >= n:
        return list(range(n))
    hot = np.flatnonzero(disagree)
    if len(hot) >= max_queries:
        chosen = hot[np.linspace(0, len(hot) - 1, max_queries).round().astype(int)]
    else:
        cold = np.flatnonzero(~disagree)
        need = max_queries - len(hot)
        chosen = np.concatenate([hot, cold[np.linspace(0, len(cold) - 1, need).round().astype(int)]]) if need else hot
    return sorted(set(int(i) for i in chosen))


def _write_thumbnail(src: Path, dst: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail(THUMB_BOX)
            im.save(dst, format="JPEG", quality=82)
    except (UnidentifiedImageError, OSError) as e:
        raise TpasInputError(f"cannot be read as an image ({e})", src) from None


# ------------------------------------------------------------------------------------------------- the report
@dataclass
class _Page:
    """Everything the page shows: the models, their metrics and top hits, and which queries to show."""

    names: list[str]
    ensembles: set[str]
    sources: dict[str, str]
    metrics: pd.DataFrame
    frame: pd.DataFrame
    qids: list[str]
    shown: list[int]
    gallery_ids: list[str]
    gt_cols: np.ndarray
    tops: dict[str, torch.Tensor]
    top_scores: dict[str, torch.Tensor]
    ranks: dict[str, np.ndarray]
    disagree: np.ndarray
    identities: dict[str, str]
    identity_source: str | None
    assets_name: str
    plot_files: dict[str, str] = field(default_factory=dict)

    def needed_columns(self) -> list[int]:
        """Gallery columns to make thumbnails of: each shown query's relevant image and every model's top hits."""
        needed: dict[int, None] = {}
        for r in self.shown:
            needed[int(self.gt_cols[r])] = None
            for n in self.names:
                for c in self.tops[n][r].tolist():
                    needed[int(c)] = None
        return list(needed)


def build_report(
    models: Mapping[str, SimsMatrix],
    gt: GroundTruth,
    images_dir: str | Path,
    out: str | Path,
    *,
    trials: pd.DataFrame | None = None,
    objective: str | None = None,
    max_queries: int | None = None,
    top_k: int = 5,
    progress: Progress | None = None,
) -> Report:
    """Write the HTML report for `models` ({display name: matrix}) scored against `gt`; returns what it wrote.

    Every matrix must cover every ground-truth query (extra rows are ignored) and the same gallery ids; gallery
    images are looked up in `images_dir` by id (file stem). `trials` (a tuning trials table, `tpas tune`'s CSV)
    adds the tuning-surface plot. Metrics cover every ground-truth query; the page shows at most `max_queries`.
    """
    from ..data.pab import list_gallery

    if not models:
        raise TpasInputError("no similarity matrix given; pass one or more SIMS files")
    if max_queries is not None and max_queries < 1:
        raise TpasInputError(f"--max-queries must be at least 1, got {max_queries}")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise TpasInputError("the report is an HTML page; give a path ending in .html", out)
    tick = progress or (lambda stage, done, total: None)
    page = _plan_page(models, gt, top_k, max_queries, f"{out.stem}_files", tick)
    gallery = {g.id: g.path for g in list_gallery(images_dir)}
    needed = page.needed_columns()
    absent = next((page.gallery_ids[c] for c in needed if page.gallery_ids[c] not in gallery), None)
    if absent is not None:
        raise TpasInputError(
            f"gallery image {absent!r} (a ground truth or top-{top_k} hit) is not in this folder", Path(images_dir)
        )

    def write_assets(folder: Path) -> None:
        _write_assets(folder, page, needed, gallery, trials, objective, tick)

    assets = _write_staged(out, page, write_assets)
    return Report(
        path=out,
        assets=assets,
        models=page.names,
        metrics=page.metrics,
        n_queries=len(page.qids),
        n_shown=len(page.shown),
        n_disagree=int(page.disagree.sum()),
        n_thumbnails=len(needed),
        plots={k: assets / "plots" / v for k, v in page.plot_files.items()},
        identity_source=page.identity_source,
    )


def _aligned(models: Mapping[str, SimsMatrix], gt: GroundTruth) -> tuple[dict[str, SimsMatrix], np.ndarray]:
    """Every matrix with exactly the ground-truth rows (in their order) and the first one's gallery order, and each
    query's relevant column in that order (the ground-truth join of `tpas evaluate`)."""
    first = next(iter(models.values()))
    aligned: dict[str, SimsMatrix] = {}
    gt_cols = np.zeros(0, dtype=np.int64)
    for name, m in models.items():
        try:
            rel = join_ground_truth(gt, m.query_ids, m.gallery_ids)
        except TpasInputError as e:
            raise TpasInputError(f"{name}: {e.message}", e.path, e.where) from None
        if m is first:
            gt_cols = rel.cols[:, 0].numpy()
        aligned[name] = m.select(list(gt.query_ids)).align(gallery_ids=first.gallery_ids)
    return aligned, gt_cols


def _plan_page(
    models: Mapping[str, SimsMatrix],
    gt: GroundTruth,
    top_k: int,
    max_queries: int | None,
    assets_name: str,
    tick: Progress,
) -> _Page:
    """Score every model (through `tpas evaluate`), find each one's top hits and choose the queries to show."""
    from . import evaluate, metrics_from_ranks

    names, qids = list(models), list(gt.query_ids)
    aligned, gt_cols = _aligned(models, gt)
    ranks: dict[str, np.ndarray] = {}
    overall: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        tick("scoring", i, len(names))
        ev = evaluate(aligned[name], gt)
        pq = ev.per_query.set_index("query_id") if "query_id" in ev.per_query.columns else ev.per_query
        ranks[name] = pq.loc[qids, "rank"].to_numpy().copy()
        overall[name] = {k: float(v) for k, v in metrics_from_ranks(torch.as_tensor(ranks[name])).items()}
    tick("scoring", len(names), len(names))
    metrics = pd.DataFrame({k: [overall[n].get(k, np.nan) for n in names] for k in METRICS}, index=names)
    tops = {n: _top_indices(aligned[n], top_k) for n in names}
    top1 = np.stack([tops[n][:, 0].numpy() for n in names])  # [models, Q]
    disagree = (top1 != top1[:1]).any(axis=0)
    identities, identity_source = identity_map(gt)
    return _Page(
        names=names,
        ensembles={n for n in names if _is_ensemble(n, models[n])},
        sources={n: models[n].source for n in names},
        metrics=metrics,
        frame=gt.frame,
        qids=qids,
        shown=_select_queries(qids, disagree, max_queries),
        gallery_ids=list(aligned[names[0]].gallery_ids),
        gt_cols=gt_cols,
        tops=tops,
        top_scores={n: _top_scores(aligned[n], tops[n]) for n in names},
        ranks=ranks,
        disagree=disagree,
        identities=identities,
        identity_source=identity_source,
        assets_name=assets_name,
    )


def _write_staged(out: Path, page: _Page, write_assets: Callable[[Path], None]) -> Path:
    """Build the page and its assets folder in a temporary folder beside `out`, then move both into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        assets = tmp / page.assets_name
        write_assets(assets)
        (tmp / out.name).write_text(_render(page), encoding="utf-8")
        final_assets = out.parent / page.assets_name
        if final_assets.exists():
            final_assets.rename(tmp / "previous")  # removed with tmp below
        os.replace(assets, final_assets)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final_assets


def _write_assets(
    assets: Path,
    page: _Page,
    needed: Sequence[int],
    gallery: Mapping[str, Path],
    trials: pd.DataFrame | None,
    objective: str | None,
    tick: Progress,
) -> None:
    """Thumbnails of the `needed` gallery columns and the summary plots (recorded in `page.plot_files`)."""
    from . import metrics_from_ranks, plots

    (assets / "thumbs").mkdir(parents=True)
    (assets / "plots").mkdir()
    for j, c in enumerate(needed):
        if j % 50 == 0:
            tick("thumbnails", j, len(needed))
        _write_thumbnail(gallery[page.gallery_ids[c]], assets / "thumbs" / f"{c}.jpg")
    tick("thumbnails", len(needed), len(needed))
    tick("plots", 0, 1)
    plots.plot_recall_curves(page.ranks, assets / "plots" / "recall_at_k.png", max_k=min(20, len(page.gallery_ids)))
    page.plot_files["Recall at K"] = "recall_at_k.png"
    for col, title in (("behaviour", "normal / anomaly"), ("scene", "scene"), ("action", "action")):
        table = _breakdown(page.frame, page.qids, page.ranks, col, metrics_from_ranks)
        if table is None:
            continue
        fname = f"breakdown_{_safe_name(col)}.png"
        panels = {m: pd.DataFrame({n: table[(n, m)] for n in page.names}) for m in ("R@1", "mAP")}
        plots.plot_breakdown(panels, assets / "plots" / fname, title=title, counts=table[("n", "")])
        page.plot_files[f"By {title}"] = fname
    if trials is not None:
        plots.plot_tuning_surface(trials, assets / "plots" / "tuning_surface.png", objective=objective)
        page.plot_files["Ensemble tuning surface"] = "tuning_surface.png"
    tick("plots", 1, 1)


def _breakdown(
    frame: pd.DataFrame,
    qids: Sequence[str],
    ranks: Mapping[str, np.ndarray],
    column: str,
    metrics_from_ranks: Callable,
) -> pd.DataFrame | None:
    """Per-group metrics of every model for one annotation column; None when the column is absent or constant."""
    if column not in frame.columns:
        return None
    groups = frame.loc[list(qids), column].astype(str).to_numpy()
    labels = [g for g in pd.unique(groups) if g not in ("", "nan", "None")]
    if len(labels) < 2:
        return None
    # Many scenes: keep the 12 largest groups so the bar chart stays readable.
    labels = sorted(labels, key=lambda g: (-(groups == g).sum(), g))[:12]
    rows = {}
    for g in labels:
        mask = groups == g
        row = {("n", ""): int(mask.sum())}
        for name, r in ranks.items():
            vals = metrics_from_ranks(torch.as_tensor(r[mask]))
            row.update({(name, k): float(v) for k, v in vals.items()})
        rows[g] = row
    return pd.DataFrame.from_dict(rows, orient="index")


# ------------------------------------------------------------------------------------------------- the page
_TEMPLATE = "report.html"  # in tpas/scoring/templates/: the page with its CSS and JS; string.Template $fields
_BEST, _DISAGREE = " class='best'", " <span class='tag dis'>models disagree</span>"


def _render(page: _Page) -> str:
    """The HTML page: the template filled with the summary table, the plots and one card per shown query."""
    esc = html.escape
    if page.identity_source is None:
        ident_note = (
            "The annotation carries no identity information, so no blue frames can be drawn "
            "(a wrong image is red even when it shows the right person)."
        )
    else:
        ident_note = f"Identities from the annotation's <code>{esc(page.identity_source)}</code> field."
    figures = "".join(
        f"<figure><img class='plot' src='{page.assets_name}/plots/{esc(f)}' alt='{esc(t)}'><figcaption>{esc(t)}"
        f"</figcaption></figure>"
        for t, f in page.plot_files.items()
    )
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = json.dumps({"models": page.names, "queries": len(page.qids), "shown": len(page.shown)})
    template = string.Template((resources.files(__package__) / "templates" / _TEMPLATE).read_text("utf-8"))
    return template.substitute(
        info=esc(info),
        n_models=len(page.names),
        n_queries=len(page.qids),
        n_shown=len(page.shown),
        n_disagree=int(page.disagree.sum()),
        summary=_summary_table(page),
        figures=figures,
        ident_note=ident_note,
        cards="\n".join(_query_card(page, r) for r in page.shown),
        created=esc(created),
        version=esc(__version__),
    )


def _summary_table(page: _Page) -> str:
    """Metrics per model, the best value of each metric in bold."""
    esc, metrics = html.escape, page.metrics
    best = {m: metrics[m].max() for m in METRICS}
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    body = []
    for n in page.names:
        tag = ' <span class="tag">ensemble</span>' if n in page.ensembles else ""
        cells = "".join(
            f"<td{_BEST if metrics.loc[n, m] == best[m] else ''}>{metrics.loc[n, m]:.2f}</td>" for m in METRICS
        )
        body.append(f"<tr><th>{esc(n)}{tag}</th><td>{esc(page.sources[n] or '')}</td>{cells}</tr>")
    return f"<table class='metrics'><tr><th>model</th><th>source</th>{head}</tr>{''.join(body)}</table>"


def _thumb(page: _Page, col: int) -> str:
    return f"{page.assets_name}/thumbs/{int(col)}.jpg"


def _query_card(page: _Page, r: int) -> str:
    """One query: caption, attributes, its relevant image and one line of top hits per model."""
    esc = html.escape
    q = page.qids[r]
    row = page.frame.loc[q]
    behaviour = str(row.get("behaviour", "") or "")
    gt_c = int(page.gt_cols[r])
    gt_id = page.gallery_ids[gt_c]
    attrs = [f"<span class='tag {esc(behaviour)}'>{esc(behaviour)}</span>"] if behaviour else []
    for col in ("action", "scene"):
        v = row.get(col, "")
        if isinstance(v, str) and v:
            attrs.append(f"<span class='attr'>{col}: {esc(v)}</span>")
    lines = "".join(_model_line(page, n, r, gt_c) for n in page.names)
    return (
        f"<section class='query' data-behaviour='{esc(behaviour or 'unknown')}' "
        f"data-disagree='{'1' if page.disagree[r] else '0'}' id='q-{r}'>"
        f"<div class='qhead'><code>{esc(q)}</code> {' '.join(attrs)}"
        f"{_DISAGREE if page.disagree[r] else ''}</div>"
        f"<p class='caption'>{esc(str(row.get('caption', '')))}</p>"
        f"<div class='body'><div class='gt'><div class='hit correct'><img src='{_thumb(page, gt_c)}' "
        f"alt='{esc(gt_id)}' data-gallery-id='{esc(gt_id)}'></div><span>relevant image<br><code>{esc(gt_id)}</code>"
        f"</span></div><div class='lines'>{lines}</div></div></section>"
    )


def _model_line(page: _Page, n: str, r: int, gt_c: int) -> str:
    """One model's top hits for query row `r`, framed correct / same identity / wrong."""
    esc = html.escape
    gt_identity = page.identities.get(page.gallery_ids[gt_c])
    items = []
    for j, (c, s) in enumerate(zip(page.tops[n][r].tolist(), page.top_scores[n][r].tolist(), strict=True)):
        gid = page.gallery_ids[c]
        if c == gt_c:
            kind = CORRECT
        elif gt_identity is not None and page.identities.get(gid) == gt_identity:
            kind = SAME_IDENTITY
        else:
            kind = WRONG
        items.append(
            f"<div class='hit {kind}' title='{esc(gid)} (score {s:.4f})'><img src='{_thumb(page, c)}' "
            f"alt='{esc(gid)}' data-gallery-id='{esc(gid)}'><span class='pos'>{j + 1}</span></div>"
        )
    kind_tag = "<br><span class='ensemble'>ensemble</span>" if n in page.ensembles and "ensemble" not in n else ""
    return (
        f"<div class='line' data-model='{esc(n)}'><div class='who'><b>{esc(n)}</b>{kind_tag}"
        f"<br>relevant at rank {int(page.ranks[n][r])}</div>{''.join(items)}</div>"
    )
