"""``vmr bench decode`` and ``vmr bench loader``: torchcodec sampling against a decode-everything
baseline, and the whole input pipeline against raw decoding of the same frames."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from vmr.bench.common import default_sampling, figure


def bench_loader(shards: str, quick: bool, max_workers: int, repeats: int) -> dict:
    import torch

    from vmr.config import DataConfig
    from vmr.data.sources import expand_shards
    from vmr.data.stream import make_loader
    from vmr.data.tars import iter_shard
    from vmr.data.video import inference_windows, open_video, sample_frames
    from vmr.text import load_tokenizer

    torch.set_num_threads(1)
    urls = expand_shards(shards)
    data = DataConfig(sampling=default_sampling(), num_workers=0)
    spec = data.sampling
    tokenizer = load_tokenizer("synthetic")
    samples = [(video, meta) for url in urls for _, video, meta in iter_shard(Path(url))]
    # Each pass reads every shard `copies` times, so a pass is long enough that worker start-up
    # does not dominate.
    copies = 2 if quick else 4

    def raw_pass() -> tuple[float, int]:
        frames = 0
        start = time.perf_counter()
        for _ in range(copies):
            for video, meta in samples:  # the frames evaluation reads: the whole video, window by window
                decoder = open_video(video)
                for window in inference_windows(meta["duration"], spec, len(decoder)):
                    frames += len(sample_frames(decoder, window.times, spec.size, meta.get("start", 0.0))[1])
        return time.perf_counter() - start, frames

    def loader_pass(workers: int) -> tuple[float, int]:
        loader = make_loader(urls * copies, data, tokenizer, batch_size=4, train=False,
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
        "samples_per_s": figure([n_samples / t for t, _ in runs], "videos/s"),
        "frames_per_s": figure([f / t for t, f in runs], "frames/s"),
    }
    raw_median = results["raw_decode"]["samples_per_s"]["median"]
    for workers in range(max_workers + 1):
        loader_pass(workers)
        runs = [loader_pass(workers) for _ in range(repeats)]
        entry = {"samples_per_s": figure([n_samples / t for t, _ in runs], "videos/s"),
                 "frames_per_s": figure([f / t for t, f in runs], "frames/s")}
        if workers == 0:  # same process as the raw decode: what the pipeline itself costs
            entry["overhead_vs_raw_decode"] = {"median": raw_median / entry["samples_per_s"]["median"] - 1,
                                               "unit": "fraction", "repetitions": repeats}
        else:  # how much of `workers` cores at the raw single-core rate the pipeline turns into batches
            entry["scaling_efficiency"] = figure([n_samples / t / (workers * raw_median) for t, _ in runs],
                                                  "fraction")
        results[f"loader_workers_{workers}"] = entry
    return {"samples": n_samples, "frames_per_video": runs[0][1] / n_samples, "sampling": dataclasses.asdict(spec),
            "results": results}


def bench_decode(shards: str, videos_dir: Path | None, quick: bool, repeats: int) -> dict:
    """Shard sampling of one window (the default config's sampling spec: 32 frames at 1 frame/s)
    against decoding every frame of the original file and picking as many, per core, on the same
    videos."""
    import torch
    from torchcodec.decoders import VideoDecoder

    from vmr.data.sources import expand_shards
    from vmr.data.tars import iter_shard
    from vmr.data.video import find_video, fit_frames, open_video, sample_frames, sample_times

    torch.set_num_threads(1)
    spec = default_sampling()
    max_frames, size = spec.window, spec.size
    samples = [(video, meta) for url in expand_shards(shards) for _, video, meta in iter_shard(Path(url))]
    originals = []
    if videos_dir is not None:
        originals = [find_video(videos_dir, meta["video_id"], meta.get("source_file")) for _, meta in samples]
    if not originals or any(path is None for path in originals):
        originals = None

    def shard_pass() -> tuple[float, int]:
        frames, start = 0, time.perf_counter()
        for video, meta in samples:
            times = sample_times(meta["duration"], "uniform", spec.fps, max_frames)
            frames += len(sample_frames(open_video(video), times, size, meta.get("start", 0.0))[1])
        return time.perf_counter() - start, frames

    def naive_pass() -> tuple[float, int]:
        frames, start = 0, time.perf_counter()
        for path in originals:
            decoder = VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=1)
            n = len(decoder)
            keep = set(torch.linspace(0, n - 1, min(max_frames, n)).round().long().tolist())
            picked = []
            for first in range(0, n, 64):  # every frame is decoded; 32 are kept
                batch = decoder.get_frames_in_range(first, min(n, first + 64)).data
                picked += [batch[i - first] for i in range(first, min(n, first + 64)) if i in keep]
            frames += len(fit_frames(torch.stack(picked), size))
        return time.perf_counter() - start, frames

    results = {}
    shard_pass()
    runs = [shard_pass() for _ in range(repeats)]
    results["shards_frames_per_s"] = figure([f / t for t, f in runs], "frames/s")
    if originals is not None:
        naive_pass()
        base = [naive_pass() for _ in range(max(1, repeats - 1))]
        results["baseline_frames_per_s"] = figure([f / t for t, f in base], "frames/s")
        results["speedup_vs_baseline"] = figure(
            [results["shards_frames_per_s"]["median"] / (f / t) for t, f in base], "x")
    return {"videos": len(samples), "frames_per_video": max_frames, "image_size": size, "results": results}
