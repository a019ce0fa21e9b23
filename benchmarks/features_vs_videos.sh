#!/usr/bin/env bash
# The same model with the same frozen backbone trained on the same data twice: from the video shards
# (decoded and encoded at every step) and from a feature cache of them (`vmr features extract`), then
# both scored on the held-out videos with the official protocol. Wall times include everything a
# user waits for: extraction, training with its validations, the final evaluation.
#
#   benchmarks/features_vs_videos.sh videos   OUT            # train + eval from video shards
#   benchmarks/features_vs_videos.sh features OUT [NAME [extract options]]  # extract + train + eval
#   benchmarks/features_vs_videos.sh features OUT views2 --views 2   # the same with one augmented view per training video
#   benchmarks/features_vs_videos.sh report   OUT            # the table, and OUT/report.json
#
# Data: the quickstart's shards (`make quickstart` builds them; DATA= to use others). Model:
# configs/tiny.yaml with CLIP frozen and a vision tower of width 256 and 12 layers (9.5M parameters,
# MODEL= to change it): on the quickstart's 32-px frames it costs about 9x the layers above it per
# training step, less than CLIP ViT-B/32 does at 224 px (17x, benchmarks/reports/2026-12-01-cpu-2core-features.md).
# Both runs train STEPS steps (default 1000) on 2 processes (launch/cpu_2proc.yaml) with the same
# seed. Run it on a quiet machine: the ratio of wall times is only as good as the machine's steadiness.
set -euo pipefail
mode=${1:?usage: features_vs_videos.sh videos|features|report OUT}
case $mode in videos|features|report) ;;
*) echo "features_vs_videos.sh: unknown mode $mode (videos, features or report)" >&2; exit 2 ;;
esac
out=${2:?the output folder}
data=${DATA:-runs/quickstart-data/shards}
read -r -a model <<< "${MODEL:-model.freeze_backbone=true model.vision_width=256 model.vision_layers=12 model.vision_heads=4}"
steps=${STEPS:-1000}
bin=$(dirname "$(command -v python3)")
launch=("$bin/accelerate" launch --config_file launch/cpu_2proc.yaml)
mkdir -p "$out"

now() { date +%s.%N; }
# seconds since $1, into $out/$2.time: what the report reads
took() { python3 -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$1" > "$out/$2.time"; }

train_and_eval() {  # NAME TRAIN_GLOB VAL_GLOB [OVERRIDE ...]
    local name=$1 train=$2 val=$3 start
    shift 3
    rm -rf "${out:?}/$name"
    start=$(now)
    "${launch[@]}" -m vmr.train --config configs/tiny.yaml "${model[@]}" "data.train_shards=$train" \
        "data.val_shards=$val" "train.output_dir=$out/$name" "train.max_steps=$steps" "$@"
    took "$start" "$name-train"
    start=$(now)
    python3 -m vmr.cli eval --checkpoint "$out/$name/export" --shards "$val" --json "$out/$name/metrics.json"
    took "$start" "$name-eval"
}

case $mode in
videos)
    train_and_eval videos "$data/train-*.tar" "$data/val-*.tar" ;;
features)
    name=${3:-features}
    shift $(( $# < 3 ? $# : 3 ))
    rm -rf "${out:?}/$name-cache"
    start=$(now)
    "${launch[@]}" -m vmr.cli features extract --config configs/tiny.yaml "$@" --shards "$data" \
        --out "$out/$name-cache" "${model[@]}"
    took "$start" "$name-extract"
    # Each input gets its best loader: a cache batch costs about 12 ms to read, and on 2 cores a
    # loader worker beside each of the 2 ranks costs more than it saves (0.373 s per step with one
    # worker, 0.334 s without); video shards train at the same speed with or without (1.835 / 1.827 s).
    train_and_eval "$name" "$out/$name-cache/train-*.tar" "$out/$name-cache/val-*.tar" data.num_workers=0 ;;
report)
    python3 - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = Path(sys.argv[1])
seconds = {p.stem: float(p.read_text()) for p in out.glob("*.time")}
runs = {}
for metrics in sorted(out.glob("*/metrics.json")):
    name, brief = metrics.parent.name, json.loads(metrics.read_text())["brief"]
    wall = round(sum(seconds.get(f"{name}-{part}", 0.0) for part in ("extract", "train", "eval")), 1)
    runs[name] = {"R1@0.5": brief["MR-full-R1@0.5"], "R1@0.7": brief["MR-full-R1@0.7"],
                  "mAP": brief["MR-full-mAP"], "extract_s": seconds.get(f"{name}-extract", 0.0),
                  "train_s": seconds.get(f"{name}-train"), "eval_s": seconds.get(f"{name}-eval"), "wall_s": wall}
    # The loop's own timings (TensorBoard perf/*): the machine's speed drifts, so each run says its own.
    events = EventAccumulator(str(next((metrics.parent / "tensorboard").rglob("events.out.tfevents.*")))).Reload()
    for tag, key in (("perf/step_s", "median_step_s"), ("perf/data_wait_fraction", "median_data_wait")):
        runs[name][key] = round(statistics.median(e.value for e in events.Scalars(tag)), 3)
base = runs.get("videos")
print("| run | R1@0.5 | R1@0.7 | mAP | extract s | train s | eval s | wall s | wall / videos | R1@0.5 - videos "
      "| median step s | data wait |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for name, r in runs.items():
    ratio = f"{r['wall_s'] / base['wall_s']:.3f}" if base else ""
    gap = f"{r['R1@0.5'] - base['R1@0.5']:+.2f}" if base else ""
    print(f"| {name} | {r['R1@0.5']:.2f} | {r['R1@0.7']:.2f} | {r['mAP']:.2f} | {r['extract_s']:.0f} | "
          f"{r['train_s']:.0f} | {r['eval_s']:.0f} | {r['wall_s']:.0f} | {ratio} | {gap} | "
          f"{r['median_step_s']:.3f} | {r['median_data_wait']:.1%} |")
if base:  # the same frozen tower: its weights' sha256 in the video run's bundle and in each cache
    from vmr.cache import vision_fingerprint
    from vmr.model import VideoMomentRetrievalModel

    tower = vision_fingerprint(VideoMomentRetrievalModel.from_pretrained(out / "videos" / "export"))
    for name in runs:
        manifest = out / f"{name}-cache" / "manifest.json"
        if manifest.is_file():
            same = json.loads(manifest.read_text())["extractor"]["vision_sha256"] == tower
            runs[name]["same_vision_tower_as_videos"] = same
            print(f"{name}: the cache's vision tower {'is' if same else 'is NOT'} the video run's")
(out / "report.json").write_text(json.dumps(runs, indent=1) + "\n")
EOF
    ;;
esac
