"""``vmr bench search``: encode once and ask many, and searching a collection.

encode   one long video (320x240, 1 minute with --quick, else 10): the first query (decode, vision
         tower, then the layers above: what ``vmr predict`` costs for one query), later queries on
         the same encoding, their ratio, and the same query by the path that decodes and runs both
         towers for every window (each window's frames read and encoded again); the encoding's
         memory per video minute. The default architecture with random weights (same cost, no
         download), or ``--config``.
search   the tiny preset: an index built from sample shards (videos/s and frames/s), then copies of
         its encodings up to 1,000 videos: the time to open them (the shortlist's keys), and the
         latency of a search against the number of videos, with the shortlist and exhaustive.
"""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

from vmr.bench.common import Options, figure

QUERIES = ["a red circle moves left", "a blue square grows", "a green triangle blinks", "a yellow circle shrinks"]


def _long_video(folder: Path, seconds: int) -> Path:
    from vmr.data.video import require_ffmpeg

    path = folder / f"long-{seconds}s.mp4"
    subprocess.run([require_ffmpeg(), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=320x240:rate=25:duration={seconds}", "-c:v", "libx264", "-preset", "veryfast",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def _full_pass(model, path: Path, query: str) -> None:
    """One query the way a whole-video pass ran before encodings: each window's frames decoded from
    the file and run through the vision tower, as the window comes."""
    from vmr.data.video import open_video, probe, sample_frames, sample_times
    from vmr.model import rank_moments
    from vmr.spans import windows_over

    info, spec = probe(path), model.sampling
    decoder = open_video(path)
    grid = sample_times(info.duration, "uniform", spec.fps, 1 << 30)

    def windows():
        for first, end, own, start, stop in windows_over(grid, info.duration, spec.window, spec.overlap):
            frames, times = sample_frames(decoder, grid[first:end], spec.size, info.start)
            yield frames, times, start, stop, own

    rank_moments(model.score_windows(windows(), [query], info.duration)[0], 5, model.config.nms_iou)


def bench_encode(device: str, quick: bool, workdir: Path, options: Options) -> dict:
    import torch

    from vmr.config import load_config, preset
    from vmr.encode import encode_video
    from vmr.model import VideoMomentRetrievalModel

    cfg = (load_config(options.config, list(options.overrides)) if options.config is not None else
           load_config(preset("default"), ["model.init=random", "model.tokenizer=synthetic"]))
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).to(device).eval()
    seconds = 60 if quick else 600
    path = _long_video(workdir, seconds)
    start = time.perf_counter()
    video = encode_video(model, path)
    video.ask(model, QUERIES[0])
    first = time.perf_counter() - start
    later = []
    for query in QUERIES[1:] * (1 if quick else 2):
        start = time.perf_counter()
        video.ask(model, query)
        later.append(time.perf_counter() - start)
    start = time.perf_counter()
    _full_pass(model, path, QUERIES[0])
    full = time.perf_counter() - start
    later_s = figure(later, "s")
    return {"config": options.label("default architecture (random init)"), "video_seconds": seconds,
            "frames": len(video.times), "windows": sum(1 for _ in video.windows()),
            "results": {"first_query_s": figure([first], "s"), "later_query_s": later_s,
                        "later_query_speedup": figure([first / later_s["median"]], "x"),
                        "full_pass_per_query_s": figure([full], "s"),
                        "first_query_vs_full_pass": figure([first / full], "x"),
                        "encoding_mb_per_video_minute": figure([video.bytes_per_minute() / 2**20], "MB"),
                        "stored_mb_per_video_minute": figure([video.bytes_per_minute() / 2**20 / 2], "MB")}}


def bench_search(quick: bool, workdir: Path) -> dict:
    import torch

    from vmr.config import load_config, preset
    from vmr.data.shards import build_shards
    from vmr.features import extract_features
    from vmr.model import VideoMomentRetrievalModel
    from vmr.search import Index
    from vmr.synth import synthesize

    cfg = load_config(preset("tiny"))
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).eval()
    synth, shards, index = workdir / "search-synth", workdir / "search-shards", workdir / "search-index"
    count = 8 if quick else 24
    synthesize(synth, videos=count, queries_per_video=2, min_duration=20, max_duration=40, fps=4, size=32,
               val_fraction=0.0, seed=5, progress=False)
    build_shards(synth / "videos", [synth / "train.jsonl"], shards, split="train", fps=2.0, size=32,
                 max_videos_per_shard=4, progress=False)
    start = time.perf_counter()
    totals = extract_features(model, model.sampling, sorted(map(str, shards.glob("*.tar"))), index, progress=False)
    build = time.perf_counter() - start
    from vmr.features import write_manifest

    write_manifest(index, totals["extractor"])
    real = Index.open(index, model).videos
    results = {"index_videos_per_s": figure([totals["samples"] / build], "videos/s"),
               "index_frames_per_s": figure([totals["frames"] / build], "frames/s")}
    sizes = (100, 300) if quick else (100, 300, 1000)
    repeats = 3 if quick else 5
    for n in sizes:
        videos = []
        for i in range(n):  # copies of real encodings: a search's cost depends on sizes, not content
            video = copy.copy(real[i % len(real)])
            video.video_id = f"{video.video_id}-{i}"
            videos.append(video)
        start = time.perf_counter()
        opened = Index(model, videos)
        results[f"open_{n}_videos_s"] = figure([time.perf_counter() - start], "s")
        for label, candidates in (("shortlist", 20), ("exhaustive", 0)):
            times = []
            for query in (QUERIES * 3)[:repeats]:
                start = time.perf_counter()
                opened.search(query, candidates=candidates)
                times.append(time.perf_counter() - start)
            results[f"search_{n}_videos_{label}_s"] = figure(times, "s")
        results[f"index_{n}_videos_mb"] = figure([opened.nbytes / 2**20], "MB")
    frames = sum(len(v.times) for v in real) / len(real)
    return {"config": "tiny (random init)", "indexed_videos": totals["samples"], "frames_per_video": frames,
            "results": results}
