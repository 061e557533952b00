"""A leaderboard submission from a matrix in memory: the ranking file (+ zip), each written file validated.

`tpas submit` (matrix read from a file) and `tpas ensemble --submit` (the fused matrix, never written or read back)
both end here, so the one-process path writes exactly the bytes of the two-process one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..sims import SimsMatrix
from .ranking_file import write_ranking_file
from .validate import validate_answer


def write_submission(
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
    """Write the ranking file (and zip) for `sims` in `query_ids` order; returns the paths written.

    Same arguments as `write_ranking_file`. Every written file is then validated against the query index (and
    gallery): the writer's own output must always pass, so a failure here is a bug and raises TpasInputError.
    """
    written = write_ranking_file(
        sims, query_ids, out, k=k, gallery_ids=gallery_ids, make_zip=make_zip,
        query_source=query_source, gallery_source=gallery_source, progress=progress,
    )  # fmt: skip
    for path in written:
        validate_answer(path, list(query_ids), gallery_ids, k=k).raise_first()
    return written
