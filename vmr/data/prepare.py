"""One video of a shard build, prepared: found in the videos folder, probed (its real length and
start), re-encoded when asked (fps, size, keyframes; never above its own rate), and its queries'
moments converted to seconds and checked against its length. Runs in the build's worker
processes; every failure becomes a ``Skip`` with its reason, never an exception."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmr.data.annotations import QueryRecord, Skip
from vmr.data.tars import sanitise_key
from vmr.data.video import find_video, probe, reencode, window_tolerance
from vmr.errors import out_of_space

MAX_REENCODE_FPS = 240.0  # the fastest common cameras; re-encoding never goes above a video's own rate


@dataclass
class VideoTask:
    video_id: str
    file_name: str | None
    queries: list[QueryRecord]


@dataclass
class PreparedVideo:
    video_id: str
    path: Path  # the bytes to store
    temporary: bool  # a re-encoded file to delete once stored
    meta: dict
    skips: list[Skip]


@dataclass(frozen=True)
class EncodeParams:
    """How the sources are read and stored: re-encoding settings, and whether a video file may be a
    symlink leading outside the videos folder (``--follow-links``)."""

    fps: float | None
    size: int | None
    keyframe_interval: float | None
    follow_links: bool = False

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.fps, self.size, self.keyframe_interval))


def query_json(record: QueryRecord, windows: list[tuple[float, float]]) -> dict:
    row = {"qid": record.qid, "query": record.query.strip(),
           "windows": [[round(s, 6), round(e, 6)] for s, e in windows]}
    if record.saliency is not None:
        row["saliency"] = record.saliency
    if record.tags:
        row["tags"] = record.tags
    return row


def prepare_video(task: VideoTask, videos_dir: Path, params: EncodeParams, tmp_dir: Path) -> PreparedVideo | Skip:
    """Find, probe and optionally re-encode one video; convert and check its queries' windows.
    Runs in a worker process; every failure becomes a Skip with its reason."""
    try:
        path = find_video(videos_dir, task.video_id, task.file_name, params.follow_links)
    except ValueError as error:
        return Skip(task.video_id, what="video", reason=str(error))
    if path is None:
        return Skip(task.video_id, what="video", reason=f"video file not found in {videos_dir} "
                                   f"(tried {task.file_name or task.video_id} and <id>.mp4/.mkv/.avi/.mov/.webm)")
    try:
        source = probe(path)
    except ValueError as error:
        return Skip(task.video_id, f"{path}: unreadable or corrupt video ({error})", what="video")

    stored, stored_path, temporary = source, path, False
    if params.active:
        stored_path = tmp_dir / f"{sanitise_key(task.video_id)}.{os.getpid()}.mp4"
        try:
            reencode(path, stored_path, params.fps, params.size, params.keyframe_interval, source.fps, source.stream)
            stored = probe(stored_path)
        except ValueError as error:
            # A full disk is the build's problem, not the video's: stop, never skip a good video.
            full = out_of_space(error, stored_path)
            stored_path.unlink(missing_ok=True)
            if full is not None:
                raise full from None
            return Skip(task.video_id, f"{path}: re-encode failed ({error})", what="video")
        temporary = True

    queries, skips = [], []
    tolerance = window_tolerance(source.fps)
    for record in task.queries:
        windows = record.seconds(source.fps)
        bad = next(((s, e) for s, e in windows if e > source.duration + tolerance), None)
        if bad is not None:
            skips.append(Skip(task.video_id, f"{record.source}: window [{bad[0]:g}, {bad[1]:g}] is outside "
                                             f"the video (0 to {source.duration:.3f} s)", qid=record.qid))
            continue
        labels = (record.saliency or {}).get("label")
        if labels is not None and (len(labels) - 1) * record.saliency["clip_seconds"] > source.duration + tolerance:
            skips.append(Skip(task.video_id, f"{record.source}: label has {len(labels)} clips of "
                                             f"{record.saliency['clip_seconds']:g} s, more than the video's "
                                             f"{source.duration:.3f} s", qid=record.qid))
            continue
        # Within tolerance of the end: clip to the stored video's real length.
        windows = [(s, min(e, stored.duration)) for s, e in windows]
        if any(e <= s for s, e in windows):
            skips.append(Skip(task.video_id, f"{record.source}: window starts at or after the end of the video",
                              qid=record.qid))
            continue
        queries.append(query_json(record, windows))
    if not queries:
        if temporary:
            stored_path.unlink(missing_ok=True)
        skips.append(Skip(task.video_id, f"{path}: no valid queries left for this video", what="video"))
        return PreparedVideo(task.video_id, path, False, {}, skips)

    meta = {"video_id": task.video_id, **stored.to_json(), "source_file": path.name, "queries": queries}
    return PreparedVideo(task.video_id, stored_path, temporary, meta, skips)


def prepare_star(args: tuple) -> PreparedVideo | Skip:
    return prepare_video(*args)
