"""`tpas report`: a static HTML page showing what each model (and the ensemble) retrieves, query by query.

Like the qualitative figures of the CMP paper, each query shows its caption and every model's top-5 gallery images as
thumbnails framed green (the relevant image), blue (the same identity in the other action: right person, wrong
behaviour) or red (wrong). Plain-JS filters select normal/anomaly queries and queries whose models disagree on the
top-1. Summary plots (R@K curves, breakdowns by normal/anomaly and scene, the ensemble tuning surface) are PNGs.

The page needs no server and no network: everything it references lives beside it, under relative paths
(`<page stem>_files/thumbs/*.jpg`, `<page stem>_files/plots/*.png`). The page and its folder are built in a temporary
folder and moved into place at the end, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..errors import TpasInputError
from ..sims import SimsMatrix

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
    from ..scoring import evaluate, metrics_from_ranks
    from . import plots

    if not models:
        raise TpasInputError("no similarity matrix given; pass one or more SIMS files")
    if max_queries is not None and max_queries < 1:
        raise TpasInputError(f"--max-queries must be at least 1, got {max_queries}")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise TpasInputError("the report is an HTML page; give a path ending in .html", out)
    tick = progress or (lambda stage, done, total: None)
    names = list(models)
    qids = list(gt.query_ids)

    # Rows: exactly the ground-truth queries, in ground-truth order; columns: the first matrix's gallery order.
    first = models[names[0]]
    aligned: dict[str, SimsMatrix] = {}
    for name in names:
        m = models[name]
        have = set(m.query_ids)
        missing = next((q for q in qids if q not in have), None)
        if missing is not None:
            raise TpasInputError(f"{name}: ground-truth query {missing!r} has no row in this matrix")
        aligned[name] = m.select(qids).align(gallery_ids=first.gallery_ids)
    gallery_ids = first.gallery_ids
    g_pos = {g: i for i, g in enumerate(gallery_ids)}
    missing_gt = next((g for g in gt.relevant.values() if g not in g_pos), None)
    if missing_gt is not None:
        raise TpasInputError(f"ground-truth image {missing_gt!r} is not in the matrices' gallery")
    gt_cols = np.array([g_pos[gt.relevant[q]] for q in qids])

    # Metrics through the same code path as `tpas evaluate`.
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
    top_scores = {n: _top_scores(aligned[n], tops[n]) for n in names}
    top1 = np.stack([tops[n][:, 0].numpy() for n in names])  # [models, Q]
    disagree = (top1 != top1[:1]).any(axis=0)
    shown = _select_queries(qids, disagree, max_queries)

    identities, identity_source = identity_map(gt)
    frame = gt.frame

    gallery = {g.id: g.path for g in list_gallery(images_dir)}
    needed: dict[int, None] = {}
    for r in shown:
        needed[int(gt_cols[r])] = None
        for n in names:
            for c in tops[n][r].tolist():
                needed[int(c)] = None
    absent = next((gallery_ids[c] for c in needed if gallery_ids[c] not in gallery), None)
    if absent is not None:
        raise TpasInputError(
            f"gallery image {absent!r} (a ground truth or top-{top_k} hit) is not in this folder", Path(images_dir)
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    assets_name = f"{out.stem}_files"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        assets = tmp / assets_name
        (assets / "thumbs").mkdir(parents=True)
        (assets / "plots").mkdir()
        for j, c in enumerate(needed):
            if j % 50 == 0:
                tick("thumbnails", j, len(needed))
            _write_thumbnail(gallery[gallery_ids[c]], assets / "thumbs" / f"{c}.jpg")
        tick("thumbnails", len(needed), len(needed))

        plot_files: dict[str, str] = {}
        tick("plots", 0, 1)
        plots.plot_recall_curves(ranks, assets / "plots" / "recall_at_k.png", max_k=min(20, len(gallery_ids)))
        plot_files["Recall at K"] = "recall_at_k.png"
        for col, title in (("behaviour", "normal / anomaly"), ("scene", "scene"), ("action", "action")):
            table = _breakdown(frame, qids, ranks, col, metrics_from_ranks)
            if table is None:
                continue
            fname = f"breakdown_{_safe_name(col)}.png"
            panels = {m: pd.DataFrame({n: table[(n, m)] for n in names}) for m in ("R@1", "mAP")}
            plots.plot_breakdown(panels, assets / "plots" / fname, title=title, counts=table[("n", "")])
            plot_files[f"By {title}"] = fname
        if trials is not None:
            plots.plot_tuning_surface(trials, assets / "plots" / "tuning_surface.png", objective=objective)
            plot_files["Ensemble tuning surface"] = "tuning_surface.png"
        tick("plots", 1, 1)

        page = _render(
            names=names,
            ensembles={n for n in names if _is_ensemble(n, models[n])},
            sources={n: models[n].source for n in names},
            metrics=metrics,
            frame=frame,
            qids=qids,
            shown=shown,
            gallery_ids=gallery_ids,
            gt_cols=gt_cols,
            tops=tops,
            top_scores=top_scores,
            ranks=ranks,
            disagree=disagree,
            identities=identities,
            identity_source=identity_source,
            assets_name=assets_name,
            plot_files=plot_files,
        )
        (tmp / out.name).write_text(page, encoding="utf-8")

        final_assets = out.parent / assets_name
        if final_assets.exists():
            final_assets.rename(tmp / "previous")  # removed with tmp below
        os.replace(assets, final_assets)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return Report(
        path=out,
        assets=final_assets,
        models=names,
        metrics=metrics,
        n_queries=len(qids),
        n_shown=len(shown),
        n_disagree=int(disagree.sum()),
        n_thumbnails=len(needed),
        plots={k: final_assets / "plots" / v for k, v in plot_files.items()},
        identity_source=identity_source,
    )


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


def _render(
    *,
    names: list[str],
    ensembles: set[str],
    sources: Mapping[str, str],
    metrics: pd.DataFrame,
    frame: pd.DataFrame,
    qids: Sequence[str],
    shown: Sequence[int],
    gallery_ids: Sequence[str],
    gt_cols: np.ndarray,
    tops: Mapping[str, torch.Tensor],
    top_scores: Mapping[str, torch.Tensor],
    ranks: Mapping[str, np.ndarray],
    disagree: np.ndarray,
    identities: Mapping[str, str],
    identity_source: str | None,
    assets_name: str,
    plot_files: Mapping[str, str],
) -> str:
    esc = html.escape
    BEST, DISAGREE = " class='best'", " <span class='tag dis'>models disagree</span>"
    thumb = lambda c: f"{assets_name}/thumbs/{int(c)}.jpg"  # noqa: E731 - tiny local formatter

    # Summary table: best value per metric in bold.
    best = {m: metrics[m].max() for m in METRICS}
    head = "".join(f"<th>{m}</th>" for m in METRICS)
    body = []
    for n in names:
        tag = ' <span class="tag">ensemble</span>' if n in ensembles else ""
        cells = "".join(
            f"<td{BEST if metrics.loc[n, m] == best[m] else ''}>{metrics.loc[n, m]:.2f}</td>" for m in METRICS
        )
        body.append(f"<tr><th>{esc(n)}{tag}</th><td>{esc(sources[n] or '')}</td>{cells}</tr>")
    summary = f"<table class='metrics'><tr><th>model</th><th>source</th>{head}</tr>{''.join(body)}</table>"

    figs = "".join(
        f"<figure><img class='plot' src='{assets_name}/plots/{esc(f)}' alt='{esc(t)}'><figcaption>{esc(t)}"
        f"</figcaption></figure>"
        for t, f in plot_files.items()
    )

    if identity_source is None:
        ident_note = (
            "The annotation carries no identity information, so no blue frames can be drawn "
            "(a wrong image is red even when it shows the right person)."
        )
    else:
        ident_note = f"Identities from the annotation's <code>{esc(identity_source)}</code> field."

    cards = []
    for r in shown:
        q = qids[r]
        row = frame.loc[q]
        behaviour = str(row.get("behaviour", "") or "")
        gt_c = int(gt_cols[r])
        gt_id = gallery_ids[gt_c]
        gt_identity = identities.get(gt_id)
        attrs = [f"<span class='tag {esc(behaviour)}'>{esc(behaviour)}</span>"] if behaviour else []
        for col in ("action", "scene"):
            v = row.get(col, "")
            if isinstance(v, str) and v:
                attrs.append(f"<span class='attr'>{col}: {esc(v)}</span>")
        lines = []
        for n in names:
            items = []
            for j, (c, s) in enumerate(zip(tops[n][r].tolist(), top_scores[n][r].tolist(), strict=True)):
                gid = gallery_ids[c]
                if c == gt_c:
                    kind = CORRECT
                elif gt_identity is not None and identities.get(gid) == gt_identity:
                    kind = SAME_IDENTITY
                else:
                    kind = WRONG
                items.append(
                    f"<div class='hit {kind}' title='{esc(gid)} (score {s:.4f})'><img src='{thumb(c)}' "
                    f"alt='{esc(gid)}' data-gallery-id='{esc(gid)}'><span class='pos'>{j + 1}</span></div>"
                )
            rank = int(ranks[n][r])
            kind_tag = "<br><span class='ensemble'>ensemble</span>" if n in ensembles and "ensemble" not in n else ""
            lines.append(
                f"<div class='line' data-model='{esc(n)}'><div class='who'><b>{esc(n)}</b>{kind_tag}"
                f"<br>relevant at rank {rank}</div>{''.join(items)}</div>"
            )
        cards.append(
            f"<section class='query' data-behaviour='{esc(behaviour or 'unknown')}' "
            f"data-disagree='{'1' if disagree[r] else '0'}' id='q-{r}'>"
            f"<div class='qhead'><code>{esc(q)}</code> {' '.join(attrs)}"
            f"{DISAGREE if disagree[r] else ''}</div>"
            f"<p class='caption'>{esc(str(row.get('caption', '')))}</p>"
            f"<div class='body'><div class='gt'><div class='hit correct'><img src='{thumb(gt_c)}' alt='{esc(gt_id)}' "
            f"data-gallery-id='{esc(gt_id)}'></div><span>relevant image<br><code>{esc(gt_id)}</code></span></div>"
            f"<div class='lines'>{''.join(lines)}</div></div></section>"
        )

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = json.dumps({"models": names, "queries": len(qids), "shown": len(shown)})
    return _PAGE.format(
        css=_CSS,
        js=_JS,
        info=esc(info),
        n_models=len(names),
        n_queries=len(qids),
        n_shown=len(shown),
        n_disagree=int(disagree.sum()),
        summary=summary,
        figures=figs,
        ident_note=ident_note,
        cards="\n".join(cards),
        created=esc(created),
        version=esc(__version__),
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1400px;padding:12px 20px;
color:#222;background:#fafafa}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin-top:1.4em}
table.metrics{border-collapse:collapse;font-size:.9em}table.metrics td,table.metrics th{border:1px solid #ccc;
padding:3px 8px;text-align:right}table.metrics th:first-child{text-align:left}td.best{font-weight:bold;
background:#e8f5e9}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plots figure{margin:0;background:#fff;border:1px solid #ddd;padding:4px}
img.plot{max-width:640px;max-height:380px}figcaption{font-size:.8em;color:#555;text-align:center}
.legend span{display:inline-block;padding:1px 8px;margin-right:8px;border:4px solid}
.filters{position:sticky;top:0;background:#fafafa;padding:8px 0;border-bottom:1px solid #ddd;z-index:2}
.filters label{margin-right:14px}
#broken{display:none;background:#ffebee;color:#b71c1c;padding:6px;border:1px solid #e57373}
section.query{background:#fff;border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px 10px}
section.query.hidden{display:none}
.qhead{font-size:.85em;color:#555}.caption{margin:.3em 0 .5em 0}
.tag{font-size:.8em;padding:1px 6px;border-radius:8px;background:#eee}.tag.anomaly{background:#ffe0b2}
.tag.normal{background:#e1f5fe}.tag.dis{background:#f3e5f5}.attr{font-size:.8em;margin-left:6px;color:#666}
.body{display:flex;gap:14px;align-items:flex-start}.gt{text-align:center;font-size:.75em;color:#555;width:120px}
.gt span{display:block}
.line{display:flex;align-items:center;gap:6px;margin-bottom:4px}.who{width:150px;font-size:.8em;color:#444}
.who .ensemble{color:#6a1b9a;font-weight:bold}
.hit{position:relative;display:inline-block;border:5px solid #999;line-height:0;background:#fff}
.hit img{height:110px;width:auto;display:block}
.hit.correct{border-color:#1ea01e}.hit.same-identity{border-color:#1565c0}.hit.wrong{border-color:#d32f2f}
.pos{position:absolute;left:0;top:0;background:rgba(0,0,0,.55);color:#fff;font-size:11px;line-height:14px;
padding:0 3px}
footer{font-size:.75em;color:#888;margin:20px 0}
"""

_JS = """
(function(){
  // Filter state lives in the URL fragment (#behaviour=anomaly&disagree=1) so a filtered view can be linked to.
  function fromHash(){
    var p=new URLSearchParams(location.hash.slice(1));
    var b=document.querySelector('input[name=behaviour][value="'+(p.get('behaviour')||'all')+'"]');
    if(b){b.checked=true;}
    document.getElementById('only-disagree').checked=p.get('disagree')==='1';
  }
  function apply(){
    var b=document.querySelector('input[name=behaviour]:checked').value;
    var d=document.getElementById('only-disagree').checked;
    var n=0;
    document.querySelectorAll('section.query').forEach(function(s){
      var ok=(b==='all'||s.dataset.behaviour===b)&&(!d||s.dataset.disagree==='1');
      s.classList.toggle('hidden',!ok); if(ok){n++;}
    });
    document.getElementById('count').textContent=n;
    return [b,d];
  }
  document.querySelectorAll('.filters input').forEach(function(i){i.addEventListener('change',function(){
    var s=apply(); history.replaceState(null,'','#behaviour='+s[0]+(s[1]?'&disagree=1':''));
  });});
  fromHash(); apply();
  // Once everything has loaded, record how many images rendered; a warning appears when any thumbnail is missing.
  window.addEventListener('load',function(){
    var imgs=document.querySelectorAll('img'), ok=0, bad=[];
    imgs.forEach(function(i){ if(i.complete&&i.naturalWidth>0){ok++;} else {bad.push(i.getAttribute('src'));} });
    document.body.dataset.imagesTotal=imgs.length; document.body.dataset.imagesLoaded=ok;
    if(bad.length){var w=document.getElementById('broken');
      w.textContent=bad.length+' image(s) failed to load, e.g. '+bad[0]; w.style.display='block';}
  });
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tpas report</title>
<meta name="tpas-report" content="{info}">
<style>{css}</style></head>
<body>
<h1>tpas retrieval report</h1>
<p>{n_models} matrices scored on {n_queries} queries; {n_shown} shown below; the models disagree on the top-1 of
{n_disagree}.</p>
<div id="broken"></div>
<h2>Metrics (%, all {n_queries} queries)</h2>
{summary}
<h2>Summary plots</h2>
<div class="plots">{figures}</div>
<h2>Top-5 per query</h2>
<p class="legend"><span style="border-color:#1ea01e">correct</span><span style="border-color:#1565c0">same person,
other behaviour</span><span style="border-color:#d32f2f">wrong</span> {ident_note}</p>
<div class="filters">
<label><input type="radio" name="behaviour" value="all" checked> all</label>
<label><input type="radio" name="behaviour" value="normal"> normal</label>
<label><input type="radio" name="behaviour" value="anomaly"> anomaly</label>
<label><input type="checkbox" id="only-disagree"> only queries where models disagree on the top-1</label>
<span><b id="count">{n_shown}</b> queries shown</span>
</div>
{cards}
<footer>Generated by tpas {version} at {created}. Static page: thumbnails and plots live in the folder beside it.
</footer>
<script>{js}</script>
</body></html>
"""
