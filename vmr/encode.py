"""Encode a video once, then ask it any number of questions.

A query enters the model only above the towers: what the vision tower makes of each frame does not
depend on the sentence. ``encode_video`` decodes the whole video once at the model's sampling spec
and keeps the tower's tokens of every frame with their times (an ``EncodedVideo``); ``ask`` runs
only the text tower and the layers above, window by window exactly as ``vmr predict`` does, and
returns what ``vmr predict`` returns. An encoding is saved and read in the feature-shard layout
(vmr/features.py): a saved encoding is a feature cache of one video, and a folder of feature shards
made by ``vmr features extract`` or ``vmr index`` holds an encoding of each of its videos.

    from vmr.bundle import load_model
    from vmr.encode import encode_video

    model, _ = load_model("runs/quickstart")
    video = encode_video(model, "kitchen.mp4")
    for answer in video.ask(model, ["a person opens the fridge", "a person washes a cup"]):
        print(answer["moments"][:1])

Legend: t frames, k tokens per frame (class token then patch grid, or the pooled vector only),
c the tower's width.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vmr.cache import check_cache, check_reads_videos, check_tower, tower_extractor
from vmr.config import SamplingConfig
from vmr.data.manifest import MANIFEST, by_tower, read_manifest
from vmr.data.tars import TIMES, TOKENS, TarShard, npy_bytes, sanitise_key, shard_damage
from vmr.errors import UserError
from vmr.io import FolderLock, first_line, json_text, write_text_atomic
from vmr.spans import windows_over
from vmr.text import check_query

if TYPE_CHECKING:  # torch is imported where it is used: 'vmr --help' stays instant
    import torch

ENCODING = "video-000000.tar"  # the one shard of a saved encoding
CHUNK = 64  # frames decoded and encoded at once: memory bounded whatever the video's length


def encode_frames_at(model, decoder, times: list[float], spec: SamplingConfig, start: float, device,
                     crop: tuple[float, tuple[float, float]] | None = None) -> tuple[torch.Tensor, list[float]]:
    """The vision tower's tokens (t, k, c) of the frames shown at ``times`` (seconds from the video's
    start), in the tower's dtype on the CPU, and the frames' real times; CHUNK frames at a time.
    ``crop`` (seed, scale): one random square crop of an area fraction in ``scale``, the same for
    every frame (each chunk redraws it from the same seed)."""
    import torch

    from vmr.data.video import sample_frames

    tokens, pts = [], []
    for first in range(0, len(times), CHUNK):
        rng, scale = (random.Random(crop[0]), crop[1]) if crop else (None, (1.0, 1.0))
        frames, at = sample_frames(decoder, times[first:first + CHUNK], spec.size, start, rng=rng, scale=scale)
        with torch.no_grad():
            tokens.append(model.towers.encode_frames(frames.to(device)).cpu())
        pts += at
    return torch.cat(tokens), pts


@dataclasses.dataclass
class EncodedVideo:
    """What the vision tower made of every frame of one video: ``tokens`` (t, k, c) at ``times``
    (seconds from the video's start, the frames' real presentation times), the video's ``duration``,
    the sampling ``spec`` it was read at and the ``extractor`` record of the tower (vmr/cache.py)."""

    video_id: str
    duration: float
    times: list[float]
    tokens: torch.Tensor
    spec: SamplingConfig
    extractor: dict

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()

    def bytes_per_minute(self) -> float:
        return self.nbytes / max(self.duration / 60, 1e-9)

    def windows(self, window: int | None = None):
        """The windows ``score_windows`` takes: tokens in place of frames, planned over the stored
        frame times as the cache's evaluation windows are (``windows_over``)."""
        size = window or self.spec.window
        for first, end, own, start, stop in windows_over(self.times, self.duration, size, self.spec.overlap):
            yield self.tokens[first:end], self.times[first:end], start, stop, own

    def scores(self, model, queries: list[str], window: int | None = None) -> list[dict]:
        """Per query, the ``frame_outputs`` of the whole video (``rank_moments`` ranks them)."""
        check_tower(self.extractor, model, f"the encoding of {self.video_id}")
        for query in queries:
            check_query(model.tokenizer, query)
        return model.score_windows(self.windows(window), queries, self.duration)

    def ask(self, model, queries: str | list[str], top_k: int = 5, nms_iou: float | None = None,
            window: int | None = None, video: str | None = None) -> list[dict]:
        """``vmr predict``'s JSON for each query: ranked ``moments`` in seconds and one score per
        frame. Only the text tower and the layers above run."""
        from vmr.model import rank_moments

        queries = [queries] if isinstance(queries, str) else list(queries)
        if not queries:
            raise UserError("no query given")
        nms_iou = model.nms_iou if nms_iou is None else nms_iou
        size = window or self.spec.window
        count = len(windows_over(self.times, self.duration, size, self.spec.overlap))
        answers = []
        for query, scores in zip(queries, self.scores(model, queries, window), strict=True):
            moments = rank_moments(scores, top_k, nms_iou)
            answers.append({
                "video": video or self.video_id, "duration": round(self.duration, 4), "query": query,
                "sampling": {"fps": self.spec.fps, "window": size, "windows": count, "frames": len(self.times)},
                "moments": [{"start": round(s, 4), "end": round(e, 4), "score": round(p, 4)} for s, e, p in moments],
                "frame_times": [round(t, 4) for t in scores["times"]],
                "frame_scores": [round(s, 4) for s in scores["relevance"]]})
        return answers

    def sample(self) -> tuple[str, dict[str, bytes], dict]:
        """(key, members, json) of this video as a feature shard's sample: fp16 tokens."""
        import numpy as np
        import torch

        meta = {"video_id": self.video_id, "duration": self.duration, "start": 0.0, "queries": []}
        return (sanitise_key(self.video_id),
                {TOKENS: npy_bytes(self.tokens.to(torch.float16).numpy(), f"{self.video_id}: {TOKENS}"),
                 TIMES: npy_bytes(np.asarray(self.times, dtype=np.float64))}, meta)

    def save(self, folder: str | Path) -> Path:
        """A feature cache of this one video in ``folder`` (a new or empty folder, or one this method
        wrote before): its shard, then its manifest. Tokens are stored in float16, as extraction stores
        them."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            raise UserError(f"{folder}: not empty and not an encoding; save to a new folder")
        if (folder / MANIFEST).is_file():  # only a saved encoding is replaced: never a cache or an index
            splits = read_manifest(folder)["splits"]
            if list(splits) != ["video"] or [s["path"] for s in splits["video"]["shards"]] != [ENCODING]:
                raise UserError(f"{folder}: holds shards that are not a saved encoding; save to another folder")
        folder.mkdir(parents=True, exist_ok=True)
        with FolderLock(folder, "saving an encoding"):
            shard = TarShard(folder, ENCODING)
            try:
                shard.write(*self.sample())
                entry = shard.close()
            except BaseException:
                shard.abort()
                raise
            manifest = {"kind": "features", "extractor": self.extractor, "skipped": [],
                        "splits": {"video": {"shards": [entry], "samples": 1, "queries": 0}}}
            write_text_atomic(folder / MANIFEST, json_text(manifest, folder / MANIFEST, indent=1) + "\n")
        return folder


def encode_video(model, source: str | Path | bytes, fps: float | None = None, video_id: str | None = None,
                 device=None) -> EncodedVideo:
    """Decode the whole video (a path or its bytes) once at the model's sampling spec (``fps``
    overrides its rate) and run the vision tower on every frame: one frame at the centre of each
    1/fps bin, as ``vmr predict`` and evaluation read it. One-line UserErrors for a missing or
    undecodable file."""
    from vmr.data.video import open_video, probe, sample_times

    check_reads_videos(model)
    name = video_id or (Path(source).stem if not isinstance(source, bytes) else "video")
    where = str(source) if not isinstance(source, bytes) else name
    if not isinstance(source, bytes):
        source = Path(source)
        if not source.is_file():
            raise UserError(f"{source}: file not found")
    try:
        info = probe(source)
    except ValueError as error:
        raise UserError(f"{where}: cannot decode this video ({error})") from None
    if fps is not None and fps > info.fps + 1e-6:  # frames that do not exist: the same ones again
        raise UserError(f"--fps {fps:g} is above the video's own {info.fps:g} frames/s ({where})")
    spec = dataclasses.replace(model.sampling, fps=fps or model.sampling.fps)
    was_training = model.training
    model.eval()
    try:
        tokens, times = encode_frames_at(model, open_video(source), sample_times(info.duration, "uniform", spec.fps,
                                                                                  info.num_frames),
                                          spec, info.start, device or next(model.parameters()).device)
    except (ValueError, RuntimeError, IndexError) as error:
        raise UserError(f"{where}: cannot decode this video ({first_line(error)})") from None
    finally:
        model.train(was_training)
    return EncodedVideo(name, info.duration, times, tokens, spec, extractor=tower_extractor(model, spec, False, where))


# ----- reading encodings back: a folder of feature shards --------------------------------------------


def check_encodings(folder: str | Path, model) -> tuple[dict, SamplingConfig]:
    """(manifest, sampling spec) of a folder of feature shards that ``model`` can read: its tower,
    width, token count and rate checked; a one-line UserError otherwise."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{folder}: no manifest.json here (not an index or a saved encoding)")
    manifest = read_manifest(folder)
    if manifest["kind"] != "features":
        raise UserError(f"{folder}: holds video shards, not encodings (build an index with 'vmr index')")
    extractor = manifest["extractor"]
    if not by_tower(extractor) and not model.config.feature_dim:
        raise UserError(f"{folder}: holds imported features, which only a model trained on them reads "
                        "(model.feature_dim)")
    check_cache(extractor, model, model.sampling, str(folder))
    check_tower(extractor, model, str(folder))
    sampling = extractor.get("sampling", {})
    unknown = sorted(set(sampling) - {f.name for f in dataclasses.fields(SamplingConfig)})
    if unknown:  # written by something else than vmr's extractor: not read on trust
        raise UserError(f"{folder / MANIFEST}: extractor.sampling: unknown key {unknown[0]!r}")
    # The frames are the features' (their rate and times); how the head reads them, its window and their
    # overlap, is the model's own (imported features record window 1: they have none).
    return manifest, SamplingConfig(**{**dataclasses.asdict(model.sampling), **sampling,
                                       "window": model.sampling.window, "overlap": model.sampling.overlap})


def open_encodings(folder: str | Path, model, skipped: list | None = None) -> Iterator[EncodedVideo]:
    """Every video of a folder of feature shards (a saved encoding, ``vmr index``, ``vmr features
    extract``) as an ``EncodedVideo``, checked against ``model`` (``check_encodings``). An unreadable
    sample is appended to ``skipped`` (key, reason) and the others go on; an unreadable folder,
    manifest or shard is a one-line UserError."""
    folder = Path(folder)
    manifest, spec = check_encodings(folder, model)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            # Read only what this folder's manifest recorded: a shard changed or copied in from
            # another index since has another size or sha256.
            damage = shard_damage(folder, entry) if "sha256" in entry and "bytes" in entry else None
            if damage is not None:
                raise UserError(f"{folder / entry['path']}: {damage} (listed in {folder / MANIFEST}); "
                                "rebuild the index")
            yield from _read_shard(folder / entry["path"], spec, manifest["extractor"], skipped)


def _read_shard(path: Path, spec: SamplingConfig, extractor: dict, skipped: list | None) -> Iterator[EncodedVideo]:
    import webdataset as wds

    if not path.is_file():
        raise UserError(f"{path}: missing (listed in its folder's manifest.json)")
    try:
        samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
    except Exception as error:  # a damaged tar: webdataset and tarfile's many types
        raise UserError(f"{path}: not a readable tar shard ({first_line(error, 160)})") from None
    for sample in samples:
        key = sample.get("__key__", "?")
        try:
            video = sample_video(key, sample["json"], sample[TOKENS], sample[TIMES], spec, extractor)
        except Exception as error:  # one bad sample: listed, the others go on
            if skipped is None:
                raise UserError(f"{path}: sample {key}: {first_line(error)}") from None
            skipped.append({"key": key, "shard": path.name, "reason": first_line(error)})
            continue
        yield video


def sample_video(key: str, meta: bytes, tokens: bytes, times: bytes, spec: SamplingConfig,
                 extractor: dict) -> EncodedVideo:
    """A feature shard's sample (its key and members' bytes) as an EncodedVideo, checked (ValueError):
    the loader's checks of its json, its video id its key's, and ``encoded``'s of its arrays."""
    from vmr.data.decode import _array, sample_meta

    meta = sample_meta({"json": meta, "__key__": key})  # id, duration, start, queries
    if sanitise_key(meta["video_id"]) != key:  # an index's samples are keyed by their video
        raise ValueError(f"'video_id' {meta['video_id']!r:.60} is not the video of sample {key!r}")
    return encoded(str(meta["video_id"]), meta["duration"], _array(tokens, TOKENS), _array(times, TIMES), spec,
                   extractor)


def encoded(video_id: str, duration: float, tokens, times, spec: SamplingConfig, extractor: dict) -> EncodedVideo:
    """An EncodedVideo from a stored sample's arrays, checked (ValueError): tokens as many as times and
    as the extractor promises per frame; times the frames' own, in order, inside the video, whose
    duration ends within a bin or two of the last (more would be a video the frames do not cover)."""
    import torch

    if tokens.ndim != 3 or times.ndim != 1 or len(tokens) != len(times) or not len(times):
        raise ValueError(f"{TOKENS} holds {tokens.shape} for {times.shape} frame times")
    if tokens.shape[1:] != (extractor["tokens"], extractor["width"]):  # what the manifest promises
        raise ValueError(f"{TOKENS} holds {tokens.shape[1]} tokens of width {tokens.shape[2]} per frame, its "
                         f"manifest's extractor {extractor['tokens']} of width {extractor['width']}")
    check_times(times, duration)
    return EncodedVideo(video_id, float(duration), times.tolist(), torch.from_numpy(tokens), spec, extractor)


def check_times(times, duration: float) -> None:
    """Stored frame times (a 1-d array), checked (ValueError): the frames' own, in order, inside the video,
    whose duration ends within a bin or two of the last."""
    import numpy as np

    if times.ndim != 1 or not len(times):
        raise ValueError(f"{TIMES} holds {times.shape}, not one time per frame")
    step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0]
    if not np.isfinite(times).all() or (np.diff(times) < 0).any() or times[0] < 0 or times[-1] > duration \
            or duration > times[-1] + 2 * step + 10:
        raise ValueError(f"{TIMES} ({times[0]:.6g} to {times[-1]:.6g} s) does not fit the video's {duration:.6g} s")


def load_encoding(folder: str | Path, model) -> EncodedVideo:
    """The one video of a saved encoding (``EncodedVideo.save``)."""
    videos = list(open_encodings(folder, model))
    if len(videos) != 1:
        raise UserError(f"{folder}: holds {len(videos)} videos, not one encoding (open it as an index)")
    return videos[0]
