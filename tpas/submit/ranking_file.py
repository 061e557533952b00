"""Write the leaderboard ranking file: one line per query in `query_index.txt` order, its k best gallery ids.

The order is the tpas rule (stable descending: equal scores keep gallery order), the same one `tpas evaluate` scores,
so the metrics reported for a matrix are what its file scores.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import TpasInputError
from ..io import atomic_write
from ..ranking import topk_stable
from ..sims import SimsMatrix, _first_difference

ANSWER_NAME = "answer.txt"
"""Name of the ranking file inside a submission zip (what CodaLab-style servers expect)."""

# Rows per topk call: large enough that per-call overhead vanishes, small enough that one chunk's copy (when rows must
# be gathered into query_index order) stays a few MB instead of the whole matrix.
_TOPK_ROWS = 256


def check_ids(
    sims: SimsMatrix,
    query_ids: Sequence[str],
    gallery_ids: Sequence[str] | None = None,
    query_source: str | Path | None = None,
    gallery_source: str | Path | None = None,
) -> None:
    """Check that the matrix rows are exactly `query_ids` and (when given) its columns exactly `gallery_ids`.

    TpasInputError names the first missing/extra ids and how many there are.
    """
    rows = set(sims.query_ids)
    missing = [q for q in query_ids if q not in rows]
    if missing:
        raise TpasInputError(
            f"{len(missing)} of {len(query_ids)} query ids have no row in the matrix, first {missing[0]!r} "
            f"(line {list(query_ids).index(missing[0]) + 1}); matrix rows look like {sims.query_ids[:2]}",
            query_source,
        )
    if len(rows) != len(query_ids):
        wanted = set(query_ids)
        extra = [q for q in sims.query_ids if q not in wanted]
        raise TpasInputError(
            f"the matrix has {len(extra)} rows that are not in the query index, first {extra[0]!r}", query_source
        )
    if gallery_ids is not None and (
        len(gallery_ids) != len(sims.gallery_ids) or set(gallery_ids) != set(sims.gallery_ids)
    ):
        raise TpasInputError(
            f"matrix gallery ({len(sims.gallery_ids)} ids) does not match the gallery ({len(gallery_ids)} ids): "
            f"{_first_difference(sims.gallery_ids, gallery_ids)}",
            gallery_source,
        )


def top_gallery_ids(
    sims: SimsMatrix,
    query_ids: Sequence[str],
    k: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """The k best gallery ids of each query in `query_ids` order, under the stable tie rule.

    Dense matrices go through `topk_stable` in row chunks (no full sort, no copy of the matrix). Top-K matrices rank
    their kept cells (ties in gallery order) and need at least k of them.
    """
    g = len(sims.gallery_ids)
    if g < k:
        raise TpasInputError(f"the gallery has {g} images; a ranking line needs {k} distinct ids")
    row_of = {q: i for i, q in enumerate(sims.query_ids)}
    rows = torch.tensor([row_of[q] for q in query_ids], dtype=torch.long)
    in_order = len(rows) == len(sims.query_ids) and bool((rows == torch.arange(len(rows))).all())
    gallery = sims.gallery_ids
    out: list[list[str]] = []
    for r0 in range(0, len(rows), _TOPK_ROWS):
        r1 = min(len(rows), r0 + _TOPK_ROWS)
        if sims.is_dense:
            chunk = sims.scores[r0:r1] if in_order else sims.scores.index_select(0, rows[r0:r1])
            cols = topk_stable(chunk, k)
        else:
            if (sims.k or 0) < k:
                raise TpasInputError(f"the matrix keeps only {sims.k} cells per query; a ranking line needs {k}")
            idx, val = sims.indices.index_select(0, rows[r0:r1]).long(), sims.values.index_select(0, rows[r0:r1])
            # Slots in gallery-column order first, so topk_stable's tie rule (lower slot first) is gallery order.
            idx, order = idx.sort(dim=1)
            cols = idx.gather(1, topk_stable(val.gather(1, order), k))
        out.extend([gallery[c] for c in row] for row in cols.tolist())
        if progress is not None:
            progress(r1, len(rows))
    return out


def write_ranking_file(
    sims: SimsMatrix,
    query_ids: Sequence[str],
    out: str | Path,
    *,
    k: int = 10,
    gallery_ids: Sequence[str] | None = None,
    make_zip: bool = False,
    query_source: str | Path | None = None,
    gallery_source: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write the ranking file (LF line ends, single spaces, final newline) atomically; returns the paths written.

    Args:
        sims: the matrix; its rows must be exactly `query_ids`.
        query_ids: the query index (`read_query_index`), whose order the lines follow.
        out: path of the text file; when it ends in `.zip`, only a zip holding `answer.txt` is written.
        gallery_ids: when given, the matrix columns must be exactly these ids (e.g. the gallery folder's stems).
        make_zip: also write `<out stem>.zip` holding the file as `answer.txt`.
    """
    check_ids(sims, query_ids, gallery_ids, query_source, gallery_source)
    lines = top_gallery_ids(sims, query_ids, k, progress)
    data = "".join(" ".join(ids) + "\n" for ids in lines).encode("utf-8")
    out = Path(out)
    written = []
    if out.suffix.lower() != ".zip":
        written.append(atomic_write(out, lambda tmp: tmp.write_bytes(data)))
    if make_zip or out.suffix.lower() == ".zip":
        zpath = out if out.suffix.lower() == ".zip" else out.with_suffix(".zip")

        def write_zip(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                z.writestr(ANSWER_NAME, data)

        written.append(atomic_write(zpath, write_zip))
    return written
