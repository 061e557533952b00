"""Readers for every PAB file format: train/test annotations, name-masked queries, query index, gallery folders.

Each reader returns typed records and raises one `TpasInputError` naming the file and the line (JSON lines, text) or
the record (0-based position in a JSON list) plus the field that was expected. Ids follow DESIGN.md:

- a gallery image's id is its file stem;
- a query's id is its `query_index` (name-masked `query.json`), `"{image_id}:{k}"` for the k-th (0-based) caption of
  a test-annotation record, or its 0-based position as a string (a JSON list of strings, or text lines);
- in a test annotation, a caption's relevant gallery id is the file stem of its record's `image`.

Ids are always kept as strings: name-masked query ids such as `100018684969009` or `0012...` must not be parsed.
"""

from __future__ import annotations

import glob as _glob
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import TpasInputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_BOM = "\ufeff"
# Fields a train record may carry besides the required ones (see PAB_FORMATS.md); absent ones read as None.
_TRAIN_OPTIONAL = ("hard_i", "hard_c", "hard_i_id", "source_id", "source_caption", "scene")
_TEST_CORE = ("image", "image_id", "caption")
_STR_OR_NONE = frozenset({str, type(None)})


# --------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True)
class Query:
    """One text query: its id (see module docstring) and caption."""

    id: str
    caption: str


@dataclass(frozen=True, slots=True)
class TestRecord:
    """One record of a test annotation (`attr.json`, `ucc.json`): an image and its captions.

    `attrs` holds every other field as a string (e.g. `normal`/`anomaly` -> action, `scene`).
    """

    __test__ = False  # not a pytest test class, despite its name

    image: str
    image_id: str
    captions: list[str]
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def gallery_id(self) -> str:
        """The id of this record's image in a gallery folder: the file stem of `image`."""
        return image_stem(self.image)


@dataclass(slots=True)  # not frozen: frozen dataclasses construct ~2x slower, and PAB has ~1M of these
class TrainRecord:
    """One training pair of `attr_*.json` / `pair_*.json`.

    `action` is the value of the record's `normal` or `anomaly` field and `is_anomaly` says which one it was
    (None when the record has neither). `hard_i` is relative to `PAB/train/`, `image` to the PAB root.
    """

    image: str
    caption: str
    image_id: str
    hard_i: str | None = None
    hard_c: str | None = None
    hard_i_id: str | None = None
    source_id: str | None = None
    source_caption: str | None = None
    action: str | None = None
    is_anomaly: bool | None = None
    scene: str | None = None


@dataclass(frozen=True, slots=True)
class GalleryImage:
    """An image of a gallery folder; `id` is its file stem."""

    id: str
    path: Path


def image_stem(image: str) -> str:
    """File stem of an annotation's image path (`test/0.jpg` -> `0`), whatever the path separator."""
    return PurePosixPath(image.replace("\\", "/")).stem


# --------------------------------------------------------------------------------------------------- low level
def _read_text(path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise TpasInputError("file not found" if not path.exists() else "expected a file, found a folder", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TpasInputError(f"is not UTF-8 text (byte {e.start})", path) from None
    except OSError as e:
        raise TpasInputError(f"cannot be read ({e.strerror})", path) from None
    return path, text.removeprefix(_BOM)


_TOO_DEEP = "JSON nested too deeply (more than ~1000 levels of lists or objects)"


def _json_document(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TpasInputError(f"invalid JSON: {e.msg} (column {e.colno})", path, f"line {e.lineno}") from None
    except RecursionError:  # json.loads gives up on deep nesting with RecursionError, not JSONDecodeError
        raise TpasInputError(_TOO_DEEP, path) from None


def _json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """Parse JSON lines; returns (1-based line number, value) for every non-blank line."""
    out = []
    loads = json.loads
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, loads(line)))
        except json.JSONDecodeError as e:
            raise TpasInputError(f"invalid JSON: {e.msg} (column {e.colno})", path, f"line {n}") from None
        except RecursionError:
            raise TpasInputError(_TOO_DEEP, path, f"line {n}") from None
    return out


def _record_list(path: Path, data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise TpasInputError(f"expected a JSON list of {what}, found a JSON {_json_type(data)}", path)
    return data


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _id_str(v: Any) -> str | None:
    """An id field as a string; ints are accepted (some forks write numeric image ids), floats/others are not."""
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def _scalar_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, (bool, int, float)):
        return json.dumps(v)
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------------------------------- test annotation
def _test_record(path: Path, i: int, rec: Any) -> TestRecord:
    where = f"record {i} (0-based)"
    if not isinstance(rec, dict):
        raise TpasInputError(
            f"expected an object with image, image_id, caption; found a JSON {_json_type(rec)}", path, where
        )
    image = rec.get("image")
    if not isinstance(image, str) or not image:
        raise TpasInputError("expected field 'image' (a non-empty string path)", path, where)
    image_id = _id_str(rec.get("image_id"))
    if image_id is None:
        raise TpasInputError("expected field 'image_id' (a string)", path, where)
    caps = rec.get("caption")
    if isinstance(caps, str):
        caps = [caps]
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise TpasInputError("expected field 'caption' (a non-empty list of strings)", path, where)
    attrs = {k: _scalar_str(v) for k, v in rec.items() if k not in _TEST_CORE}
    return TestRecord(image=image, image_id=image_id, captions=caps, attrs=attrs)


def read_test_annotation(path: str | Path) -> list[TestRecord]:
    """Read a test annotation (`attr.json`, `ucc.json`): a JSON list of `{image, image_id, caption: [...]}`.

    A single caption string is accepted as a one-element list. Every other field is kept in `attrs`.
    """
    path, text = _read_text(path)
    data = _record_list(path, _json_document(path, text), "test records")
    return [_test_record(path, i, rec) for i, rec in enumerate(data)]


def annotation_query_ids(records: Sequence[TestRecord], path: str | Path | None = None) -> list[str]:
    """Query ids of a test annotation's captions, in file order (see `record_query_ids`)."""
    return [q for i, r in enumerate(records) for q in record_query_ids(r, i, path)]


def record_query_ids(r: TestRecord, index: int = 0, path: str | Path | None = None) -> list[str]:
    """Query ids of one record's captions: `"{image_id}:{k}"`, or its `query_index` when the record names one.

    A name-masked ground truth (one caption per record, plus the `query_index` that `query.json` uses) then scores
    the matrices `tpas infer` wrote from that `query.json` directly.
    """
    qi = r.attrs.get("query_index")
    if qi is None:
        return [f"{r.image_id}:{k}" for k in range(len(r.captions))]
    if len(r.captions) != 1:
        raise TpasInputError(
            f"a record with a 'query_index' must hold exactly one caption, found {len(r.captions)}",
            path,
            f"record {index} (0-based)",
        )
    return [str(qi)]


# --------------------------------------------------------------------------------------------------- train annotation
def _train_records(path: Path, data: list[Any]) -> list[TrainRecord]:
    out: list[TrainRecord] = []
    append = out.append
    ok_types = _STR_OR_NONE
    for i, rec in enumerate(data):
        # Fast path for well-formed records (~1M of them in PAB): one type-set check per record; anything odd is
        # diagnosed field by field in _train_record_slow.
        try:
            get = rec.get
            image, caption, image_id = rec["image"], rec["caption"], rec["image_id"]
            normal, anomaly = get("normal"), get("anomaly")
            hard_i, hard_c, hard_i_id = get("hard_i"), get("hard_c"), get("hard_i_id")
            source_id, source_caption, scene = get("source_id"), get("source_caption"), get("scene")
        except (KeyError, TypeError, AttributeError):
            append(_train_record_slow(path, i, rec))
            continue
        if (
            type(image) is not str
            or type(caption) is not str
            or type(image_id) is not str
            or (normal is not None and anomaly is not None)
            or not {
                type(normal),
                type(anomaly),
                type(hard_i),
                type(hard_c),
                type(hard_i_id),
                type(source_id),
                type(source_caption),
                type(scene),
            }
            <= ok_types
        ):
            append(_train_record_slow(path, i, rec))
            continue
        append(
            TrainRecord(
                image,
                caption,
                image_id,
                hard_i,
                hard_c,
                hard_i_id,
                source_id,
                source_caption,
                normal if anomaly is None else anomaly,
                None if normal is None and anomaly is None else anomaly is not None,
                scene,
            )
        )
    return out


def _train_record_slow(path: Path, i: int, rec: Any) -> TrainRecord:
    where = f"record {i} (0-based)"
    if not isinstance(rec, dict):
        raise TpasInputError(
            f"expected an object with image, caption, image_id; found a JSON {_json_type(rec)}", path, where
        )
    for key in ("image", "caption"):
        if not isinstance(rec.get(key), str):
            raise TpasInputError(f"expected field {key!r} (a string)", path, where)
    image_id = _id_str(rec.get("image_id"))
    if image_id is None:
        raise TpasInputError("expected field 'image_id' (a string)", path, where)
    if rec.get("normal") is not None and rec.get("anomaly") is not None:
        raise TpasInputError("a record has either 'normal' or 'anomaly', not both", path, where)
    opt: dict[str, str | None] = {}
    for key in (*_TRAIN_OPTIONAL, "normal", "anomaly"):
        v = rec.get(key)
        if key in ("hard_i_id", "source_id") and v is not None:
            v = _id_str(v)
            if v is None:
                raise TpasInputError(f"expected field {key!r} to be a string id", path, where)
        if v is not None and not isinstance(v, str):
            raise TpasInputError(f"expected field {key!r} to be a string, found a JSON {_json_type(v)}", path, where)
        opt[key] = v
    return TrainRecord(
        image=rec["image"],
        caption=rec["caption"],
        image_id=image_id,
        hard_i=opt["hard_i"],
        hard_c=opt["hard_c"],
        hard_i_id=opt["hard_i_id"],
        source_id=opt["source_id"],
        source_caption=opt["source_caption"],
        action=opt["anomaly"] if opt["anomaly"] is not None else opt["normal"],
        is_anomaly=None if opt["normal"] is None and opt["anomaly"] is None else opt["anomaly"] is not None,
        scene=opt["scene"],
    )


def _natural_key(p: Path) -> tuple[Any, ...]:
    # attr_2.json before attr_10.json
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def train_annotation_files(path: str | Path) -> list[Path]:
    """The files a train-annotation argument names: a file, a folder (its `attr_*.json` and `pair_*.json`, in
    natural order), or a glob pattern."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for pat in ("attr_*.json", "pair_*.json") for f in p.glob(pat) if f.is_file()]
        if not files:
            raise TpasInputError("folder holds no attr_*.json or pair_*.json files", p)
        return sorted(files, key=_natural_key)
    if _glob.has_magic(str(path)):
        files = [Path(f) for f in _glob.glob(str(path)) if Path(f).is_file()]
        if not files:
            raise TpasInputError("no file matches this pattern", p)
        return sorted(files, key=lambda f: (str(f.parent), _natural_key(f)))
    raise TpasInputError("file not found", p)


def read_train_annotation(path: str | Path | Iterable[str | Path]) -> list[TrainRecord]:
    """Read training pairs from one `attr_*.json`/`pair_*.json` file, a folder of them, a glob, or a list of those.

    Files are concatenated in natural order (attr_2 before attr_10).
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[TrainRecord] = []
    for p in paths:
        for f in train_annotation_files(p):
            f, text = _read_text(f)
            out.extend(_train_records(f, _record_list(f, _json_document(f, text), "training records")))
    return out


# --------------------------------------------------------------------------------------------------- queries
def _text_lines(path: Path, text: str, what: str) -> list[str]:
    """Lines of a text file (LF or CRLF); trailing blank lines are ignored, a blank line inside is an error."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise TpasInputError(f"blank line; expected one {what} per line", path, f"line {n}")
    return lines


def _queries_from_json_lines(path: Path, rows: list[tuple[int, Any]]) -> list[Query]:
    out = []
    for n, obj in rows:
        if not isinstance(obj, dict):
            raise TpasInputError(
                f"expected an object {{query_index, caption}}, found a JSON {_json_type(obj)}", path, f"line {n}"
            )
        qid = obj.get("query_index")
        if not isinstance(qid, str) or not qid:
            hint = " (numbers lose leading zeros; write it as a string)" if isinstance(qid, (int, float)) else ""
            raise TpasInputError(f"expected field 'query_index' (a non-empty string){hint}", path, f"line {n}")
        cap = obj.get("caption")
        if not isinstance(cap, str):
            raise TpasInputError("expected field 'caption' (a string)", path, f"line {n}")
        out.append(Query(qid, cap))
    return out


def read_queries(path: str | Path) -> list[Query]:
    """Read queries in any PAB format (DESIGN.md `--queries`), with ids as DESIGN.md fixes them.

    - name-masked `query.json`: JSON lines `{"query_index", "caption"}` (a JSON list of such objects also works);
    - test `attr.json` / `ucc.json`: a JSON list of records; ids `"{image_id}:{k}"`;
    - a JSON list of strings, or text with one caption per line (`.txt`): ids are 0-based positions.

    Duplicate query ids are an error naming the second occurrence.
    """
    path, text = _read_text(path)
    head = text.lstrip()[:1]
    if path.suffix.lower() == ".txt" or head not in ("[", "{"):
        queries = [Query(str(i), line.strip()) for i, line in enumerate(_text_lines(path, text, "caption"))]
        if not queries:
            raise TpasInputError("holds no captions", path)
        return queries
    if head == "{":
        queries = _queries_from_json_lines(path, _json_lines(path, text))
        where = lambda i: f"line {i + 1}"  # noqa: E731 - only used for the duplicate message below
    else:
        data = _json_document(path, text)
        if not data:
            raise TpasInputError("holds an empty JSON list; expected queries", path)
        if all(isinstance(x, str) for x in data):
            return [Query(str(i), c) for i, c in enumerate(data)]
        if isinstance(data[0], dict) and "query_index" in data[0]:
            queries = _queries_from_json_lines(path, [(i, x) for i, x in enumerate(data)])
        else:
            recs = [_test_record(path, i, r) for i, r in enumerate(data)]
            caps = [c for r in recs for c in r.captions]
            queries = [Query(q, c) for q, c in zip(annotation_query_ids(recs, path), caps, strict=True)]
        where = lambda i: f"query {i} (0-based)"  # noqa: E731
    if not queries:
        raise TpasInputError("holds no queries", path)
    seen: set[str] = set()
    for i, q in enumerate(queries):
        if q.id in seen:
            raise TpasInputError(f"duplicate query id {q.id!r}", path, where(i))
        seen.add(q.id)
    return queries


def read_query_index(path: str | Path) -> list[str]:
    """Read `query_index.txt`: one query id per line (LF or CRLF), kept as strings. Duplicates are an error."""
    return read_id_lines(path, "query id")


def read_id_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a list file, one `what` each (named in errors); blanks inside a line, repeats or none refused."""
    path, text = _read_text(path)
    ids = _text_lines(path, text, what)
    seen: dict[str, int] = {}
    for n, line in enumerate(ids, 1):
        if line != line.strip() or len(line.split()) != 1:
            raise TpasInputError(
                f"expected exactly one {what} with no surrounding whitespace, found {line!r}", path, f"line {n}"
            )
        if line in seen:
            raise TpasInputError(f"duplicate {what} {line!r} (first on line {seen[line]})", path, f"line {n}")
        seen[line] = n
    if not ids:
        raise TpasInputError(f"holds no {what}s", path)
    return ids


# --------------------------------------------------------------------------------------------------- gallery
def list_gallery(directory: str | Path) -> list[GalleryImage]:
    """Every image file under `directory` (recursive), sorted by id (= file stem). Duplicate stems are an error."""
    d = Path(directory)
    if not d.is_dir():
        raise TpasInputError("gallery folder not found" if not d.exists() else "expected a gallery folder", d)
    by_id: dict[str, Path] = {}
    for p in d.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            if p.stem in by_id:
                raise TpasInputError(
                    f"two images share the id {p.stem!r}: {by_id[p.stem]} and {p} (ids are file stems)", d
                )
            by_id[p.stem] = p
    if not by_id:
        raise TpasInputError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the gallery folder", d)
    return [GalleryImage(i, by_id[i]) for i in sorted(by_id)]


def read_gallery_ids(path: str | Path) -> list[str]:
    """Gallery ids from a gallery folder (file stems, sorted) or from a text file with one id per line."""
    p = Path(path)
    if p.is_dir():
        return [g.id for g in list_gallery(p)]
    return read_id_lines(p, "gallery id")


# --------------------------------------------------------------------------------------------------- ground truth
class GroundTruth:
    """Which gallery image each query should find, plus the annotation columns to break results down by.

    `frame` is indexed by query id, in annotation order, with columns `caption`, `gallery_id`, `image_id`,
    `behaviour` ("normal"/"anomaly", or "" when the record says neither), `action`, and every other attribute of the
    record (`scene`, ...) when present. Built from the annotation's `rows` on first use: scoring needs only
    `relevant`, and importing pandas would double `tpas evaluate`'s own time.
    """

    def __init__(
        self,
        query_ids: list[str],
        relevant: dict[str, str],
        frame: Any = None,
        path: Path | None = None,
        *,
        rows: list[dict[str, str]] | None = None,
    ) -> None:
        self.query_ids, self.relevant, self.path = query_ids, relevant, path
        self._frame, self._rows = frame, rows

    @property
    def frame(self) -> Any:
        """The annotation columns as a pandas.DataFrame (typed loosely so this module does not import pandas)."""
        if self._frame is None and self._rows is not None:
            import pandas as pd

            # Records without an attribute get "" (not NaN), so breakdowns keep them as their own group.
            self._frame = pd.DataFrame(self._rows, index=pd.Index(self.query_ids, name="query_id")).fillna("")
            self._rows = None
        return self._frame

    @frame.setter
    def frame(self, value: Any) -> None:
        self._frame, self._rows = value, None

    @property
    def columns(self) -> list[str]:
        """Names of `frame`'s columns (without building it)."""
        if self._rows is None:
            return [] if self._frame is None else list(self._frame.columns)
        return list(dict.fromkeys(k for row in self._rows for k in row))

    def identity_groups(self) -> dict[str, list[str]]:
        """Gallery ids of each identity (`image_id`), for identity matching: {image_id: [gallery ids]}."""
        groups: dict[str, list[str]] = {}
        for image_id, gid in zip(self.frame["image_id"], self.frame["gallery_id"], strict=True):
            lst = groups.setdefault(image_id, [])
            if gid not in lst:
                lst.append(gid)
        return groups


def ground_truth_from_records(records: Sequence[TestRecord], path: str | Path | None = None) -> GroundTruth:
    """Build the ground truth of test records: each caption's relevant image is its own record's image."""
    rows: list[dict[str, str]] = []
    qids: list[str] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if "normal" in r.attrs and "anomaly" in r.attrs:
            raise TpasInputError("a record has either 'normal' or 'anomaly', not both", path, f"record {i} (0-based)")
        behaviour = "anomaly" if "anomaly" in r.attrs else "normal" if "normal" in r.attrs else ""
        action = r.attrs.get("anomaly", r.attrs.get("normal", ""))
        extra = {k: v for k, v in r.attrs.items() if k not in ("normal", "anomaly", "query_index")}
        for qid, cap in zip(record_query_ids(r, i, path), r.captions, strict=True):
            if qid in seen:
                raise TpasInputError(
                    f"query id {qid!r} repeats record {seen[qid]} (image_id must be unique per record)",
                    path,
                    f"record {i} (0-based)",
                )
            seen[qid] = i
            qids.append(qid)
            rows.append(
                {
                    "caption": cap,
                    "gallery_id": r.gallery_id,
                    "image_id": r.image_id,
                    "behaviour": behaviour,
                    "action": action,
                    **extra,
                }
            )
    if not rows:
        raise TpasInputError("holds no captions", path)
    relevant = {q: row["gallery_id"] for q, row in zip(qids, rows, strict=True)}
    return GroundTruth(qids, relevant, path=None if path is None else Path(path), rows=rows)


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read a test annotation (`attr.json`, `ucc.json`) as ground truth; query ids are `"{image_id}:{k}"`."""
    return ground_truth_from_records(read_test_annotation(path), path)
