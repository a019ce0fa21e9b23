"""What building shards in parts costs and saves: the same videos built as 1 part, then as 2 and as
4 parts run side by side on this machine (one `vmr shards build --part I/N` process each, as many
machines would run them), then merged.

    .venv/bin/python benchmarks/build_parts.py --videos 12 --size 720 --fps 30 \
        --out benchmarks/reports/$(date +%F)-<machine>-build-parts.json

Source videos come from `vmr synth` (H.264, --size px square, --fps frames/s); every build uses the
recommended settings (`--fps 2 --size 224 --keyframe-interval 0`). For each division it reports
the wall time, the CPU time of all its processes (user + system, ffmpeg included), the CPU seconds
per second of source video, per part, the wall time against the 1-part build, and the time of a
`vmr shards merge` run afterwards (every record and every shard's sha256 checked again). Every
division must hold the same samples as the 1-part build (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SETTINGS = ["--fps", "2", "--size", "224", "--keyframe-interval", "0"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build(videos: Path, annotations: Path, out: Path, parts: int) -> dict:
    """Every part of ``parts`` at once, each its own process; wall and CPU seconds."""
    command = [str(BIN / "vmr"), "shards", "build", "--videos", str(videos), "--annotations", str(annotations),
               "--out", str(out), "--split", "train", *SETTINGS]
    cpu, start = children_cpu(), time.perf_counter()
    procs = [subprocess.Popen([*command, *(["--part", f"{i}/{parts}"] if parts > 1 else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(parts)]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit(f"a part failed: {next(e for p, e in zip(procs, errors, strict=True) if p.returncode)[-2000:]}")
    return {"parts": parts, "wall_s": wall, "cpu_s": children_cpu() - cpu}


def samples(out: Path) -> dict:
    from vmr.data.manifest import read_manifest
    from vmr.data.tars import iter_shard

    split = read_manifest(out)["splits"]["train"]
    return {meta["video_id"]: meta for shard in split["shards"] for _, _, meta in iter_shard(out / shard["path"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--size", type=int, default=720)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, required=True, help="the report (JSON); a .md beside it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmr-parts-") as tmp:
        work = Path(tmp)
        print(f"making {args.videos} source videos ({args.size} px, {args.fps:g} frames/s) ...", file=sys.stderr)
        subprocess.run([str(BIN / "vmr"), "synth", "--out", str(work / "synth"), "--videos", str(args.videos),
                        "--size", str(args.size), "--fps", str(args.fps), "--val-fraction", "0"], check=True,
                       stdout=subprocess.DEVNULL)
        annotations = work / "synth" / "train.jsonl"
        source_s = sum(json.loads(line)["duration"] for line in
                       {json.loads(row)["vid"]: row for row in annotations.read_text().splitlines()}.values())
        runs, reference = [], None
        for parts in args.parts:
            out = work / f"parts{parts}"
            print(f"building in {parts} part(s) ...", file=sys.stderr)
            run = build(work / "synth" / "videos", annotations, out, parts)
            start = time.perf_counter()
            if parts > 1:
                subprocess.run([str(BIN / "vmr"), "shards", "merge", "--out", str(out), "--split", "train"],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                run["merge_s"] = time.perf_counter() - start
            held = samples(out)
            reference = reference or held
            run["same_samples_as_first"] = held == reference
            run["cpu_s_per_source_s"] = run["cpu_s"] / source_s
            run["cpu_s_per_part"] = run["cpu_s"] / parts
            runs.append(run)
        for run in runs:
            run["wall_vs_first"] = run["wall_s"] / runs[0]["wall_s"]
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "command": " ".join(sys.argv), "source": {"videos": args.videos, "size": args.size, "fps": args.fps,
                                                        "seconds": source_s},
              "settings": " ".join(SETTINGS), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Shards built in parts: {args.videos} videos, {source_s:.0f} s of {args.size} px {args.fps:g} fps source",
             "", f"Machine: {os.cpu_count()} CPUs, {platform.platform()}. Command: `{report['command']}`. "
             f"Build settings: `{report['settings']}`, each part one process (`--workers 1`).", "",
             "| parts at once | wall s | CPU s | CPU s per source s | CPU s per part | wall vs 1 part | merge s | same samples |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        lines.append(f"| {r['parts']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['cpu_s_per_source_s']:.3f} | "
                     f"{r['cpu_s_per_part']:.1f} | {r['wall_vs_first']:.2f} | "
                     f"{r.get('merge_s', float('nan')):.2f} | {r['same_samples_as_first']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
