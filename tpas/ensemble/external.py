"""External scores as fusion inputs: TREC run files and `query_id,gallery_id,score` CSV files.

Both are top-K lists (e.g. a VLM re-ranker's scores for each query's candidates); they are read into a top-K
SimsMatrix over the reference query and gallery ids of the fusion. Rows that list fewer cells than the longest row
are padded with unlisted gallery columns at that row's minimum score, which is exactly the `row-min` fill rule.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import torch

from ..errors import TpasInputError
from ..sims import SimsMatrix

RUN_FORMATS = ("trec", "csv")


def detect_format(path: str | Path) -> str:
    """`csv` for a .csv file, `trec` for .run/.trec/.txt; SimsMatrix files (.pt) are not run files."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".run", ".trec", ".txt", ".tsv"):
        return "trec"
    raise TpasInputError("cannot tell the run format from the suffix; set `format: trec` or `format: csv`", path)


def _parse_score(text: str, path: Path, line: int) -> float:
    try:
        v = float(text)
    except ValueError:
        raise TpasInputError(f"score {text!r} is not a number", path, f"line {line}") from None
    if not math.isfinite(v):
        raise TpasInputError(f"score {text!r} is not finite", path, f"line {line}")
    return v


def _records_trec(path: Path, f: TextIO) -> Iterator[tuple[int, str, str, float]]:
    for n, raw in enumerate(f, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 6:
            raise TpasInputError(
                f"expected 6 fields `qid Q0 docid rank score tag`, found {len(parts)}", path, f"line {n}"
            )
        yield n, parts[0], parts[2], _parse_score(parts[4], path, n)


def _records_csv(path: Path, f: TextIO) -> Iterator[tuple[int, str, str, float]]:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise TpasInputError("empty CSV; expected a header `query_id,gallery_id,score`", path)
    cols = [h.strip() for h in header]
    need = ("query_id", "gallery_id", "score")
    missing = [c for c in need if c not in cols]
    if missing:
        raise TpasInputError(f"CSV header lacks {', '.join(missing)}; expected `query_id,gallery_id,score`", path)
    qi, gi, si = (cols.index(c) for c in need)
    for n, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(cols):
            raise TpasInputError(f"expected {len(cols)} fields, found {len(row)}", path, f"line {n}")
        yield n, row[qi].strip(), row[gi].strip(), _parse_score(row[si].strip(), path, n)


def _records(path: Path, fmt: str) -> Iterator[tuple[int, str, str, float]]:
    """(line, query id, gallery id, score) of a run file, streamed; bytes that are not UTF-8, or a CSV the csv
    module rejects (a NUL byte, an over-long field), become TpasInputError naming the line reached."""
    n = 0
    try:
        with path.open(encoding="utf-8", newline="" if fmt == "csv" else None) as f:
            for n, qid, gid, score in (_records_csv if fmt == "csv" else _records_trec)(path, f):
                yield n, qid, gid, score
    except UnicodeDecodeError as e:
        raise TpasInputError(f"is not UTF-8 text ({e.reason} after line {n})", path) from None
    except csv.Error as e:
        raise TpasInputError(f"not a readable CSV ({e})", path, f"after line {n}") from None


def read_run(
    path: str | Path, query_ids: Sequence[str], gallery_ids: Sequence[str], fmt: str | None = None, source: str = ""
) -> SimsMatrix:
    """Read a TREC run or CSV of scores into a top-K SimsMatrix over the given ids.

    Every query must have at least one entry; unknown query or gallery ids and repeated (query, gallery) pairs are
    errors naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("file not found", path)
    fmt = fmt or detect_format(path)
    if fmt not in RUN_FORMATS:
        raise TpasInputError(f"unknown run format {fmt!r}; use one of {list(RUN_FORMATS)}", path)
    q_pos = {str(q): i for i, q in enumerate(query_ids)}
    g_pos = {str(g): i for i, g in enumerate(gallery_ids)}
    rows: list[dict[int, float]] = [{} for _ in query_ids]
    for n, qid, gid, score in _records(path, fmt):
        qi = q_pos.get(qid)
        if qi is None:
            raise TpasInputError(f"query id {qid!r} is not among the fusion's queries", path, f"line {n}")
        gi = g_pos.get(gid)
        if gi is None:
            raise TpasInputError(f"gallery id {gid!r} is not in the fusion's gallery", path, f"line {n}")
        if gi in rows[qi]:
            raise TpasInputError(f"pair ({qid!r}, {gid!r}) is listed twice", path, f"line {n}")
        rows[qi][gi] = score
    empty = next((q for q, r in zip(query_ids, rows, strict=True) if not r), None)
    if empty is not None:
        raise TpasInputError(f"query id {empty!r} has no entries (every query of the fusion needs scores)", path)
    k = max(len(r) for r in rows)
    indices = torch.empty(len(rows), k, dtype=torch.long)
    values = torch.empty(len(rows), k, dtype=torch.float32)
    padded = 0
    for i, r in enumerate(rows):
        cols = list(r)
        vals = [r[c] for c in cols]
        if len(cols) < k:
            padded += 1
            low = min(vals)
            listed = set(cols)
            extra = list(itertools.islice((c for c in range(len(gallery_ids)) if c not in listed), k - len(cols)))
            cols += extra
            vals += [low] * len(extra)
        indices[i] = torch.tensor(cols, dtype=torch.long)
        values[i] = torch.tensor(vals, dtype=torch.float32)
    meta = {"imported_from": str(path), "run_format": fmt, "rows_padded_with_row_min": padded}
    return SimsMatrix(
        list(query_ids), list(gallery_ids), indices=indices, values=values, source=source or fmt, meta=meta
    )
