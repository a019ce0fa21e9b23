"""``vmr bench train``, ``features`` and ``infer``: the real training loop against the model alone
(MFU from a FLOP count), the feature cache against end-to-end frozen training, and inference
latency and throughput."""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from vmr.bench.common import Options, bench_config, deepspeed_file, figure, percentile, sync


def training_flops(model, batch: dict, device) -> float:
    """FLOPs of one forward and backward pass on ``batch`` (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vmr.data.prefetch import to_device
    from vmr.model import batch_forward, moment_losses

    batch = to_device(batch, device)
    with FlopCounterMode(display=False) as counter:
        outputs = batch_forward(model, batch)
        moment_losses(outputs, batch, model.config)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# Dense bf16 peaks (FLOP/s) for model FLOP utilisation; other devices report achieved FLOP/s only.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def model_alone_steps(cfg, batch: dict, device, steps: int) -> tuple[list[float], float, float]:
    """The model by itself: forward + ``moment_losses`` + backward + clipping + the fused AdamW
    step, on one batch reused (already on the device), at the loop's precision and compile
    setting. Returns the seconds of each step after two warm-up steps (each step synchronised) and
    the peak memory in MB, and on CUDA the implicit host-device synchronisations per step (torch's
    sync debug mode; none is the goal)."""
    import torch

    from vmr.data.prefetch import to_device
    from vmr.model import VideoMomentRetrievalModel, batch_forward, moment_losses
    from vmr.runtime import compute_threads, memory_mb, precision_for

    t = cfg.train
    cuda = device.type == "cuda"
    precision = precision_for(t.mixed_precision, cuda, device.type == "mps", cuda and torch.cuda.is_bf16_supported())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).to(device).train()
    optimizer = torch.optim.AdamW(model.parameter_groups(t.lr, t.weight_decay, t.backbone_lr_mult), lr=t.lr, fused=True)
    forward = torch.compile(model, dynamic=False) if t.compile else model
    batch = to_device(batch, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, syncs = [], 0
    with compute_threads(device, cfg.data.num_workers):  # the loop's threads on a CPU (vmr.train)
        for i in range(steps + 2):
            sync(device)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda and i >= 2:  # after warm-up: every implicit host-device synchronisation warns
                    torch.cuda.set_sync_debug_mode("warn")
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = moment_losses(batch_forward(forward, batch), batch, cfg.model)["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            syncs += sum("synchroniz" in str(w.message) for w in caught)
            sync(device)
            times.append(time.perf_counter() - start)
    return times[2:], memory_mb(device), syncs / steps


def _variants(args_batch: list[int], compile_: bool, checkpointing: bool, stages: list[int]) -> list[tuple[str, dict]]:
    """The measured variants: the base one (first batch size, eager, no checkpointing, no
    DeepSpeed), then one per other switch value, each changing one thing."""
    base = {"batch_size": args_batch[0], "compile": False, "gradient_checkpointing": False, "deepspeed_stage": 0}
    variants = [("base", base)]
    variants += [(f"batch{b}", {**base, "batch_size": b}) for b in args_batch[1:]]
    if compile_:
        variants.append(("compile", {**base, "compile": True}))
    if checkpointing:
        variants.append(("checkpointing", {**base, "gradient_checkpointing": True}))
    variants += [(f"zero{s}", {**base, "deepspeed_stage": s}) for s in stages if s]
    return variants


def bench_train(shards: str, device: str, quick: bool, workdir: Path, options: Options) -> dict:
    """For each variant (``options``), on the same config and batch: the real loop
    (vmr.train.train; under DeepSpeed through ``accelerate launch``) for a few dozen steps, its
    figures from its TensorBoard scalars after the warm-up steps, one epoch long enough that the
    stream never restarts inside them; then the model alone on one of the loop's batches; their
    ratio ``loop_overhead``, achieved FLOP/s and MFU of both from one FLOP count, peak memory."""
    import torch

    from vmr.config import config_to_dict
    from vmr.data.stream import make_loader
    from vmr.model import VideoMomentRetrievalModel

    steps, warmup, log_every = (12, 4, 2) if quick else (60, 10, 5)
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu), None)
    variants = _variants(list(options.batch_size) or [bench_config(device, shards, options).train.batch_size],
                         options.compile, options.gradient_checkpointing, list(options.deepspeed_stage))
    report = {}
    for label, variant in variants:
        cfg = bench_config(device, shards, options)
        cfg.train.batch_size, cfg.train.compile = variant["batch_size"], variant["compile"]
        cfg.model.gradient_checkpointing = variant["gradient_checkpointing"]
        cfg.train.max_steps, cfg.train.log_every = steps, log_every
        cfg.data.epoch_samples = 2 * steps * cfg.train.batch_size * cfg.train.grad_accum  # one epoch, no restart
        if device == "cpu":
            cfg.train.mixed_precision = "no"
        loop = _step_times(cfg, workdir / f"train-{label}", warmup, stage=variant["deepspeed_stage"])
        step_s = loop["perf/step_s"]
        results = {
            "loop_step_s": figure(step_s, "s"),
            "steps_per_s": figure([1 / t for t in step_s], "steps/s"),
            "samples_per_s": figure(loop["perf/samples_per_s"], "videos/s"),
            "frames_per_s": figure(loop["perf/frames_per_s"], "frames/s"),
            "data_wait_fraction": figure(loop["perf/data_wait_fraction"], "fraction"),
            "peak_memory": figure([max(loop["perf/memory_mb"])], "MB"),
        }
        flop_model = VideoMomentRetrievalModel.from_config(cfg.model).to(dev).train()
        loader = make_loader(shards, cfg.data, flop_model.tokenizer, cfg.train.batch_size, train=True,
                             rank=0, world=1, num_workers=0)
        batch = next(iter(loader))
        flops = training_flops(flop_model, batch, dev)
        del flop_model
        alone, alone_memory, syncs = model_alone_steps(cfg, batch, dev, max(5, steps - warmup))
        results["model_alone_step_s"] = figure(alone, "s")
        if device == "cuda":
            results["model_alone_host_syncs_per_step"] = figure([syncs], "syncs")
        results["model_alone_peak_memory"] = figure([alone_memory], "MB")
        results["loop_overhead"] = figure([statistics.median(step_s) / statistics.median(alone)], "x")
        results["model_tflops_per_s"] = figure([flops / t / 1e12 for t in step_s], "TFLOP/s")
        results["model_alone_tflops_per_s"] = figure([flops / t / 1e12 for t in alone], "TFLOP/s")
        if peak:
            results["mfu"] = figure([flops / t / peak for t in step_s], "fraction")
            results["model_alone_mfu"] = figure([flops / t / peak for t in alone], "fraction")
        entry = {**variant, "flops_per_step": flops, "results": results}
        if not report:  # the base run
            report = {"config": options.label("default (random init)" if device == "cuda" else "tiny"), "steps": steps,
                      "warmup_steps": warmup, "log_every": log_every, **entry,
                      "resolved_config": config_to_dict(cfg), "variants": {}}
        else:
            report["variants"][label] = entry
    return report


def _step_times(cfg, out: Path, warmup: int, stage: int = 0) -> dict[str, list[float]]:
    """Run the real loop and read back its TensorBoard ``perf/*`` scalars logged after ``warmup``
    steps: in this process (vmr.train.train), or with ``stage`` 1-3 as one DeepSpeed ZeRO process
    through ``accelerate launch`` (the loop needs the launcher's environment)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vmr.config import save_config
    from vmr.train import train

    cfg.train.output_dir = str(out)
    cfg.train.save_every, cfg.train.eval_every = 0, 0
    cfg.data.val_shards = []
    if stage:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "bench.yaml")
        launch = deepspeed_file(stage)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--use_deepspeed",
                   "--deepspeed_config_file", str(launch), "-m", "vmr.train", "--config", str(out / "bench.yaml")]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            from vmr.errors import UserError

            raise UserError(f"DeepSpeed ZeRO-{stage} run failed: {result.stderr.strip().splitlines()[-1][:300]}")
    else:
        train(cfg)
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")))).Reload()
    tags = ("perf/step_s", "perf/samples_per_s", "perf/frames_per_s", "perf/data_wait_fraction", "perf/memory_mb")
    return {tag: [e.value for e in events.Scalars(tag) if e.step > warmup] for tag in tags}


def bench_features(shards: str, device: str, quick: bool, workdir: Path, options: Options) -> dict:
    """The frozen-feature cache: extraction rate against its bound (decode + one vision-tower forward
    per frame, measured apart on the same frames), then the same frozen-backbone training step
    (same model, same batch size, the real loop) from the video shards and from the feature shards."""
    import torch

    from vmr.data.sources import expand_shards
    from vmr.data.tars import iter_shard
    from vmr.data.video import open_video, sample_frames, sample_times
    from vmr.features import extract_features, write_manifest
    from vmr.model import VideoMomentRetrievalModel

    torch.set_num_threads(1 if device == "cpu" else torch.get_num_threads())
    cfg = bench_config(device, shards, options)
    cfg.model.freeze_backbone = True
    dev = torch.device(device)
    spec = cfg.data.sampling
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=spec).to(dev).eval()
    urls = expand_shards(shards)
    samples = [(video, meta) for url in urls for _, video, meta in iter_shard(Path(url))]

    start = time.perf_counter()  # decode alone, then the tower alone, on the very frames extraction reads
    decoded = [sample_frames(open_video(v), sample_times(m["duration"], "uniform", spec.fps, 1 << 30), spec.size,
                             m.get("start", 0.0))[0] for v, m in samples]
    decode_s = time.perf_counter() - start
    frames = sum(len(f) for f in decoded)
    sync(dev)
    start = time.perf_counter()
    with torch.no_grad():
        for f in decoded:
            model.towers.encode_frames(f.to(dev))
    sync(dev)
    forward_s = time.perf_counter() - start
    out = workdir / "features"
    start = time.perf_counter()
    extractor = extract_features(model, spec, urls, out, progress=False, source="bench")["extractor"]
    sync(dev)
    extract_s = time.perf_counter() - start
    write_manifest(out, extractor)

    steps, warmup = (12, 4) if quick else (40, 8)
    cfg.train.max_steps = steps
    if device == "cpu":
        cfg.train.mixed_precision = "no"
    cfg.train.log_every = 1
    video_steps = _step_times(cfg, workdir / "from_videos", warmup)["perf/step_s"]
    cfg.data.train_shards = [str(out)]
    feature_steps = _step_times(cfg, workdir / "from_features", warmup)["perf/step_s"]
    results = {
        "extract_videos_per_s": figure([len(samples) / extract_s], "videos/s"),
        "extract_frames_per_s": figure([frames / extract_s], "frames/s"),
        "extract_vs_decode_plus_forward": figure([(decode_s + forward_s) / extract_s], "x"),
        "frozen_step_from_videos_s": figure(video_steps, "s"),
        "frozen_step_from_features_s": figure(feature_steps, "s"),
        "features_speedup": figure([statistics.median(video_steps) / statistics.median(feature_steps)], "x"),
    }
    return {"config": options.label("default (random init, frozen CLIP)" if device == "cuda" else "tiny (frozen CLIP)"),
            "videos": len(samples), "frames": frames, "steps": steps, "warmup_steps": warmup,
            "batch_size": cfg.train.batch_size, "sampling": dataclasses.asdict(spec), "results": results}


def bench_infer(shards: str, videos_dir: Path | None, device: str, quick: bool, repeats: int,
                options: Options) -> dict:
    """Latency at batch 1 and throughput batched, from decoded windows (the config's frames per
    window); end to end from a file (the whole video)."""
    import torch

    from vmr.config import config_to_dict
    from vmr.eval.predict import predict_video
    from vmr.model import VideoMomentRetrievalModel
    from vmr.runtime import memory_mb

    cfg = bench_config(device, shards, options)
    dev = torch.device(device)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).to(dev).eval()
    if device == "cuda":
        model = model.to(torch.bfloat16)
        torch.cuda.reset_peak_memory_stats(dev)
    size, t = cfg.data.sampling.size, cfg.data.sampling.window
    text = {k: v.to(dev) for k, v in model.tokenize(["a red circle moves left"]).items()}

    def forward(batch: int, runner) -> float:
        videos = torch.randint(0, 256, (batch, t, 3, size, size), dtype=torch.uint8, device=dev)
        tokens = {k: v.expand(batch, -1) for k, v in text.items()}
        sync(dev)
        start = time.perf_counter()
        with torch.no_grad():
            model.decode(runner(videos, tokens), top_k=5)
        sync(dev)
        return time.perf_counter() - start

    n = 20 if quick else 100
    batch = 128 if device == "cuda" else 8
    results = {}
    runners = [("", model)]
    if options.compile:  # CUDA graphs on a GPU ("reduce-overhead"): launch costs gone at batch 1
        runners.append(("compiled_", torch.compile(model, mode="reduce-overhead" if device == "cuda" else None,
                                                    dynamic=False)))
    for prefix, runner in runners:
        for _ in range(3):
            forward(1, runner)
        latency = [forward(1, runner) * 1000 for _ in range(n)]
        for _ in range(2):
            forward(batch, runner)
        throughput = [batch / forward(batch, runner) for _ in range(max(3, n // 10))]
        results.update({
            f"{prefix}latency_ms_p50": {**figure(latency, "ms"), "median": percentile(latency, 0.5)},
            f"{prefix}latency_ms_p95": {**figure(latency, "ms"), "median": percentile(latency, 0.95)},
            f"{prefix}batched_videos_per_s_batch{batch}": figure(throughput, "videos/s"),
        })
    if videos_dir is not None:
        files = sorted(Path(videos_dir).glob("*.mp4"))[:4]
        end_to_end = []
        for path in files * (1 if quick else 3):
            start = time.perf_counter()
            predict_video(model, cfg, path, "a red circle moves left")
            sync(dev)
            end_to_end.append((time.perf_counter() - start) * 1000)
        results["end_to_end_ms_from_file"] = figure(end_to_end, "ms")
    results["peak_memory"] = figure([memory_mb(dev)], "MB")
    return {"config": options.label("default (random init, bf16)" if device == "cuda" else "tiny (fp32)"), "frames": t,
            "image_size": size, "batch_size": batch, "model_config": config_to_dict(cfg)["model"], "results": results}
