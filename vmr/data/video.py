"""Video files: find, probe, re-encode, decode. Pure functions over paths and bytes.

Decoding is torchcodec's (it reads what the system FFmpeg reads); re-encoding for shards runs
the ``ffmpeg`` program, which streams any length of video in constant memory and applies the
rotation metadata of phone videos.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from vmr.data.annotations import VIDEO_EXTENSIONS
from vmr.errors import UserError


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    fps: float
    num_frames: int
    width: int
    height: int
    start: float  # pts of the first frame in seconds (non-zero in some real files)

    def to_json(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def find_video(videos_dir: Path, video_id: str, file_name: str | None = None) -> Path | None:
    """The file a video id names: the annotation's file name, the id itself, else ``<id>.<ext>``.
    Raises ValueError for a name that leads outside ``videos_dir`` (``../x``, an absolute path):
    annotations must never make vmr read, let alone pack, files the user did not point it at."""
    root = os.path.normpath(os.path.abspath(videos_dir))
    for name in (file_name, video_id):
        if name and not os.path.normpath(os.path.join(root, name)).startswith(root + os.sep):
            raise ValueError(f"video id {name!r} points outside the videos folder {videos_dir}")
    for name in (file_name, video_id, *(f"{video_id}.{ext}" for ext in VIDEO_EXTENSIONS)):
        if name and (videos_dir / name).is_file():
            return videos_dir / name
    return None


def probe(source: str | Path | bytes, check_decode: bool = True) -> VideoInfo:
    """Stream facts from a full scan of the file (exact mode), and, with ``check_decode``, a decode
    of its first and last frames, so truncated or corrupt files fail here and not in training.
    Raises ValueError with torchcodec's reason."""
    from torchcodec.decoders import VideoDecoder

    source = str(source) if isinstance(source, Path) else source
    try:
        decoder = VideoDecoder(source, seek_mode="exact", num_ffmpeg_threads=1)
        meta = decoder.metadata
        n = len(decoder)
        if n == 0:
            raise ValueError("no video frames")
        if check_decode:
            decoder.get_frames_at([0, n - 1])
    except (RuntimeError, ValueError, IndexError) as error:
        raise ValueError(_first_line(error)) from None
    start = float(meta.begin_stream_seconds or 0.0)
    end = float(meta.end_stream_seconds) if meta.end_stream_seconds is not None else None
    fps = float(meta.average_fps) if meta.average_fps else n / (end - start)
    duration = (end - start) if end is not None else n / fps
    return VideoInfo(duration, fps, n, int(meta.width), int(meta.height), start)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def require_ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        raise UserError("re-encoding needs the ffmpeg program on PATH (install FFmpeg, e.g. 'apt-get install ffmpeg')")
    return path


def reencode(src: Path, dst: Path, fps: float | None, size: int | None, keyframe_interval: float | None,
             source_fps: float) -> None:
    """Re-encode to H.264/yuv420p MP4 for cheap decoding in training: optionally a lower frame
    rate, the shorter side scaled to ``size``, a keyframe every ``keyframe_interval`` seconds
    (0 = every frame). No audio. Timestamps start at 0. One encoder thread: ``--workers`` gives
    the parallelism, and the output bytes do not depend on it. Raises ValueError on failure."""
    filters = ["setpts=PTS-STARTPTS"]
    if fps:
        filters.append(f"fps={fps:g}")
    if size:
        # Shorter side to `size`, the other side keeps the aspect ratio, rounded to even (yuv420p).
        filters.append(f"scale='if(lte(iw,ih),{size},-2)':'if(lte(iw,ih),-2,{size})'")
        filters.append("setsar=1")
    out_fps = fps or source_fps
    interval = 1.0 if keyframe_interval is None else keyframe_interval
    gop = max(1, round(interval * out_fps))
    command = [
        require_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
        "-map", "0:v:0", "-an", "-sn", "-dn", "-map_metadata", "-1",
        "-vf", ",".join(filters), "-c:v", "libx264", "-preset", "fast", "-crf", "23",
        "-pix_fmt", "yuv420p", "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
        "-threads", "1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
        "-movflags", "+faststart", str(dst),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not dst.is_file() or dst.stat().st_size == 0:
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"ffmpeg failed: {message[:300]}")


def keyframe_times(source) -> list[float]:
    """Times in seconds from the video's start of its key frames. ``source`` is a path, bytes, or
    a VideoDecoder opened with ``seek_mode="exact"`` (the key frame list needs that scan)."""
    from torchcodec.decoders import VideoDecoder

    if not isinstance(source, VideoDecoder):
        source = VideoDecoder(str(source) if isinstance(source, Path) else source, seek_mode="exact")
    fps = source.metadata.average_fps
    return [int(i) / fps for i in source._get_key_frame_indices()]


def window_tolerance(fps: float) -> float:
    """How far past the end of a video a window may reach and still be clipped rather than
    rejected: annotations round times (QVHighlights uses 2-second steps) and re-encoding can
    shorten a stream by a frame or two."""
    return max(0.25, 2.0 / fps) if math.isfinite(fps) and fps > 0 else 0.25


# ----- frame sampling: which timestamps to decode ------------------------------------------------


def sample_times(
    duration: float,
    mode: str,
    clip_fps: float,
    max_frames: int,
    rng=None,
    jitter: bool = False,
    keyframes: list[float] | None = None,
    span: tuple[float, float] | None = None,
) -> list[float]:
    """Timestamps in seconds (from the video's start) of the frames to decode.

    uniform    the centres of n equal bins over the span, n = duration * clip_fps, at most
               max_frames (the rate drops for long videos); with ``jitter`` the whole grid moves
               by one random offset within a bin.
    random     one random time in each of the same n bins (training).
    keyframes  the key frames inside the span, thinned evenly to at most max_frames: the
               cheapest, since no frame other than the returned ones is decoded.
    ``span`` restricts sampling to [start, end) (a temporal crop).
    """
    lo, hi = span if span is not None else (0.0, duration)
    length = hi - lo
    if mode == "keyframes":
        inside = [t for t in (keyframes or []) if lo <= t < hi] or [lo]
        if len(inside) > max_frames:
            step = len(inside) / max_frames
            inside = [inside[int(i * step)] for i in range(max_frames)]
        return inside
    n = max(1, min(max_frames, math.floor(length * clip_fps + 1e-6)))
    bin_ = length / n
    if mode == "random":
        offsets = [rng.random() for _ in range(n)] if rng is not None else [0.5] * n
    elif mode == "uniform":
        shift = rng.random() if (jitter and rng is not None) else 0.5
        offsets = [shift] * n
    else:
        raise ValueError(f"unknown frame sampling {mode!r}")
    return [lo + (i + u) * bin_ for i, u in enumerate(offsets)]


def decode_frames(decoder, times: list[float], start: float = 0.0):
    """Frames played at ``times`` (seconds from the video's start) as uint8 (t, 3, h, w) and
    their real presentation times (same origin). Times are clamped inside the stream."""
    import torch

    meta = decoder.metadata
    end = float(meta.end_stream_seconds) if meta.end_stream_seconds is not None else None
    begin = float(meta.begin_stream_seconds or start)
    absolute = [min(max(begin, t + start), end - 1e-6) if end is not None else t + start for t in times]
    batch = decoder.get_frames_played_at(absolute)
    return batch.data, (batch.pts_seconds.to(torch.float64) - start).clamp_min(0.0)
