"""Validate a ranking file against its query index (and gallery) before it goes to the leaderboard.

Checks: readable UTF-8 without a byte-order mark; one line ending style throughout (LF, or CRLF as in the official
`answer_example.txt`; mixed or bare CR is an error); one line per query of `query_index.txt`, no blank or trailing
blank lines; each line exactly k ids separated by single spaces, no leading/trailing whitespace or tabs, no repeated
id, no query id in front of the gallery ids; every id in the gallery when one is given. Every problem names its line.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data.pab import read_gallery_ids, read_query_index
from ..errors import TpasInputError
from .ranking_file import ANSWER_NAME


@dataclass(frozen=True)
class Problem:
    """One validation problem: the 1-based line (None for the whole file) and what is wrong there."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line is not None else self.message


@dataclass
class ValidationReport:
    """What `validate_answer` found: counts, the line-ending style, and every problem (capped at `max_problems`)."""

    path: Path
    n_lines: int
    n_queries: int
    line_ending: str
    gallery_checked: bool
    problems: list[Problem] = field(default_factory=list)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the file has no problem."""
        return not self.problems

    def raise_first(self) -> None:
        """Raise TpasInputError for the first problem (no-op when the file is valid)."""
        if self.problems:
            p = self.problems[0]
            raise TpasInputError(p.message, self.path, None if p.line is None else f"line {p.line}")


# A ranking file of the largest benchmark is a few MB; a zip member that inflates past this is not one (a zip bomb).
MAX_ANSWER_BYTES = 256 << 20


def _read_answer_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise TpasInputError("file not found", path)
    if path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                if names != [ANSWER_NAME]:
                    raise TpasInputError(f"a submission zip must hold exactly {ANSWER_NAME!r}, found {names}", path)
                with z.open(ANSWER_NAME) as member:
                    data = member.read(MAX_ANSWER_BYTES + 1)
        except TpasInputError:
            raise
        except Exception as e:  # zipfile fails in many ways on a damaged archive (OSError, EOFError, zlib.error, ...)
            raise TpasInputError(f"not a valid zip file ({type(e).__name__}: {e})", path) from None
        if len(data) > MAX_ANSWER_BYTES:
            raise TpasInputError(f"{ANSWER_NAME} inflates to more than {MAX_ANSWER_BYTES >> 20} MiB", path)
        return data
    try:
        return path.read_bytes()
    except OSError as e:
        raise TpasInputError(f"cannot be read ({e.strerror})", path) from None


def validate_answer(
    answer: str | Path,
    query_index: str | Path | list[str],
    gallery: str | Path | list[str] | None = None,
    *,
    k: int = 10,
    max_problems: int = 20,
) -> ValidationReport:
    """Check a ranking file (or a submission zip holding `answer.txt`) line by line.

    Args:
        answer: the file to check.
        query_index: `query_index.txt` (or its ids); the answer must have one line per id, in that order.
        gallery: a gallery folder, a file of gallery ids, or a list of ids; when given, every id must be one of them.
        k: ids per line (10 for AICity'26 Track 4).
        max_problems: stop collecting after this many problems.

    Returns:
        A ValidationReport; missing or unreadable inputs raise TpasInputError instead.
    """
    path = Path(answer)
    qids = list(query_index) if isinstance(query_index, list) else read_query_index(query_index)
    gallery_set = None
    if gallery is not None:
        gallery_set = set(gallery) if isinstance(gallery, list) else set(read_gallery_ids(gallery))
    raw = _read_answer_bytes(path)
    problems: list[Problem] = []

    def add(line: int | None, msg: str) -> bool:
        problems.append(Problem(line, msg))
        return len(problems) >= max_problems

    report = ValidationReport(path, 0, len(qids), "LF", gallery_set is not None, problems)
    if raw.startswith(b"\xef\xbb\xbf"):
        add(1, "the file starts with a UTF-8 byte-order mark (BOM); save it without one")
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        add(raw.count(b"\n", 0, e.start) + 1, f"not UTF-8 text (byte {e.start})")
        return report
    if not text:
        add(None, f"the file is empty; expected {len(qids)} lines")
        return report

    # Split keeping each line's terminator, so line endings can be checked one by one.
    parts = text.split("\n")
    final_newline = parts[-1] == ""
    if final_newline:
        parts.pop()
    lines: list[str] = []
    style = None
    for n, part in enumerate(parts, 1):
        terminated = n < len(parts) or final_newline
        body = part[:-1] if terminated and part.endswith("\r") else part
        if "\r" in body:
            if add(n, "bare carriage return (CR) inside the line; use LF or CRLF line ends"):
                break
            body = body.replace("\r", "")
        if terminated:
            ending = "CRLF" if part.endswith("\r") else "LF"
            if style is None:
                style = ending
            elif ending != style and add(n, f"line ends with {ending} but line 1 ends with {style} (mixed line ends)"):
                break
        lines.append(body)
    report.line_ending = style or "none"

    # Trailing blank lines: report them as such rather than as lines with 0 ids.
    content = len(lines)
    while content and not lines[content - 1].strip():
        content -= 1
    report.n_lines = content
    for n in range(content + 1, len(lines) + 1):
        if add(n, "blank line after the last ranking line; remove trailing blank lines"):
            break

    seen_full = False
    for n, line in enumerate(lines[:content], 1):
        if len(problems) >= max_problems:
            seen_full = True
            break
        msg = _check_line(line, n, qids, gallery_set, k)
        if msg:
            add(n, msg)
    if content != len(qids) and len(problems) < max_problems:
        add(None, f"{content} ranking lines, but the query index has {len(qids)} queries (one line per query)")
    report.truncated = seen_full or len(problems) >= max_problems
    return report


def _check_line(line: str, n: int, qids: list[str], gallery: set[str] | None, k: int) -> str | None:
    if not line.strip():
        return f"blank line; expected {k} gallery ids"
    if "\t" in line:
        return "tab character; separate ids with single spaces"
    if line != line.strip():
        return "leading or trailing whitespace"
    if "  " in line:
        return f"more than one space between ids (column {line.index('  ') + 1}); separate ids with single spaces"
    ids = line.split(" ")
    if n <= len(qids) and ids[0] == qids[n - 1] and len(ids) == k + 1:
        return f"starts with its query id {ids[0]!r}; a line holds only the {k} gallery ids (line i = query i)"
    if len(ids) != k:
        return f"expected {k} gallery ids, found {len(ids)}"
    if len(set(ids)) != k:
        dup = next(i for p, i in enumerate(ids) if i in ids[:p])
        return f"gallery id {dup!r} appears more than once"
    if gallery is not None:
        bad = next((i for i in ids if i not in gallery), None)
        if bad is not None:
            return f"gallery id {bad!r} is not in the gallery"
    return None
