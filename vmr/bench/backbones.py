"""``vmr bench backbones``: CLIP's towers against SigLIP's.

cost     the default architecture with CLIP ViT-B/32 against the same layers on a SigLIP base tower
         of google/siglip-base-patch16-224's sizes (ViT-B/16 at 224 px; configs/qvhighlights_siglip.yaml),
         random weights (same cost, no download), fp32, on the same frames and queries: parameters,
         frames/s through the vision tower, queries/s through the text tower, one window's inference
         forward, and one training step of the whole model (towers fine-tuned: forward, losses,
         backward, AdamW).
quality  the quickstart's task (``vmr synth`` videos in 32-px shards at 2 frames/s; configs/tiny.yaml)
         trained the same steps on the same batches with the tiny CLIP and with a tiny SigLIP of the
         same sizes, each scored on the held-out videos (QVHighlights protocol, R1@0.5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from vmr.bench.common import figure
from vmr.bundle import read_bundle

QUERIES = ["a red circle moves left", "a blue square grows", "a green triangle blinks", "a yellow circle shrinks"]
# SigLIP base (google/siglip-base-patch16-224): both towers 768 wide, 12 layers of 12 heads, 16-px patches.
SIGLIP_BASE = ["model.backbone=siglip", "model.patch_size=16", "model.text_width=768", "model.text_heads=12"]


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _cost(backbone_overrides: list[str], frames: int, repeats: int) -> dict:
    import torch

    from vmr.config import load_config, preset
    from vmr.model import VideoMomentRetrievalModel, moment_losses

    cfg = load_config(preset("default"), ["model.init=random", "model.tokenizer=synthetic", "model.dropout=0",
                                          *backbone_overrides])
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).train()
    size = cfg.data.sampling.size
    video = torch.randint(0, 256, (1, frames, 3, size, size), dtype=torch.uint8)
    text = model.tokenize(QUERIES[:2])
    batch = {"relevance": torch.zeros(2, frames), "moments": torch.tensor([[[0.0, frames / 2]]] * 2),
             "moment_frames": torch.tensor([[[0, frames // 2 - 1]]] * 2), "moment_mask": torch.ones(2, 1, dtype=torch.bool),
             "saliency": torch.zeros(2, frames), "has_saliency": torch.zeros(2, dtype=torch.bool)}
    batch["relevance"][:, : frames // 2] = 1.0
    optimizer = torch.optim.AdamW(model.parameter_groups(1e-4, 1e-5, 0.1), lr=1e-4)

    def step():
        loss = moment_losses(model(video, text), batch, model.config)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train = _timed(step, repeats)
    model.eval()
    with torch.no_grad():
        infer = _timed(lambda: model(video, text), repeats)
        vision = _timed(lambda: model.towers.encode_frames(video[0]), repeats)
        words = _timed(lambda: model.encode_queries(QUERIES), repeats)
    return {"params_m": figure([sum(p.numel() for p in model.parameters()) / 1e6], "M"),
            "vision_frames_per_s": figure([frames / t for t in vision], "frames/s"),
            "text_queries_per_s": figure([len(QUERIES) / t for t in words], "queries/s"),
            "infer_window_s": figure(infer, "s"), "train_step_s": figure(train, "s"),
            "patches_per_frame": figure([model.towers.grid], "patches")}


def bench_backbone_cost(quick: bool) -> dict:
    """Both towers on the same frames and queries; the ratios are SigLIP's over CLIP's."""
    frames, repeats = (2, 1) if quick else (8, 5)
    clip, siglip = _cost([], frames, repeats), _cost(SIGLIP_BASE, frames, repeats)
    results = {f"clip_b32_{k}": v for k, v in clip.items()} | {f"siglip_b16_{k}": v for k, v in siglip.items()}
    for key in ("train_step_s", "infer_window_s"):
        results[f"siglip_vs_clip_{key}"] = figure([siglip[key]["median"] / clip[key]["median"]], "x")
    return {"config": "configs/default.yaml (random init, fp32) with CLIP ViT-B/32 and with SigLIP B/16 towers",
            "frames_per_window": frames, "queries": 2, "results": results}


def _quickstart_data(workdir: Path, quick: bool) -> Path:
    """The quickstart's sample data (the Makefile's settings; fewer and shorter videos with --quick)."""
    from vmr.data.shards import build_shards
    from vmr.synth import synthesize

    synth, out = workdir / "quickstart-synth", workdir / "quickstart-shards"
    synthesize(synth, videos=12 if quick else 400, size=32, fps=4.0, min_duration=10 if quick else 20,
               max_duration=20 if quick else 40, progress=False)
    for split in ("train", "val"):
        build_shards(synth / "videos", [synth / f"{split}.jsonl"], out, split=split, fps=2.0, size=32,
                     keyframe_interval=0, max_videos_per_shard=20, workers=2, progress=False)
    return out


def bench_backbone_quality(shards: Path | None, quick: bool, workdir: Path, seeds: tuple[int, ...] = (0,)) -> dict:
    """configs/tiny.yaml trained in one process (its two processes' videos per step in one batch),
    once with its CLIP towers and once with SigLIP towers of the same sizes, with the same seeds
    (``train.seed`` and ``data.seed``) and steps; then each export scored on the held-out shards as
    ``vmr eval --checkpoint`` scores it. A figure's spread is over the seeds."""
    from vmr.config import load_config, preset
    from vmr.eval.metrics import evaluate
    from vmr.eval.predict import predict_shards
    from vmr.train import train

    data = shards or _quickstart_data(workdir, quick)
    steps = 4 if quick else load_config(preset("tiny")).train.max_steps
    runs: dict[str, dict[str, list[float]]] = {}
    for backbone in ("clip", "siglip"):
        for seed in seeds:
            out = workdir / f"quality-{backbone}-{seed}"
            cfg = load_config(preset("tiny"), [
                f"data.train_shards={data}/train-*.tar", f"data.val_shards={data}/val-*.tar", f"model.backbone={backbone}",
                f"train.output_dir={out}", f"train.max_steps={steps}", "train.batch_size=8", "train.eval_every=0",
                "train.save_every=0", "train.log_every=50", f"train.seed={seed}", f"data.seed={seed}"])
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                train(cfg)
            minutes = (time.perf_counter() - start) / 60
            model = read_bundle(out / "export")  # what vmr eval --checkpoint scores
            predictions, truth, _, _ = predict_shards(model, f"{data}/val-*.tar", cfg, model.tokenizer, progress=False)
            brief = evaluate(predictions, truth)[0]["brief"]
            for key, value in (("r1_at_0.5", brief["MR-full-R1@0.5"]), ("r1_at_0.7", brief["MR-full-R1@0.7"]),
                               ("mr_map", brief["MR-full-mAP"]), ("train_minutes", minutes)):
                runs.setdefault(f"{backbone}_tiny_{key}", []).append(value)
    units = {"r1_at_0.5": "R1@0.5 %", "r1_at_0.7": "R1@0.7 %", "mr_map": "mAP %", "train_minutes": "min"}
    results = {name: figure(values, units[name.split("_tiny_")[1]]) for name, values in runs.items()}
    return {"config": "configs/tiny.yaml, model.backbone clip and siglip, one process, train.batch_size 8",
            "shards": str(shards) if shards else "the quickstart's data (vmr synth, made here)", "steps": steps,
            "seeds": list(seeds), "per_seed": runs,
            "sizes": {k: v for k, v in dataclasses.asdict(load_config(preset("tiny")).model).items()
                      if k.endswith(("_width", "_layers", "_heads", "_size"))},
            "results": results}
