"""``vmr bench search``: encode once and ask many, and searching a collection.

encode   one long video (320x240, 30 s with --quick, else 10 minutes): the first query (decode, vision
         tower, then the layers above: what ``vmr predict`` costs for one query), later queries on
         the same encoding, their ratio, and the same query by the path that decodes and runs both
         towers for every window (each window's frames read and encoded again); the encoding's
         memory per video minute. The default architecture with random weights (same cost, no
         download), or ``--config``.
search   the tiny preset: an index built from sample shards (videos/s and frames/s: extraction and
         keys), then collections of 1,000, 10,000 and 100,000 videos whose keys are the real ones
         with noise per copy (synthetic beyond the real videos): the ANN build, and in a fresh
         process its memory, the shortlist's and a whole search's latency (median, p99; 20 and 10
         candidates, and 20 with contrast: every sentence of the synthetic vocabulary) and the
         shortlist's recall against exact search; and finding a query's near misses for contrast in a
         pool of 100,000 synthetic sentences.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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
    seconds = 30 if quick else 600
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
    """Building an index (real: extraction and keys of sample shards), then collections of 1,000,
    10,000 and 100,000 videos (1,000 with --quick) made of those real videos' keys with
    noise added per copy (synthetic beyond the real encodings), searched by a fresh process: its
    memory, the shortlist's latency and recall against exact search, and a whole search's latency
    (the shortlist then the full model on 20 candidates, whose prepared rows are the real ones on disk)."""
    import torch

    from vmr.bundle import write_bundle
    from vmr.config import load_config, preset
    from vmr.data.shards import build_shards
    from vmr.model import VideoMomentRetrievalModel
    from vmr.synth import synthesize

    cfg = load_config(preset("tiny"), ["data.sampling.size=32"])
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).eval()
    bundle = write_bundle(model, workdir / "search-bundle", cfg)
    synth, shards, index = workdir / "search-synth", workdir / "search-shards", workdir / "search-index"
    count = 4 if quick else 24
    synthesize(synth, videos=count, queries_per_video=2, min_duration=20, max_duration=40, fps=4, size=32,
               val_fraction=0.0, seed=5, progress=False)
    build_shards(synth / "videos", [synth / "train.jsonl"], shards, split="train", fps=2.0, size=32,
                 max_videos_per_shard=4, progress=False)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vmr.cli", "index", "--checkpoint", str(bundle), "--shards", str(shards),
                    "--out", str(index)], check=True, capture_output=True)
    build = time.perf_counter() - start
    from vmr.ann import Collection

    real = Collection.open(index, model)
    frames = len(real.keys)
    results = {"index_videos_per_s": figure([len(real) / build], "videos/s"),
               "index_frames_per_s": figure([frames / build], "frames/s")}
    kinds = {}  # the ANN index each size got
    for n in (1000,) if quick else (1000, 10000, 100000):
        folder = workdir / f"collection-{n}"
        start = time.perf_counter()
        kind = synthetic_collection(real, index, folder, n)
        results[f"ann_build_{n}_videos_s"] = figure([time.perf_counter() - start], "s")
        measured = json.loads(subprocess.run([sys.executable, "-m", "vmr.bench.search", str(bundle), str(folder),
                                              str(3 if quick else 10)], check=True, capture_output=True,
                                             text=True).stdout)
        kinds[n] = kind
        results[f"search_{n}_videos_memory_mb"] = figure([measured["rss_mb"]], "MB")
        results[f"search_{n}_videos_shortlist_ms"] = figure(measured["shortlist_ms"], "ms")
        results[f"search_{n}_videos_shortlist_p99_ms"] = figure([float(np.percentile(measured["shortlist_ms"], 99))],
                                                                "ms")
        results[f"search_{n}_videos_ms"] = figure(measured["search_ms"], "ms")
        results[f"search_{n}_videos_p99_ms"] = figure([float(np.percentile(measured["search_ms"], 99))], "ms")
        results[f"search_{n}_videos_10_candidates_ms"] = figure(measured["search10_ms"], "ms")
        results[f"search_{n}_videos_contrast_ms"] = figure(measured["contrast_ms"], "ms")
        results[f"search_{n}_videos_recall"] = figure([recall(folder, measured["shortlists"],
                                                              measured["query_keys"])], "share")
        shutil.rmtree(folder)
    results["contrast_lookup_100000_sentences_ms"] = figure(contrast_lookup(100_000, 3 if quick else 20), "ms")
    return {"config": "tiny (random init); keys beyond the real videos synthetic", "real_videos": len(real),
            "frames_per_video": frames / len(real), "ann_index": kinds, "results": results}


def contrast_lookup(n: int, repeats: int) -> list[float]:
    """Milliseconds to find a query's near misses (``--contrast``) in a pool of ``n`` synthetic ten-word
    sentences (a caption file's size: the vocabulary's words among 2,000 others), the pool built once."""
    import random

    from vmr.model.corpus import SentencePool
    from vmr.vocab import ACTIONS, COLOURS, SHAPES

    rng = random.Random(0)
    words = [w for kind in (COLOURS, SHAPES, ACTIONS) for phrase in kind for w in phrase.split()]
    words += ["a", "the", "and", "of"] * 50 + [f"word{i}" for i in range(2000)]
    pool = SentencePool(" ".join(rng.choice(words) for _ in range(10)) for _ in range(n))
    times = []
    for query in (QUERIES * repeats)[:repeats]:
        start = time.perf_counter()
        pool.nearest(query, 8)
        times.append(1000 * (time.perf_counter() - start))
    return times


def synthetic_collection(real, index: Path, folder: Path, n: int) -> str:
    """An index folder of ``n`` videos: the real index's shards and manifest (hard links), and merged keys
    made of its videos' keys, each copy moved by a random offset of its own (0.1 per dimension, the
    keys being unit vectors) and per-frame noise (0.02), pointing at the real videos' tokens and prepared rows."""
    from vmr.ann import COLLECTION, write_collection

    folder.mkdir(parents=True)
    for item in index.iterdir():  # hard links: the same bytes, inside the folder
        if item.is_file():
            os.link(item, folder / item.name)
    out = folder / "keys" / real.root.name
    out.mkdir(parents=True)
    rng = np.random.default_rng(n)
    counts = np.diff(real.starts)
    source = np.arange(n) % len(real)
    keys = []
    base = np.asarray(real.keys, dtype=np.float32)
    for first in range(0, n, 1000):  # 1,000 videos at a time: the build's memory stays small
        chunk = []
        for v in range(first, min(n, first + 1000)):
            s = source[v]
            # a video of its own: a random offset for the whole video, and a little noise per frame
            copy = base[real.starts[s]:real.starts[s + 1]] + rng.normal(scale=0.1, size=(1, base.shape[1])) \
                + rng.normal(scale=0.02, size=(counts[s], base.shape[1]))
            chunk.append(copy / np.linalg.norm(copy, axis=1, keepdims=True))
        keys.append(np.concatenate(chunk).astype(np.float16))
    keys = np.concatenate(keys)
    starts = np.concatenate([[0], np.cumsum(counts[source])]).astype(np.int64)
    record = json.loads((real.root / COLLECTION).read_text())
    os.link(real.root / "prepared.npy", out / "prepared.npy")  # each copy reads its real video's rows
    written = write_collection(out, keys, starts, real.table[source], real.durations[source], real.prepared_rows[source],
                               [f"{real.ids[s]}-{v}" for v, s in enumerate(source)], [], record["shards"])
    return written["kind"]


def recall(folder: Path, shortlists: list[list[int]], query_keys: list[list[float]]) -> float:
    """The share of each exact top-20 (every key scored, a video by its best frame) the shortlist kept."""
    root = next((folder / "keys").iterdir())
    keys = np.load(root / "keys.npy", mmap_mode="r")
    starts = np.load(root / "starts.npy")
    queries = np.asarray(query_keys, dtype=np.float32)
    best = np.full((len(queries), len(starts) - 1), -np.inf, dtype=np.float32)
    step = 1 << 14  # videos at a time
    for first in range(0, len(starts) - 1, step):
        rows = starts[first:first + step + 1]
        scores = np.asarray(keys[rows[0]:rows[-1]], dtype=np.float32) @ queries.T  # (frames, queries)
        best[:, first:first + len(rows) - 1] = np.maximum.reduceat(scores, rows[:-1] - rows[0], axis=0).T
    kept = [len(set(np.argsort(-best[q], kind="stable")[:len(s)]) & set(s)) / len(s)
            for q, s in enumerate(shortlists)]
    return float(np.mean(kept))


def _measure(bundle: str, folder: str, repeats: int) -> dict:
    """In a fresh process (``python -m vmr.bench.search BUNDLE FOLDER REPEATS``): open the collection,
    search, report resident memory and latencies as JSON."""
    import psutil
    import torch

    from vmr.bundle import load_model
    from vmr.search import Index
    from vmr.vocab import ACTIONS, COLOURS, SHAPES

    torch.set_num_threads(2)
    model, _ = load_model(bundle, fast=False)
    index = Index.open(folder, model)
    queries = (QUERIES * repeats)[:max(repeats, len(QUERIES))]
    # With contrast (vmr search --contrast): every sentence of the synthetic vocabulary to draw from.
    vocabulary = [f"a {c} {s} {a}" for c in COLOURS for s in SHAPES for a in ACTIONS]
    shortlist_ms, search_ms, search10_ms, contrast_ms, shortlists, keys = [], [], [], [], [], []
    for query in queries:
        start = time.perf_counter()
        shortlists.append([v for v, _ in index.shortlist(query, 20)])
        shortlist_ms.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        index.search(query, top_k=10, candidates=20)
        search_ms.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        index.search(query, top_k=10, candidates=10)
        search10_ms.append(1000 * (time.perf_counter() - start))
        index.set_contrast(vocabulary)
        start = time.perf_counter()
        index.search(query, top_k=10, candidates=20)
        contrast_ms.append(1000 * (time.perf_counter() - start))
        index.set_contrast([])
        with torch.no_grad():
            keys.append(index._sentence(query)[1].tolist())
    return {"rss_mb": psutil.Process().memory_info().rss / 2**20, "shortlist_ms": shortlist_ms,
            "search_ms": search_ms, "search10_ms": search10_ms, "contrast_ms": contrast_ms, "shortlists": shortlists,
            "query_keys": keys}


if __name__ == "__main__":
    print(json.dumps(_measure(*sys.argv[1:3], int(sys.argv[3]))))
