"""The frozen-feature cache: ``vmr features extract`` and ``vmr features import``.

Most experiments keep the vision tower (CLIP's or SigLIP's) frozen; then what it computes for a frame never changes,
and decoding and re-encoding every video at every epoch is repeated work. ``extract`` decodes each
video once at the model's sampling spec (the whole video: one frame at the centre of each 1/fps
bin) and runs the vision tower once per frame; ``import`` packs the field's released
per-clip features. Both write **feature shards**: WebDataset tars with the same sample keys and
``json`` as the video shards, where each sample holds instead of ``mp4``

  tokens.npy   float16 (t, k, c)   per frame: the tower's pooled embedding (CLIP's projected class
                                   token, SigLIP's pooling head), then its patch grid (k = 1 +
                                   patches), or the pooled vector only (k = 1)
  times.npy    float64 (t,)        seconds from the video's start
  text.npz     float16, per qid    imported query features (tokens, c) (optional)
  views.npy    float16 (v, t, k, c) with ``--views 1+v``: augmented copies for training (optional)
  view_times.npy float64 (v, t)    their frames' times

The plain view (tokens.npy) is what evaluation and prediction see: each bin's centre, the whole
frame. A cache of fixed frames cannot apply the video loader's training augmentation, so
``--views N`` stores N - 1 more views of each training video, drawn as the video loader draws a
training window: one random time in each bin (``data.sampling.frames``, ``data.temporal_jitter``)
and one random square crop (``data.scale_jitter``) per view. Training picks one of the N views of
a video at random each time it is drawn.

and ``manifest.json`` (the video shards' layout plus ``kind: features`` and ``extractor``: model,
sampling spec, dtype, token count, width). Training, evaluation and prediction read them through the
same loader and model (vmr/data/stream.py ``decode_features``; the model takes float tokens in place
of frames) and refuse a cache that does not fit the model (``check_cache``). The same layout holds a
saved encoding of one video and an index of a collection (vmr/encode.py, vmr/search.py): extraction
works on ``Part``s, each one output shard, made from a video shard or from a group of video files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import sys
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

from vmr.cache import cache_of, tower_extractor
from vmr.config import DataConfig, SamplingConfig
from vmr.data.manifest import MANIFEST, check_shard, check_split, claim, shard_entry
from vmr.data.sources import bounded_downloads
from vmr.data.tars import (
    TIMES,
    TOKENS,
    VIEW_TIMES,
    VIEWS,
    TarShard,
    fingerprint,
    npy_bytes,
    sanitise_key,
    shard_damage,
    sweep_temporaries,
    tar_counts,
)
from vmr.encode import encode_frames_at
from vmr.errors import UserError, out_of_space
from vmr.io import FolderLock, field, first_line, json_text, objects, read_json, write_text_atomic
from vmr.spans import QVH_CLIP_SECONDS

EVALUATION_SPLITS = ("val", "test")  # splits that get no augmented views: evaluation reads the plain one
DONE = ".done"  # per finished shard, a record (samples, queries, sha256, skips): what resume trusts


# ----- extraction -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
    """One unit of extraction, and of its resume: one output shard ``name`` in ``split``, made from
    the video samples ``samples()`` yields (``__key__``, ``mp4``: bytes or a path, ``json``: the video
    shard's metadata, or none for a bare file, which is probed). ``inputs`` says what it is made
    from, by content (each source's ``fingerprint``: name, size, hash), computed when needed: a
    resume redoes a part whose sources differ; ``where`` names it in errors."""

    name: str
    split: str
    samples: Callable[[], Iterable[dict]]
    where: str
    inputs: Callable[[], tuple[str, ...]] | None = None


def shard_parts(urls: list[str]) -> list[Part]:
    """One part per video shard: the feature shard takes its name and split."""
    import webdataset as wds

    def split_of(url: str) -> str:
        found = shard_entry(url)
        if found is not None:
            return found[0]
        name = Path(url).name
        return name.split("-")[0] if "-" in name else "train"

    seen: dict[str, str] = {}
    for url in urls:  # each feature shard takes its video shard's name: two of one name would be one
        name = Path(url).name
        if name in seen:
            raise UserError(f"--shards: {seen[name]} and {url} share the name {name!r}, and each feature shard takes "
                            "its video shard's name; give them in separate runs with separate --out folders")
        seen[name] = url

    def inputs(url: str) -> tuple[str, ...]:
        return (fingerprint(Path(url)),) if Path(url).is_file() else (url,)

    # (No WebDataset object: its node splitter would deal the shard's samples over ranks.)
    return [Part(Path(url).name, split_of(url), lambda url=url: wds.tarfile_to_samples()([{"url": url}]), url,
                 lambda url=url: inputs(url))
            for url in urls]


def check_video_shards(urls: list[str], given: str, out: Path) -> None:
    """What ``vmr features extract`` and ``vmr index`` read must be video shards, and not in the
    folder they write: each feature shard takes its video shard's name and would replace it."""
    if cache_of(urls) is not None:
        raise UserError(f"{given}: these are feature shards already; give video shards")
    if out.resolve() in {Path(u).resolve().parent for u in urls if Path(u).is_file()}:
        raise UserError(f"--out: {out} holds the video shards being read; write to another folder")


def video_parts(files: list[Path], per_part: int, split: str = "videos") -> list[Part]:
    """Video files (sorted by name), ``per_part`` to a feature shard ``<split>-NNNNNN.tar``; a video's
    key is its file name without the extension."""
    keys = {}
    for path in files:
        key = sanitise_key(path.stem)
        if key in keys:
            raise UserError(f"{path} and {keys[key]} would both be video {key!r}; rename one")
        keys[key] = path
    groups = [files[i:i + per_part] for i in range(0, len(files), per_part)]
    return [Part(f"{split}-{n:06d}.tar", split,
                 lambda group=group: ({"__key__": sanitise_key(p.stem), "mp4": p} for p in group),
                 str(group[0].parent), lambda group=group: tuple(fingerprint(p) for p in group))
            for n, group in enumerate(groups)]


def file_meta(path: Path) -> dict:
    """The json of a bare video file's feature sample (what a video shard's sample would carry)."""
    from vmr.data.video import probe

    info = probe(path)
    return {"video_id": path.stem, "source_file": path.name, "duration": info.duration, "start": info.start,
            "fps": info.fps, "width": info.width, "height": info.height, "queries": []}


def _encode_sample(model, sample: dict, spec: SamplingConfig, data: DataConfig, views: int, pooled_only: bool,
                   device) -> tuple[dict, dict, int]:
    """A video sample -> (its json, the feature sample's members, frames encoded): the whole video at
    the spec's rate (the centres of its bins), and ``views - 1`` augmented views."""
    import numpy as np
    import torch

    from vmr.data.video import open_video, sample_times

    meta = json.loads(sample["json"]) if "json" in sample else file_meta(sample["mp4"])
    decoder = open_video(sample["mp4"])
    duration, start = float(meta["duration"]), float(meta.get("start", 0.0))

    def encode(times, crop=None):
        tokens, at = encode_frames_at(model, decoder, times, spec, start, device, crop)
        return (tokens[:, :1] if pooled_only else tokens).to(torch.float16).numpy(), np.asarray(at, dtype=np.float64)

    frames = len(decoder)  # what the stream holds bounds the plan, whatever its times say
    tokens, times = encode(sample_times(duration, "uniform", spec.fps, frames))
    members = {TOKENS: npy_bytes(tokens, f"{meta.get('video_id', sample.get('__key__'))}: {TOKENS}"), TIMES: npy_bytes(times)}
    if views > 1:
        # Seeded by the video: the same views whichever process makes them, and again on a resume.
        rng = random.Random(f"views:{sample.get('__key__', '')}")
        mode = "uniform" if spec.frames == "uniform" else "random"  # key frames: a random time per bin
        drawn = [encode(sample_times(duration, mode, spec.fps, frames, rng=rng, jitter=data.temporal_jitter),
                        crop=(rng.random(), tuple(data.scale_jitter)))
                 for _ in range(views - 1)]
        members[VIEWS] = npy_bytes(np.stack([view for view, _ in drawn]), f"{sample.get('__key__')}: {VIEWS}")
        members[VIEW_TIMES] = npy_bytes(np.stack([at for _, at in drawn]))
    return meta, members, len(times) * views


def _extract_part(model, part: Part, out: Path, spec: SamplingConfig, data: DataConfig, views: int,
                  pooled_only: bool, device) -> tuple[dict, int]:
    """One part -> its feature shard in ``out`` (a ``TarShard``: renamed when complete). Returns its
    manifest entry and the frames encoded."""
    bounded_downloads()
    shard_views = 1 if part.split in EVALUATION_SPLITS else views
    inputs = part.inputs() if part.inputs is not None else None  # what it is made from, before it is read
    shard, skipped, frames = TarShard(out, part.name), [], 0
    try:
        for sample in part.samples():
            try:
                meta, members, encoded = _encode_sample(model, sample, spec, data, shard_views, pooled_only, device)
            except Exception as error:  # a corrupt video: listed, the others go on
                skipped.append({"key": sample.get("__key__"), "reason": first_line(error)})
                continue
            shard.write(sample["__key__"], members, meta)
            frames += encoded
        entry = shard.close()
    except (UserError, KeyboardInterrupt, SystemExit):
        shard.abort()
        raise
    except Exception as error:  # the shard itself: a stalled download, a damaged tar, a full disk
        shard.abort()
        full = out_of_space(error, shard.tmp) if isinstance(error, OSError) else None
        raise (full or UserError(f"{part.where}: cannot read this shard ({first_line(error)})")) from None
    return {**entry, "split": part.split, "skipped": skipped,
            **({"inputs": list(inputs)} if inputs is not None else {})}, frames


def extract_features(model, spec: SamplingConfig, parts: list[str] | list[Part], out: Path, pooled_only: bool = False,
                     source: str = "", rank: int = 0, world: int = 1, progress: bool = True, device=None,
                     views: int = 1, data: DataConfig | None = None) -> dict:
    """Feature shards in ``out`` for ``parts`` (``Part``s, or video shard URLs: one output shard per
    input shard, of the same name); this process (``rank`` of ``world``) takes parts rank, rank +
    world, ... Parts finished before (a record in ``out/.done/``, made from the same inputs) are not
    redone; each shard is written under a temporary name and renamed when complete. ``views`` > 1:
    that many views of each video outside the evaluation splits, augmented as ``data`` says (module
    docstring). Returns this process's totals, and the ``extractor`` record that ``write_manifest``
    takes (hashing the tower's weights once is enough)."""
    from tqdm import tqdm

    parts = [p if isinstance(p, Part) else shard_parts([p])[0] for p in parts]
    device = device or next(model.parameters()).device
    model.eval()
    (out / DONE).mkdir(parents=True, exist_ok=True)
    data = data or DataConfig()
    extractor = tower_extractor(model, spec, pooled_only, source, views, data)
    totals = {"shards": 0, "resumed": 0, "samples": 0, "frames": 0, "skipped": 0}
    mine = parts[rank::world]
    bar = tqdm(total=len(mine), desc="encoding", unit="shard", disable=not progress, file=sys.stderr)
    try:  # the bar ends its line before any error is printed
        for part in mine:
            record = out / DONE / f"{part.name}.json"
            done = _finished(record, out, part) if record.is_file() else None
            if done is not None:
                _same_extractor(done, extractor, out)
                totals["resumed"] += 1
            else:
                entry, frames = _extract_part(model, part, out, spec, data, views, pooled_only, device)
                write_text_atomic(record, json_text({**entry, "extractor": extractor}, record) + "\n")
                totals["shards"] += 1
                totals["samples"] += entry["samples"]
                totals["frames"] += frames
                totals["skipped"] += len(entry["skipped"])
            bar.update(1)
    finally:
        bar.close()
    return {**totals, "extractor": extractor}


def _read_record(path: Path, out: Path) -> dict:
    """A ``.done`` record, every field checked; its shard's name stays inside ``out``."""
    entry, where = read_json(path), str(path)
    name = check_shard(out, entry, where).name
    if path.name != f"{name}.json":
        raise UserError(f"{where}: records shard {name!r}, not {path.name.removesuffix('.json')!r}")
    check_split(field(entry, "split", str, where), f"{where}: 'split'")
    objects(entry, "skipped", where)
    field(entry, "extractor", dict, where)
    return entry


def _finished(record: Path, out: Path, part: Part) -> dict | None:
    """The record of a shard finished before, if the shard still matches it (size and sha256) and
    was made from the part's inputs; None when it must be redone (a shard that changed, or is gone,
    or a folder of videos that gained or lost files)."""
    entry = _read_record(record, out)
    if part.inputs is not None and tuple(entry.get("inputs") or ()) != part.inputs():
        print(f"{out / entry['path']}: made from other sources than {part.where} holds now (names, sizes or "
              "contents differ); encoding it again", file=sys.stderr)
        return None
    problem = shard_damage(out, entry)
    if problem is None and entry["split"] != part.split:
        problem = f"its record says split {entry['split']!r}, this part is of {part.split!r}"
    if problem is None:
        try:
            counts = tar_counts(out / entry["path"])
        except (OSError, ValueError, tarfile.TarError) as error:
            counts = (None, str(error))
        if counts != (entry["samples"], entry["queries"]):
            problem = (f"its record counts {entry['samples']} videos and {entry['queries']} queries, the shard "
                       f"holds {counts[0]} and {counts[1]}")
    if problem is None:
        return entry
    print(f"{out / entry['path']}: missing or changed since its record was written ({problem}); extracting it again",
          file=sys.stderr)
    return None


def write_manifest(out: Path, extractor: dict) -> dict:
    """manifest.json from the records of every finished shard (all processes'), video-shard layout."""
    splits: dict[str, dict] = {}
    skipped = []
    for record in sorted((out / DONE).glob("*.json")):
        entry = _read_record(record, out)
        _same_extractor(entry, extractor, out)
        split = splits.setdefault(entry["split"], {"shards": [], "samples": 0, "queries": 0})
        split["shards"].append({k: entry[k] for k in ("path", "samples", "queries", "sha256", "bytes")})
        split["samples"] += entry["samples"]
        split["queries"] += entry["queries"]
        skipped += [{**s, "shard": entry["path"]} for s in entry["skipped"]]
    manifest = {"kind": "features", "extractor": extractor, "splits": splits, "skipped": skipped}
    write_text_atomic(out / MANIFEST, json_text(manifest, out / MANIFEST, indent=1) + "\n")
    return manifest


def _same_extractor(entry: dict, extractor: dict, out: Path) -> None:
    """A finished shard from an earlier run counts only if the same tower, spec and views made it
    (the label ``model`` aside)."""
    theirs, ours = entry.get("extractor", {}), extractor
    differ = sorted(k for k in theirs.keys() | ours.keys() if k != "model" and theirs.get(k) != ours.get(k))
    if differ:
        words = {"vision_sha256": "vision tower", "sampling": "sampling spec", "tokens": "token count (--pooled-only)",
                 "views": "number of views (--views)", "augmentation": "view augmentation"}
        raise UserError(f"{out}: {entry['path']} was extracted with another {', '.join(words.get(k, k) for k in differ)};"
                        " remove the folder (or that shard and its .done record) and extract again")


# ----- commands -----------------------------------------------------------------------------------


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an inference bundle or run directory: its towers and sampling spec")
    source.add_argument("--config", help="a config preset: its towers (model.backbone and model.name, or random init) "
                                         "and data.sampling")
    p.add_argument("--shards", nargs="+", required=True, help="video shards (folder, glob, brace pattern)")
    p.add_argument("--out", type=Path, required=True, help="folder for the feature shards and manifest.json")
    p.add_argument("--pooled-only", action="store_true", help="keep only each frame's pooled vector (no patch grid)")
    p.add_argument("--views", type=int, default=1,
                   help="views of each training video (default 1: the plain one); more are augmented copies, drawn "
                        "as the video loader's training windows are (data.sampling.frames, data.temporal_jitter, "
                        "data.scale_jitter), of which training picks one at random; the val and test splits get "
                        "only the plain view")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds video shards (replacing its manifest)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value (with --config)")


def run_extract(args: argparse.Namespace) -> int:
    from vmr.data.sources import expand_shards
    from vmr.runtime import process_group_scope, process_state

    # Overrides written right after --shards land in its list: take them back.
    overrides = [*(a for a in args.shards if "=" in a and not Path(a).exists()), *args.overrides]
    urls = expand_shards([a for a in args.shards if a not in overrides])
    if overrides and args.checkpoint:
        raise UserError(f"config overrides ({overrides[0]}) go with --config; a --checkpoint brings its own")
    check_video_shards(urls, args.shards[0], args.out)
    if not 1 <= args.views <= 64:
        raise UserError(f"--views must be between 1 and 64, got {args.views}")
    state = process_state()
    with process_group_scope():
        return extract_command(args, state, shard_parts(urls), overrides)


def extract_command(args: argparse.Namespace, state, parts: list[Part], overrides: list[str]) -> int:
    """``vmr features extract`` (and ``vmr index``) on this rank, inside its process group's scope:
    the model from ``args.checkpoint`` or ``args.config``, then ``parts`` into ``args.out``."""
    import time

    import torch

    from vmr.config import load_config
    from vmr.model import VideoMomentRetrievalModel

    if args.checkpoint:
        from vmr.bundle import load_model

        model, cfg = load_model(args.checkpoint, state.device, fast=False)  # the tower's own fp32 weights
        source = str(args.checkpoint)
    else:
        cfg = load_config(args.config, overrides)
        torch.manual_seed(cfg.train.seed)  # random-init towers are the same in every process
        model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).to(state.device)
        source = cfg.model.name if cfg.model.init == "pretrained" else f"random init ({args.config}, seed {cfg.train.seed})"
    spec = model.sampling
    start = time.perf_counter()
    # The main process holds the folder's lock for the whole run; every rank checks the folder's kind.
    claim(args.out, "features", None, args.overwrite)
    with FolderLock(args.out, "vmr features extract") if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process and sweep_temporaries(args.out, args.out / DONE):
            print(f"removed temporary files a killed run left in {args.out}", file=sys.stderr)
        state.wait_for_everyone()
        totals = extract_features(model, spec, parts, args.out, args.pooled_only, source, state.process_index,
                                  state.num_processes, progress=state.is_main_process, views=args.views, data=cfg.data)
        state.wait_for_everyone()
        manifest = write_manifest(args.out, totals["extractor"]) if state.is_main_process else None
    seconds = time.perf_counter() - start
    if state.is_main_process:
        videos = sum(s["samples"] for s in manifest["splits"].values())
        print(f"{videos} videos in {sum(len(s['shards']) for s in manifest['splits'].values())} feature shard(s) in "
              f"{args.out} ({totals['resumed']} shard(s) already done); this process: {totals['samples']} videos, "
              f"{totals['frames']} frames in {seconds:.1f} s ({totals['frames'] / max(seconds, 1e-9):.0f} frames/s)"
              + (f"; {len(manifest['skipped'])} unreadable video(s) skipped, listed in manifest.json"
                 if manifest["skipped"] else ""))
    return 0


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video-features", nargs="+", type=Path, required=True,
                   help="folders of <vid>.npz with 'features' (clips, dim); several are L2-normalised and concatenated")
    p.add_argument("--text-features", type=Path, help="folder of qid<qid>.npz ('last_hidden_state' or 'pooler_output')")
    p.add_argument("--annotations", type=Path, required=True, help="QVHighlights-style JSONL of the split")
    p.add_argument("--out", type=Path, required=True, help="folder for the feature shards and manifest.json")
    p.add_argument("--split", default="train", help="split name (default train)")
    p.add_argument("--clip-seconds", type=float, default=QVH_CLIP_SECONDS, help="seconds per feature row (default 2, QVHighlights)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored precision (default float16, half the size; float32 keeps the released numbers exactly, "
                        "e.g. to reproduce a converted published checkpoint's predictions)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing split, or a folder of video shards or of features of another width")


def run_import(args: argparse.Namespace) -> int:
    for folder in [*args.video_features, *([args.text_features] if args.text_features else [])]:
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
    if not args.annotations.is_file():
        raise UserError(f"{args.annotations}: file not found")
    if not args.clip_seconds > 0:
        raise UserError(f"--clip-seconds must be positive, got {args.clip_seconds}")
    from vmr.data.released import import_features

    manifest = import_features(args.video_features, args.text_features, args.annotations, args.out, args.split,
                               args.clip_seconds, overwrite=args.overwrite, dtype=args.dtype)
    info = manifest["splits"][args.split]
    print(f"split {args.split!r}: {info['samples']} videos, {info['queries']} queries, "
          f"{manifest['extractor']['width']}-d features in {args.out}; skipped {len(manifest['skipped'])} "
          "(listed in manifest.json)")
    return 0
