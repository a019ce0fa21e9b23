"""Span math in seconds. Importable by anything; imports nothing from vmr.

A window is ``(start, end)`` in seconds with ``end > start``. Frame ``f`` of a video at ``fps``
frames per second is shown during ``[f / fps, (f + 1) / fps)``, so an inclusive frame range
``[first, last]`` covers the seconds ``[first / fps, (last + 1) / fps]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Span = tuple[float, float]  # (start, end) in seconds: a moment, a clip, a prediction

# QVHighlights cuts every video into 2-second clips; relevant_clip_ids and saliency refer to them.
QVH_CLIP_SECONDS = 2.0


def frames_to_seconds(first_frame: int, last_frame: int, fps: float) -> Span:
    """Inclusive 0-based frame range -> span in seconds (the seed annotation format)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return first_frame / fps, (last_frame + 1) / fps


def seconds_to_frames(start: float, end: float, fps: float) -> tuple[int, int]:
    """Span in seconds -> inclusive 0-based frame range (inverse of frames_to_seconds)."""
    first = round(start * fps)
    last = max(first, round(end * fps) - 1)
    return first, last


def iou(a: Span, b: Span) -> float:
    """Temporal intersection over union of two spans (0 when they do not overlap)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def overlap(a: Span, b: Span) -> float:
    """Length in seconds of the intersection of two spans."""
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def nms(candidates: Sequence[tuple[float, float, float]], iou_threshold: float,
        top_k: int | None = None) -> list[tuple[float, float, float]]:
    """Greedy non-maximum suppression of ``(start, end, score)`` spans: best score first, and
    a span overlapping an already kept one by more than ``iou_threshold`` is dropped."""
    kept: list[tuple[float, float, float]] = []
    for cand in sorted(candidates, key=lambda c: -c[2]):
        if all(iou(cand[:2], k[:2]) <= iou_threshold for k in kept):
            kept.append(cand)
            if top_k is not None and len(kept) == top_k:
                break
    return kept


def clip_relevance(
    moments: Sequence[Span], duration: float, clip_seconds: float = QVH_CLIP_SECONDS
) -> list[float]:
    """Fraction of each fixed-length clip covered by the moments, clip ``c`` being
    ``[c * clip_seconds, (c + 1) * clip_seconds)`` cut at ``duration``."""
    n_clips = max(1, math.ceil(duration / clip_seconds - 1e-9))
    fractions = []
    for c in range(n_clips):
        clip = (c * clip_seconds, min((c + 1) * clip_seconds, duration))
        length = clip[1] - clip[0]
        covered = sum(overlap(clip, w) for w in merge_spans(moments))
        fractions.append(min(1.0, covered / length) if length > 0 else 0.0)
    return fractions


def merge_spans(spans: Sequence[Span]) -> list[Span]:
    """Union of spans as a sorted list of disjoint spans."""
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def frame_targets(moments: Sequence[Span], times: Sequence[float]) -> tuple[list[float], list[tuple[int, int]]]:
    """Per-frame relevance and, per moment, the first and last frame index inside it.

    A frame belongs to a moment when its timestamp lies in ``[start, end)``. A moment too short
    to hold any sampled frame gets the frame nearest its centre, so every query keeps a positive.
    """
    relevance = [0.0] * len(times)
    spans = []
    for start, end in moments:
        inside = [j for j, t in enumerate(times) if start <= t < end]
        if not inside and len(times):
            centre = (start + end) / 2
            inside = [min(range(len(times)), key=lambda j: abs(times[j] - centre))]
        for j in inside:
            relevance[j] = 1.0
        spans.append((inside[0], inside[-1]) if inside else (0, 0))
    return relevance, spans


def frame_windows(n: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Cut ``n`` frames into windows of ``size`` frames (fewer when ``n`` is smaller) overlapping by
    ``overlap`` of a window, the last one ending at frame ``n``. Returns ``(first, end, own_first,
    own_end)`` frame ranges: each window reports the frames [own_first, own_end), where it sees the
    most context; ownership changes hands in the middle of each overlap, so the owned ranges tile
    [0, n) in order."""
    size = max(1, min(size, n))
    stride = max(1, size - round(size * overlap))
    starts = list(range(0, n - size, stride)) + [n - size]
    bounds = [0] + [(starts[k] + starts[k - 1] + size) // 2 for k in range(1, len(starts))] + [n]
    return [(first, first + size, bounds[k], bounds[k + 1]) for k, first in enumerate(starts)]


def windows_over(times: Sequence[float], duration: float, size: int,
                 overlap: float) -> list[tuple[int, int, tuple[int, int], float, float]]:
    """Frames whose times are known (decoded, or stored in a cache) cut into windows of ``size``
    frames (``frame_windows``): ``(first, end, own, start, stop)`` with ``own`` the frames the window
    reports, relative to ``first``, and the window's span in seconds (``frame_edges``). Before
    decoding, ``vmr.data.video.inference_windows`` plans the same windows on the sampling grid."""
    edges = frame_edges(times, duration)
    return [(first, end, (own_first - first, own_end - first), edges[first], edges[end])
            for first, end, own_first, own_end in frame_windows(len(times), size, overlap)]


def frame_edges(times: Sequence[float], duration: float) -> list[float]:
    """Where each frame's share of the video begins and ends: 0, the midpoints between consecutive
    frame times, and the video's end. A window of frames [first, end) spans edges[first] to
    edges[end] seconds."""
    return [0.0, *((a + b) / 2 for a, b in zip(times, times[1:], strict=False)), max(duration, times[-1])]
