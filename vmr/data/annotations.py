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
- ActivityNet Captions JSON (``train.json``, ``val_1.json``, ``val_2.json``): one object
  ``{video_id: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}``, seconds. The qid
  is ``<video_id>_<sentence index>``; an end past the annotated duration is cut to it.
- TACoS JSON as the grounding repositories ship it: ``{"s30-d52.avi": {"timestamps": [[s, e],
  ...], "sentences", "fps", "num_frames"}}``, timestamps in frames, made seconds with the file's
  own ``fps`` (which need not be whole); the qid is ``<video_id>_<sentence index>``.
- Highlight-detection JSONL (TVSum, YouTube Highlights): ``{"qid", "query", "vid", "duration"?,
  "label": [...], "domain"?, ...}`` per line, no moment windows: ``label`` holds one entry per
  2-second clip, a score or one score per annotator (TVSum: 20 annotators, 1-5; YouTube
  Highlights: one, 0/1 or -1/1). Its other fields (``domain``) are kept as tags, as for QVHighlights.

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
from vmr.io import first_line
from vmr.spans import QVH_CLIP_SECONDS, frames_to_seconds

FORMATS = ("seed", "qvhighlights", "charades", "activitynet", "tacos", "highlights")
KNOWN_LAYOUTS = ("seed JSON array, QVHighlights JSONL, Charades-STA 'VIDEO START END##sentence' lines, "
                 "ActivityNet Captions JSON {video: {duration, timestamps, sentences}}, TACoS JSON {video: "
                 "{timestamps in frames, sentences, fps, num_frames}}, highlight-detection JSONL (TVSum, "
                 "YouTube Highlights: label per clip, domain)")
VIDEO_EXTENSIONS = ("mp4", "mkv", "avi", "mov", "webm")
_CHARADES_LINE = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s*##(.*)$")


@dataclass
class QueryRecord:
    qid: int | str
    video_id: str
    query: str
    moments: list[tuple[float, float]]  # seconds, or frame indices (end inclusive) when unit == "frames"
    unit: str = "seconds"
    # {"clip_seconds", "clip_ids", "scores"} (QVHighlights, scores 0-4) or {"clip_seconds", "label"}
    # (highlight detection: one row of annotator scores per clip, any scale) when the data has it
    saliency: dict | None = None
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
    """Tell the format from the content: a JSON array is seed; one JSON object of videos is
    ActivityNet Captions (or TACoS when its videos carry an ``fps``); JSON lines are QVHighlights
    (or highlight detection when the first has a ``label``);
    ``VIDEO START END##sentence`` lines are Charades-STA."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        if path.suffix.lower() == ".jsonl":
            raise UserError(f"{path}: holds one JSON array, but a .jsonl file holds one JSON object per line "
                            "(QVHighlights); rename it .json if it is seed-format, or write one object per line")
        return "seed"
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # several objects: JSON lines
            whole = None
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
            if all("timestamps" in v for v in whole.values()):
                return "tacos" if any("fps" in v for v in whole.values()) else "activitynet"
            raise UserError(f"{path}: a JSON object of videos, but not every video has 'timestamps'; "
                            f"vmr reads: {KNOWN_LAYOUTS}; pass --format to read it as one of them")
        first = next(line for line in text.splitlines() if line.strip())
        try:
            row = json.loads(first)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if isinstance(row, dict) and "label" in row:  # a QVHighlights line never has one
            return "highlights"
        return "qvhighlights"
    first = next((line for line in text.splitlines() if line.strip()), "")
    if _CHARADES_LINE.match(first.strip()):
        return "charades"
    raise UserError(f"{path}: cannot tell the annotation format; vmr reads: {KNOWN_LAYOUTS}; pass --format")


def read_annotations(path: Path, fmt: str = "auto") -> tuple[list[QueryRecord], list[Skip]]:
    """Every usable query of the file, and a skip for each bad row. A file with rows but not one
    usable query is a UserError (a wrong format or schema, not a few bad rows)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown annotation format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    readers = {"seed": _read_seed, "qvhighlights": _read_qvhighlights, "charades": _read_charades,
               "activitynet": _read_activitynet, "tacos": _read_tacos, "highlights": _read_highlights}
    records, skips = readers[fmt](path)
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


def _read_json(path: Path, expected: type, layout: str):
    """A whole-file JSON annotation (seed, ActivityNet Captions, TACoS) holding ``expected``."""
    try:
        value = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path}: not valid JSON ({first_line(error)})") from None
    if not isinstance(value, expected):
        raise UserError(f"{path}: {layout}, got {type(value).__name__}")
    return value


def _read_seed(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    rows = _read_json(path, list, "a seed annotation file must hold a JSON array of objects")
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


def _window(value, key: str = "relevant_windows") -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{key} entry {value!r} is not [start, end]"[:160])
    return float(value[0]), float(value[1])


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{key} must be a finite number, got {value!r}"[:160])
    return float(value)


QVH_FIELDS = ("qid", "query", "vid", "duration", "relevant_windows", "relevant_clip_ids", "saliency_scores")
HIGHLIGHT_FIELDS = ("qid", "query", "vid", "duration", "label", "relevant_windows")


def _read_lines(path: Path, parse, known: tuple[str, ...]) -> tuple[list[QueryRecord], list[Skip]]:
    """A JSON-lines file: ``parse(row, where)`` makes each object a record; a line that is not JSON,
    or that ``parse`` refuses (KeyError, TypeError, ValueError), is a skip naming the file and line.
    The row's fields outside ``known`` are kept as the record's tags."""
    records, skips = [], []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if not records and not skips:
                raise UserError(f"{where}: not a JSON line; is this a JSON-lines file?") from None
            skips.append(Skip("?", f"{where}: not a JSON line"))
            continue
        try:
            if not isinstance(row, dict):
                raise TypeError(f"a line must be an object, got {row!r}"[:120])
            record = parse(row, where)
        except (KeyError, TypeError, ValueError) as error:
            video = str(row.get("vid", "?")) if isinstance(row, dict) else "?"
            qid = row.get("qid") if isinstance(row, dict) and isinstance(row.get("qid"), (int, str)) else None
            skips.append(Skip(video, f"{where}: malformed line ({type(error).__name__}: {error})", qid=qid))
            continue
        record.tags = {k: v for k, v in row.items() if k not in known}
        records.append(record)
    return records, skips


def _qvhighlights_row(row: dict, where: str) -> QueryRecord:
    windows = [_window(w) for w in row["relevant_windows"]]
    record = QueryRecord(_id(row["qid"], "qid"), str(_id(row["vid"], "vid")), _text(row["query"], "query"),
                         windows, source=where)
    record.saliency = _saliency(row)
    return record


def _read_qvhighlights(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    return _read_lines(path, _qvhighlights_row, QVH_FIELDS)


def _clip_labels(value) -> list[list[float]]:
    """A highlight ``label``: one entry per 2-second clip, a score or a list of annotator scores
    (every clip the same number of them), as rows of floats."""
    if not isinstance(value, list) or not value:
        raise TypeError(f"label must be a non-empty list with one entry per clip, got {value!r}"[:160])
    rows = [[_number(v, "label score") for v in (entry if isinstance(entry, list) else [entry])] for entry in value]
    if not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise TypeError(f"label: every clip needs the same number of annotator scores (clip 0 has {len(rows[0])})")
    return rows


def _highlights_row(row: dict, where: str) -> QueryRecord:
    windows = [_window(w) for w in row.get("relevant_windows") or []]
    record = QueryRecord(_id(row["qid"], "qid"), str(_id(row["vid"], "vid")), _text(row["query"], "query"),
                         windows, source=where)
    record.saliency = {"clip_seconds": QVH_CLIP_SECONDS, "label": _clip_labels(row["label"])}
    return record


def _read_highlights(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    return _read_lines(path, _highlights_row, HIGHLIGHT_FIELDS)


def _read_videos(path: Path, what: str, timing) -> tuple[list[QueryRecord], list[Skip]]:
    """ActivityNet Captions and TACoS files: one JSON object with an object per video holding
    ``timestamps`` and ``sentences``. ``timing(entry)`` gives the factor that makes its timestamps
    seconds and the video's length by the file (or None); a moment's end past that length is cut to
    it. One record per sentence, qid ``<video id>_<index>``; a malformed entry skips its video."""
    records, skips = [], []
    for video, entry in _read_json(path, dict, f"a {what} file holds one JSON object, {{video: {{...}}}}").items():
        where, video_id = f"{path}: video {video}", _strip_extension(str(video))
        try:
            if not isinstance(entry, dict):
                raise TypeError(f"a video's entry must be an object, got {entry!r}"[:120])
            scale, duration = timing(entry)
            stamps, sentences = entry["timestamps"], entry["sentences"]
            if not isinstance(stamps, list) or not isinstance(sentences, list) or len(stamps) != len(sentences):
                raise ValueError(f"timestamps and sentences must be lists of the same length, got "
                                 f"{len(stamps) if isinstance(stamps, list) else stamps!r} and "
                                 f"{len(sentences) if isinstance(sentences, list) else sentences!r}"[:160])
        except (KeyError, TypeError, ValueError) as error:
            skips.append(Skip(video_id, f"{where}: malformed entry ({type(error).__name__}: {error})", what="video"))
            continue
        for i, (stamp, sentence) in enumerate(zip(stamps, sentences, strict=True)):
            source = f"{where} sentence {i}"
            try:
                start, end = (v * scale for v in _window(stamp, "timestamps"))
                query = _text(sentence, "sentence")
            except (TypeError, ValueError) as error:
                skips.append(Skip(video_id, f"{source}: malformed ({type(error).__name__}: {error})",
                                  qid=f"{video_id}_{i}"))
                continue
            if duration is not None and start < duration < end:
                end = duration
            records.append(QueryRecord(f"{video_id}_{i}", video_id, query, [(start, end)], source=source,
                                       video_file=str(video) if str(video) != video_id else None))
    return records, skips


def _activitynet_timing(entry: dict) -> tuple[float, float | None]:
    """Seconds already; ``duration`` the annotated length."""
    duration = entry.get("duration")
    return 1.0, None if duration is None else _number(duration, "duration")


def _tacos_timing(entry: dict) -> tuple[float, float | None]:
    """Frames, at the entry's own ``fps``; ``num_frames`` the length."""
    fps = _number(entry["fps"], "fps")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps:g}")
    frames = entry.get("num_frames")
    return 1.0 / fps, None if frames is None else _number(frames, "num_frames") / fps


def _read_activitynet(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    return _read_videos(path, "ActivityNet Captions", _activitynet_timing)


def _read_tacos(path: Path) -> tuple[list[QueryRecord], list[Skip]]:
    return _read_videos(path, "TACoS", _tacos_timing)


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
    if not record.moments and not (record.saliency and "label" in record.saliency):
        return f"{record.source}: no moments (and no highlight label)"
    for start, end in record.moments:
        if not (math.isfinite(start) and math.isfinite(end)):
            return f"{record.source}: moment [{start}, {end}] is not finite"
        if start < 0:
            return f"{record.source}: moment [{start}, {end}] starts before 0"
        # Seed frames are inclusive, so a one-frame event has end == start.
        if end < start or (end == start and record.unit == "seconds"):
            return f"{record.source}: moment [{start}, {end}] has end <= start"
    return None
