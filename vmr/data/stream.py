"""The input pipeline: WebDataset shards -> torchcodec decode in DataLoader workers -> batches.

``make_loader(shards, cfg.data, ...)`` is the one entry point for training, evaluation and the
benchmarks. Every stage is a step in ``ShardStream.__iter__``; stage functions live at module
level so they pickle into worker processes.

Each of the b "videos" of a batch is one window of a video: the part the temporal layers see at
once, at the sampling spec's rate (``data.sampling``; one window per video in training, every
window of each video in evaluation, see vmr/data/video.py). A batch (b windows, q queries, t frames,
l text tokens, w moments per query):
  videos        uint8 (b, t, 3, s, s)  CLIP normalisation happens on the device, not here; channels-last
                                       in memory (torchcodec's layout), a view as (b, t, 3, s, s)
  frame_mask    bool  (b, t)           False on padding
  frame_times   float (b, t)           seconds from the start of the window
  duration      float (b,)             the window's length in seconds
  offset        float64 (b,)           where the window starts in its video (seconds)
  own           long  (b, 2)           the frames [own[0], own[1]) this window reports in evaluation
  window        long  (b, 2)           (index of the window in its video, number of windows)
  video_duration float64 (b,); key     the whole video's length; the sample's key (one per video)
  text_ids, text_mask        (q, l)
  windows       float (q, w, 2) seconds, relative to the window (a moment outside it: none; the
                query is then a negative); window_mask bool (q, w)
  clip_windows  long  (q, w, 2) first and last frame index inside each window
  relevance     float (q, t)           1 where the frame's time is inside a window
  saliency      float (q, t)           annotator score / 4 of the frame's 2-second clip; has_saliency (q,)
  video_index   long  (q,)             which video of the batch a query belongs to
  frames        int                    the number of valid frames (a plain number: no device read)
  query_mask    bool  (q,)             False on padding queries (training batches have fixed
                                       sizes, ``BatchShape``: frames, queries and words padded)
  qid, query, video_id               lists, for predictions and logging (real queries only:
                                     padding queries come after them)
  ground_truth  list of QVHighlights-style rows, one per real query, whole-video times (for scoring)

The loader is never passed through ``accelerator.prepare``: ranks and workers split the shards
here, and ``loader.skipped`` counts samples that could not be decoded (they are skipped, the
stream goes on).
"""

from __future__ import annotations

import glob
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from vmr.config import DataConfig, SamplingConfig
from vmr.data.annotations import read_annotations
from vmr.data.shards import FEATURES, TEXT, TIMES, VIEW_TIMES, VIEWS
from vmr.data.video import (
    find_video,
    inference_windows,
    keyframe_indices,
    open_video,
    sample_frames,
    sample_times,
    training_span,
)
from vmr.errors import UserError
from vmr.spans import QVH_CLIP_SECONDS, clip_targets

# ----- shard lists ------------------------------------------------------------------------------


def expand_shards(spec: str | list[str], allow_pipe: bool = False) -> list[str]:
    """Shard URLs from paths, folders (every .tar inside), globs, brace patterns
    (``train-{000000..000099}.tar``), ``http(s)://`` URLs and, with ``allow_pipe``
    (``data.allow_pipe``), ``pipe:COMMAND``, which runs COMMAND in a shell."""
    import braceexpand

    urls: list[str] = []
    for item in [spec] if isinstance(spec, str) else spec:
        for pattern in braceexpand.braceexpand(item):
            if pattern.startswith("pipe:") and not allow_pipe:
                raise UserError(f"shards: {pattern[:80]!r} runs a shell command; set data.allow_pipe=true "
                                "to allow pipe: URLs (only for commands you wrote yourself)")
            if pattern.startswith("pipe:") or "://" in pattern:
                urls.append(pattern)
            elif Path(pattern).is_dir():
                urls += sorted(str(p) for p in Path(pattern).glob("*.tar"))
            elif any(c in pattern for c in "*?["):
                urls += sorted(glob.glob(pattern))
            elif Path(pattern).is_file():
                urls.append(pattern)
            else:
                raise UserError(f"shards: {pattern} does not exist")
    if not urls:
        raise UserError(f"shards: no shard matches {spec!r}")
    return urls


# curl's waits, bounded: connect within 10 s, then fail if fewer than 1 kB/s arrive for 60 s.
# (webdataset's own curl command retries for a minute and can wait forever on a stalled server.)
CURL = ["curl", "--connect-timeout", "10", "--speed-limit", "1024", "--speed-time", "60", "--retry", "2",
        "--retry-delay", "1", "-f", "-s", "-S", "-L"]


def open_url(url: str, mode: str = "rb", bufsize: int = 8192):
    """Open an http(s) shard through curl with bounded waits (a webdataset gopen scheme)."""
    from webdataset.gopen import Pipe

    if mode[0] != "r":
        raise ValueError(f"{url}: shards are only read here")
    return Pipe([*CURL, url], mode=mode, bufsize=bufsize, ignore_status=[141, 23], timeout=300.0)


def bounded_downloads() -> None:
    """Every webdataset read of an http(s) URL in this process (and the workers it forks) goes
    through ``open_url``: a server that accepts and never sends stops the read within a minute
    instead of hanging it. Called by every reader of shard URLs (the loader, feature extraction)."""
    from webdataset.gopen import gopen_schemes

    gopen_schemes["http"] = gopen_schemes["https"] = open_url


def count_samples(urls: list[str]) -> int | None:
    """Videos in these shards according to the manifests beside them; None when unknown."""
    from vmr.data.manifest import MANIFEST, read_manifest

    total, folders = 0, {}
    for url in urls:
        path = Path(url)
        if not path.is_file() or not (path.parent / MANIFEST).is_file():
            return None
        if path.parent not in folders:  # each folder's manifest read once
            splits = read_manifest(path.parent)["splits"].values()
            folders[path.parent] = {s["path"]: s for info in splits for s in info["shards"]}
        entry = folders[path.parent].get(path.name)
        if entry is None:
            return None
        total += entry["samples"]
    return total


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed or the launcher's environment."""
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ----- stages -------------------------------------------------------------------------------------


class StreamError(UserError):
    """The stream cannot go on (nothing but unreadable shards or samples). Raised in a DataLoader
    worker, re-raised in the main process with the worker's traceback glued to the message: the
    constructor keeps only the reason, so the user sees one line."""

    def __init__(self, message: str):
        super().__init__(message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip())


class SkipCounter:
    """Samples (and shards) skipped as unreadable, summed over the DataLoader's worker processes,
    with each worker's latest reason. One slot per worker in shared memory: each worker writes only
    its own slot, so no locking."""

    REASON_BYTES = 300

    def __init__(self, workers: int):
        self.slots = torch.zeros(max(1, workers), dtype=torch.int64).share_memory_()
        self.reasons = torch.zeros(max(1, workers), self.REASON_BYTES, dtype=torch.uint8).share_memory_()

    def add(self, worker: int, reason: str = "") -> None:
        self.slots[worker] += 1
        data = reason.encode(errors="replace")[: self.REASON_BYTES]
        self.reasons[worker].zero_()
        self.reasons[worker, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else 0

    @property
    def total(self) -> int:
        return int(self.slots.sum())

    @property
    def last_reason(self) -> str:
        """The latest reason of the first worker that has one ("" when nothing was skipped)."""
        for row in self.reasons:
            text = bytes(row.tolist()).rstrip(b"\0").decode(errors="replace")
            if text:
                return text
        return ""


MAX_FAILURES_IN_A_ROW = 50


class FailureGuard:
    """One worker's view of failures: each unreadable shard or sample counts once in the shared
    counter; a long run of them with no good sample in between stops the stream with the last
    reason, since an endless training stream of nothing but bad input would otherwise spin forever."""

    def __init__(self, counter: SkipCounter, worker: int):
        self.counter, self.worker, self.in_a_row = counter, worker, 0

    def failed(self, where: str, error: BaseException) -> None:
        first = str(error.args[0]) if error.args else ""
        text = first.strip().splitlines()[0][:200] if first.strip() else type(error).__name__
        reason = f"{where}: {text}"
        self.counter.add(self.worker, reason)
        self.in_a_row += 1
        if self.in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise StreamError(f"{self.in_a_row} shards or samples in a row could not be read; last: {reason}")

    def succeeded(self) -> None:
        self.in_a_row = 0

    def tar_handler(self, error: BaseException) -> bool:
        """webdataset handler for a shard or tar member that cannot be read: count it, go on."""
        # webdataset appends the shard's URL to the exception's arguments.
        url = error.args[-1] if len(error.args) > 1 and isinstance(error.args[-1], str) else "a shard"
        self.failed(url, error)
        return True


def shuffled(samples, buffer: int, rng: random.Random):
    """A shuffle buffer that never mixes two epochs: up to ``buffer`` samples are held and a random
    one is released for each new one; the rest is released, in random order, when ``samples`` ends."""
    held: list = []
    for sample in samples:
        held.append(sample)
        if len(held) >= buffer:
            yield held.pop(rng.randrange(len(held)))
    rng.shuffle(held)
    yield from held


def _share(samples, index: int, every: int, counts: list[int]):
    """Keep the samples at positions ``index``, ``index + every``, ...; count seen and kept."""
    for sample in samples:
        counts[0] += 1
        if (counts[0] - 1) % every == index % every:
            counts[1] += 1
            yield sample


def epoch_samples(urls: list[str], seed: str, slot: int, slots: int, handler, buffer: int, rng: random.Random):
    """Training: tar samples for one (rank, worker) slot, epoch after epoch, forever. Each epoch
    puts the shards in an order drawn for the epoch (the same on every rank) and deals them out:
    whole shards per slot when there are at least as many shards as slots, else every slot reads
    them all and keeps every ``slots``-th sample. So over all slots an epoch reads every video
    once; a slot whose share runs out before its quota goes on into the next epoch's share, so no
    worker ever runs dry and every rank runs the same number of steps (no end-of-epoch hang).
    With fewer samples than slots, a slot left without any shares them with the others. Samples are
    shuffled within the slot's share of each epoch (``buffer`` at a time)."""
    by_shard = len(urls) >= slots
    modulus, epoch, empty_passes = slots, 0, 0
    while True:
        order = list(urls)
        random.Random(f"{seed}-order-{epoch}").shuffle(order)
        tars = wds.tarfile_to_samples(handler=handler)({"url": u} for u in (order[slot::slots] if by_shard else order))
        counts = [0, 0]  # samples seen in this pass, and kept by this slot
        yield from shuffled(_share(tars, slot % modulus, 1 if by_shard else modulus, counts), buffer, rng)
        seen, own = counts
        if own == 0 and seen > 0 and not by_shard:
            modulus = seen  # more slots than samples: take sample slot % seen, shared with another slot
        empty_passes = empty_passes + 1 if own == 0 else 0
        if empty_passes >= MAX_FAILURES_IN_A_ROW:
            raise StreamError(f"{empty_passes} passes over this worker's share of {len(urls)} shard(s) found "
                              "no sample (empty shards?)")
        epoch += 1


def _qvh_saliency(saliency: dict | None, times: list[float]) -> list[float] | None:
    """Per-frame saliency in [0, 1]: the mean annotator score (0-4) of the frame's clip, / 4."""
    if not saliency:
        return None
    by_clip = {c: sum(s) / len(s) / 4.0 for c, s in zip(saliency["clip_ids"], saliency["scores"], strict=False)}
    clip = saliency.get("clip_seconds", QVH_CLIP_SECONDS)
    return [by_clip.get(int(t // clip), 0.0) for t in times]


def _swap_left_right(text: str) -> str:
    words = text.split(" ")
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}
    return " ".join(swap.get(w, w) for w in words)


def _choose_queries(queries: list[dict], k: int, length: float, rng: random.Random) -> list[dict]:
    """Up to ``k`` queries at random, each one added only while the hull of all their windows still
    fits in ``length`` seconds (one training window), so that one window can hold them all."""
    order = rng.sample(queries, len(queries))
    chosen, lo, hi = [order[0]], *_hull([order[0]])
    for q in order[1:]:
        if len(chosen) == k:
            break
        q_lo, q_hi = _hull([q])
        if max(hi, q_hi) - min(lo, q_lo) <= length:
            chosen.append(q)
            lo, hi = min(lo, q_lo), max(hi, q_hi)
    return chosen


def _training_window(queries: list[dict], duration: float, data: DataConfig, rng: random.Random):
    """The queries one training step trains on a video and the part of it shown: at most
    ``data.queries_per_video``, whose moments fit one window, and the span (``training_span``)."""
    length = data.sampling.window / data.sampling.fps
    if len(queries) > data.queries_per_video or duration > length:
        queries = _choose_queries(queries, data.queries_per_video, length, rng)
    return queries, training_span(duration, _hull(queries), data.sampling, rng, crop=data.temporal_crop)


def _hull(queries: list[dict]) -> tuple[float, float]:
    return min(s for q in queries for s, _ in q["windows"]), max(e for q in queries for _, e in q["windows"])


def _item(meta: dict, key: str, frames, pts: list[float], span: tuple[float, float], own: tuple[int, int],
          window: tuple[int, int], queries: list[dict], flip: bool = False) -> dict:
    """One window of one video as the collator takes it: times and windows relative to the span."""
    offset, length = span[0], span[1] - span[0]
    items = []
    for q in queries:
        windows = [(max(0.0, s - offset), min(length, e - offset)) for s, e in q["windows"]]
        items.append({**({"text_features": q["text_features"]} if "text_features" in q else {}),
            "qid": q["qid"],
            "query": _swap_left_right(q["query"]) if flip else q["query"],
            "windows": [(s, e) for s, e in windows if e > s],  # none left: the query is a negative here
            "video_windows": [tuple(w) for w in q["windows"]],
            "saliency": _qvh_saliency(q.get("saliency"), pts),
            "clip_saliency": q.get("saliency"),
            "tags": q.get("tags", {}),
        })
    # A frame shown at the window's start can have been presented a little before it: clamp.
    return {"key": key, "video_id": meta["video_id"], "frames": frames,
            "times": [min(max(t - offset, 0.0), length) for t in pts],
            "duration": length, "offset": offset, "own": own, "window": window,
            "video_duration": float(meta["duration"]), "queries": items}


def decode_video(sample: dict, data: DataConfig, rng: random.Random | None, train: bool):
    """One shard sample -> its items, sampled by ``data.sampling`` (see vmr/data/video.py).

    Training (``rng`` given): one window at the trained rate, placed around up to
    ``data.queries_per_video`` queries (``training_span``), with augmentation. Evaluation: the whole
    video at the trained rate, one item per window (``inference_windows``), every query in each."""
    if FEATURES in sample:
        yield from decode_features(sample, data, rng, train)
        return
    spec = data.sampling
    meta = json.loads(sample["json"])
    duration, start, key = float(meta["duration"]), float(meta.get("start", 0.0)), sample.get("__key__", "")
    queries = list(meta["queries"])
    decoder = open_video(sample["mp4"])
    if not train:
        windows = inference_windows(duration, spec)
        for k, window in enumerate(windows):
            frames, pts = sample_frames(decoder, window.times, spec.size, start)
            yield _item(meta, key, frames, pts, (window.start, window.end), window.own, (k, len(windows)), queries)
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
    yield _item(meta, key, frames, pts, span, (0, len(pts)), (0, 1), queries, flip)


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
    from vmr.spans import frame_edges, frame_windows

    spec = data.sampling
    meta = json.loads(sample["json"])
    duration, key = float(meta["duration"]), sample.get("__key__", "")
    tokens = torch.from_numpy(_array(sample[FEATURES], FEATURES))
    times = _array(sample[TIMES], TIMES).tolist()
    if tokens.ndim != 3 or len(tokens) != len(times) or not times:
        raise ValueError(f"{FEATURES} holds {tuple(tokens.shape)} for {len(times)} frame times")
    queries = list(meta["queries"])
    if TEXT in sample:
        with _array(sample[TEXT], TEXT) as text:
            queries = [{**q, "text_features": text[str(q["qid"])]} for q in queries]
    n = len(times)
    if not train:
        edges = frame_edges(times, duration)
        windows = frame_windows(n, spec.window, spec.overlap)
        for k, (first, end, own_first, own_end) in enumerate(windows):
            yield _item(meta, key, tokens[first:end], times[first:end], (edges[first], edges[end]),
                        (own_first - first, own_end - first), (k, len(windows)), queries)
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
    yield _item(meta, key, tokens[inside[0]:inside[-1] + 1], picked, span, (0, len(picked)), (0, 1), queries)


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


@dataclass(frozen=True)
class BatchShape:
    """Fixed sizes a training batch is padded to, so that every step has the same tensor shapes:
    no new allocations or kernel plans per step, and compiled code (``train.compile``) or CUDA
    graphs are reused instead of rebuilt. ``frames`` per window, ``queries`` per batch; words per
    query are padded to the collator's ``max_text_len``, and moments per query to a power of two of
    at least 4. A batch
    that needs more (never in training: windows hold at most ``frames`` frames, each video at most
    ``data.queries_per_video`` queries) grows to fit."""

    frames: int
    queries: int


def _bucket(n: int) -> int:
    return 1 << max(2, (n - 1).bit_length())


class Collator:
    """Items -> one padded batch (see the module docstring). Tokenises the queries. With ``shape``
    (training) the batch is padded to those fixed sizes; padded queries come last, with
    ``query_mask`` False, an empty sentence, no moment and no weight in the losses."""

    def __init__(self, tokenizer, max_text_len: int, shape: BatchShape | None = None):
        self.tokenizer, self.max_text_len, self.shape = tokenizer, max_text_len, shape

    def __call__(self, items: list[dict]) -> dict:
        shape = self.shape
        b, t = len(items), max(len(item["times"]) for item in items)
        queries = [(i, q) for i, item in enumerate(items) for q in item["queries"]]
        n_windows = max([len(q["windows"]) for _, q in queries] + [1])
        n_queries = len(queries)
        if shape is not None:
            t, n_queries, n_windows = max(t, shape.frames), max(n_queries, shape.queries), _bucket(n_windows)
        # In a loader worker the batch is built in shared memory (_empty): sending it to the main
        # process then costs no copy (what DataLoader's own collation does). Only padding is zeroed.
        first = items[0]["frames"]
        if first.dim() == 4:
            # uint8 frames (n, 3, s, s), which torchcodec decodes channels-last: the batch keeps that
            # memory layout (a view as (b, t, 3, s, s)), so filling it is a plain copy rather than
            # a transpose (3x faster on 224-px frames).
            _, c, h, w = first.shape
            videos = _empty((b, t, h, w, c), first.dtype).permute(0, 1, 4, 2, 3)
        else:  # a cache's fp16 tokens (n, k, c)
            videos = _empty((b, t, *first.shape[1:]), first.dtype)
        # Targets are built as Python lists and become tensors once: many small tensor writes
        # cost more than the numbers they hold.
        frame_mask, frame_times = [[False] * t for _ in items], [[0.0] * t for _ in items]
        windows = [[[0.0, 0.0]] * n_windows for _ in range(n_queries)]
        clip_windows = [[[0, 0]] * n_windows for _ in range(n_queries)]
        window_mask = [[False] * n_windows for _ in range(n_queries)]
        relevance, saliency = [[0.0] * t for _ in range(n_queries)], [[0.0] * t for _ in range(n_queries)]
        has_saliency = [False] * n_queries
        for i, item in enumerate(items):
            n = len(item["times"])
            videos[i, :n] = item["frames"]
            videos[i, n:] = 0
            frame_mask[i][:n], frame_times[i][:n] = [True] * n, item["times"]
        for j, (i, q) in enumerate(queries):
            rel, clips = clip_targets(q["windows"], items[i]["times"])
            relevance[j][: len(rel)] = rel
            for k, (window, clip) in enumerate(zip(q["windows"], clips, strict=True)):
                windows[j][k], clip_windows[j][k], window_mask[j][k] = list(window), list(clip), True
            if q["saliency"] is not None:
                scores = list(q["saliency"][:t])
                saliency[j][: len(scores)] = scores
                has_saliency[j] = True
        frame_mask, frame_times = torch.tensor(frame_mask, dtype=torch.bool), torch.tensor(frame_times)
        windows, clip_windows = torch.tensor(windows), torch.tensor(clip_windows, dtype=torch.long)
        window_mask = torch.tensor(window_mask, dtype=torch.bool)
        relevance, saliency = torch.tensor(relevance), torch.tensor(saliency)
        has_saliency = torch.tensor(has_saliency, dtype=torch.bool)
        query_mask = torch.arange(n_queries) < len(queries)
        sentences = [q["query"] for _, q in queries] + [""] * (n_queries - len(queries))
        text = self.tokenizer(sentences, padding="max_length" if shape is not None else True, truncation=True,
                              max_length=self.max_text_len, return_tensors="pt")
        extra = {}
        if "text_features" in queries[0][1]:  # imported query features replace the text tower
            feats = [torch.as_tensor(q["text_features"], dtype=torch.float32).reshape(-1, q["text_features"].shape[-1])
                     for _, q in queries]
            feats += [feats[0][:1] * 0] * (n_queries - len(queries))
            extra["text_features"] = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
            text["attention_mask"] = torch.nn.utils.rnn.pad_sequence([torch.ones(len(f)) for f in feats],
                                                                     batch_first=True)
        return {**extra,
            "videos": videos, "frame_mask": frame_mask, "frame_times": frame_times,
            "duration": torch.tensor([item["duration"] for item in items]),
            "offset": torch.tensor([item["offset"] for item in items], dtype=torch.float64),
            "own": torch.tensor([item["own"] for item in items], dtype=torch.long),
            "window": torch.tensor([item["window"] for item in items], dtype=torch.long),
            "video_duration": torch.tensor([item["video_duration"] for item in items], dtype=torch.float64),
            "key": [item["key"] for item in items],
            "text_ids": text["input_ids"], "text_mask": text["attention_mask"].bool(),
            "windows": windows, "window_mask": window_mask, "clip_windows": clip_windows,
            "relevance": relevance, "saliency": saliency, "has_saliency": has_saliency,
            "video_index": torch.tensor([i for i, _ in queries] + [0] * (n_queries - len(queries)), dtype=torch.long),
            "query_mask": query_mask,
            "frames": sum(len(item["times"]) for item in items),  # valid frames, counted on the host
            "qid": [q["qid"] for _, q in queries], "query": [q["query"] for _, q in queries],
            "video_id": [item["video_id"] for item in items],
            "ground_truth": [ground_truth_row(items[i], q) for i, q in queries],
        }


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def ground_truth_row(item: dict, query: dict) -> dict:
    """A query's ground truth in the QVHighlights JSONL layout, for scoring predictions on shards."""
    row = {**query.get("tags", {}), "qid": query["qid"], "query": query["query"], "vid": item["video_id"],
           "duration": item["video_duration"], "relevant_windows": [list(w) for w in query["video_windows"]]}
    saliency = query.get("clip_saliency")
    if saliency and saliency.get("clip_seconds", QVH_CLIP_SECONDS) == QVH_CLIP_SECONDS:
        row["relevant_clip_ids"], row["saliency_scores"] = list(saliency["clip_ids"]), list(saliency["scores"])
    return row


# ----- the stream -------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from shards for one rank. Training: each epoch's shards dealt out over ranks and
    workers (``epoch_samples``), shuffled, augmented, exactly ``epoch_batches`` batches per epoch
    on every rank. Evaluation: every sample exactly once over
    all ranks and workers, in order, no augmentation."""

    def __init__(self, urls: list[str], data: DataConfig, tokenizer, batch_size: int,
                 train: bool, rank: int, world: int, epoch_batches: int | None, counter: SkipCounter):
        super().__init__()
        self.urls, self.data, self.batch_size = urls, data, batch_size
        self.train, self.rank, self.world, self.epoch_batches = train, rank, world, epoch_batches
        shape = BatchShape(data.sampling.window, batch_size * data.queries_per_video)
        self.collate = Collator(tokenizer, data.max_text_len, shape if train else None)
        self.counter = counter
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseeds shuffling and augmentation; call before iterating an epoch."""
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        guard = FailureGuard(self.counter, worker)
        handler = guard.tar_handler

        if self.train:
            rng = random.Random(f"{self.data.seed}-{self.epoch}-{slot}")
            # At this point we have tar samples: {"__key__", "mp4": bytes, "json": bytes}, this
            # slot's share of each epoch's shards, forever.
            stream = epoch_samples(self.urls, f"{self.data.seed}-{self.epoch}", slot, slots, handler,
                                   self.data.shuffle_buffer, rng)
        else:
            rng = None
            # Every sample once over all (rank, worker) slots: whole shards per slot when there
            # are enough of them, else every slot reads all shards and keeps every slots-th sample.
            by_shard = len(self.urls) >= slots
            mine = self.urls[slot::slots] if by_shard else self.urls
            stream = wds.tarfile_to_samples(handler=handler)({"url": u} for u in mine)
            if not by_shard:
                stream = (s for i, s in enumerate(stream) if i % slots == slot)

        # Decoded: {"frames": uint8 (t, 3, s, s), "times", "duration", "queries", ...} per window:
        # one per video in training, every window of each video in evaluation.
        stream = decode_stage(stream, self.data, rng, self.train, guard)
        # Batched and collated: the dict described at the top of this file.
        stream = wds.batched(self.batch_size, collation_fn=self.collate, partial=not self.train)(stream)

        if self.train:
            # The rank's epoch_batches split over its workers: every rank runs the same number of steps.
            quota = self.epoch_batches // workers + (1 if worker < self.epoch_batches % workers else 0)
            for _, batch in zip(range(quota), stream, strict=False):
                yield batch
        else:
            yield from stream


def make_loader(shards: str | list[str], data: DataConfig, tokenizer, batch_size: int, train: bool,
                rank: int | None = None, world: int | None = None,
                epoch_batches: int | None = None, num_workers: int | None = None):
    """A DataLoader of batches for this rank (see ShardStream). ``loader.skipped`` is the number
    of samples skipped as undecodable so far; ``loader.dataset.set_epoch(e)`` reseeds."""
    urls = expand_shards(shards, data.allow_pipe)
    bounded_downloads()  # inherited by the forked workers
    if rank is None or world is None:
        rank, world = distributed_rank()
    workers = data.num_workers if num_workers is None else num_workers
    if train and epoch_batches is None:
        samples = data.epoch_samples or count_samples(urls)
        if samples is None:
            raise UserError("data.epoch_samples: shards without a manifest.json beside them need the "
                            "number of videos per epoch")
        epoch_batches = max(1, math.ceil(samples / (world * batch_size)))
    counter = SkipCounter(workers)
    stream = ShardStream(urls, data, tokenizer, batch_size, train, rank, world, epoch_batches, counter)
    # Batches are complete when they leave the stream: no default_convert walk over every field.
    # Pinned (page-locked) batches on CUDA: only those copy to the device while it computes.
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         persistent_workers=False, prefetch_factor=2 if workers else None,
                                         pin_memory=torch.cuda.is_available())
    loader.skip_counter = counter
    return loader


def _as_is(batch: dict) -> dict:
    return batch


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """A batch's tensors on ``device``; its lists and numbers as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def device_batches(batches, device):
    """``batches`` on ``device``, each copied there while the step before it computes. On CUDA the
    copy of the next batch is queued on a side stream before the current one is handed out, so it
    overlaps the current step's kernels; the compute stream waits for a batch's copy before using
    it, and the batch's memory is marked as used by that stream (so the allocator does not recycle
    it while a kernel still reads it). Elsewhere a plain copy: the same batches either way."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def issue(batch: dict) -> tuple[dict, torch.cuda.Event]:
        with torch.cuda.stream(side):
            moved = to_device(batch, device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        return moved, copied

    upcoming = None
    for batch in batches:
        ready, upcoming = upcoming, issue(batch)
        if ready is not None:
            yield _arrived(*ready, compute)
    if upcoming is not None:
        yield _arrived(*upcoming, compute)


def _arrived(batch: dict, copied, compute) -> dict:
    compute.wait_event(copied)  # this batch's copy only, not the one queued after it
    for value in batch.values():
        if torch.is_tensor(value):
            value.record_stream(compute)
    return batch


def skipped(loader) -> int:
    return loader.skip_counter.total


# ----- map-style access to loose files (small data, the demo) -------------------------------------


class VideoMomentDataset(torch.utils.data.Dataset):
    """Videos in a folder plus an annotation file (any supported format), one item per video in
    the same format as the stream's decoded items; batch them with ``Collator``. Every query of a
    video, the whole video at ``sampling.fps`` (one window however long: for small data), no
    augmentation. ``sampling.frames`` says where each frame sits in its 1/fps bin: ``uniform`` at the
    centre, ``random`` anywhere (seeded by the item's index), ``keyframes`` the video's key frames."""

    def __init__(self, video_dir: str | Path, annotation_file: str | Path, sampling: SamplingConfig | None = None):
        self.video_dir = Path(video_dir)
        records, _ = read_annotations(Path(annotation_file))
        self.videos: dict[str, list] = {}
        for record in records:
            self.videos.setdefault(record.video_id, []).append(record)
        self.ids = list(self.videos)
        self.sampling = sampling or SamplingConfig(frames="uniform")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        from vmr.data.video import probe

        video_id, spec = self.ids[index], self.sampling
        records = self.videos[video_id]
        try:
            path = find_video(self.video_dir, video_id, records[0].video_file)
        except ValueError as error:
            raise UserError(str(error)) from None
        if path is None:
            raise UserError(f"{self.video_dir}: no video file for {video_id!r}")
        info = probe(path, check_decode=False)
        decoder = open_video(path)
        if spec.frames == "keyframes":
            indices = keyframe_indices(decoder, (0.0, info.duration), 1 << 30)
            frames, pts = sample_frames(decoder, None, spec.size, info.start, indices=indices)
        else:
            rng = random.Random(index) if spec.frames == "random" else None
            frames, pts = sample_frames(decoder, sample_times(info.duration, spec.frames, spec.fps, 1 << 30, rng=rng),
                                        spec.size, info.start)
        queries = [{"qid": r.qid, "query": r.query, "windows": r.seconds(info.fps), "saliency": r.saliency}
                   for r in records]
        meta = {"video_id": video_id, "duration": info.duration}
        return _item(meta, path.name, frames, pts, (0.0, info.duration), (0, len(pts)), (0, 1), queries)
