"""Video files: find, probe, re-encode, decode and sample. Pure functions over paths and bytes.

Decoding is torchcodec's (it reads what the system FFmpeg reads); re-encoding for shards runs
the ``ffmpeg`` program, which streams any length of video in constant memory. Both apply the
rotation metadata of phone videos.

The sampling spec (``SamplingConfig``: frames per second, frames per window, frame size) is applied
here and only here: ``open_video`` + ``sample_times`` + ``sample_frames`` are what the training
stream, evaluation, ``vmr predict``, the demo, ``vmr shards verify`` and the benchmarks decode with,
and ``inference_windows`` / ``training_span`` place the windows. Frames are always found by their
presentation time, so variable-frame-rate files and files that do not start at 0 give the right
frames at the right times.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from vmr.config import SamplingConfig
from vmr.data.annotations import VIDEO_EXTENSIONS
from vmr.errors import UserError
from vmr.io import first_line
from vmr.spans import frame_windows


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    fps: float
    num_frames: int
    width: int
    height: int
    start: float  # pts of the first frame in seconds (non-zero in some real files)
    stream: int = 0  # index of the video stream decoded (files can hold several)

    def to_json(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def inside(folder: Path, path: Path) -> bool:
    """Whether ``path``, symlinks resolved, is inside ``folder`` (symlinks resolved too)."""
    return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(folder)))


def video_files(folder: Path, follow_links: bool = False) -> list[Path]:
    """The video files of a folder (by extension), sorted; unless ``follow_links``, not those that
    are symlinks leading outside it. THE listing of a videos folder, whether a user named it on the
    command line or a file (an index's ``videos``) names it."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS
                  and p.is_file() and (follow_links or inside(folder, p)))


def find_video(videos_dir: Path, video_id: str, file_name: str | None = None, follow_links: bool = False) -> Path | None:
    """The file a video id names: the annotation's file name, the id itself, else ``<id>.<ext>``.
    Raises ValueError for a name that leads outside ``videos_dir`` (``../x``, an absolute path), or,
    unless ``follow_links``, a file that is a symlink leading outside it: annotations must never
    make vmr read, let alone pack, files the user did not point it at."""
    root = os.path.normpath(os.path.abspath(videos_dir))
    for name in (file_name, video_id):
        if name and not os.path.normpath(os.path.join(root, name)).startswith(root + os.sep):
            raise ValueError(f"video id {name!r} points outside the videos folder {videos_dir}")
    for name in (file_name, video_id, *(f"{video_id}.{ext}" for ext in VIDEO_EXTENSIONS)):
        try:
            if name and (videos_dir / name).is_file():
                if not follow_links and not inside(videos_dir, videos_dir / name):
                    raise ValueError(f"{videos_dir / name} is a link leading outside {videos_dir} "
                                     "(pass --follow-links to read such files)")
                return videos_dir / name
        except OSError as error:  # a name too long for the file system, an unreadable folder: this video's
            raise ValueError(f"video id {name[:60]!r}{'...' if len(name) > 60 else ''}: "
                             f"{error.strerror or error}") from None
    return None


TAIL_FRAMES = 16  # how far back from the promised last frame a probe looks for one that decodes


def probe(source: str | Path | bytes, check_decode: bool = True) -> VideoInfo:
    """Stream facts from a full scan of the file (exact mode), and, with ``check_decode``, a decode
    of its first and last frames, so truncated or corrupt files fail here and not in training. A
    container whose index promises a few frames more than decode (common in AVI files) is taken
    as the frames that do: the last of the final ``TAIL_FRAMES`` that decodes ends it. Raises
    ValueError with torchcodec's reason."""
    last = None
    try:
        decoder = open_video(source)
        meta = decoder.metadata
        n = len(decoder)
        if n == 0:
            raise ValueError("no video frames")
        if check_decode:
            decoder.get_frames_at([0])
            last = _last_decodable(decoder, n)
    except (RuntimeError, ValueError, IndexError) as error:
        raise ValueError(first_line(error, 300)) from None
    start = float(meta.begin_stream_seconds or 0.0)
    end = float(meta.end_stream_seconds) if meta.end_stream_seconds is not None else None
    if last is not None and last[0] < n - 1:  # what decodes, not what the index promised
        n, end = last[0] + 1, last[1]
    fps = float(meta.average_fps) if meta.average_fps else n / (end - start)
    duration = (end - start) if end is not None else n / fps
    return VideoInfo(duration, fps, n, int(meta.width), int(meta.height), start, int(meta.stream_index or 0))


def _last_decodable(decoder, n: int) -> tuple[int, float]:
    """(index, end time in seconds) of the last frame that decodes, looking back at most
    ``TAIL_FRAMES`` from the promised last one; the promised last one's error when none does."""
    first_error = None
    for index in range(n - 1, max(-1, n - 1 - TAIL_FRAMES), -1):
        try:
            frame = decoder.get_frame_at(index)
        except (RuntimeError, ValueError, IndexError) as error:
            first_error = first_error or error
            continue
        return index, float(frame.pts_seconds) + float(frame.duration_seconds or 0.0)
    raise first_error


def open_video(source: str | Path | bytes):
    """A torchcodec decoder in exact seek mode: one scan of the file's packets (nothing decoded)
    indexes every frame's presentation time, so a time maps to the frame really shown then.
    Approximate mode turns seconds into frame indices with the header's average rate, which picks
    wrong frames, or indices past the end, in variable-frame-rate video (phone recordings). One
    FFmpeg thread: the DataLoader's workers give the parallelism."""
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(str(source) if isinstance(source, Path) else source, seek_mode="exact", num_ffmpeg_threads=1)



def require_ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        raise UserError("re-encoding needs the ffmpeg program on PATH (install FFmpeg, e.g. 'apt-get install ffmpeg')")
    return path


def reencode(src: Path, dst: Path, fps: float | None, size: int | None, keyframe_interval: float | None,
             source_fps: float, stream: int = 0) -> None:
    """Re-encode to H.264/yuv420p MP4 for cheap decoding in training: optionally a lower frame
    rate, the shorter side scaled to ``size``, a keyframe every ``keyframe_interval`` seconds
    (0 = every frame). No audio. Timestamps start at 0. One encoder thread: ``--workers`` gives
    the parallelism, and the output bytes do not depend on it. ``stream`` is the video stream
    torchcodec decodes (``VideoInfo.stream``), so that the shard holds what prediction would read
    from the same file. Raises ValueError on failure."""
    filters = ["setpts=PTS-STARTPTS"]
    if fps and source_fps and math.isfinite(source_fps) and fps > source_fps:
        fps = source_fps  # never above the source's rate: duplicated frames only cost (the json has the rate kept)
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
        "-map", f"0:{stream}", "-an", "-sn", "-dn", "-map_metadata", "-1",
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
        source = open_video(source)
    indices = [int(i) for i in source._get_key_frame_indices()]
    if not indices:
        return []
    # Their real presentation times (an index over the average rate is wrong for variable rates).
    begin = float(source.metadata.begin_stream_seconds or 0.0)
    return [float(t) - begin for t in source.get_frames_at(indices).pts_seconds]


def window_tolerance(fps: float) -> float:
    """How far past the end of a video a window may reach and still be clipped rather than
    rejected: annotations round times (QVHighlights uses 2-second steps) and re-encoding can
    shorten a stream by a frame or two."""
    return max(0.25, 2.0 / fps) if math.isfinite(fps) and fps > 0 else 0.25


# ----- frame sampling: which timestamps to decode ------------------------------------------------


def sample_times(
    duration: float,
    mode: str,
    fps: float,
    limit: int,
    rng=None,
    jitter: bool = False,
    span: tuple[float, float] | None = None,
) -> list[float]:
    """Timestamps in seconds (from the video's start) of the frames to decode in ``span`` (default
    the whole video): n = length * fps equal bins (at most ``limit``: the window for a training
    window, for a whole video the number of frames its stream holds, so that a container whose
    times promise more than the stream has never plans more than it holds), one frame per bin.

    uniform    the centre of each bin; with ``jitter`` the whole grid moves by one random offset.
    random     one random time in each bin (training).
    (keyframes, the third training mode, picks frames by index: ``keyframe_indices``.)
    """
    lo, hi = span if span is not None else (0.0, duration)
    length = hi - lo
    n = max(1, min(limit, math.floor(length * fps + 1e-6)))
    bin_ = length / n
    if mode == "random":
        offsets = [rng.random() for _ in range(n)] if rng is not None else [0.5] * n
    elif mode == "uniform":
        shift = rng.random() if (jitter and rng is not None) else 0.5
        offsets = [shift] * n
    else:
        raise ValueError(f"unknown frame sampling {mode!r}")
    return [lo + (i + u) * bin_ for i, u in enumerate(offsets)]


def keyframe_indices(decoder, span: tuple[float, float], limit: int) -> list[int]:
    """Indices of the key frames inside ``span`` (seconds from the start, placed by the average
    rate: the decoded frames' real times are checked afterwards), thinned evenly to ``limit``: the
    cheapest sampling, since no frame other than the returned ones is decoded."""
    fps = float(decoder.metadata.average_fps or 1.0)
    keys = [int(i) for i in decoder._get_key_frame_indices()] or [0]
    inside = [i for i in keys if span[0] <= i / fps < span[1]] or [min(keys, key=lambda i: abs(i / fps - span[0]))]
    if len(inside) > limit:
        step = len(inside) / limit
        inside = [inside[int(i * step)] for i in range(limit)]
    return inside


def sample_frames(decoder, times: list[float] | None, size: int, start: float = 0.0, indices: list[int] | None = None,
                  rng=None, scale: tuple[float, float] = (1.0, 1.0)):
    """THE frame sampler: the frames shown at ``times`` (seconds from the video's start; or the
    frames at ``indices``), square-cropped to ``size`` (see ``fit_frames``), as uint8 (t, 3, size, size),
    and their real presentation times (same origin). Times are clamped inside the stream."""
    import torch

    if indices is not None:
        batch = decoder.get_frames_at(indices)
    else:
        meta = decoder.metadata
        end = float(meta.end_stream_seconds) if meta.end_stream_seconds is not None else None
        begin = float(meta.begin_stream_seconds or start)
        absolute = [min(max(begin, t + start), end - 1e-6) if end is not None else t + start for t in times]
        batch = decoder.get_frames_played_at(absolute)
    pts = (batch.pts_seconds.to(torch.float64) - start).clamp_min(0.0)
    return fit_frames(batch.data, size, rng, scale), [float(t) for t in pts]


def fit_frames(frames, size: int, rng=None, scale: tuple[float, float] = (1.0, 1.0)):
    """uint8 (t, 3, h, w) -> (t, 3, size, size): a square crop (centred; with ``rng``, of a random
    area fraction in ``scale`` at a random place), resized only when its side is not ``size``."""
    import torch

    t, c, h, w = frames.shape
    side = min(h, w)
    if rng is not None and scale[0] < 1.0:
        side = max(1, round(side * math.sqrt(rng.uniform(*scale))))
        y0, x0 = rng.randint(0, h - side), rng.randint(0, w - side)
    else:
        y0, x0 = (h - side) // 2, (w - side) // 2
    crop = frames[:, :, y0:y0 + side, x0:x0 + side]
    if side == size:
        # A view: torchcodec's frames are channels-last in memory, and the collator's copy into the
        # batch converts the layout; copying here too cost about 10% of the loader's time.
        return crop
    resized = torch.nn.functional.interpolate(crop.float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


# ----- windows: which part of a video the temporal layers see at once ----------------------------


@dataclass(frozen=True)
class FrameWindow:
    """One window of a whole-video pass: frame ``times`` (seconds from the video's start) between
    ``start`` and ``end``; the window reports its frames ``own[0]:own[1]`` (positions in ``times``),
    those where it sees the most context, so that the windows' reports tile the video."""

    start: float
    end: float
    times: list[float]
    own: tuple[int, int]


def inference_windows(duration: float, spec: SamplingConfig, frames: int | None = None) -> list[FrameWindow]:
    """The whole video at the spec's rate (a frame at the centre of each 1/fps bin, never more bins
    than the stream's ``frames``), cut into windows of ``spec.window`` frames that overlap by
    ``spec.overlap`` of a window (``frame_windows``). A video no longer than a window is one window."""
    grid = sample_times(duration, "uniform", spec.fps, frames if frames is not None else 1 << 30)
    bin_ = duration / len(grid)
    return [FrameWindow(first * bin_, end * bin_, grid[first:end], (own_first - first, own_end - first))
            for first, end, own_first, own_end in frame_windows(len(grid), spec.window, spec.overlap)]


def training_span(duration: float, moments: tuple[float, float] | None, spec: SamplingConfig, rng,
                  crop: float = 0.0) -> tuple[float, float]:
    """[start, end) seconds of the part of a video one training step sees, at the trained rate.

    A video no longer than a window is seen whole, or, with probability ``crop``, cropped at
    random around ``moments`` (the hull of the chosen queries' windows). A longer video is seen
    through one window (window / fps seconds) placed at random so that it contains ``moments`` (or
    lies inside them when they are longer), except for a share ``spec.negatives`` of windows placed
    anywhere, which teach that the query may not happen in the part of the video shown."""
    length = spec.window / spec.fps
    if duration <= length + 1e-6:
        if moments is not None and rng.random() < crop:
            a, b = rng.uniform(0.0, moments[0]), rng.uniform(moments[1], duration)
            if b - a >= 1.0 / spec.fps:
                return a, b
        return 0.0, duration
    if moments is None or rng.random() < spec.negatives:
        a = rng.uniform(0.0, duration - length)
    elif moments[1] - moments[0] <= length:
        a = rng.uniform(max(0.0, moments[1] - length), min(moments[0], duration - length))
    else:
        a = rng.uniform(moments[0], min(moments[1], duration) - length)
    return a, a + length
