"""The one join of a ground truth onto a matrix: which rows are scored and which gallery columns are relevant to each.

`tpas evaluate`, `tpas tune` and `tpas report` all score through it, so "relevant" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch

from ..errors import TpasInputError
from ..ranking import Ties

if TYPE_CHECKING:
    from ..data.pab import GroundTruth


class Match(str, Enum):
    """Which gallery images count as relevant for a caption.

    - `image` (the PAB protocol): its own record's image.
    - `identity`: every image whose record has the same `image_id` (the person identity, where the annotation reuses
      an id across records).
    """

    IMAGE = "image"
    IDENTITY = "identity"


def check_policies(match: Match | str, ties: Ties | str) -> tuple[Match, Ties]:
    """`match` and `ties` as enums; TpasInputError naming the option and its choices for any other value."""
    out = []
    for option, enum, value in (("--match", Match, match), ("--ties", Ties, ties)):
        try:
            out.append(enum(value))
        except ValueError:
            raise TpasInputError(f"{option}: {value!r} is not one of {[e.value for e in enum]}") from None
    return out[0], out[1]


@dataclass
class Relevance:
    """A ground truth joined onto a matrix's ids."""

    query_ids: list[str]  # the scored queries, in ground-truth order
    rows: torch.Tensor  # [Q] long: each one's matrix row
    cols: torch.Tensor  # [Q, M] long: its relevant gallery columns, -1 padding (M = 1 under Match.IMAGE)
    match: Match

    def is_every_row(self, n_rows: int) -> bool:
        """True when the scored rows are all `n_rows` rows of the matrix, in order (no row selection needed)."""
        return len(self.rows) == n_rows and bool((self.rows == torch.arange(n_rows)).all())

    def in_row_order(self) -> Relevance:
        """The same join with the queries in matrix-row order."""
        order = self.rows.argsort(stable=True)
        qids = [self.query_ids[i] for i in order.tolist()]
        return Relevance(qids, self.rows[order], self.cols[order], self.match)


def join_ground_truth(
    gt: GroundTruth,
    query_ids: Sequence[str],
    gallery_ids: Sequence[str],
    match: Match | str = Match.IMAGE,
    *,
    every_query: bool = True,
) -> Relevance:
    """Join `gt` onto a matrix's row and column ids; TpasInputError naming the first id that does not join.

    Args:
        gt: the ground truth (`tpas.data.pab.GroundTruth`).
        query_ids, gallery_ids: the matrix's row and column ids.
        match: which images are relevant (`Match`).
        every_query: True: every ground-truth query must be a row of the matrix. False: ground-truth queries the
            matrix lacks are left out (at least one must remain).
    """
    match = Match(match)
    row_of = {q: i for i, q in enumerate(query_ids)}
    missing = [q for q in gt.query_ids if q not in row_of]
    if missing and every_query:
        raise TpasInputError(
            f"ground-truth query {missing[0]!r} is not a row of the matrix ({len(missing)} of {len(gt.query_ids)} "
            f"ground-truth queries have no row; matrix rows look like {list(query_ids[:2])})",
            gt.path,
        )
    qids = [q for q in gt.query_ids if q in row_of]
    if not qids:
        raise TpasInputError(
            "no query of the matrices has a ground truth in this annotation (query ids differ: the matrices "
            f"use e.g. {query_ids[0]!r}, the annotation e.g. {gt.query_ids[0]!r})",
            gt.path,
        )
    col_of = {g: i for i, g in enumerate(gallery_ids)}
    lists = _identity_columns(gt, qids, col_of) if match is Match.IDENTITY else _image_columns(gt, qids, col_of)
    width = max(len(x) for x in lists)
    cols = torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long).reshape(len(lists), width)
    rows = torch.tensor([row_of[q] for q in qids], dtype=torch.long)
    return Relevance(qids, rows, cols, match)


def _image_columns(gt: GroundTruth, qids: list[str], col_of: dict[str, int]) -> list[list[int]]:
    out = []
    for q in qids:
        gid = gt.relevant[q]
        c = col_of.get(gid)
        if c is None:
            raise TpasInputError(
                f"query {q!r}: its relevant image {gid!r} is not a gallery id of the matrix "
                f"({len(col_of)} gallery ids, e.g. {list(col_of)[:2]})",
                gt.path,
            )
        out.append([c])
    return out


def _identity_columns(gt: GroundTruth, qids: list[str], col_of: dict[str, int]) -> list[list[int]]:
    groups = gt.identity_groups()
    identity = gt.frame["image_id"]
    out = []
    for q in qids:
        cols = []
        for gid in groups[identity[q]]:
            c = col_of.get(gid)
            if c is None:
                raise TpasInputError(
                    f"query {q!r}: image {gid!r} of identity {identity[q]!r} is not a gallery id of the matrix", gt.path
                )
            cols.append(c)
        out.append(cols)
    return out
