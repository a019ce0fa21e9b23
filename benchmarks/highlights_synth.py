"""Highlight-only training end to end on the quickstart's sample data: its queries rewritten in the
TVSum highlight layout (one line per query, a ``label`` of 3 annotator scores 1-5 per 2-s clip,
a ``domain``, no moment windows), shards built from that file, the tiny model trained with the
saliency head alone, and the held-out videos scored with the TVSum protocol per domain.

    make quickstart   # once: the sample videos in runs/quickstart-data
    .venv/bin/python benchmarks/highlights_synth.py --steps 800 \
        --out benchmarks/reports/$(date +%F)-<machine>-highlights-synth.json

The label of a clip is 1 + the quickstart's own saliency score (0-4) where it has one, else 1;
the domain is the query's ``told_apart_by``. As a floor, the same protocol is computed for random
clip scores (mean of 20 draws) and for a constant score (every clip tied).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SYNTH = ROOT / "runs" / "quickstart-data" / "synth"


def highlight_rows(split: str) -> list[dict]:
    rows = []
    for line in (SYNTH / f"{split}.jsonl").read_text().splitlines():
        q = json.loads(line)
        scores = dict(zip(q["relevant_clip_ids"], q["saliency_scores"], strict=True))
        label = [[1 + s for s in scores.get(c, [0, 0, 0])] for c in range(math.ceil(q["duration"] / 2))]
        rows.append({"qid": q["qid"], "query": q["query"], "vid": q["vid"], "duration": q["duration"],
                     "domain": q["told_apart_by"], "label": label})
    return rows


def run(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "highlights-synth")
    parser.add_argument("--out", type=Path, required=True, help="the report (JSON)")
    args = parser.parse_args()
    if not (SYNTH / "val.jsonl").is_file():
        print(f"{SYNTH} is missing: run `make quickstart` first", file=sys.stderr)
        return 2
    from vmr.eval.metrics import evaluate

    args.work.mkdir(parents=True, exist_ok=True)
    truth = {}
    build = 0.0
    for split in ("train", "val"):
        rows = highlight_rows(split)
        truth[split] = rows
        ann = args.work / f"{split}.jsonl"
        ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
        build += run([str(BIN / "vmr"), "shards", "build", "--videos", str(SYNTH / "videos"), "--annotations", str(ann),
                      "--out", str(args.work / "shards"), "--split", split, "--fps", "2", "--size", "32",
                      "--keyframe-interval", "0", "--max-videos-per-shard", "20", "--workers", "2", "--overwrite"])
    out = args.work / "run"
    train = run([str(BIN / "vmr"), "train", "--config", "configs/tiny.yaml", f"train.output_dir={out}",
                 f"data.train_shards={args.work}/shards/train-*.tar", f"data.val_shards={args.work}/shards/val-*.tar",
                 f"train.max_steps={args.steps}", f"train.eval_every={args.steps // 2}",
                 f"train.save_every={args.steps // 2}", "train.eval_protocol=tvsum", "train.best_metric=HL-mAP",
                 "data.sampling.negatives=0"])
    metrics = args.work / "metrics.json"
    run([str(BIN / "vmr"), "eval", "--checkpoint", str(out / "export"), "--shards", f"{args.work}/shards/val-*.tar",
         "--protocol", "tvsum", "--group-by", "domain", "--json", str(metrics)])
    trained = json.loads(metrics.read_text())
    rng = random.Random(0)
    chance = []
    for _ in range(20):
        preds = [{"qid": r["qid"], "pred_saliency_scores": [rng.random() for _ in r["label"]]} for r in truth["val"]]
        chance.append(evaluate(preds, truth["val"], "tvsum")[0]["brief"]["HL-mAP"])
    flat = [{"qid": r["qid"], "pred_saliency_scores": [0.0] * len(r["label"])} for r in truth["val"]]
    report = {"machine": platform.node(), "python": platform.python_version(), "steps": args.steps,
              "build_s": round(build, 1), "train_s": round(train, 1),
              "val_queries": len(truth["val"]), "trained": trained,
              "random_scores_HL-mAP": round(sum(chance) / len(chance), 2),
              "constant_scores_HL-mAP": evaluate(flat, truth["val"], "tvsum")[0]["brief"]["HL-mAP"]}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "trained"} | {"HL-mAP": trained["brief"]["HL-mAP"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
