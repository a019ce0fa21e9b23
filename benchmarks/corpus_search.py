"""The quickstart's held-out videos as a small corpus benchmark (TVR's protocol): every held-out query
is searched over all 80 videos with ``vmr search --queries``, and the prediction file is scored with
``vmr eval --protocol tvr`` (VCMR, SVMR, VR at R@1/5/10/100).

TVR names one video per query, but a synthetic sentence ("a green circle grows") often holds in
several of the held-out videos: beside TVR's figures, ``collection_R1@0.5`` counts a query's best
result when its video has an event with that exact sentence that the result overlaps at IoU >= 0.5
(the figure the collection search's goal is stated in), and ``in_video_R1@0.5`` is the same for the
query's own video alone (SVMR's first moment, against every window of the query). ``shortlist_holds``
is the share of queries whose reranked videos hold one with the sentence. ``--contrast`` (default: the
quickstart's training annotations; ``--contrast ''`` for none) is passed to ``vmr search``.

    make quickstart   # once: the model in runs/quickstart and the held-out shards
    .venv/bin/python benchmarks/corpus_search.py --out benchmarks/reports/$(date +%F)-<machine>-corpus.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
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
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "corpus",
                        help="where the index, the TVR ground truth and the predictions go")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--contrast", default=str(ROOT / "runs" / "quickstart-data" / "synth" / "train.jsonl"),
                        help="annotations whose sentences vmr search contrasts the best videos with ('': none)")
    parser.add_argument("--out", type=Path, help="the report JSON")
    args = parser.parse_args()

    from vmr.data.sources import expand_shards
    from vmr.data.tars import iter_shard

    args.work.mkdir(parents=True, exist_ok=True)
    events: dict[str, list[tuple[str, list]]] = {}  # video -> [(sentence, windows)]
    truth = []
    for url in expand_shards(args.shards):
        for _, _, meta in iter_shard(Path(url)):
            for q in meta["queries"]:
                events.setdefault(meta["video_id"], []).append((q["query"], q["windows"]))
                truth.append({"desc_id": q["qid"], "desc": q["query"], "vid_name": meta["video_id"],
                              "ts": q["windows"][0], "duration": meta["duration"], "windows": q["windows"]})
    gt = args.work / "ground_truth.jsonl"
    gt.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "windows"}) + "\n" for r in truth))
    index, predictions, metrics = args.work / "index", args.work / "predictions.json", args.work / "metrics.json"
    for command in (["index", "--checkpoint", args.checkpoint, "--shards", args.shards, "--out", str(index)],
                    ["search", "--index", str(index), "--queries", str(gt), "--out", str(predictions),
                     "--candidates", str(args.candidates), *(["--contrast", args.contrast] if args.contrast else [])],
                    ["eval", "--protocol", "tvr", "--predictions", str(predictions), "--ground-truth", str(gt),
                     "--json", str(metrics)]):
        print("vmr", " ".join(command), flush=True)
        subprocess.run([str(BIN / "vmr"), *command], check=True)
    submission = json.loads(predictions.read_text())
    names = {n: v for v, n in submission["video2idx"].items()}

    def right(video: str, sentence: str, start: float, end: float) -> bool:
        return any(s == sentence and any(iou((start, end), w) >= 0.5 for w in windows)
                   for s, windows in events.get(video, []))

    by_id = {r["desc_id"]: r for r in truth}
    collection = in_video = holds = 0
    for entry in submission["VCMR"]:
        row = by_id[entry["desc_id"]]
        video, start, end, _ = entry["predictions"][0]
        collection += right(names[video], row["desc"], start, end)
    for entry in submission["SVMR"]:
        row = by_id[entry["desc_id"]]
        _, start, end, _ = entry["predictions"][0]
        in_video += any(iou((start, end), w) >= 0.5 for w in row["windows"])
    for entry in submission["VR"]:
        row = by_id[entry["desc_id"]]
        holds += any(s == row["desc"] for v, *_ in entry["predictions"][:args.candidates]
                     for s, _ in events.get(names[v], []))
    n = len(truth)
    report = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "queries": n,
              "videos": len(events), "candidates": args.candidates, "contrast": args.contrast or None,
              "tvr": json.loads(metrics.read_text()),
              "collection_R1@0.5": round(100 * collection / n, 2), "in_video_R1@0.5": round(100 * in_video / n, 2),
              "ratio": round(collection / max(in_video, 1), 3), "shortlist_holds": round(100 * holds / n, 2)}
    print(json.dumps({k: v for k, v in report.items() if k != "tvr"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
