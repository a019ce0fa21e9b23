"""``vmr shards verify``: every shard of a folder checked against its manifest (present, sha256,
sample and query counts) and every video decoded the way the loader decodes it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from vmr.data.manifest import MANIFEST, read_manifest
from vmr.data.shards import finish_commits
from vmr.data.tars import iter_shard, sha256_of
from vmr.errors import UserError
from vmr.io import first_line

VERIFY_POINTS = 8  # times per video decoded by verify, besides the first and last frame


def verify_shards(out: Path, progress: bool = True) -> tuple[dict, list[str]]:
    """Check every shard of the manifest: present, sha256, sample and query counts, and frames
    decodable (first, middle and last of every video). Returns totals and a list of problems."""
    finish_commits(out)
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out}: no {MANIFEST} here; is this a folder made by 'vmr shards build'?")
    manifest = read_manifest(out)
    problems: list[str] = []
    totals = {"shards": 0, "samples": 0, "queries": 0}
    entries = [shard for info in manifest["splits"].values() for shard in info["shards"]]
    for shard in tqdm(entries, desc="verify", unit="shard", disable=not progress, file=sys.stderr):
        path = out / shard["path"]
        if not path.is_file():
            problems.append(f"{path}: shard listed in the manifest is missing")
            continue
        totals["shards"] += 1
        if sha256_of(path) != shard.get("sha256"):
            problems.append(f"{path}: sha256 differs from the manifest (the file changed or is corrupt)")
        samples = queries = 0
        try:
            for key, video, meta in iter_shard(path):
                samples += 1
                queries += len(meta.get("queries", []))
                problem = _check_sample(video, meta) if video is not None else None  # feature shards: no video
                if problem:
                    problems.append(f"{path} key {key}: {problem}")
        except Exception as error:  # a damaged tar: name the shard, keep checking the others
            problems.append(f"{path}: cannot read the tar after {samples} samples ({error})")
            continue
        totals["samples"] += samples
        totals["queries"] += queries
        if (samples, queries) != (shard.get("samples"), shard.get("queries")):
            problems.append(f"{path}: holds {samples} samples / {queries} queries, the manifest says "
                            f"{shard.get('samples')} / {shard.get('queries')}")
    return totals, problems


def _check_sample(video: bytes, meta: dict) -> str | None:
    """Decode the sample the way the loader does (``open_video`` + ``sample_frames``: frames found
    by presentation time) at times spread over its whole length, first and last frame included, so
    that a video passing here cannot fail in training."""
    from vmr.data.video import open_video, sample_frames

    duration, start = float(meta.get("duration", 0.0)), float(meta.get("start", 0.0))
    try:
        decoder = open_video(video)
        n = len(decoder)
        times = sorted({0.0, *(duration * (i + 0.5) / VERIFY_POINTS for i in range(VERIFY_POINTS)), duration})
        sample_frames(decoder, times, 8, start)
    except Exception as error:
        return f"cannot decode the video ({first_line(error)})"
    if n != meta.get("num_frames"):
        return f"decodes to {n} frames, its metadata says {meta.get('num_frames')}"
    return None


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="folder with manifest.json and the shards")


def run_verify(args: argparse.Namespace) -> int:
    totals, problems = verify_shards(args.dir)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"vmr shards verify: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"ok: {totals['shards']} shard(s), {totals['samples']} videos, {totals['queries']} queries match "
          f"{args.dir / MANIFEST}; every video decodes")
    return 0
