"""Learnable synthetic sample data: ``vmr synth``.

Every video shows a slowly changing background and several *events*. An event is an object with
two attributes (a colour and a shape) doing one action (moves left/right/up/down, grows, shrinks,
blinks) during a time window, and each distinct (colour, shape, action) of a video is one query:
"a red circle moves left". Events of a video overlap in time and share attributes with each
other (the same object doing another action, the same shape in another colour, ...), so a query
must be read in full to be localised, and the other queries of the video are its hard negatives.
About a quarter of the queries happen twice, giving two windows.

Windows are exact: an event is drawn on frames ``first..last`` and its window in seconds is
``[first / fps, (last + 1) / fps]`` (vmr.spans.frames_to_seconds). Everything derives from
``--seed``, so the same arguments give byte-identical annotation files and identical frames.

Output (DIR):
  videos/<video_id>.mp4   H.264, yuv420p, one keyframe every second
  annotations.json        all queries, seed schema (frame indices at the video's fps)
  train.jsonl, val.jsonl  QVHighlights schema (seconds), split by video, with 2-second clip
                          ids and saliency scores derived from how much of a clip is covered,
                          and ``told_apart_by``: which attribute alone separates the query from
                          the most similar other query of its video (``vmr eval --group-by``)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vmr.data.tars import sweep_temporaries
from vmr.errors import UserError
from vmr.io import write_text_atomic
from vmr.spans import clip_relevance, frames_to_seconds
from vmr.vocab import ACTIONS, COLOURS, SHAPES

# Sizes are fractions of the frame side so the task looks the same at any --size.
RADIUS = 0.10  # half-size of an object
TRAVEL = 0.40  # distance covered by a moving object over its event
GROW_RANGE = (0.05, 0.16)  # radius at the start and end of "grows" (reversed for "shrinks")
BLINK_PERIOD = 1.5  # seconds; not a divisor of 0.5 s or 1 s, so 1-2 fps sampling still sees it
MIN_EVENT, MAX_EVENT = 3.0, 10.0  # event length in seconds
P_TWICE = 0.25  # probability that an event happens twice in its video


@dataclass(frozen=True)
class Event:
    colour: str
    shape: str
    action: str
    first: int  # first frame, inclusive
    last: int  # last frame, inclusive
    x: float  # centre at the start of the event, fractions of the frame
    y: float

    @property
    def query(self) -> str:
        return f"a {self.colour} {self.shape} {self.action}"


def _pick_triples(rng: np.random.Generator, k: int) -> list[tuple[str, str, str]]:
    """k distinct (colour, shape, action) triples, most of them sharing attributes with an earlier
    one, so that no single attribute is enough to tell them apart."""
    total = len(COLOURS) * len(SHAPES) * len(ACTIONS)
    if k > total:
        raise UserError(f"--queries-per-video: at most {total} distinct queries exist, got {k}")
    colours = list(COLOURS)
    triples: list[tuple[str, str, str]] = []
    while len(triples) < k:
        if triples and rng.random() < 0.8:
            base = list(triples[rng.integers(len(triples))])
            # Change one or two of the three attributes of an existing event.
            for slot in rng.choice(3, size=rng.integers(1, 3), replace=False):
                options = (colours, SHAPES, ACTIONS)[slot]
                base[slot] = options[rng.integers(len(options))]
            triple = (base[0], base[1], base[2])
        else:
            triple = (
                colours[rng.integers(len(colours))],
                SHAPES[rng.integers(len(SHAPES))],
                ACTIONS[rng.integers(len(ACTIONS))],
            )
        if triple not in triples:
            triples.append(triple)
    return triples


def _start_position(rng: np.random.Generator, action: str) -> tuple[float, float]:
    """A start centre from which the whole motion stays inside the frame."""
    lo, hi = RADIUS, 1.0 - RADIUS
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if action == "moves left":
        x = rng.uniform(lo + TRAVEL, hi)
    elif action == "moves right":
        x = rng.uniform(lo, hi - TRAVEL)
    elif action == "moves up":
        y = rng.uniform(lo + TRAVEL, hi)
    elif action == "moves down":
        y = rng.uniform(lo, hi - TRAVEL)
    return float(x), float(y)


def plan_video(rng: np.random.Generator, n_frames: int, fps: float, queries: int) -> list[Event]:
    """The events of one video: one or two windows for each of ``queries`` distinct triples."""
    duration = n_frames / fps
    events = []
    for colour, shape, action in _pick_triples(rng, queries):
        longest = min(MAX_EVENT, duration / 3)
        twice = rng.random() < P_TWICE
        taken: list[tuple[int, int]] = []
        for _ in range(2 if twice else 1):
            length = max(2, round(rng.uniform(min(MIN_EVENT, longest), longest) * fps))
            # A second window never overlaps the first, so it reads as the event happening again.
            for _attempt in range(20):
                first = int(rng.integers(0, n_frames - length + 1))
                last = first + length - 1
                if all(last < a or first > b for a, b in taken):
                    break
            else:
                continue
            taken.append((first, last))
            x, y = _start_position(rng, action)
            events.append(Event(colour, shape, action, first, last, x, y))
    return events


class _Background:
    """A dim diagonal wave whose phase and tint drift with time: a moving, changing background that
    carries no information about the events.

    Determinism: numpy's vectorised sin may round differently depending on the array's memory
    alignment, which is enough to flip a pixel's uint8 value between two runs. So the sines of the
    grid are taken once with math.sin, and each frame only adds and multiplies (exactly rounded):
    sin(a + phase) = sin(a) cos(phase) + cos(a) sin(phase).
    """

    def __init__(self, size: int, tint: np.ndarray):
        coords = (np.arange(size) + 0.5) / size
        angles = [2 * math.pi * (0.8 * x + 0.6 * y) for y in coords for x in coords]
        self.sin = np.array([math.sin(a) for a in angles]).reshape(size, size)
        self.cos = np.array([math.cos(a) for a in angles]).reshape(size, size)
        self.tint = [float(v) * 6.0 for v in tint]

    def at(self, t: float) -> np.ndarray:
        phase = 0.35 * t
        wave = 0.5 + 0.5 * (self.sin * math.cos(phase) + self.cos * math.sin(phase))
        drift = np.array([0.6 + 0.4 * (0.5 + 0.5 * math.sin(0.21 * t + c)) for c in self.tint])
        return 40 + 50 * wave[..., None] * drift[None, None, :]


def _shape_mask(shape: str, cx: float, cy: float, r: float, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    yy, xx = grid
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # An upward triangle: its half-width grows linearly from the apex to the base.
    rel = (yy - (cy - r)) / (2 * r)
    return (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * r)


def _object_state(event: Event, frame: int, fps: float) -> tuple[float, float, float, bool]:
    """Centre, radius and visibility of an event's object on a frame inside its window."""
    span = max(1, event.last - event.first)
    p = (frame - event.first) / span  # 0 at the first frame, 1 at the last
    cx, cy, r, visible = event.x, event.y, RADIUS, True
    if event.action == "moves left":
        cx -= TRAVEL * p
    elif event.action == "moves right":
        cx += TRAVEL * p
    elif event.action == "moves up":
        cy -= TRAVEL * p
    elif event.action == "moves down":
        cy += TRAVEL * p
    elif event.action == "grows":
        r = GROW_RANGE[0] + (GROW_RANGE[1] - GROW_RANGE[0]) * p
    elif event.action == "shrinks":
        r = GROW_RANGE[1] - (GROW_RANGE[1] - GROW_RANGE[0]) * p
    elif event.action == "blinks":
        visible = ((frame - event.first) / fps) % BLINK_PERIOD < BLINK_PERIOD / 2
    return cx, cy, r, visible


def render_video(events: list[Event], n_frames: int, fps: float, size: int, tint: np.ndarray) -> torch.Tensor:
    """All frames of a video as uint8 ``(t, 3, h, w)``."""
    coords = (np.arange(size) + 0.5) / size
    grid = np.meshgrid(coords, coords, indexing="ij")  # (yy, xx), fractions of the frame
    background = _Background(size, tint)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for i in range(n_frames):
        image = background.at(i / fps)
        for event in events:
            if event.first <= i <= event.last:
                cx, cy, r, visible = _object_state(event, i, fps)
                if visible:
                    image[_shape_mask(event.shape, cx, cy, r, grid)] = COLOURS[event.colour]
        frames[i] = image.clip(0, 255).astype(np.uint8)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def encode_mp4(frames: torch.Tensor, fps: float, path: Path, keyframe_every: int) -> None:
    """H.264 / yuv420p with a keyframe every ``keyframe_every`` frames (cheap seeking later).

    Raw RGB frames go through the ffmpeg program with one thread and bit-exact flags: the same
    frames always give the same bytes. (torchcodec's in-process encoder gave different bytes now
    and then for identical frames in one process, which breaks --seed reproducibility.)
    """
    import subprocess

    from vmr.data.video import require_ffmpeg

    t, _, h, w = frames.shape
    command = [
        require_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "-",
        "-c:v", "libx264", "-preset", "fast", "-crf", "20", "-pix_fmt", "yuv420p",
        "-g", str(keyframe_every), "-threads", "1", "-map_metadata", "-1",
        "-fflags", "+bitexact", "-flags:v", "+bitexact", str(path),
    ]
    # Encoded beside, then renamed: a killed run leaves no half video under a real name.
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.mp4")
    command[-1] = str(tmp)
    rgb = frames.permute(0, 2, 3, 1).contiguous().numpy().tobytes()
    try:
        result = subprocess.run(command, input=rgb, capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"ffmpeg could not encode {path}: {result.stderr.decode(errors='replace').strip()[-300:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _video_id(index: int, rng: np.random.Generator, duration: float) -> str:
    # Every third id looks like a QVHighlights id (`<youtube id>_<start>_<end>`, dots included),
    # so everything downstream is exercised on ids whose first dot is not an extension.
    if index % 3 == 2:
        offset = 30.0 * int(rng.integers(0, 10))
        return f"synth{index:04d}_{offset:.1f}_{offset + duration:.1f}"
    return f"synth_{index:04d}"


OWN = {"annotations.json", "train.jsonl", "val.jsonl", "videos"}  # what synth writes in --out
# Its videos (_video_id's two forms) and, as for its files, a killed run's temporaries (.NAME.tmp-<pid>...).
OWN_VIDEO = re.compile(r"\.?synth(_\d{4,}|\d{4,}_\d+\.\d_\d+\.\d)(\.tmp-\d+)?\.mp4")


def _own_file(name: str) -> bool:
    return name in OWN or (name.startswith(".") and ".tmp-" in name and name[1:].split(".tmp-")[0] in OWN)


def check_own_folder(out: Path) -> None:
    """``out`` may be missing, empty, or an earlier synth's output (its files and videos, which are
    replaced): anything else is a user's, and synth never writes over it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    if not out.is_dir():
        return
    foreign = [p for p in out.iterdir() if not _own_file(p.name)]
    videos = out / "videos"
    if videos.is_dir():
        foreign += [p for p in videos.iterdir() if not OWN_VIDEO.fullmatch(p.name)]
    elif videos.exists():
        foreign.append(videos)
    if foreign:
        raise UserError(f"--out {out}: holds {foreign[0].relative_to(out)}, which vmr synth did not write; synth "
                        "writes into a new or empty folder, or over its own earlier output")


def told_apart_by(triple: tuple[str, str, str], others: list[tuple[str, str, str]]) -> str:
    """What tells a query apart from the most similar other query of its video: ``"action"`` when
    another event has the same colour and shape (only the action differs), likewise ``"shape"`` and
    ``"colour"``; ``"several"`` when every other event differs in two attributes or more; ``"alone"``
    when the video has no other query. Ties between two-attribute matches go to action, then shape,
    because motion is the hardest attribute to see."""
    if not others:
        return "alone"
    differing = [{name for name, a, b in zip(("colour", "shape", "action"), triple, other, strict=True) if a != b}
                 for other in others]
    for attribute in ("action", "shape", "colour"):
        if {attribute} in differing:
            return attribute
    return "several"


def _qvh_record(qid: int, query: str, vid: str, duration: float, windows: list[tuple[float, float]],
                apart_by: str) -> dict:
    """One QVHighlights line; saliency from the fraction of each 2-second clip the event covers:
    score ceil(4 * fraction) in 1..4 from two annotators, one less from a stricter third."""
    fractions = clip_relevance(windows, duration)
    clip_ids = [c for c, f in enumerate(fractions) if f > 0]
    scores = []
    for c in clip_ids:
        base = max(1, math.ceil(4 * fractions[c] - 1e-9))
        scores.append([base, base, max(1, base - 1) if fractions[c] < 1 else base])
    return {
        "qid": qid,
        "query": query,
        "duration": round(duration, 6),
        "vid": vid,
        "relevant_windows": [[round(s, 6), round(e, 6)] for s, e in windows],
        "relevant_clip_ids": clip_ids,
        "saliency_scores": scores,
        "told_apart_by": apart_by,  # an optional field: `vmr eval --group-by told_apart_by`
    }


def synthesize(
    out: Path,
    videos: int = 20,
    queries_per_video: int = 5,
    min_duration: float = 20.0,
    max_duration: float = 60.0,
    fps: float = 10.0,
    size: int = 224,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write the sample data set to ``out``; returns a summary."""
    if videos < 1:
        raise UserError(f"--videos must be at least 1, got {videos}")
    if queries_per_video < 1:
        raise UserError(f"--queries-per-video must be at least 1, got {queries_per_video}")
    if not 0 < min_duration <= max_duration:
        raise UserError(f"--min-duration/--max-duration: need 0 < min <= max, got {min_duration}, {max_duration}")
    if min_duration < 3:
        raise UserError(f"--min-duration must be at least 3 seconds, got {min_duration}")
    if fps <= 0 or fps > 60:
        raise UserError(f"--fps must be in (0, 60], got {fps}")
    if size < 16 or size % 2:
        raise UserError(f"--size must be an even number of pixels >= 16, got {size}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")

    check_own_folder(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_val = min(videos - 1, round(videos * val_fraction)) if videos > 1 else 0
    val_set = set(rng.permutation(videos)[:n_val].tolist())
    keyframe_every = max(1, math.floor(fps))  # at least one keyframe per second

    seed_rows, splits, made = [], {"train": [], "val": []}, set()
    qid = 0
    for index in tqdm(range(videos), desc="synth", unit="video", disable=not progress):
        vrng = np.random.default_rng([seed, index])  # per video: any video can be re-made alone
        n_frames = round(vrng.uniform(min_duration, max_duration) * fps)
        duration = n_frames / fps
        vid = _video_id(index, vrng, duration)
        events = plan_video(vrng, n_frames, fps, queries_per_video)
        frames = render_video(events, n_frames, fps, size, tint=vrng.uniform(0, 1, size=3))
        encode_mp4(frames, fps, out / "videos" / f"{vid}.mp4", keyframe_every)
        made.add(f"{vid}.mp4")

        by_query: dict[str, list[Event]] = {}
        for event in events:
            by_query.setdefault(event.query, []).append(event)
        triples = {query: (evs[0].colour, evs[0].shape, evs[0].action) for query, evs in by_query.items()}
        for query, evs in by_query.items():
            apart_by = told_apart_by(triples[query], [t for q, t in triples.items() if q != query])
            evs.sort(key=lambda e: e.first)
            for e in evs:
                seed_rows.append({
                    "id": len(seed_rows),
                    "video_id": f"{vid}.mp4",
                    "query": query,
                    "start_frame": e.first,
                    "end_frame": e.last,
                    "description": f"{query} (frames {e.first}-{e.last} at {fps:g} fps)",
                })
            windows = [frames_to_seconds(e.first, e.last, fps) for e in evs]
            split = "val" if index in val_set else "train"
            splits[split].append(_qvh_record(qid, query, vid, duration, windows, apart_by))
            qid += 1

    write_text_atomic(out / "annotations.json", json.dumps(seed_rows, indent=1) + "\n")
    for split, rows in splits.items():
        write_text_atomic(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for stale in (out / "videos").iterdir():  # an earlier, larger set's videos: not in these annotations
        if OWN_VIDEO.fullmatch(stale.name) and stale.name not in made:
            stale.unlink()
    sweep_temporaries(out, out / "videos")  # a killed run's (check_own_folder let no other's in)
    return {
        "videos": videos,
        "queries": qid,
        "train_queries": len(splits["train"]),
        "val_queries": len(splits["val"]),
        "val_videos": n_val,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--videos", type=int, default=20, help="number of videos (default: 20)")
    parser.add_argument("--queries-per-video", type=int, default=5,
                        help="distinct queries (events) per video (default: 5)")
    parser.add_argument("--min-duration", type=float, default=20.0, help="shortest video in seconds (default: 20)")
    parser.add_argument("--max-duration", type=float, default=60.0, help="longest video in seconds (default: 60)")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second (default: 10)")
    parser.add_argument("--size", type=int, default=224, help="frame width and height in pixels (default: 224)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of videos held out in val.jsonl (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default: 0)")


def run(args: argparse.Namespace) -> int:
    summary = synthesize(
        args.out, videos=args.videos, queries_per_video=args.queries_per_video,
        min_duration=args.min_duration, max_duration=args.max_duration, fps=args.fps,
        size=args.size, val_fraction=args.val_fraction, seed=args.seed,
    )
    print(
        f"wrote {summary['videos']} videos and {summary['queries']} queries to {args.out} "
        f"({summary['train_queries']} train / {summary['val_queries']} val queries, "
        f"{summary['val_videos']} held-out videos)"
    )
    return 0
