"""``vmr bench``: measured throughput of the input pipeline (first part of the benchmark suite).

loader  samples/s and frames/s of the full pipeline (shards -> decode -> sampling -> batches)
        with 0, 1, 2, ... workers, against raw torchcodec decode of the very same frames in one
        process: the overhead is what the pipeline adds on top of decoding.

Without ``--shards`` it makes its own sample data with ``vmr synth`` and builds shards with the
README's recommended settings. Every figure is the median of several repetitions after a warm-up,
with its spread; results go to stdout as a markdown table and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _machine() -> dict:
    import torch
    import torchcodec
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchcodec": torchcodec.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _figure(values: list[float], unit: str) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "unit": unit,
            "repetitions": len(values)}


def _make_shards(workdir: Path, quick: bool) -> Path:
    from vmr.data.shards import build_shards
    from vmr.synth import synthesize

    synth = workdir / "synth"
    synthesize(synth, videos=6 if quick else 20, min_duration=10 if quick else 20,
               max_duration=20 if quick else 60, val_fraction=0.0, progress=False)
    out = workdir / "shards"
    # The README's recommended settings; one video per shard so workers can split them.
    build_shards(synth / "videos", [synth / "train.jsonl"], out, fps=2.0, size=224, keyframe_interval=0,
                 max_videos_per_shard=1, workers=2, progress=False)
    return out


def bench_loader(shards: str, quick: bool, max_workers: int, repeats: int) -> dict:
    import torch
    from torchcodec.decoders import VideoDecoder

    from vmr.config import DataConfig
    from vmr.data.shards import iter_shard
    from vmr.data.stream import expand_shards, make_loader
    from vmr.data.video import decode_frames, sample_times
    from vmr.text import load_tokenizer

    torch.set_num_threads(1)
    urls = expand_shards(shards)
    data = DataConfig(clip_fps=1.0, image_size=224, num_workers=0)
    max_frames = 32
    tokenizer = load_tokenizer("synthetic")
    samples = [(video, meta) for url in urls for _, video, meta in iter_shard(Path(url))]
    # Each pass reads every shard `copies` times, so a pass is long enough that worker start-up
    # does not dominate.
    copies = 2 if quick else 4

    def raw_pass() -> tuple[float, int]:
        frames = 0
        start = time.perf_counter()
        for _ in range(copies):
            for video, meta in samples:
                decoder = VideoDecoder(video, seek_mode="approximate", num_ffmpeg_threads=1)
                times = sample_times(meta["duration"], "uniform", data.clip_fps, max_frames)
                frames += decode_frames(decoder, times, start=meta.get("start", 0.0))[0].shape[0]
        return time.perf_counter() - start, frames

    def loader_pass(workers: int) -> tuple[float, int]:
        loader = make_loader(urls * copies, data, tokenizer, batch_size=4, max_frames=max_frames, train=False,
                             rank=0, world=1, num_workers=workers)
        frames = 0
        start = time.perf_counter()
        for batch in loader:
            frames += int(batch["frame_mask"].sum())
        return time.perf_counter() - start, frames

    n_samples = len(samples) * copies
    results = {}
    raw_pass()  # warm-up: page cache, codec initialisation
    runs = [raw_pass() for _ in range(repeats)]
    results["raw_decode"] = {
        "samples_per_s": _figure([n_samples / t for t, _ in runs], "videos/s"),
        "frames_per_s": _figure([f / t for t, f in runs], "frames/s"),
    }
    raw_median = results["raw_decode"]["samples_per_s"]["median"]
    for workers in range(max_workers + 1):
        loader_pass(workers)
        runs = [loader_pass(workers) for _ in range(repeats)]
        entry = {"samples_per_s": _figure([n_samples / t for t, _ in runs], "videos/s"),
                 "frames_per_s": _figure([f / t for t, f in runs], "frames/s")}
        if workers == 0:  # same process as the raw decode: what the pipeline itself costs
            entry["overhead_vs_raw_decode"] = {"median": raw_median / entry["samples_per_s"]["median"] - 1,
                                               "unit": "fraction", "repetitions": repeats}
        results[f"loader_workers_{workers}"] = entry
    return {"samples": n_samples, "frames_per_video": max_frames, "image_size": data.image_size,
            "results": results}


def _table(report: dict) -> str:
    lines = ["| figure | median | spread (min-max) | unit |", "| --- | --- | --- | --- |"]
    for name, entry in report["loader"]["results"].items():
        for key, fig in entry.items():
            spread = f"{fig['min']:.1f}-{fig['max']:.1f}" if "min" in fig else ""
            value = f"{100 * fig['median']:.1f}%" if fig["unit"] == "fraction" else f"{fig['median']:.1f}"
            lines.append(f"| {name}.{key} | {value} | {spread} | {fig['unit']} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", choices=("loader",), help="what to measure (more parts arrive with the full suite)")
    p.add_argument("--quick", action="store_true", help="small data and few repetitions (about a minute)")
    p.add_argument("--shards", help="shards to read (path, glob or folder); default: make sample shards")
    p.add_argument("--max-workers", type=int, default=2, help="measure 0..N loader workers (default: 2)")
    p.add_argument("--json", type=Path, help="write the full report here")


def run(args: argparse.Namespace) -> int:
    from vmr.errors import UserError

    if args.max_workers < 0:
        raise UserError(f"--max-workers must be >= 0, got {args.max_workers}")
    repeats = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="vmr-bench-") as tmp:
        if args.shards:
            shards = args.shards
        else:
            print("making sample shards ...", file=sys.stderr)
            shards = str(_make_shards(Path(tmp), args.quick))
        print("measuring the loader ...", file=sys.stderr)
        report = {"machine": _machine(), "command": "vmr bench " + " ".join(sys.argv[2:]),
                  "loader": bench_loader(shards, args.quick, args.max_workers, repeats)}
    print(_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0
