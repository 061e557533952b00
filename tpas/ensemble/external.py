"""External scores as fusion inputs: TREC run files, `query_id,gallery_id,score` CSV files, and ranking files.

All are top-K lists (e.g. a VLM re-ranker's scores for each query's candidates, or another tool's submission); they
are read into a top-K SimsMatrix over the query and gallery ids of the fusion. Rows that list fewer cells than the
longest row are padded with unlisted gallery columns at that row's minimum score, which is exactly the `row-min`
fill rule.

A ranking file (the challenge's `answer.txt`: line i holds query i's best gallery ids of `query_index.txt`, best
first) has no scores: the id at 1-based position r scores 1 / r (reciprocal rank), so its first id scores 1 and its
tenth 0.1. Only the order matters to the ranking and to `rrf` fusion; min-max normalisation maps 1 -> 1 and the
last listed position -> 0.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from ..errors import TpasInputError
from ..sims import SimsMatrix

RUN_FORMATS = ("trec", "csv", "ranking")

Record = tuple[int, str, str, float]  # (line, query id, gallery id, score)


def detect_format(path: str | Path) -> str:
    """`csv` for .csv; `trec` for .run/.trec/.tsv; for .txt `trec` when its first line has the six TREC fields
    (`qid Q0 docid rank score tag`), else `ranking`; `sims` (a SimsMatrix file) for any other suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".run", ".trec", ".tsv"):
        return "trec"
    if suffix != ".txt":
        return "sims"
    if not path.is_file():
        return "trec"  # reading it reports the missing file
    with path.open(encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip() and not line.startswith("#")), "")
    parts = first.split()
    return "trec" if len(parts) == 6 and parts[3].isdigit() and _is_number(parts[4]) else "ranking"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_score(text: str, path: Path, line: int) -> float:
    try:
        v = float(text)
    except ValueError:
        raise TpasInputError(f"score {text!r} is not a number", path, f"line {line}") from None
    if not math.isfinite(v):
        raise TpasInputError(f"score {text!r} is not finite", path, f"line {line}")
    return v


def _records_trec(path: Path, f: TextIO) -> Iterator[Record]:
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


def _records_csv(path: Path, f: TextIO) -> Iterator[Record]:
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


def _records(path: Path, fmt: str) -> Iterator[Record]:
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


def _records_ranking(path: Path, query_ids: Sequence[str] | None) -> Iterator[Record]:
    if query_ids is None:
        raise TpasInputError("a ranking file has no query ids: give the query index whose order its lines follow", path)
    try:
        with path.open(encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise TpasInputError(f"is not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != len(query_ids):
        raise TpasInputError(f"has {len(lines)} lines but the query index has {len(query_ids)} queries", path)
    for n, (qid, line) in enumerate(zip(query_ids, lines, strict=True), start=1):
        gids = line.split()
        if not gids:
            raise TpasInputError("blank line; expected the query's gallery ids, best first", path, f"line {n}")
        for r, gid in enumerate(gids, start=1):
            yield n, str(qid), gid, 1.0 / r


@dataclass
class Run:
    """The records of one run file, parsed once (their ids can then fix the fusion's ids)."""

    path: Path
    format: str
    records: list[Record]

    def query_ids(self) -> list[str]:
        """Query ids in order of first appearance."""
        return list(dict.fromkeys(r[1] for r in self.records))

    def gallery_ids(self) -> list[str]:
        """Distinct gallery ids, sorted (the order a gallery folder's file stems have)."""
        return sorted({r[2] for r in self.records})


def parse_run(path: str | Path, fmt: str | None = None, query_ids: Sequence[str] | None = None) -> Run:
    """Read a run file's records; `query_ids` (the query index) is needed for ranking files, whose lines follow it."""
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("file not found", path)
    fmt = fmt or detect_format(path)
    if fmt not in RUN_FORMATS:
        raise TpasInputError(f"unknown run format {fmt!r}; use one of {list(RUN_FORMATS)}", path)
    records = list(_records_ranking(path, query_ids) if fmt == "ranking" else _records(path, fmt))
    if not records:
        raise TpasInputError("holds no scores", path)
    return Run(path, fmt, records)


def run_to_sims(run: Run, query_ids: Sequence[str], gallery_ids: Sequence[str], source: str = "") -> SimsMatrix:
    """A parsed run as a top-K SimsMatrix over the given ids.

    Every query must have at least one entry; unknown query or gallery ids and repeated (query, gallery) pairs are
    errors naming the line.
    """
    path = run.path
    q_pos = {str(q): i for i, q in enumerate(query_ids)}
    g_pos = {str(g): i for i, g in enumerate(gallery_ids)}
    rows: list[dict[int, float]] = [{} for _ in query_ids]
    for n, qid, gid, score in run.records:
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
    meta = {"imported_from": str(path), "run_format": run.format, "rows_padded_with_row_min": padded}
    if run.format == "ranking":
        meta["scores_from_ranks"] = "1 / rank (1-based position on the line)"
    return SimsMatrix(
        list(query_ids), list(gallery_ids), indices=indices, values=values, source=source or run.format, meta=meta
    )


def read_run(
    path: str | Path, query_ids: Sequence[str], gallery_ids: Sequence[str], fmt: str | None = None, source: str = ""
) -> SimsMatrix:
    """Read a TREC run, CSV of scores or ranking file (lines in `query_ids` order) into a top-K SimsMatrix."""
    return run_to_sims(parse_run(path, fmt, query_ids), query_ids, gallery_ids, source)


def import_run(
    path: str | Path,
    query_ids: Sequence[str],
    gallery_ids: Sequence[str] | None = None,
    fmt: str | None = None,
    source: str = "",
) -> SimsMatrix:
    """`tpas import-run`: a run file as a top-K SimsMatrix over the query index and gallery.

    Without `gallery_ids` the gallery is the sorted union of the ids the run lists (stated in `meta.ids_from`):
    enough to fuse and submit the run, but fewer columns than the real gallery, which `fill` and padding draw from.
    """
    run = parse_run(path, fmt, query_ids)
    gallery_from = "given"
    if gallery_ids is None:
        gallery_ids = run.gallery_ids()
        gallery_from = f"union of the run's {len(gallery_ids)} gallery ids"
    m = run_to_sims(run, query_ids, gallery_ids, source)
    m.meta["ids_from"] = {"query_ids": "given", "gallery_ids": gallery_from}
    return m
