"""vmr's head, Moment-DETR and QD-DETR side by side on the quickstart's task: the same data (make
quickstart's shards), the same tiny towers, the same steps, one process; each head trained for each
seed, then scored on the 80 held-out videos with the QVHighlights protocol. Two inputs:

  video   end to end from the video shards (the towers train with the head)
  cache   on a frozen-tower feature cache (`vmr features extract` once, with the tiny towers frozen at
          their seeded random init; every head then trains on the same cached tokens)

    .venv/bin/python benchmarks/heads_side_by_side.py --steps 250 --seeds 0 1 --inputs video cache

Prints a Markdown table (R1@0.5, R1@0.7, MR-mAP, HL-mAP, seconds per step) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = ROOT / "runs" / "quickstart-data" / "shards"
HEADS = ("vmr", "moment_detr", "qd_detr")
# The published heads at the quickstart's scale: their defaults, except the feed-forward width (the
# tiny towers are 64 wide) and the learning rate, which is the quickstart's for every head.
DETR = ["model.detr.dim_feedforward=256"]


TINY = ROOT / "configs" / "tiny.yaml"
FROZEN = ["model.freeze_backbone=true"]


def vmr(*args: str) -> None:
    done = subprocess.run([str(BIN / "vmr"), *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"vmr {args[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def feature_cache(out: Path) -> Path:
    """The quickstart's shards through the frozen tiny towers, once (the seeded random init)."""
    cache = out / "cache"
    if not (cache / "manifest.json").is_file():
        vmr("features", "extract", "--config", str(TINY), "--shards", str(DATA), "--out", str(cache), *FROZEN)
    return cache


def run(head: str, seed: int, steps: int, out: Path, cache: Path | None) -> dict:
    run_dir = out / f"{'cache' if cache else 'video'}-{head}-seed{seed}"
    data = [f"data.train_shards={cache}/train-*.tar", f"data.val_shards={cache}/val-*.tar", *FROZEN] if cache else []
    start = time.perf_counter()
    vmr("train", "--config", str(TINY), f"train.output_dir={run_dir}", f"train.max_steps={steps}",
        f"train.seed={seed}", f"data.seed={seed}", "train.eval_every=0", f"train.save_every={steps}",
        f"model.head={head}", *(DETR if head != "vmr" else []), *data)
    seconds = time.perf_counter() - start
    metrics = run_dir / "metrics.json"
    vmr("eval", "--checkpoint", str(run_dir / "export"), "--shards", str((cache or DATA) / "val-*.tar"), "--json", str(metrics))
    brief = json.loads(metrics.read_text())["brief"]
    return {"input": "cache" if cache else "video", "head": head, "seed": seed, "steps": steps,
            "seconds_per_step": round(seconds / steps, 3),
            "R1@0.5": brief["MR-full-R1@0.5"], "R1@0.7": brief["MR-full-R1@0.7"], "MR-mAP": brief["MR-full-mAP"],
            "HL-mAP": brief["HL-min-VeryGood-mAP"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--inputs", nargs="+", default=["video", "cache"], choices=["video", "cache"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "heads")
    args = parser.parse_args()
    if not (DATA / "manifest.json").is_file():
        sys.exit(f"{DATA}: the quickstart's shards are missing (run make quickstart first)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.inputs:
        cache = feature_cache(args.out) if kind == "cache" else None
        for seed in args.seeds:
            for head in args.heads:
                rows.append(run(head, seed, args.steps, args.out, cache))
                print(json.dumps(rows[-1]), flush=True)
                (args.out / "side_by_side.json").write_text(json.dumps(rows, indent=1))
    print("| input | head | seed | R1@0.5 | R1@0.7 | MR-mAP | HL-mAP | s/step |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['head']} | {r['seed']} | {r['R1@0.5']:.2f} | {r['R1@0.7']:.2f} | {r['MR-mAP']:.2f} | "
              f"{r['HL-mAP']:.2f} | {r['seconds_per_step']:.3f} |")


if __name__ == "__main__":
    main()
