"""Training: one loop, readable top to bottom. Accelerate does the plumbing (DDP, DeepSpeed ZeRO,
mixed precision, checkpoint state); the loop does, at every step: once in a while validate /
checkpoint, then one optimizer step of ``train.grad_accum`` micro-batches.

    vmr train --config configs/tiny.yaml train.max_steps=200
    accelerate launch --config_file launch/cpu_2proc.yaml -m vmr.train --config configs/tiny.yaml

Both run ``main``. The data loader is not passed through ``accelerator.prepare``: the stream
splits shards by rank and worker itself (vmr.data.stream).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmr.config import Config, load_config, save_config
from vmr.errors import UserError
from vmr.eval.metrics import brief_keys
from vmr.io import first_line
from vmr.runtime import (
    compute_threads,
    make_accelerator,
    memory_mb,
    process_group_scope,
    settle_process_group,
)


class LoopState:
    """Counters saved with every checkpoint (accelerate's register_for_checkpointing)."""

    def __init__(self):
        self.step, self.best, self.nonfinite = 0, None, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "best": self.best, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best, self.nonfinite = state["step"], state["best"], state["nonfinite"]


class StepVerdicts:
    """Whether each optimizer step was skipped because its loss or its gradient norm was not
    finite. The device decides at once: the fused optimizer reads the verdict as ``found_inf`` and
    skips the update without the host looking (as it does under a gradient scaler). The host reads
    each verdict one step later (``settle``), when reading no longer makes it wait for the device,
    counts it, and stops the run after ``limit`` skipped steps in a row."""

    def __init__(self, loop: LoopState, limit: int):
        self.loop, self.limit, self.in_a_row, self.pending = loop, limit, 0, []

    def push(self, step: int, skipped) -> None:
        """``skipped``: a bool, or a tensor still being computed on the device."""
        self.pending.append((step, skipped))

    def settle(self, keep: int = 1) -> None:
        """Read every verdict but the newest ``keep``."""
        while len(self.pending) > keep:
            step, skipped = self.pending.pop(0)
            if not bool(skipped):
                self.in_a_row = 0
                continue
            self.loop.nonfinite += 1
            self.in_a_row += 1
            if self.in_a_row >= self.limit:
                raise UserError(f"the loss or its gradients were not finite for {self.in_a_row} steps in a row "
                                f"(step {step}); "
                                "the last checkpoint is intact: lower train.lr, use bf16 instead of fp16, "
                                "or check the data, then --resume latest")


def lr_schedule(warmup: int, total: int, min_ratio: float):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def endless(loader, label: str):
    """Batches forever, reseeding the stream each epoch. After a resume ``label`` holds the step, so
    the resumed run draws fresh samples instead of replaying the start of an epoch."""
    epoch = 0
    while True:
        loader.dataset.set_epoch(f"{label}{epoch}")
        yield from loader
        epoch += 1


def train(cfg: Config, resume: str | None = None) -> dict | None:
    """Run the configured training; returns the last validation metrics (main process)."""
    t = cfg.train
    if not cfg.data.train_shards:
        raise UserError("data.train_shards is empty: give the training shards (folder, glob or URLs)")
    if t.best_metric not in brief_keys(t.eval_protocol):
        raise UserError(f"train.best_metric: {t.best_metric!r} is not one of {', '.join(brief_keys(t.eval_protocol))} "
                        f"(the brief of train.eval_protocol {t.eval_protocol})")
    with process_group_scope():  # released once the accelerator below is gone: it holds the group
        return _on_accelerator(cfg, resume)


def _on_accelerator(cfg: Config, resume: str | None) -> dict | None:
    """The accelerator and the CPU threads around the loop."""
    accelerator = make_accelerator(cfg)
    with compute_threads(accelerator.device, cfg.data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1))):
        try:
            return _train(cfg, resume, accelerator)
        finally:  # the prepared model (DDP, a DeepSpeed engine) holds the process group: drop it
            accelerator.free_memory()


@dataclass
class Run:
    """Everything the loop's parts share: what ``setup`` made, and the counters it keeps."""

    cfg: Config
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    loader: object
    batches: object  # batches on the device (vmr/data/prefetch.py), endless
    loop: LoopState
    verdicts: StepVerdicts
    tracker: object  # TensorBoard (main process), else None
    bar: object
    out: Path
    start: int  # the step training (re)started at
    total: int
    zero3: bool
    deepspeed: bool
    metrics: dict | None = None  # the last validation's (main process)
    perf: dict = field(default_factory=dict)  # since the last log: time, data wait, videos, frames, steps
    bank: object = None  # model.corpus.sentences: the sentences this process saw last (vmr/model/corpus.py)


def _train(cfg: Config, resume: str | None, accelerator) -> dict | None:
    """The loop: once in a while validate and checkpoint, then one optimizer step; log."""
    run = setup(cfg, resume, accelerator)
    try:
        while True:
            step = run.loop.step
            last = step >= run.total
            periodic_jobs(run, step, last)
            if last:
                break
            losses, grad_norm = optimizer_step(run)
            if run.loop.step % cfg.train.log_every == 0 or run.loop.step == run.total:
                log_step(run, losses, grad_norm)
        run.verdicts.settle(keep=0)
    finally:  # the bar's last redraw must not land after an error's one line
        run.bar.close()
        run.batches.close()  # the loader's workers stop now, not at interpreter exit
    return finish(run)


def setup(cfg: Config, resume: str | None, accelerator) -> Run:
    """Model, optimizer, schedule and data, prepared by the accelerator; resumed when asked."""
    import torch
    from accelerate.utils import set_seed
    from tqdm import tqdm

    from vmr.cache import check_training_shards, use_cache
    from vmr.checkpoint import check_run_directory
    from vmr.data.prefetch import device_batches
    from vmr.data.stream import make_loader
    from vmr.model import VideoMomentRetrievalModel
    from vmr.model.corpus import SentenceBank

    t = cfg.train
    check_run_directory(t.output_dir)  # every process, before the main one writes there
    set_seed(t.seed, device_specific=True)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling)
    cache = check_training_shards(model, cfg)
    if cache is not None:  # feature shards: the layers above the cache train, its towers get no input
        use_cache(model, cache)
    # DeepSpeed wraps the optimizer and steps it inside backward; elsewhere the fused AdamW (one
    # kernel per step instead of several per tensor) also skips a non-finite step on the device.
    deepspeed = accelerator.state.deepspeed_plugin is not None
    optimizer = torch.optim.AdamW(model.parameter_groups(t.lr, t.weight_decay, t.backbone_lr_mult), lr=t.lr,
                                  fused=not deepspeed)
    loader = make_loader(cfg.data.train_shards, cfg.data, model.tokenizer, t.batch_size, train=True,
                         rank=accelerator.process_index, world=accelerator.num_processes)
    steps_per_epoch = max(1, loader.dataset.epoch_batches // t.grad_accum)
    total = t.max_steps or t.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(t.warmup_steps, total, t.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    loop = LoopState()
    # The scheduler is stepped by hand once per optimizer step (a prepared one steps once per process).
    accelerator.register_for_checkpointing(scheduler, loop)
    out = Path(t.output_dir)
    if resume:
        _resume(accelerator, out, resume, loop)
    _start_run_directory(accelerator, cfg, out)
    accelerator.init_trackers("run")
    main = accelerator.is_main_process
    # Each batch is copied to the device while the step before it computes.
    batches = device_batches(endless(loader, f"resume{loop.step}-" if loop.step else ""), accelerator.device)
    # In a log file (no terminal) a bar redrawn 10 times a second is noise: redraw every 30 s there.
    bar = tqdm(total=total, initial=loop.step, desc="training", unit="step", disable=not main, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device.type}, precision "
                      f"{accelerator.mixed_precision}, {steps_per_epoch} steps per epoch, {total} steps")
    return Run(cfg, accelerator, model, optimizer, scheduler, loader, batches, loop,
               StepVerdicts(loop, t.max_nonfinite_steps),
               accelerator.get_tracker("tensorboard", unwrap=False) if main else None, bar, out, loop.step, total,
               deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3, deepspeed, perf=_fresh_perf(),
               bank=SentenceBank(seed=t.seed + accelerator.process_index) if cfg.model.corpus.sentences else None)


def _resume(accelerator, out: Path, resume: str, loop: LoopState) -> None:
    from vmr.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(out, resume)
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"--resume: cannot load {checkpoint} as a checkpoint of this run "
                        f"({first_line(error)})") from None
    accelerator.print(f"resumed from {checkpoint} at step {loop.step}")


def _start_run_directory(accelerator, cfg: Config, out: Path) -> None:
    """The run directory with the resolved config in it (main process)."""
    if not accelerator.is_main_process:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    except OSError as error:
        raise UserError(f"train.output_dir: cannot write to {out} ({error.strerror or error})") from None


def _fresh_perf() -> dict:
    return {"time": 0.0, "wait": 0.0, "videos": 0, "frames": 0, "steps": 0}


def periodic_jobs(run: Run, step: int, last: bool) -> None:
    """Once in a while (and at the end): validate and keep the best bundle; checkpoint."""
    from accelerate.utils import broadcast_object_list

    from vmr.bundle import export_bundle
    from vmr.checkpoint import EXPORT_BEST, save_checkpoint

    t, accelerator = run.cfg.train, run.accelerator
    if run.cfg.data.val_shards and (last or (t.eval_every and step % t.eval_every == 0 and step > run.start)):
        run.metrics = validate(accelerator, run.model, run.cfg, step, run.tracker, run.zero3)
        score = None if run.metrics is None else run.metrics["brief"].get(t.best_metric)  # main process only
        score = broadcast_object_list([score])[0]
        if score is not None and (run.loop.best is None or score > run.loop.best):
            run.loop.best = score
            export_bundle(accelerator, run.model, run.cfg, run.out / EXPORT_BEST)
    if (last and step > run.start) or (t.save_every and step % t.save_every == 0 and step > run.start):
        run.verdicts.settle(keep=0)  # the saved counters are exact
        save_checkpoint(accelerator, run.out, step, t.keep_checkpoints, run.cfg)


def optimizer_step(run: Run) -> tuple[dict, object]:
    """One optimizer step of ``train.grad_accum`` micro-batches; returns the last micro-batch's
    losses and the gradient norm (None under DeepSpeed). Nothing here waits for the device (on
    CUDA the host runs ahead, queueing work), except under DeepSpeed."""
    import torch

    from vmr.model import batch_forward, moment_losses
    from vmr.model.corpus import corpus_batch

    t, accelerator, model, perf = run.cfg.train, run.accelerator, run.model, run.perf
    step_start = time.perf_counter()
    model.train()
    bad = torch.zeros((), device=accelerator.device)  # micro-batches whose loss is not finite
    for _ in range(t.grad_accum):
        wait_start = time.perf_counter()
        batch = next(run.batches)
        perf["wait"] += time.perf_counter() - wait_start
        perf["videos"] += len(batch["video_id"]) * accelerator.num_processes
        perf["frames"] += batch["frames"] * accelerator.num_processes
        config = accelerator.unwrap_model(model).config
        if config.corpus.enabled and config.head == "vmr":  # other videos as negatives (vmr/model/corpus.py)
            batch = corpus_batch(batch, config.corpus, run.bank, accelerator.unwrap_model(model).tokenizer)
        with accelerator.accumulate(model):
            losses = moment_losses(batch_forward(model, batch), batch, config)
            bad = bad + (~torch.isfinite(losses["loss"].detach())).float()
            grad_norm = _backward_deepspeed(run, losses, bad) if run.deepspeed else _backward(run, losses, bad)
            if accelerator.sync_gradients:
                run.scheduler.step()  # skipped steps count in the schedule, as in loop.step
            run.optimizer.zero_grad(set_to_none=True)
    run.loop.step += 1
    run.verdicts.settle(keep=1)  # the step before this one, long done on the device
    perf["time"] += time.perf_counter() - step_start
    perf["steps"] += 1
    run.bar.update(1)
    return losses, grad_norm


def _backward(run: Run, losses: dict, bad):
    """Backward, and at the accumulation's end a clipped step that the fused AdamW skips on the
    device when any rank's loss or the gradient norm is not finite. Returns the norm (or None)."""
    import torch

    accelerator = run.accelerator
    accelerator.backward(losses["loss"])
    if not accelerator.sync_gradients:
        return None
    max_norm = run.cfg.train.max_grad_norm or math.inf  # 0: the norm is still computed, for the verdict
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    # Every rank reaches the same verdict: loss flags are summed over ranks and the norm is that of
    # the reduced gradients. A finite loss can still overflow in backward (a non-finite norm).
    found = ((accelerator.reduce(bad, "sum") > 0) | ~torch.isfinite(grad_norm)).float()
    run.optimizer.optimizer.found_inf = found  # read by the fused AdamW: no update
    run.optimizer.step()
    run.verdicts.push(run.loop.step + 1, found)
    return grad_norm


def _backward_deepspeed(run: Run, losses: dict, bad) -> None:
    """DeepSpeed steps inside backward, so whether to step must be known before it: here the host
    waits for each micro-batch's loss, summed over ranks."""
    accelerator = run.accelerator
    refused = accelerator.reduce(bad.reshape(1), "sum").item() > 0
    if not refused:
        accelerator.backward(losses["loss"])
    if accelerator.sync_gradients:
        run.verdicts.push(run.loop.step + 1, refused)
    return None


def log_step(run: Run, losses: dict, grad_norm) -> None:
    """Losses, speed, data wait, memory, skipped samples and learning rates to TensorBoard and the bar."""
    import torch

    from vmr.data.stream import skipped

    run.verdicts.settle(keep=0)
    # One read of the device for every logged number.
    named = {f"loss/{k}": v.detach().float() for k, v in losses.items()}
    if grad_norm is not None:
        named["train/grad_norm"] = grad_norm.detach().float()
    values = dict(zip(named, torch.stack(list(named.values())).tolist(), strict=True))
    perf = run.perf
    elapsed = max(perf["time"], 1e-9)
    values.update({
        "perf/samples_per_s": perf["videos"] / elapsed,
        "perf/frames_per_s": perf["frames"] / elapsed,
        "perf/data_wait_fraction": perf["wait"] / elapsed,
        "perf/step_s": elapsed / perf["steps"],
        "perf/memory_mb": memory_mb(run.accelerator.device),
        "data/skipped_samples": skipped(run.loader),
        "train/nonfinite_steps": run.loop.nonfinite,
    })
    for group in run.optimizer.param_groups:
        values[f"lr/{group.get('name', 'group')}"] = group["lr"]
    run.accelerator.log(values, step=run.loop.step)
    run.bar.set_postfix(loss=f"{values['loss/loss']:.3f}", wait=f"{values['perf/data_wait_fraction']:.0%}",
                        refresh=False)
    run.perf = _fresh_perf()


def finish(run: Run) -> dict | None:
    """The final bundle, the engine freed, the skipped count gathered, the group settled."""
    from vmr.bundle import export_bundle
    from vmr.checkpoint import EXPORT, EXPORT_BEST
    from vmr.data.stream import skipped

    accelerator, t = run.accelerator, run.cfg.train
    export_bundle(accelerator, run.model, run.cfg, run.out / EXPORT)
    # A DeepSpeed engine is destroyed here (ZeRO-3 hooks and threads), while the group it needs is alive.
    accelerator.free_memory()
    bad = skipped(run.loader)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        bad = sum(gather_object([bad]))
    settle_process_group()  # before end_training destroys the group (vmr/runtime.py)
    accelerator.end_training()
    if accelerator.is_main_process:
        if bad:
            print(f"{bad} unreadable shard or sample read(s) were skipped (each read counts once; last reason on "
                  f"this process: {run.loader.skip_counter.last_reason or 'none here'})", file=sys.stderr)
        print(f"done: {run.loop.step} steps. Inference bundle: {run.out / EXPORT}"
              + (f" (best {t.best_metric} = {run.loop.best:.2f}: {run.out / EXPORT_BEST})"
                 if run.loop.best is not None else ""))
        print(f"TensorBoard: tensorboard --logdir {run.out / 'tensorboard'}")
    return run.metrics


def validate(accelerator, model, cfg: Config, step: int, tracker, zero3: bool) -> dict | None:
    """Predict on the validation shards on every rank, gather, score on the main process, log."""
    from tqdm import tqdm

    from vmr.eval.metrics import evaluate
    from vmr.eval.predict import gathered, nothing_read, predict_shards

    # ZeRO-3 keeps each rank's slice of the weights: only the engine's forward can run the model.
    # A compiled model stays compiled for the fixed training shapes: validation's batches vary in
    # length, so it runs the plain module (recompiling for each length would cost more).
    runner = model if zero3 else accelerator.unwrap_model(model, keep_torch_compile=False)
    tokenizer = accelerator.unwrap_model(model).tokenizer
    predictions, truth, bad, reason = gathered(*predict_shards(
        runner, cfg.data.val_shards, cfg, tokenizer, cfg.train.eval_batch_size, device=accelerator.device,
        rank=accelerator.process_index, world=accelerator.num_processes, lockstep=accelerator if zero3 else None,
        progress=False), accelerator.num_processes)
    if not predictions:
        raise nothing_read(cfg.data.val_shards, bad, reason)
    if not accelerator.is_main_process:
        return None
    metrics, _ = evaluate(predictions, truth, cfg.train.eval_protocol, allow_missing=True)
    values = {f"val/{k}": v for k, v in metrics["brief"].items() if isinstance(v, float) and math.isfinite(v)}
    values["val/skipped_videos"] = bad
    accelerator.log(values, step=step)
    if tracker is not None and cfg.train.figure_queries:
        from vmr.figures import scores_figure

        image = scores_figure(predictions[: cfg.train.figure_queries], truth[: cfg.train.figure_queries])
        tracker.log_images({"val/clip_scores": image[None]}, step=step, dataformats="NHWC")
    brief = metrics["brief"]
    shown = [cfg.train.best_metric, *(k for k in ("MR-full-R1@0.7", "MR-full-mAP", "R1@0.7", "mIoU")
                                      if k != cfg.train.best_metric)]
    tqdm.write(f"step {step}: " + ", ".join(f"{k} {brief[k]:.2f}" for k in shown if k in brief))
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a YAML preset (configs/tiny.yaml, configs/default.yaml, ...)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.max_steps=200 data.train_shards=data/shards/train-*.tar")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest checkpoint of train.output_dir, or from a checkpoint folder")


def run(args: argparse.Namespace) -> int:
    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vmr.train`` / ``accelerate launch -m vmr.train``: the same as ``vmr train``."""
    parser = argparse.ArgumentParser(prog="vmr train", description="Train a moment retrieval model.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"vmr train: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from vmr.runtime import run_entry

    run_entry(main)
