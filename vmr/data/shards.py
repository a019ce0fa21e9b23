"""WebDataset shards: ``vmr shards build``, whole or one part of many (vmr/data/parts.py).

One sample per video, holding all of its queries, so that training decodes a video once for
several queries:

  <key>.mp4    the video bytes (the source file unchanged, or re-encoded)
  <key>.json   {"video_id", "duration", "fps", "num_frames", "width", "height", "start",
                "source_file", "queries": [{"qid", "query", "windows": [[s, e], ...],
                "saliency"?: {"clip_seconds", "clip_ids", "scores"}, "tags"?: {...}}]}

Keys are sanitised ids: webdataset splits a file name at its first dot, and real ids have dots
(QVHighlights ``j7rJstUseKg_360.0_510.0``); the real id lives in the JSON.

``OUT/manifest.json``: {"splits": {<split>: {"shards": [{"path", "samples", "queries", "bytes",
"sha256"}], "samples", "queries", "params"}}, "skipped": [{"split", "video_id", "qid"?, "reason"}],
"params": <the last build's parameters>}. Building another split into the same folder adds to it.

A build is a transaction: shards are written into a hidden staging folder ``OUT/.vmr-build-<split>/``
and nothing in OUT changes until the whole split is complete. The switch is then recorded in a
journal (``OUT/.vmr-commit-<split>.json``) and carried out: old shards of the split removed, new
ones moved in, the manifest rewritten. A build killed before the switch leaves OUT as it was (the
next build clears the staging folder); one killed during the switch is finished by the next
``build`` or ``verify``. A full disk stops the build with one line naming the disk.

A part (``--part I/N``) builds only its videos, into shards ``<split>-pIIII-NNNNNN.tar`` staged in
``OUT/.vmr-build-<split>-pIIII/`` and moved in, then writes its record; parts are merged into the
manifest by vmr/data/parts.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from vmr.data.annotations import FORMATS, Skip, check_query, read_annotations
from vmr.data.manifest import MANIFEST, check_shard, check_split, claim, read_manifest
from vmr.data.parts import (
    PARTS,
    merge_when_complete,
    other_settings,
    parse_part,
    part_from_env,
    part_name,
    part_of,
    read_record,
    record_path,
)
from vmr.data.prepare import MAX_REENCODE_FPS, EncodeParams, VideoTask, prepare_star
from vmr.data.tars import ShardWriter, sanitise_key, shard_damage
from vmr.errors import UserError, out_of_space
from vmr.io import (
    LOCK,
    FolderLock,
    confined,
    field,
    json_text,
    objects,
    read_bytes,
    read_json,
    write_text_atomic,
)


def build_shards(
    videos: Path,
    annotations: list[Path],
    out: Path,
    split: str = "train",
    fmt: str = "auto",
    fps: float | None = None,
    size: int | None = None,
    keyframe_interval: float | None = None,
    max_shard_mb: float = 256,
    max_videos_per_shard: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    part: tuple[int, int] | None = None,
    follow_links: bool = False,
) -> dict:
    """Build one split, or with ``part`` (I, N) part I of its N parts (vmr/data/parts.py); returns
    the split's (or the part's) manifest entry plus the skips. See the module docstring."""
    if not videos.is_dir():
        raise UserError(f"--videos: {videos} is not a folder")
    check_split(split)
    _check_build_values(fps, size, keyframe_interval, max_shard_mb, max_videos_per_shard, workers)
    params = EncodeParams(fps, size, keyframe_interval, follow_links)
    tasks, skips = _tasks(annotations, fmt)
    _make_folder(out)
    params_json = {"videos": str(videos), "annotations": [str(a) for a in annotations],
                   "annotations_sha256": _annotations_sha256(annotations), "format": fmt,
                   "fps": fps, "size": size, "keyframe_interval": keyframe_interval,
                   "max_shard_mb": max_shard_mb, "max_videos_per_shard": max_videos_per_shard}
    limits = (int(max_shard_mb * 1024 * 1024), max_videos_per_shard)
    if part is not None:
        index, count = part
        mine = {video: task for video, task in tasks.items() if part_of(video, count) == index}
        skips = [skip for skip in skips if part_of(skip.video_id, count) == index]
        return _build_part(out, split, part, mine, skips, videos, params, params_json, limits, workers, overwrite,
                           progress)
    # One build of a folder at a time: two would share its staging folders and manifest.
    with FolderLock(out, f"vmr shards build --split {split}"):
        finish_commits(out)
        staging = out / f".vmr-build-{split}"
        if staging.exists():
            print(f"removing an unfinished build of split {split!r} left in {staging} (the build was interrupted; "
                  "nothing in the output folder had changed)", file=sys.stderr)
            shutil.rmtree(staging)
        claim(out, "videos", split, overwrite)
        old_files = sorted(out.glob(f"{split}-*.tar"))
        if old_files and not overwrite:
            raise UserError(f"{out}: {old_files[0].name} and other shards of split {split!r} exist but the manifest "
                            "does not list them; pass --overwrite to replace them")
        if not tasks:
            raise UserError(f"no usable query in {', '.join(map(str, annotations))}"
                            + (f": {skips[0].reason}" if skips else ""))
        writer = ShardWriter(staging, split, *limits)
        shards, _ = _pack(tasks, videos, params, staging, writer, workers, skips, progress)
        entry = {"shards": shards, "samples": sum(s["samples"] for s in shards),
                 "queries": sum(s["queries"] for s in shards), "params": params_json}
        journal = {"split": split, "entry": entry, "old": [p.name for p in old_files],
                   "skipped": [{"split": split, **s.to_json()} for s in skips]}
        try:
            write_text_atomic(out / f".vmr-commit-{split}.json", json_text(journal, out) + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _commit(out, journal)
        return {**entry, "skipped": skips}


def _build_part(out: Path, split: str, part: tuple[int, int], tasks: dict[str, VideoTask], skips: list[Skip],
                videos: Path, params: EncodeParams, params_json: dict, limits: tuple, workers: int, overwrite: bool,
                progress: bool) -> dict:
    """Part I of N: its shards into ``out`` (staged, then moved in), its record last; nothing to do
    when its record exists and its shards check out; then the merge when every part is recorded.
    Parts lock only themselves, so that they run side by side on one folder."""
    index, count = part
    name = part_name(split, index)
    path = record_path(out, split, index)
    with FolderLock(out, f"vmr shards build --split {split} --part {index}/{count}", name=f"{LOCK}-{name}"):
        record = read_record(path, out) if path.exists() else None
        if record is not None and not overwrite and record["parts"] == count:
            differ = other_settings(record["params"], params_json)
            if differ:
                raise UserError(f"{path}: part {index}/{count} was built with another {', '.join(differ)}; pass "
                                "--overwrite to build it again with these settings")
        if record is not None and not overwrite and record["parts"] == count and \
                not any(shard_damage(out, s) for s in record["shards"]):
            print(f"part {index}/{count} of split {split!r} is built already ({path}); nothing to do", file=sys.stderr)
        else:
            manifest = claim(out, "videos", None, overwrite)  # a folder of feature shards is refused
            whole = manifest["splits"].get(split)
            if whole is not None and "parts" not in whole.get("params", {}) and not overwrite:
                raise UserError(f"{out}: split {split!r} exists, built whole; pass --overwrite to rebuild it in parts")
            # A killed run of this part left no record: whatever it left is redone from scratch. But
            # the committed split stays whole until the merge replaces it: its shards are neither
            # deleted nor overwritten here (the new ones take other names); the merge removes them
            # once the new manifest is written.
            committed = {shard["path"]: shard.get("sha256") for shard in (whole or {}).get("shards", [])}
            path.unlink(missing_ok=True)
            staging = out / f".vmr-build-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            for stale in out.glob(f"{name}-*.tar"):
                if stale.name not in committed:
                    stale.unlink()
            shards, packed = _pack(tasks, videos, params, staging, ShardWriter(staging, name, *limits), workers, skips,
                                   progress, allow_empty=True)
            for shard in _beside(shards, committed, name):
                os.replace(staging / shard.pop("staged"), out / shard["path"])
            shutil.rmtree(staging, ignore_errors=True)
            record = {"split": split, "part": index, "parts": count, "params": params_json, "shards": shards,
                      "videos": packed, "skipped": [s.to_json() for s in skips]}
            path.parent.mkdir(exist_ok=True)
            write_text_atomic(path, json_text(record, path, indent=1) + "\n")  # the last write: the part is done
    merged = merge_when_complete(out, split, count, overwrite)
    return {"shards": record["shards"], "samples": sum(s["samples"] for s in record["shards"]),
            "queries": sum(s["queries"] for s in record["shards"]), "params": params_json, "skipped": skips,
            "part": part, "merged": merged}


def _beside(shards: list[dict], committed: dict[str, str | None], name: str) -> list[dict]:
    """The part's new shards, each with its ``staged`` name and the ``path`` it takes in the folder:
    its own, unless a shard of the committed split has that name with other contents; then a name of
    a new generation (``<name>-rG-NNNNNN.tar``), so that the committed split stays whole until the
    merge replaces it."""
    taken = {id(s) for s in shards if s["path"] in committed and committed[s["path"]] != s["sha256"]}
    generation = 0
    if taken:
        generation = 1
        while any(c.startswith(f"{name}-r{generation}-") for c in committed):
            generation += 1
    for shard in shards:
        shard["staged"] = shard["path"]
        if id(shard) in taken:
            shard["path"] = f"{name}-r{generation}-{shard['path'][len(name) + 1:]}"
    return shards


def _check_build_values(fps, size, keyframe_interval, max_shard_mb, max_videos_per_shard, workers) -> None:
    if fps is not None and not 0 < fps <= MAX_REENCODE_FPS:
        raise UserError(f"--fps must be in (0, {MAX_REENCODE_FPS:g}] frames/s, got {fps:g} (a video's own rate "
                        "caps it further)")
    if size is not None and (size < 16 or size % 2):
        raise UserError(f"--size must be an even number of pixels >= 16, got {size}")
    if keyframe_interval is not None and keyframe_interval < 0:
        raise UserError(f"--keyframe-interval must be >= 0 seconds, got {keyframe_interval:g}")
    if max_shard_mb <= 0:
        raise UserError(f"--max-shard-mb must be positive, got {max_shard_mb:g}")
    if max_videos_per_shard is not None and max_videos_per_shard < 1:
        raise UserError(f"--max-videos-per-shard must be at least 1, got {max_videos_per_shard}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def _tasks(annotations: list[Path], fmt: str) -> tuple[dict[str, VideoTask], list[Skip]]:
    """Every annotation file read, the good queries grouped by video in file order; the skips."""
    skips: list[Skip] = []
    tasks: dict[str, VideoTask] = {}
    seen_qids: dict = {}
    for path in annotations:
        records, bad = read_annotations(path, fmt)
        skips.extend(bad)
        for record in records:
            reason = check_query(record)
            if reason is None and record.qid in seen_qids:
                reason = f"{record.source}: duplicate qid {record.qid!r} (first at {seen_qids[record.qid]})"
            if reason is not None:
                skips.append(Skip(record.video_id, reason, qid=record.qid))
                continue
            seen_qids[record.qid] = record.source
            task = tasks.setdefault(record.video_id, VideoTask(record.video_id, record.video_file, []))
            task.queries.append(record)
    return tasks, skips


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out: cannot create {out} ({error.strerror or error})") from None


def _pack(tasks: dict[str, VideoTask], videos: Path, params: EncodeParams, staging: Path, writer: ShardWriter,
          workers: int, skips: list[Skip], progress: bool, allow_empty: bool = False) -> tuple[list[dict], list[str]]:
    """Prepare every video (``workers`` processes) and write them, in annotation order, into
    ``staging``; returns the shards and the ids of the videos packed. Skips are added to ``skips``. On any failure the staging
    folder is removed (a full disk becomes one line saying nothing in the output folder changed)."""
    encode_dir = staging / "encode"
    encode_dir.mkdir(parents=True)
    keys: set[str] = set()
    packed: list[str] = []
    jobs = [(task, videos, params, encode_dir) for task in tasks.values()]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        # imap keeps the annotation order, so the shards do not depend on the number of workers.
        results = pool.imap(prepare_star, jobs) if pool else map(prepare_star, jobs)
        for result in tqdm(results, total=len(jobs), desc=f"shards {writer.split}", unit="video",
                           disable=not progress, file=sys.stderr):
            if isinstance(result, Skip):
                skips.append(result)
                continue
            skips.extend(result.skips)
            if not result.meta:
                continue
            key = sanitise_key(result.video_id)
            while key in keys:  # two ids that differ only in punctuation
                key += "_"
            keys.add(key)
            writer.write(key, {"mp4": result.path.read_bytes()}, result.meta)
            packed.append(result.video_id)
            if result.temporary:
                result.path.unlink()
        shards = writer.close()
        if not shards and not allow_empty:
            raise UserError(f"split {writer.split!r}: no video could be packed; {len(skips)} skipped, the first: "
                            f"{skips[0].reason if skips else '?'}")
        return shards, packed
    except BaseException as error:
        writer.abort()
        # Asked before the staging folder gives its space back, so the disk still reads as full.
        full = out_of_space(error, staging) if isinstance(error, OSError) else None
        shutil.rmtree(staging, ignore_errors=True)
        if full is None:
            raise
        raise UserError(f"{full}; nothing in {staging.parent} was changed") from None
    finally:
        if pool:
            pool.terminate()


def _commit(out: Path, journal: dict) -> None:
    """Switch a split to its staged build. Idempotent, so that a switch interrupted half way is
    finished by running it again (``finish_commits``)."""
    split, entry = journal["split"], journal["entry"]
    staging = out / f".vmr-build-{split}"
    new = {s["path"] for s in entry["shards"]}
    for name in journal["old"]:
        if name not in new:
            (out / name).unlink(missing_ok=True)
    for name in sorted(new):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    manifest = read_manifest(out)
    if manifest["kind"] != "videos":  # --overwrite of a folder of feature shards
        manifest = {"kind": "videos", "splits": {}, "skipped": []}
    manifest["splits"][split] = entry
    manifest["skipped"] = [s for s in manifest.get("skipped", []) if s.get("split") != split] + journal["skipped"]
    manifest["params"] = entry["params"]
    write_text_atomic(out / MANIFEST, json_text(manifest, out / MANIFEST, indent=1) + "\n")
    for record in (out / PARTS).glob(f"{split}-p*.json"):  # the split is whole now: its parts are history
        if re.fullmatch(rf"{re.escape(split)}-p\d{{4}}\.json", record.name):
            record.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    (out / f".vmr-commit-{split}.json").unlink(missing_ok=True)


def _annotations_sha256(annotations: list[Path]) -> str:
    """One sha256 over the annotation files' contents, in the order given: parts of one split must
    be built from the same annotations (their paths may differ from machine to machine)."""
    import hashlib

    digest = hashlib.sha256()
    for path in annotations:
        digest.update(read_bytes(path))
        digest.update(b"\0")
    return digest.hexdigest()


def _read_journal(path: Path, out: Path) -> dict:
    """A commit journal, every name in it a plain file name of this split inside ``out``: a
    journal is a file like any other, and ``_commit`` deletes and moves what it names."""
    journal = read_json(path)
    where = str(path)
    split = check_split(field(journal, "split", str, where), f"{where}: 'split'")
    if path.name != f".vmr-commit-{split}.json":
        raise UserError(f"{where}: 'split' {split!r} does not match the journal's name")
    entry = field(journal, "entry", dict, where)
    shards = field(entry, "shards", list, f"{where}: entry")
    names = [*field(journal, "old", list, where),
             *(field(s, "path", str, f"{where}: entry.shards") if isinstance(s, dict) else s for s in shards)]
    for name in names:
        confined(out, name, f"{where}: shard name")
        if not (isinstance(name, str) and name.startswith(f"{split}-") and name.endswith(".tar")):
            raise UserError(f"{where}: {name!r} is not a shard of split {split!r}")
    for number, shard in enumerate(shards):  # what the manifest will list: every field, and the file itself
        spot = f"{where}: entry.shards[{number}]"
        check_shard(out, shard, spot)
        staged = out / f".vmr-build-{split}" / shard["path"]
        if shard_damage(staged.parent if staged.is_file() else out, shard) is not None:
            raise UserError(f"{spot}: {shard['path']} is neither staged nor in place as recorded; remove {path} and "
                            f"build split {split!r} again")
    for key in ("samples", "queries"):
        field(entry, key, int, f"{where}: entry")
    objects(journal, "skipped", where)
    field(entry, "params", dict, f"{where}: entry", default={})
    return journal


def finish_commits(out: Path) -> None:
    """Finish any split switch that a killed build left half done."""
    for path in sorted(out.glob(".vmr-commit-*.json")):  # written atomically: whole, or not there
        journal = _read_journal(path, out)
        print(f"finishing the interrupted switch of split {journal['split']!r} in {out}", file=sys.stderr)
        _commit(out, journal)


# ----- command line -------------------------------------------------------------------------


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", required=True, type=Path, help="folder holding the video files")
    p.add_argument("--annotations", required=True, type=Path, nargs="+", metavar="FILE",
                   help="annotation files: seed JSON, QVHighlights JSONL, Charades-STA text, ActivityNet Captions "
                        "JSON, TACoS JSON, highlight-detection JSONL (TVSum, YouTube Highlights); docs/data.md")
    p.add_argument("--out", required=True, type=Path, help="output folder for the shards and manifest.json")
    p.add_argument("--split", default="train", help="split name, the shards' prefix (default: train)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="annotation format (default: auto, told from the content); highlights = TVSum / "
                        "YouTube Highlights JSONL")
    p.add_argument("--fps", type=float, help="re-encode at this frame rate (default: keep the source's)")
    p.add_argument("--size", type=int, help="re-encode with the shorter side at this many pixels")
    p.add_argument("--keyframe-interval", type=float, metavar="SEC",
                   help="re-encode with a keyframe every SEC seconds, 0 = every frame (default when "
                        "re-encoding: 1)")
    p.add_argument("--max-shard-mb", type=float, default=256, help="start a new shard past this size (default: 256)")
    p.add_argument("--max-videos-per-shard", type=int, help="start a new shard after this many videos")
    p.add_argument("--workers", type=int, default=1, help="parallel processes over videos (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing split")
    p.add_argument("--follow-links", action="store_true",
                   help="read video files that are symlinks leading outside --videos (default: skipped as such)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when anything was skipped")
    p.add_argument("--part", metavar="I/N",
                   help="build part I of N of the split (counted from 0), for many machines; default: from the "
                        "launcher's RANK/WORLD_SIZE (torchrun, accelerate launch), SLURM_ARRAY_TASK_ID/COUNT (a job "
                        "array) or SLURM_PROCID/STEP_NUM_TASKS (srun) when it runs several tasks, never a batch "
                        "script's own variables; the last part to finish merges them (else: vmr shards merge)")


def run_build(args: argparse.Namespace) -> int:
    part, source = (parse_part(args.part), "--part") if args.part else (None, None)
    if part is None and (found := part_from_env()) is not None:
        part, source = found[:2], found[2]
    if part is not None:
        print(f"building part {part[0]} of {part[1]} (parts 0-{part[1] - 1}) of split {args.split!r}, from {source}",
              file=sys.stderr)
    elif any(name in os.environ for name in ("RANK", "SLURM_PROCID", "SLURM_ARRAY_TASK_ID")):
        print(f"building split {args.split!r} whole: no --part, and the launcher's variables do not say it runs "
              "several tasks", file=sys.stderr)
    result = build_shards(
        args.videos, args.annotations, args.out, split=args.split, fmt=args.format, fps=args.fps,
        size=args.size, keyframe_interval=args.keyframe_interval, max_shard_mb=args.max_shard_mb,
        max_videos_per_shard=args.max_videos_per_shard, workers=args.workers,
        overwrite=args.overwrite, part=part, follow_links=args.follow_links,
    )
    skips = result["skipped"]
    for skip in skips:
        print(f"skipped {skip.video_id}{f' qid {skip.qid}' if skip.qid is not None else ''}: {skip.reason}",
              file=sys.stderr)
    size_mb = sum(s["bytes"] for s in result["shards"]) / 1e6
    skipped_videos = sum(1 for s in skips if s.what == "video")
    what = f"part {part[0]}/{part[1]} of split {args.split!r}" if part else f"split {args.split!r}"
    listed = f"{PARTS}/{part_name(args.split, part[0])}.json" if part else MANIFEST
    print(f"{what}: {result['samples']} videos, {result['queries']} queries in "
          f"{len(result['shards'])} shard(s), {size_mb:.1f} MB, in {args.out}; skipped "
          f"{skipped_videos} video(s) and {len(skips) - skipped_videos} query(ies) (listed in {listed})")
    if part is not None:
        merged = result["merged"]
        print(f"all {part[1]} parts are built: split {args.split!r} merged into {args.out / MANIFEST} "
              f"({merged['samples']} videos in {len(merged['shards'])} shards)" if merged else
              f"the split is merged when every part is built (by the last one, or: vmr shards merge --out {args.out} "
              f"--split {args.split})")
    if args.strict and skips:
        raise UserError(f"--strict: {len(skips)} item(s) skipped (see above and {args.out / MANIFEST})")
    return 0
