"""Readers for the annotation formats vmr accepts, all into one record type.

- seed JSON: ``[{"id","video_id","query","start_frame","end_frame","description"}]``, frames
  0-based with the end inclusive. Rows with the same video and query text are one query with
  several windows (the event happens more than once). Frames become seconds only once the
  video's real fps is known (vmr.spans.frames_to_seconds), so records keep ``unit="frames"``.
- QVHighlights JSONL: ``{"qid","query","vid","duration","relevant_windows",
  "relevant_clip_ids"?,"saliency_scores"?}`` per line, seconds, 2-second clips. Any other field
  of a line (a tag such as ``"dataset"`` or ``"told_apart_by"``) is kept in ``QueryRecord.tags``
  and travels with the query into the shards, so ``vmr eval --group-by`` can break metrics down by it.
- Charades-STA text: ``VIDEO START END##sentence`` per line, seconds. The qid is
  ``<file stem>:<line number>`` since the format has none.

A file that cannot be read as its format is a UserError naming it; a single malformed line or
row is returned as a skip (``Skip``) with a reason naming the file and line, and reading goes on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vmr.errors import UserError
from vmr.spans import QVH_CLIP_SECONDS, frames_to_seconds

FORMATS = ("seed", "qvhighlights", "charades")
VIDEO_EXTENSIONS = ("mp4", "mkv", "avi", "mov", "webm")
_CHARADES_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s*##(.*)$")


@dataclass
class QueryRecord:
    qid: int | str
    video_id: str
    query: str
    moments: list[tuple[float, float]]  # seconds, or frame indices (end inclusive) when unit == "frames"
    unit: str = "seconds"
    saliency: dict | None = None  # {"clip_seconds", "clip_ids", "scores"} when the data has it
    video_file: str | None = None  # a file name given by the annotation (seed format)
    source: str = ""  # "file:line" for messages
    tags: dict = field(default_factory=dict)  # the annotation's own extra fields, kept as given

    def seconds(self, fps: float) -> list[tuple[float, float]]:
        """The moments in seconds; frame numbers are converted with the video's real fps."""
        if self.unit == "frames":
            return [frames_to_seconds(int(s), int(e), fps) for s, e in self.moments]
        return list(self.moments)


@dataclass
class Skip:
    video_id: str
    reason: str
    qid: int | str | None = None
    what: str = "query"  # "video" when a whole video is left out

    def to_json(self) -> dict:
        row = {"video_id": self.video_id}
        if self.qid is not None:
            row["qid"] = self.qid
        row["reason"] = self.reason
        return row


def detect_format(path: Path) -> str:
    """Tell the format from the content: a JSON array is seed, JSON lines are QVHighlights,
    ``VIDEO START END##sentence`` lines are Charades-STA."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        if path.suffix.lower() == ".jsonl":
            raise UserError(f"{path}: holds one JSON array, but a .jsonl file holds one JSON object per line "
                            "(QVHighlights); rename it .json if it is seed-format, or write one object per line")
        return "seed"
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "qvhighlights"
    if _CHARADES_LINE.match(first.strip()):
        return "charades"
    raise UserError(
        f"{path}: cannot tell the annotation format (not a seed JSON array, QVHighlights JSONL or "
        f"Charades-STA 'VIDEO START END##sentence' lines); pass --format"
    )


def read_annotations(path: Path, fmt: str = "auto") -> tuple[list[QueryRecord], list[Skip]]:
    """Every usable query of the file, and a skip for each bad row. A file with rows but not one
    usable query is a UserError (a wrong format or schema, not a few bad rows)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown annotation format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    records, skips = {"seed": _read_seed, "qvhighlights": _read_qvhighlights, "charades": _read_charades}[fmt](path)
    if not records:
        more = f" (and {len(skips) - 1} more like it)" if len(skips) > 1 else ""
        raise UserError(skips[0].reason + more if skips else f"{path}: no annotations in this file")
    return records, skips


def _id(value, key: str) -> int | str:
    """A qid or video id: a number or a non-empty string (a list or object cannot name anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise TypeError(f"{key} must be a number or a non-empty string, got {value!r}")
    return value


def _text(value, key: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {value!r}")
    return value


def _saliency(row: dict) -> dict | None:
    """QVHighlights clip saliency: ``relevant_clip_ids`` (clip numbers) and ``saliency_scores``
    (one list of annotator scores 0-4 per clip), both present or neither."""
    if "relevant_clip_ids" not in row and "saliency_scores" not in row:
        return None
    ids, scores = row.get("relevant_clip_ids"), row.get("saliency_scores")
    if not isinstance(ids, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in ids):
        raise TypeError(f"relevant_clip_ids must be a list of clip numbers, got {ids!r}"[:200])
    if not isinstance(scores, list) or len(scores) != len(ids) or not all(
            isinstance(s, list) and s and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and 0 <= v <= 4 for v in s) for s in scores):
        raise TypeError(f"saliency_scores must be one list of scores 0-4 per relevant clip "
                        f"({len(ids)} clips), got {scores!r}"[:200])
    return {"clip_seconds": QVH_CLIP_SECONDS, "clip_ids": list(ids), "scores": [list(s) for s in scores]}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read annotation file ({error})") from None


def _strip_extension(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext.lower() in VIDEO_EXTENSIONS else name


def _frame(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise TypeError(f"{key} must be a whole frame number, got {value!r}")
    return int(value)


def _read_seed(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: a seed annotation file must hold a JSON array of objects")
    records: dict[tuple[str, str], QueryRecord] = {}
    skips = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        try:
            if not isinstance(row, dict):
                raise TypeError(f"a row must be an object, got {row!r}"[:120])
            video_file = str(_id(row["video_id"], "video_id"))
            window = (_frame(row["start_frame"], "start_frame"), _frame(row["end_frame"], "end_frame"))
            qid, query = _id(row["id"], "id"), _text(row["query"], "query")
        except (KeyError, TypeError, ValueError) as error:
            video = str(row.get("video_id", "?")) if isinstance(row, dict) else "?"
            skips.append(Skip(video, f"{where}: malformed row ({type(error).__name__}: {error})"))
            continue
        video_id = _strip_extension(video_file)
        key = (video_id, query.strip())
        if key in records:  # the same event again: one more window for the same query
            records[key].moments.append(window)
            continue
        records[key] = QueryRecord(qid, video_id, query, [window], unit="frames",
                                   video_file=video_file, source=where)
    return list(records.values()), skips


def _window(value) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TypeError(f"relevant_windows entry {value!r} is not [start, end] in seconds"[:160])
    return float(value[0]), float(value[1])


QVH_FIELDS = ("qid", "query", "vid", "duration", "relevant_windows", "relevant_clip_ids", "saliency_scores")


def _read_qvhighlights(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    records, skips = [], []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if not records and not skips:
                raise UserError(f"{where}: not a JSON line; is this a QVHighlights JSONL file?") from None
            skips.append(Skip("?", f"{where}: not a JSON line"))
            continue
        try:
            if not isinstance(row, dict):
                raise TypeError(f"a line must be an object, got {row!r}"[:120])
            windows = [_window(w) for w in row["relevant_windows"]]
            record = QueryRecord(_id(row["qid"], "qid"), str(_id(row["vid"], "vid")),
                                 _text(row["query"], "query"), windows, source=where)
            record.saliency = _saliency(row)
        except (KeyError, TypeError, ValueError) as error:
            video = str(row.get("vid", "?")) if isinstance(row, dict) else "?"
            qid = row.get("qid") if isinstance(row, dict) and isinstance(row.get("qid"), (int, str)) else None
            skips.append(Skip(video, f"{where}: malformed line ({type(error).__name__}: {error})", qid=qid))
            continue
        record.tags = {k: v for k, v in row.items() if k not in QVH_FIELDS}
        records.append(record)
    return records, skips


def _read_charades(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    records, skips = [], []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        match = _CHARADES_LINE.match(line.strip())
        if not match:
            skips.append(Skip("?", f"{where}: not a 'VIDEO START END##sentence' line"))
            continue
        video, start, end, sentence = match.groups()
        try:
            window = (float(start), float(end))
        except ValueError:
            skips.append(Skip(video, f"{where}: start/end are not numbers ({start!r}, {end!r})"))
            continue
        records.append(QueryRecord(f"{path.stem}:{number}", video, sentence.strip(), [window], source=where))
    return records, skips


def check_query(record: QueryRecord) -> str | None:
    """Why a query cannot be used, or None. Checks what needs no video: the text and the order and
    sign of its moments (moments against the video's length are checked once it is probed)."""
    if not record.query.strip():
        return f"{record.source}: empty query"
    if not record.moments:
        return f"{record.source}: no moments"
    for start, end in record.moments:
        if not (math.isfinite(start) and math.isfinite(end)):
            return f"{record.source}: moment [{start}, {end}] is not finite"
        if start < 0:
            return f"{record.source}: moment [{start}, {end}] starts before 0"
        # Seed frames are inclusive, so a one-frame event has end == start.
        if end < start or (end == start and record.unit == "seconds"):
            return f"{record.source}: moment [{start}, {end}] has end <= start"
    return None
