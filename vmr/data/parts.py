"""One split built in parts, on as many machines as there are parts: ``vmr shards build --part I/N``
(vmr/data/shards.py builds a part) and ``vmr shards merge`` (here).

Each video belongs to part ``part_of(video_id, N)``, a hash of its id: the same part whatever the
order of the annotation files or the machine. A part writes its shards ``<split>-pIIII-NNNNNN.tar``
into the output folder, which the parts share (NFS, a mounted bucket) or which are copied together
later, and as its last write its record ``OUT/parts/<split>-pIIII.json``: its shards (sizes, sha256,
counts), its videos, its skips and its parameters. A part without a record is not finished: the
same command redoes it from scratch. ``merge`` checks that every part 0..N-1 is recorded, that no
video is in two parts and that every recorded shard is there unchanged, then writes the split's
manifest in one atomic step; the last part to finish runs it when it sees all the others.

The part comes from ``--part I/N``, else from a launcher that clearly runs an array of workers:
``RANK``/``WORLD_SIZE`` (torchrun, ``accelerate launch``),
``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (a Slurm job array), ``SLURM_PROCID``/
``SLURM_STEP_NUM_TASKS`` (the tasks of an ``srun`` step; a batch script's own ``SLURM_NTASKS`` is not
enough: the script runs once). The choice is printed. vmr brings no scheduler of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from tqdm import tqdm

from vmr.data.manifest import MANIFEST, check_shard, check_split, claim, read_manifest
from vmr.data.tars import shard_damage
from vmr.errors import UserError
from vmr.io import FolderLock, LockBusy, confined, field, json_text, objects, read_json, write_text_atomic

PARTS = "parts"  # OUT/parts/<split>-pIIII.json: one record per finished part
# What every part of a split must share: the annotations (by content) and the encoding settings.
ENCODING = ("annotations_sha256", "format", "fps", "size", "keyframe_interval")
ENVIRONMENTS = (  # (index variable, count variable, what else a real launch sets), in the order asked
    ("RANK", "WORLD_SIZE", ()),
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", ()),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", ("SLURM_STEP_ID",)),
)


def part_of(video_id: str, parts: int) -> int:
    """The part a video belongs to: stable across machines, runs and the order of the input."""
    return int.from_bytes(hashlib.sha256(video_id.encode()).digest()[:8], "big") % parts


def part_name(split: str, index: int) -> str:
    return f"{split}-p{index:04d}"


def parse_part(text: str, where: str = "--part") -> tuple[int, int]:
    """``I/N``: part I (0-based) of N."""
    index, sep, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not I/N (part I of N, counted from 0), e.g. 0/4") from None
    if not sep or count < 1 or not 0 <= index < count:
        raise UserError(f"{where}: {text!r} must be I/N with 0 <= I < N")
    return index, count


def part_from_env(environ=None) -> tuple[int, int, str] | None:
    """(index, count, where from) when a launcher runs several tasks, else None. Variables without
    the rest of their launcher's environment (a Slurm batch script's SLURM_PROCID and SLURM_NTASKS,
    which run the script once) choose no part."""
    environ = os.environ if environ is None else environ
    for index_name, count_name, companions in ENVIRONMENTS:
        if any(name not in environ for name in (index_name, count_name, *companions)):
            continue
        index, count = parse_part(f"{environ[index_name]}/{environ[count_name]}", f"{index_name}/{count_name}") \
            if index_name != "SLURM_ARRAY_TASK_ID" else _slurm_array(environ)
        if count > 1:
            return index, count, f"{index_name}/{count_name}"
    return None


def _slurm_array(environ) -> tuple[int, int]:
    # Array indices need not start at 0 (--array=1-8): count from the array's first index.
    first = environ.get("SLURM_ARRAY_TASK_MIN", "0")
    try:
        index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(first)
    except ValueError:
        raise UserError(f"SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_MIN: {environ['SLURM_ARRAY_TASK_ID']!r} / "
                        f"{first!r} are not numbers") from None
    return parse_part(f"{index}/{environ['SLURM_ARRAY_TASK_COUNT']}", "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")


def record_path(out: Path, split: str, index: int) -> Path:
    return Path(out) / PARTS / f"{part_name(split, index)}.json"


def read_record(path: Path, out: Path) -> dict:
    """A part's record, every field checked; its shards are shards of that part inside ``out``."""
    record, where = read_json(path), str(path)
    split = check_split(field(record, "split", str, where), f"{where}: 'split'")
    index, count = field(record, "part", int, where), field(record, "parts", int, where)
    if count < 1 or not 0 <= index < count:
        raise UserError(f"{where}: part {index} of {count} is not a part")
    if path.name != f"{part_name(split, index)}.json":
        raise UserError(f"{where}: records part {index} of split {split!r}, not what its name says")
    for number, shard in enumerate(field(record, "shards", list, where)):
        spot = f"{where}: shards[{number}]"
        name = check_shard(out, shard, spot).name
        if not (name.startswith(f"{part_name(split, index)}-") and name.endswith(".tar")):
            raise UserError(f"{spot}: {name!r} is not a shard of part {index} of split {split!r}")
    if not all(isinstance(v, str) for v in field(record, "videos", list, where)):
        raise UserError(f"{where}: 'videos' must be a list of video ids")
    objects(record, "skipped", where)
    field(record, "params", dict, where)
    return record


def other_settings(params: dict, reference: dict) -> list[str]:
    """The encoding settings in which two builds of one split differ (they must not)."""
    return [{"annotations_sha256": "annotations (their contents)"}.get(k, k) for k in ENCODING
            if params.get(k) != reference.get(k)]


def merge(out: Path, split: str, overwrite: bool = False, progress: bool = True) -> dict:
    """The split's manifest entry from its parts' records, written in one atomic step; every check
    first, so that a failed merge changes nothing. Other splits of the manifest are kept."""
    check_split(split)
    out = Path(out)
    with FolderLock(out, f"vmr shards merge --split {split}"):
        parts = _complete_parts(out, split)
        count = len(parts)
        owner: dict[str, int] = {}
        for index, record in enumerate(parts):
            for video in record["videos"]:
                if video in owner:
                    raise UserError(f"{out}: video {video!r} is in part {owner[video]} and part {index} of split "
                                    f"{split!r}; were the parts built from different annotation files? nothing merged")
                owner[video] = index
        shards = [(index, shard) for index, record in enumerate(parts) for shard in record["shards"]]
        for index, shard in tqdm(shards, desc=f"merge {split}", unit="shard", disable=not progress, file=sys.stderr):
            problem = shard_damage(out, shard)
            if problem is not None:
                raise UserError(f"{out / shard['path']}: {problem}; build part {index}/{count} again (remove "
                                f"{record_path(out, split, index)} first); nothing merged")
        manifest = claim(out, "videos", None, overwrite)
        old = manifest["splits"].get(split)
        if old is not None and "parts" not in old.get("params", {}) and not overwrite:
            raise UserError(f"{out}: split {split!r} exists, built whole; pass --overwrite to replace it by its parts")
        entry = {"shards": [{k: s[k] for k in ("path", "samples", "queries", "bytes", "sha256")} for _, s in shards],
                 "samples": sum(s["samples"] for _, s in shards), "queries": sum(s["queries"] for _, s in shards),
                 "params": {**parts[0]["params"], "parts": count}}
        manifest["splits"][split] = entry
        manifest["skipped"] = [s for s in manifest.get("skipped", []) if s.get("split") != split] + [
            {**skip, "split": split} for record in parts for skip in record["skipped"]]
        manifest["params"] = entry["params"]
        write_text_atomic(out / MANIFEST, json_text(manifest, out / MANIFEST, indent=1) + "\n")
        # Only now, with the new split committed, go the earlier shards it no longer lists: killed
        # before this, the folder still holds a whole split (the old one, or the new one).
        keep = {s["path"] for _, s in shards}
        for stale in (old or {}).get("shards", []):
            if stale["path"] not in keep:
                confined(out, stale["path"], f"{out / MANIFEST}: shard").unlink(missing_ok=True)
        return entry


def _complete_parts(out: Path, split: str) -> list[dict]:
    """The records of parts 0..N-1, in order; one line naming what is missing or inconsistent."""
    records = [read_record(path, out) for path in sorted((out / PARTS).glob(f"{split}-p*.json"))]
    records = [r for r in records if r["split"] == split]  # not those of a split named like "{split}-pre"
    if not records:
        raise UserError(f"{out}: no part of split {split!r} is recorded in {out / PARTS}/ (build them with "
                        "'vmr shards build ... --part I/N'); nothing merged")
    counts = sorted({r["parts"] for r in records})
    if len(counts) > 1:
        raise UserError(f"{out / PARTS}: parts of split {split!r} were built as parts of {counts[0]} and of "
                        f"{counts[-1]}; remove the records of the old division; nothing merged")
    count = counts[0]
    by_index = {r["part"]: r for r in records}
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise UserError(f"{out}: part(s) {listed} of {count} of split {split!r} not built yet (no record in "
                        f"{out / PARTS}/); nothing merged")
    first = by_index[0]["params"]
    for index in range(1, count):
        differ = other_settings(by_index[index]["params"], first)
        if differ:
            raise UserError(f"{record_path(out, split, index)}: built with another {', '.join(differ)} than part 0; "
                            "build every part with the same settings; nothing merged")
    return [by_index[i] for i in range(count)]


def merge_when_complete(out: Path, split: str, count: int, overwrite: bool = False) -> dict | None:
    """Run by a part once its record is written: the merged entry when all ``count`` parts are
    recorded (and merged by this process or one that holds the folder meanwhile), else None.
    ``overwrite``: the part's own, which may replace a split built whole."""
    if not all(record_path(out, split, i).is_file() for i in range(count)):
        return None
    merged = read_manifest(out)["splits"].get(split)
    keys = ("path", "samples", "queries", "bytes", "sha256")
    recorded = [{k: s[k] for k in keys} for i in range(count)
                for s in read_record(record_path(out, split, i), out)["shards"]]
    if merged is not None and merged.get("params", {}).get("parts") == count and \
            [{k: s.get(k) for k in keys} for s in merged["shards"]] == recorded:
        return merged  # merged already (a finished part run again): no need to hash every shard again
    try:
        return merge(out, split, overwrite, progress=False)
    except LockBusy:  # another part finished at the same moment and is merging
        print(f"{out}: another process is merging split {split!r}", file=sys.stderr)
        return None


# ----- command line -------------------------------------------------------------------------


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="the folder the parts wrote into")
    p.add_argument("--split", default="train", help="the split whose parts to merge (default: train)")
    p.add_argument("--overwrite", action="store_true", help="replace the split when it was built whole")


def run_merge(args: argparse.Namespace) -> int:
    if not args.out.is_dir():
        raise UserError(f"--out: {args.out} is not a folder")
    entry = merge(args.out, args.split, args.overwrite)
    print(f"split {args.split!r}: {entry['params']['parts']} parts, {entry['samples']} videos and {entry['queries']} "
          f"queries in {len(entry['shards'])} shard(s), merged into {args.out / MANIFEST}")
    return 0
