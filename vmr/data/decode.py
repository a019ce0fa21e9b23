"""The stream's decoding stage: one shard sample -> the items the collator batches.

A video sample is decoded by torchcodec at the sampling spec (``data.sampling``, vmr/data/video.py):
in training one window placed around up to ``data.queries_per_video`` queries, augmented; in
evaluation every window of the whole video. A feature sample (vmr/features.py) is cut into the same
windows from its stored frames without decoding anything. An item is one window of one video:

  key, video_id, frames (uint8 (t, 3, s, s) or fp16 tokens (t, k, c)), times (seconds from the
  window's start), duration, offset (where the window starts in its video), own, window
  (index, count), video_duration, queries: [{qid, query, moments (seconds, relative to the
  window), video_moments, saliency (per frame), clip_saliency, tags, text_features?}]

The shard's json keeps its own key ``windows`` for a query's moments (the shard format).
"""

from __future__ import annotations

import json
import math
import random

import torch

from vmr.config import DataConfig
from vmr.data.sources import FailureGuard
from vmr.data.tars import TEXT, TIMES, TOKENS, VIEW_TIMES, VIEWS
from vmr.data.video import (
    inference_windows,
    keyframe_indices,
    open_video,
    sample_frames,
    sample_times,
    training_span,
)
from vmr.spans import QVH_CLIP_SECONDS


def frame_saliency(saliency: dict | None, times: list[float]) -> list[float] | None:
    """Per-frame saliency in [0, 1] from the frame's clip: QVHighlights' mean annotator score (0-4)
    / 4, 0 outside its relevant clips; a highlight ``label``'s mean annotator score, scaled by the
    query's own lowest and highest (TVSum's 1-5 and YouTube Highlights' -1/1 alike; only the order
    of frames matters to the ranking loss)."""
    if not saliency:
        return None
    clip = saliency.get("clip_seconds", QVH_CLIP_SECONDS)
    if "label" in saliency:
        means = [sum(row) / len(row) for row in saliency["label"]]
        low, high = min(means), max(means)
        by_clip = dict(enumerate((m - low) / (high - low) if high > low else 0.0 for m in means))
    else:
        by_clip = {c: sum(s) / len(s) / 4.0 for c, s in zip(saliency["clip_ids"], saliency["scores"], strict=False)}
    return [by_clip.get(int(t // clip), 0.0) for t in times]


def _swap_left_right(text: str) -> str:
    words = text.split(" ")
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}
    return " ".join(swap.get(w, w) for w in words)


def _choose_queries(queries: list[dict], k: int, length: float, rng: random.Random) -> list[dict]:
    """Up to ``k`` queries at random, each one added only while the hull of all their windows still
    fits in ``length`` seconds (one training window), so that one window can hold them all. A query
    without windows (highlight detection) fits anywhere."""
    order = rng.sample(queries, len(queries))
    chosen, hull = [order[0]], _hull([order[0]])
    for q in order[1:]:
        if len(chosen) == k:
            break
        grown = _hull([*chosen, q])
        if grown is None or hull is None or grown[1] - grown[0] <= length:
            chosen.append(q)
            hull = grown
    return chosen


def _training_window(queries: list[dict], duration: float, data: DataConfig, rng: random.Random):
    """The queries one training step trains on a video and the part of it shown: at most
    ``data.queries_per_video``, whose moments fit one window, and the span (``training_span``:
    anywhere in the video when none of them has a moment)."""
    length = data.sampling.window / data.sampling.fps
    if len(queries) > data.queries_per_video or duration > length:
        queries = _choose_queries(queries, data.queries_per_video, length, rng)
    return queries, training_span(duration, _hull(queries), data.sampling, rng, crop=data.temporal_crop)


def _hull(queries: list[dict]) -> tuple[float, float] | None:
    """The span from the first moment of these queries to the last; None when they have none."""
    windows = [w for q in queries for w in q["windows"]]
    if not windows:
        return None
    return min(s for s, _ in windows), max(e for _, e in windows)


def window_item(meta: dict, key: str, frames, pts: list[float], span: tuple[float, float], own: tuple[int, int],
          window: tuple[int, int], queries: list[dict], flip: bool = False) -> dict:
    """One window of one video as the collator takes it: times and windows relative to the span."""
    offset, length = span[0], span[1] - span[0]
    items = []
    for q in queries:
        moments = [(max(0.0, s - offset), min(length, e - offset)) for s, e in q["windows"]]
        items.append({**({"text_features": q["text_features"]} if "text_features" in q else {}),
            "qid": q["qid"],
            "query": _swap_left_right(q["query"]) if flip else q["query"],
            "moments": [(s, e) for s, e in moments if e > s],  # none left: the query is a negative here
            "video_moments": [tuple(m) for m in q["windows"]],
            "saliency": frame_saliency(q.get("saliency"), pts),
            "clip_saliency": q.get("saliency"),
            "tags": q.get("tags", {}),
        })
    # A frame shown at the window's start can have been presented a little before it: clamp.
    return {"key": key, "video_id": meta["video_id"], "frames": frames,
            "times": [min(max(t - offset, 0.0), length) for t in pts],
            "duration": length, "offset": offset, "own": own, "window": window,
            "video_duration": float(meta["duration"]), "queries": items,
            # every sentence the video holds, sampled or not: another query of the batch asking one of
            # them is no negative for it (model.corpus)
            "sentences": sorted({_swap_left_right(q["query"]) if flip else q["query"]
                                 for q in meta.get("queries", [])})}


def sample_meta(sample: dict) -> dict:
    """A shard sample's ``json``, every field the loader uses checked (a ValueError, which skips the
    sample with its reason): the video id a string, the duration a positive number,
    the start finite, and each query an object with a qid, a sentence, finite windows inside the
    video, and ``tags`` / ``saliency`` objects when present."""
    meta = json.loads(sample["json"])
    key = sample.get("__key__", "")
    if not isinstance(meta, dict):
        raise ValueError("its json is not an object")
    video_id, duration, start = meta.get("video_id"), meta.get("duration"), meta.get("start", 0.0)
    if not isinstance(video_id, str) or not video_id:
        raise ValueError(f"'video_id' must be a non-empty string, got {video_id!r:.60} (sample {key!r})")
    for name, value, what in (("duration", duration, "a positive"), ("start", start, "a finite")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                name == "duration" and value <= 0):
            raise ValueError(f"'{name}' must be {what} number of seconds, got {value!r:.40}")
    queries = meta.get("queries")
    if not isinstance(queries, list):
        raise ValueError("'queries' must be a list")
    for number, q in enumerate(queries):
        where = f"queries[{number}]"
        if not isinstance(q, dict) or isinstance(q.get("qid"), bool) or not isinstance(q.get("qid"), (int, str)) \
                or not isinstance(q.get("query"), str) or not isinstance(q.get("windows"), list):
            raise ValueError(f"{where} must be an object with a qid, a query and its windows")
        for window in q["windows"]:
            if not (isinstance(window, list) and len(window) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in window)
                    and 0 <= window[0] < window[1] <= duration + 1e-3):
                raise ValueError(f"{where}: window {window!r:.60} is not [start, end] inside the video")
        for name in ("tags", "saliency"):
            if q.get(name) is not None and not isinstance(q[name], dict):
                raise ValueError(f"{where}: '{name}' must be an object")
    return meta


def _matches_stream(meta: dict, decoder) -> None:
    """The json's start and duration are the stored video's own (the builder probed that file)."""
    stream = decoder.metadata
    begin = float(stream.begin_stream_seconds or 0.0)
    if abs(meta.get("start", 0.0) - begin) > 0.05:
        raise ValueError(f"'start' {meta.get('start')!r:.30} is not its video's first frame ({begin:.3f} s)")
    if stream.end_stream_seconds is not None and meta["duration"] > float(stream.end_stream_seconds) - begin + 1.0:
        raise ValueError(f"'duration' {meta['duration']!r:.30} is longer than its video "
                         f"({float(stream.end_stream_seconds) - begin:.3f} s)")


def decode_video(sample: dict, data: DataConfig, rng: random.Random | None, train: bool):
    """One shard sample -> its items, sampled by ``data.sampling`` (see vmr/data/video.py).

    Training (``rng`` given): one window at the trained rate, placed around up to
    ``data.queries_per_video`` queries (``training_span``), with augmentation. Evaluation: the whole
    video at the trained rate, one item per window (``inference_windows``), every query in each."""
    if TOKENS in sample:
        yield from decode_features(sample, data, rng, train)
        return
    spec = data.sampling
    meta = sample_meta(sample)
    duration, start, key = float(meta["duration"]), float(meta.get("start", 0.0)), sample.get("__key__", "")
    queries = list(meta["queries"])
    decoder = open_video(sample["mp4"])
    _matches_stream(meta, decoder)
    if not train:
        windows = inference_windows(duration, spec, len(decoder))
        for k, window in enumerate(windows):
            frames, pts = sample_frames(decoder, window.times, spec.size, start)
            yield window_item(meta, key, frames, pts, (window.start, window.end), window.own, (k, len(windows)), queries)
        return

    queries, span = _training_window(queries, duration, data, rng)
    if spec.frames == "keyframes":
        indices = keyframe_indices(decoder, span, spec.window)
        frames, pts = sample_frames(decoder, None, spec.size, start, indices=indices, rng=rng, scale=data.scale_jitter)
        inside = [i for i, t in enumerate(pts) if span[0] <= t < span[1]] or [0]
        frames, pts = frames[inside], [min(max(pts[i], span[0]), span[1]) for i in inside]
    else:
        times = sample_times(duration, spec.frames, spec.fps, spec.window, rng=rng, jitter=data.temporal_jitter,
                             span=span)
        frames, pts = sample_frames(decoder, times, spec.size, start, rng=rng, scale=data.scale_jitter)
    flip = data.hflip and rng.random() < 0.5
    if flip:
        frames = frames.flip(-1)
    yield window_item(meta, key, frames, pts, span, (0, len(pts)), (0, 1), queries, flip)


def _array(data: bytes, name: str):
    """A sample member written by numpy (``.npy``: an array; ``.npz``: a mapping of arrays)."""
    import io

    import numpy as np

    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{name} is not a numpy array file ({error})") from None
    # A NaN or inf in a cache would train silently on garbage: the sample is skipped and counted.
    if isinstance(loaded, np.ndarray) and loaded.dtype.kind == "f" and not np.isfinite(loaded).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return loaded


def decode_features(sample: dict, data: DataConfig, rng: random.Random | None, train: bool):
    """A feature shard's sample -> its items, like ``decode_video`` but without decoding anything:
    the cache holds the tokens of every frame at the sampling rate (the centres of its 1/fps bins),
    so a training window and the evaluation windows are ranges of stored frames. ``frames`` of an
    item are fp16 tokens (t, k, c); queries carry their ``text_features`` when the cache has them.
    A training draw of a video with augmented views reads one of them at random."""
    from vmr.spans import windows_over

    spec = data.sampling
    meta = sample_meta(sample)
    duration, key = float(meta["duration"]), sample.get("__key__", "")
    tokens = torch.from_numpy(_array(sample[TOKENS], TOKENS))
    times = _array(sample[TIMES], TIMES).tolist()
    if tokens.ndim != 3 or len(tokens) != len(times) or not times:
        raise ValueError(f"{TOKENS} holds {tuple(tokens.shape)} for {len(times)} frame times")
    queries = list(meta["queries"])
    if TEXT in sample:
        with _array(sample[TEXT], TEXT) as text:
            queries = [{**q, "text_features": text[str(q["qid"])]} for q in queries]
    if not train:
        windows = windows_over(times, duration, spec.window, spec.overlap)
        for k, (first, end, own, start, stop) in enumerate(windows):
            yield window_item(meta, key, tokens[first:end], times[first:end], (start, stop), own, (k, len(windows)),
                              queries)
        return
    if VIEWS in sample:  # augmented views (vmr features extract --views): one of them, or the plain one
        view_times = _array(sample[VIEW_TIMES], VIEW_TIMES)
        view = rng.randrange(1 + len(view_times))
        if view:
            views = _array(sample[VIEWS], VIEWS)
            if views.shape[:2] != view_times.shape or views.shape[2:] != tokens.shape[1:]:
                raise ValueError(f"{VIEWS} holds {views.shape} for {view_times.shape} frame times")
            tokens, times = torch.from_numpy(views[view - 1]), view_times[view - 1].tolist()
    queries, span = _training_window(queries, duration, data, rng)
    inside = [i for i, t in enumerate(times) if span[0] <= t < span[1]][: spec.window] or \
        [min(range(len(times)), key=lambda i: abs(times[i] - span[0]))]
    picked = [times[i] for i in inside]
    yield window_item(meta, key, tokens[inside[0]:inside[-1] + 1], picked, span, (0, len(picked)), (0, 1), queries)


def decode_stage(src, data: DataConfig, rng: random.Random | None, train: bool, guard: FailureGuard):
    """Decode every sample; an undecodable one is counted and skipped, the stream goes on (until
    the guard sees nothing but failures). A video that fails after some of its windows were
    yielded ends there (its windows so far still count)."""
    for sample in src:
        try:
            yield from decode_video(sample, data, rng, train)
        except Exception as error:  # a corrupt video must never stop a run: count it and move on
            guard.failed(f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}", error)
            continue
        guard.succeeded()
