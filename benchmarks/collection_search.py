"""Searching a collection, measured for quality on the quickstart's 80 held-out videos: every held-out
query is searched over all 80 (``vmr search``'s two stages, and with every video reranked), and
its best result counts when its video has an event with that exact sentence whose window it
overlaps at IoU >= 0.5. Beside it, the in-video R1@0.5 of the same model on the same encodings (the
query asked of its own video only), and the share of queries whose shortlist holds a right video.

    make quickstart   # once: the model in runs/quickstart and the held-out shards
    .venv/bin/python benchmarks/collection_search.py \
        --out benchmarks/reports/$(date +%F)-<machine>-collection-search.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def iou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--shards", default=str(ROOT / "runs" / "quickstart-data" / "shards" / "val-*.tar"))
    parser.add_argument("--candidates", type=int, nargs="+", default=[5, 10, 20, 0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from vmr.bundle import load_model
    from vmr.data.sources import expand_shards
    from vmr.data.tars import iter_shard
    from vmr.search import Index

    events: dict[str, list[tuple[str, list]]] = {}  # video -> [(sentence, windows)]
    queries = []  # (sentence, its video)
    for url in expand_shards(args.shards):
        for _, _, meta in iter_shard(Path(url)):
            for q in meta["queries"]:
                events.setdefault(meta["video_id"], []).append((q["query"], q["windows"]))
                queries.append((q["query"], meta["video_id"]))

    def right(video: str, sentence: str, start: float, end: float) -> bool:
        return any(s == sentence and any(iou((start, end), w) >= 0.5 for w in windows)
                   for s, windows in events.get(video, []))

    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        subprocess.run([str(BIN / "vmr"), "index", "--checkpoint", args.checkpoint, "--shards", args.shards,
                        "--out", str(index)], check=True)
        model, _ = load_model(args.checkpoint, fast=False)
        opened = Index.open(index, model)
        by_id = {v.video_id: v for v in opened.videos}
        start = time.perf_counter()
        in_video = sum(right(vid, s, m["start"], m["end"]) for s, vid in queries
                       for m in by_id[vid].ask(model, s, top_k=1)[0]["moments"][:1])
        results = {"queries": len(queries), "videos": len(opened.videos),
                   "in_video_R1@0.5": round(100 * in_video / len(queries), 2)}
        for candidates in args.candidates:
            hits = kept = 0
            seconds = []
            for sentence, _ in queries:
                began = time.perf_counter()
                found = opened.search(sentence, top_k=1, candidates=candidates)
                seconds.append(time.perf_counter() - began)
                best = found["results"][0]
                hits += right(best["video"], sentence, best["start"], best["end"])
                listed = [opened.videos[i].video_id
                          for i, _ in opened.shortlist(sentence, candidates or len(opened.videos))]
                kept += any(any(s == sentence for s, _ in events[v]) for v in listed)
            r1 = 100 * hits / len(queries)
            results[f"candidates_{candidates or 'all'}"] = {
                "collection_R1@0.5": round(r1, 2), "ratio_to_in_video": round(r1 / results["in_video_R1@0.5"], 3),
                "shortlist_holds_a_right_video": round(100 * kept / len(queries), 2),
                "median_search_s": round(sorted(seconds)[len(seconds) // 2], 4)}
        results["seconds"] = round(time.perf_counter() - start, 1)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "checkpoint": args.checkpoint, "shards": args.shards, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
