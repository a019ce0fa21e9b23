#!/usr/bin/env bash
# Every GPU-speed measurement in one run: the loop against the model alone (batch 8 and 32, compiled,
# gradient checkpointing, ZeRO-2), the loader up to 12 workers, inference eager and compiled, and
# the frozen end-to-end step against the head-only step from a feature cache.
#
#   benchmarks/gpu_speed.sh prepare DATA     # on a CPU machine with FFmpeg: sample videos -> shards
#   benchmarks/gpu_speed.sh run DATA OUT     # on the GPU machine: reports into OUT
#
# The shards use the README's recommended settings (2 frames/s, 224 px, every frame a key frame),
# one video per shard so that loader workers can split them. On a machine without network access,
# `source .gpu-kit/env.sh .` first (see the GPU kit's README).
set -euo pipefail
mode=${1:?usage: gpu_speed.sh prepare DATA | run DATA OUT}
data=${2:?the data folder}
vmr=(python3 -m vmr.cli)

if [ "$mode" = prepare ]; then
    "${vmr[@]}" synth --out "$data/synth" --videos "${VIDEOS:-64}" --min-duration 30 --max-duration 90 --val-fraction 0
    "${vmr[@]}" shards build --videos "$data/synth/videos" --annotations "$data/synth/train.jsonl" \
        --out "$data/shards" --split train --fps 2 --size 224 --keyframe-interval 0 --max-videos-per-shard 1
    exit 0
fi

out=${3:?the report folder}
mkdir -p "$out"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
stamp="$out/$(date +%F)-$card"
shards="$data/shards"
"${vmr[@]}" bench train --device cuda --shards "$shards" --batch-size 8 32 --compile --gradient-checkpointing \
    --deepspeed-stage 2 --json "$stamp-train.json" | tee "$stamp-train.md"
"${vmr[@]}" bench loader --shards "$shards" --max-workers 12 --json "$stamp-loader.json" | tee "$stamp-loader.md"
"${vmr[@]}" bench infer --device cuda --shards "$shards" --compile --json "$stamp-infer.json" | tee "$stamp-infer.md"
"${vmr[@]}" bench features --device cuda --shards "$shards" --json "$stamp-features.json" | tee "$stamp-features.md"
