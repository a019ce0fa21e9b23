"""vmr's head, Moment-DETR and QD-DETR side by side on the quickstart's task: the same data (make
quickstart's shards), the same tiny towers, the same steps, one process; each head trained end to end
for each seed, then scored on the 80 held-out videos with the QVHighlights protocol.

    .venv/bin/python benchmarks/heads_side_by_side.py --steps 300 --seeds 0 1 --out runs/heads

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


def run(head: str, seed: int, steps: int, out: Path) -> dict:
    run_dir = out / f"{head}-seed{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([str(BIN / "vmr"), "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                    f"train.output_dir={run_dir}", f"train.max_steps={steps}", f"train.seed={seed}", f"data.seed={seed}",
                    "train.eval_every=0", f"train.save_every={steps}", f"model.head={head}",
                    *(DETR if head != "vmr" else [])], check=True, env=env, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    metrics = run_dir / "metrics.json"
    subprocess.run([str(BIN / "vmr"), "eval", "--checkpoint", str(run_dir / "export"), "--shards",
                    str(DATA / "val-*.tar"), "--json", str(metrics)], check=True, env=env, capture_output=True, cwd=ROOT)
    brief = json.loads(metrics.read_text())["brief"]
    return {"head": head, "seed": seed, "steps": steps, "seconds_per_step": round(seconds / steps, 3),
            "R1@0.5": brief["MR-full-R1@0.5"], "R1@0.7": brief["MR-full-R1@0.7"], "MR-mAP": brief["MR-full-mAP"],
            "HL-mAP": brief["HL-min-VeryGood-mAP"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "heads")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for head in args.heads:
            rows.append(run(head, seed, args.steps, args.out))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "side_by_side.json").write_text(json.dumps(rows, indent=1))
    print("| head | seed | R1@0.5 | R1@0.7 | MR-mAP | HL-mAP | s/step |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['seed']} | {r['R1@0.5']:.2f} | {r['R1@0.7']:.2f} | {r['MR-mAP']:.2f} | "
              f"{r['HL-mAP']:.2f} | {r['seconds_per_step']:.3f} |")


if __name__ == "__main__":
    main()
