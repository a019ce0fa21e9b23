"""The field's released features -> feature shards: ``vmr features import``.

Moment-DETR, Lighthouse and UniVTG release per-clip features as ``<vid>.npz`` (``features``:
(clips, dim), one row per 2-s clip on QVHighlights) and query features as ``qid<qid>.npz``
(``last_hidden_state`` (tokens, dim) or ``pooler_output`` (dim,)). They are packed with their
annotations into the feature-shard layout that ``vmr features extract`` writes (vmr/features.py),
so training, evaluation and prediction read both alike.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from vmr.config import SamplingConfig
from vmr.data.annotations import read_annotations
from vmr.data.manifest import MANIFEST, check_split, claim
from vmr.data.prepare import query_json
from vmr.data.tars import (
    TEXT,
    TIMES,
    TOKENS,
    ShardWriter,
    npy_bytes,
    npz_bytes,
    sanitise_key,
    sweep_temporaries,
)
from vmr.errors import UserError
from vmr.io import FolderLock, confined, json_text, read_npz, write_text_atomic
from vmr.spans import QVH_CLIP_SECONDS


def import_features(video_dirs: list[Path], text_dir: Path | None, annotations: Path, out: Path,
                    split: str = "train", clip_seconds: float = QVH_CLIP_SECONDS, max_videos_per_shard: int = 500,
                    progress: bool = True, overwrite: bool = False, dtype: str = "float16") -> dict:
    """``_import_features`` with the folder claimed (feature shards only; an existing split, or
    other features, only with ``overwrite``) and locked for the run."""
    check_split(split)
    claim(out, "features", split, overwrite)
    with FolderLock(out, f"vmr features import --split {split}"):
        sweep_temporaries(out)
        previous = claim(out, "features", split, overwrite)  # again: another run may have written meanwhile
        return _import_features(video_dirs, text_dir, annotations, out, split, clip_seconds, max_videos_per_shard,
                                progress, previous, overwrite, dtype)


def _import_features(video_dirs: list[Path], text_dir: Path | None, annotations: Path, out: Path, split: str,
                     clip_seconds: float, max_videos_per_shard: int, progress: bool, previous: dict,
                     overwrite: bool, dtype: str = "float16") -> dict:
    """Feature shards from the Moment-DETR / Lighthouse / UniVTG release layout: ``<vid>.npz`` with
    ``features`` (clips, dim) at ``clip_seconds`` per clip in each of ``video_dirs`` (L2-normalised
    each, concatenated along the feature axis, truncated to the shortest), and ``qid<qid>.npz`` with
    ``last_hidden_state`` (tokens, dim) or ``pooler_output`` (dim) in ``text_dir``. Queries come from
    a QVHighlights-style annotation file; a video or query without its files is skipped and listed.
    Stored as ``dtype`` (float16, half the size; float32 keeps the released numbers exactly, so that a
    converted published checkpoint reproduces its reference's predictions)."""
    import numpy as np
    from tqdm import tqdm

    records, skips = read_annotations(annotations)
    skipped = [{"video_id": s.video_id, "qid": s.qid, "reason": s.reason} for s in skips]
    by_video: dict[str, list] = {}
    seen: set = set()
    for record in records:
        if record.qid in seen:
            skipped.append({"video_id": record.video_id, "qid": record.qid,
                            "reason": f"{record.source}: duplicate qid {record.qid!r}"})
            continue
        seen.add(record.qid)
        by_video.setdefault(record.video_id, []).append(record)
    # Shards are written by the video shards' writer: temporary name, renamed when complete.
    writer = ShardWriter(out, split, 1 << 62, max_videos_per_shard)
    width, text_width = None, None
    try:
        for video_id, queries in tqdm(by_video.items(), desc="import", unit="video", disable=not progress, file=sys.stderr):
            parts = []
            for folder in video_dirs:
                path = confined(folder, f"{video_id}.npz", f"{annotations}: video id")
                if not path.is_file():
                    break
                array = read_npz(path, ("features",))
                if array.ndim != 2 or len(array) == 0:
                    raise UserError(f"{path}: 'features' must be (clips, dim), got {array.shape}")
                parts.append(array / np.linalg.norm(array, axis=1, keepdims=True).clip(min=1e-12))
            if len(parts) < len(video_dirs):
                skipped.append({"video_id": video_id, "reason": f"no {video_id}.npz in {folder}"})
                continue
            n = min(len(p) for p in parts)
            features = np.concatenate([p[:n] for p in parts], axis=1)
            if width not in (None, features.shape[1]):
                raise UserError(f"{video_id}: its features are {features.shape[1]}-d, earlier videos' {width}-d")
            width = features.shape[1]
            texts, kept = {}, []
            for record in queries:
                if text_dir is not None:
                    path = confined(text_dir, f"qid{record.qid}.npz", f"{annotations}: qid")
                    if not path.is_file():
                        skipped.append({"video_id": video_id, "qid": record.qid, "reason": f"{path} is missing"})
                        continue
                    array = read_npz(path, ("last_hidden_state", "pooler_output"))
                    if array.ndim > 2 and not all(n == 1 for n in array.shape[:-2]):
                        raise UserError(f"{path}: expected (tokens, dim) or (dim,), got {array.shape}")
                    if text_width not in (None, array.shape[-1]):
                        raise UserError(f"{path}: {array.shape[-1]}-d, earlier queries' features are {text_width}-d")
                    texts[str(record.qid)] = array.reshape(-1, array.shape[-1]).astype(dtype)
                    text_width = array.shape[-1]
                kept.append(query_json(record, record.seconds(1.0 / clip_seconds)))
            if not kept:
                continue
            # The rows cover the video in clip_seconds steps (QVHighlights: 75 rows for 150 s).
            duration = max([n * clip_seconds, *(e for q in kept for _, e in q["windows"])])
            meta = {"video_id": video_id, "duration": duration, "start": 0.0, "queries": kept}
            members = {TOKENS: npy_bytes(features[:, None].astype(dtype)),
                       TIMES: npy_bytes((np.arange(n) + 0.5) * clip_seconds)}
            if texts:
                members[TEXT] = npz_bytes(texts)
            writer.write(sanitise_key(video_id), members, meta)
        shards = writer.close()
    except BaseException:  # a bad file half way: no half-written shard left behind
        writer.abort()
        raise
    if not shards:
        raise UserError(f"{annotations}: no video had its features in {', '.join(map(str, video_dirs))}")
    fps = 1.0 / clip_seconds
    extractor = {"kind": "imported", "model": " + ".join(str(d) for d in video_dirs), "dtype": dtype,
                 "tokens": 1, "width": width, "text": text_dir is not None, "text_width": text_width,
                 "sampling": dataclasses.asdict(SamplingConfig(fps=fps, window=1, size=0))}
    manifest = {"kind": "features", "extractor": extractor,
                "splits": {split: {"shards": shards, "samples": sum(s["samples"] for s in shards),
                                   "queries": sum(s["queries"] for s in shards)}}, "skipped": skipped}
    others = {k: v for k, v in previous["splits"].items() if k != split} if previous["kind"] == "features" else {}
    if others:  # other splits imported before into the same folder: kept when they fit together
        theirs = previous["extractor"]
        differ = [k for k in ("width", "text", "text_width", "sampling") if theirs.get(k) != extractor.get(k)]
        if differ and not overwrite:
            raise UserError(f"{out}: its splits {', '.join(sorted(others))} hold features that differ in "
                            f"{', '.join(differ)}; import into another folder, or pass --overwrite to drop them")
        if not differ:
            manifest["splits"] = {**others, **manifest["splits"]}
            manifest["skipped"] = [s for s in previous.get("skipped", []) if s.get("split") != split] + [
                {**s, "split": split} for s in skipped]
    write_text_atomic(out / MANIFEST, json_text(manifest, out / MANIFEST, indent=1) + "\n")
    return manifest
