"""Training end to end on tiny shards: real subprocesses, real `accelerate launch` (DDP and
DeepSpeed ZeRO-2/3 over gloo on CPU), checkpoints, resume after SIGKILL, TensorBoard files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vmr.bundle import read_bundle, write_bundle
from vmr.cli import main
from vmr.config import load_config
from vmr.errors import UserError

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def overrides(shard_dir: Path, out: Path, **train) -> list[str]:
    values = {"max_steps": 4, "batch_size": 2, "warmup_steps": 1, "save_every": 2, "eval_every": 4,
              "log_every": 1, "eval_batch_size": 2, **train}
    return [f"data.train_shards={shard_dir}/train-*.tar", f"data.val_shards={shard_dir}/val-*.tar",
            "data.sampling.size=16", "data.num_workers=0", f"train.output_dir={out}",
            *(f"train.{k}={v}" for k, v in values.items())]


def run(args: list[str], launcher: list[str] | None = None, timeout: int = 300, **popen):
    head = [*launcher, "-m", "vmr.train"] if launcher else [str(BIN / "vmr"), "train"]
    return subprocess.run([*head, "--config", str(TINY), *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **popen)


def launch(n: int = 2, *extra: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--num_processes", str(n), *extra]


def steps_of(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown config key 'train.max_step'"):
        load_config(TINY, ["train.max_step=3"])
    with pytest.raises(UserError, match="train.batch_size: expected int, got 'eight'"):
        load_config(TINY, ["train.batch_size=eight"])
    with pytest.raises(UserError, match="train.mixed_precision: 'fp8' is not one of"):
        load_config(TINY, ["train.mixed_precision=fp8"])
    assert load_config(TINY, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 reads 3e-4 as text
    assert load_config(TINY, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # ... and no as false
    assert main(["train", "--config", str(TINY), "train.grad_accum=0"]) == 2
    assert capsys.readouterr().err.strip() == "vmr train: error: train.grad_accum must be at least 1, got 0"
    assert main(["train", "--config", str(TINY), f"data.train_shards={tmp_path}/none-*.tar"]) == 2
    assert "shards: no shard matches" in capsys.readouterr().err
    # Near-miss sentences need the text tower: imported query features cannot encode them.
    assert main(["train", "--config", str(TINY), "model.corpus.sentences=2", "model.text_feature_dim=8"]) == 2
    assert capsys.readouterr().err.strip().startswith("vmr train: error: model.corpus.sentences needs the text tower")
    with pytest.raises(UserError, match="model.corpus key_dim must be >= 1.*sentences"):
        load_config(TINY, ["model.corpus.sentences=-1"])


def test_one_process_run_writes_everything(shard_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run(overrides(shard_dir, out, eval_every=2, grad_accum=2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_of(out) == ["step_0000002", "step_0000004"]
    assert load_config(out / "checkpoints" / "step_0000004" / "config.yaml").train.grad_accum == 2
    saved = load_config(out / "config.yaml")
    assert saved.train.max_steps == 4 and saved.train.grad_accum == 2 and saved.data.sampling.size == 16
    for bundle in ("export", "export_best"):
        assert (out / bundle / "model.safetensors").is_file()
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")))).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/loss", "loss/relevance", "loss/l1", "loss/giou", "loss/saliency", "lr/head", "lr/backbone",
                "lr/head_no_decay", "train/grad_norm", "perf/samples_per_s", "perf/frames_per_s",
                "perf/data_wait_fraction", "perf/memory_mb", "data/skipped_samples", "val/MR-full-R1@0.5",
                "val/MR-full-mAP", "val/HL-min-VeryGood-Hit1"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("val/MR-full-R1@0.5")] == [2, 4]
    assert "val/clip_scores" in events.Tags()["images"]
    assert "TensorBoard: tensorboard --logdir" in result.stdout


def test_predict_and_eval_with_the_trained_bundle(shard_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(overrides(shard_dir, out, max_steps=2, save_every=0, eval_every=0)).returncode == 0
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    assert main(["predict", "--checkpoint", str(out), "--video", str(video), "--query", "a red circle grows",
                 "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert set(result) == {"video", "duration", "query", "sampling", "moments", "frame_times", "frame_scores"}
    assert 1 <= len(result["moments"]) <= 3 and len(result["frame_times"]) == len(result["frame_scores"])
    # The whole video at the trained rate (the bundle's spec: 2 frames/s), said on stderr.
    assert result["sampling"]["fps"] == 2.0 and len(result["frame_times"]) == int(result["duration"] * 2)
    assert f"scored {len(result['frame_times'])} frames" in captured.err and "(2 frames/s)" in captured.err
    assert all(0 <= m["start"] < m["end"] <= result["duration"] for m in result["moments"])
    metrics = tmp_path / "eval" / "metrics.json"
    assert main(["eval", "--checkpoint", str(out / "export"), "--shards", f"{shard_dir}/val-*.tar",
                 "--predictions-out", str(tmp_path / "eval" / "preds.jsonl"), "--json", str(metrics),
                 "--group-by", "told_apart_by"]) == 0
    saved = json.loads(metrics.read_text())
    assert 0 <= saved["brief"]["MR-full-R1@0.5"] <= 100
    # The shards carry vmr synth's tag, so the breakdown needs no ground-truth file.
    rows = [json.loads(line) for line in (tmp_path / "eval" / "preds.jsonl").read_text().splitlines()]
    groups = saved["groups"]["groups"]
    assert "(missing)" not in groups and sum(g["queries"] for g in groups.values()) == len(rows)
    assert {"qid", "query", "vid", "pred_relevant_windows", "pred_saliency_scores"} <= set(rows[0])
    assert main(["predict", "--checkpoint", str(out), "--video", str(tmp_path / "missing.mp4"), "--query", "x"]) == 2
    assert "missing.mp4: file not found" in capsys.readouterr().err
    (tmp_path / "not_a_video.mp4").write_bytes(b"hello")
    assert main(["predict", "--checkpoint", str(out), "--video", str(tmp_path / "not_a_video.mp4"),
                 "--query", "a red circle grows"]) == 2
    assert "cannot decode this video" in capsys.readouterr().err


def test_nonfinite_losses_stop_the_run_with_a_reason(shard_dir, tmp_path):
    """A loss weight of 1e38 overflows in backward (the loss itself may stay finite): the steps are
    skipped, the run stops with the reason, and no bundle of broken weights is written."""
    result = run([*overrides(shard_dir, tmp_path / "run", max_nonfinite_steps=2), "model.loss_relevance=1e38"])
    assert result.returncode == 2
    assert "were not finite for 2 steps in a row" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.slow
def test_a_compiled_run_trains_validates_and_exports(shard_dir, tmp_path):
    """train.compile: the loop through accelerate's torch.compile (the same shapes as the
    compiled-model test, so inductor's cache serves both), validation on the plain module."""
    out = tmp_path / "run"
    result = run([*overrides(shard_dir, out, max_steps=3, save_every=3, eval_every=3, compile="true"),
                  "model.dropout=0", "data.sampling.window=64"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 3 steps" in result.stdout and "MR-full-R1@0.5" in result.stdout

    assert read_bundle(out / "export").config.name


def test_an_infinite_learning_rate_is_refused(shard_dir, tmp_path):
    result = run([*overrides(shard_dir, tmp_path / "run"), "train.lr=1e400"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "vmr train: error: train.lr: must be a finite number, got '1e400'"


@pytest.mark.slow
def test_resume_after_sigkill_ends_at_the_same_step(shard_dir, tmp_path):
    out = tmp_path / "run"
    args = overrides(shard_dir, out, max_steps=12, save_every=3, eval_every=0)
    process = subprocess.Popen([str(BIN / "vmr"), "train", "--config", str(TINY), *args], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_0000006").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = steps_of(out)
    assert "step_0000012" not in kept
    result = run([*args, "--resume", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_at = int(result.stdout.split("at step ")[1].split()[0])
    assert resumed_at >= 6 and f"step_{resumed_at:07d}" in kept
    assert steps_of(out)[-1] == "step_0000012" and "done: 12 steps" in result.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_run(shard_dir, tmp_path):
    out = tmp_path / "run"
    # With near-miss sentences: each process then reads its own number of extra text rows (model.corpus).
    result = run([*overrides(shard_dir, out), "model.corpus.sentences=2"],
                 launcher=launch(2, "--config_file", str(ROOT / "launch/cpu_2proc.yaml")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    assert steps_of(out) == ["step_0000002", "step_0000004"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_0000004").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gradient_of_two_halves_matches_the_whole_batch(tmp_path):
    command = [*launch(2, "--config_file", str(ROOT / "launch/cpu_2proc.yaml")), str(ROOT / "tests/launch_grad.py"),
               str(TINY), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "grad.json").read_text())
    assert report["world"] == 2 and report["checked"] > 100
    assert report["worst_relative"] < 1e-3, report  # float32 sums in another order
    assert report["worst_absolute_of_zero"] < 1e-7, report


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_both(shard_dir, tmp_path):
    """Rank 1's loss is NaN at step 3 (a fault injected into the real loop): both ranks skip that
    step (its checkpoint holds the weights of step 2), count it, train on and end with the same
    weights. The verdict is taken on the device and read by the host a step later."""
    out = tmp_path / "run"
    args = overrides(shard_dir, out, max_steps=5, save_every=1, keep_checkpoints=5, eval_every=0,
                     max_nonfinite_steps=2)
    command = [*launch(2, "--config_file", str(ROOT / "launch/cpu_2proc.yaml")), str(ROOT / "tests/launch_nonfinite.py"),
               str(TINY), str(tmp_path), *args]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["calls"] == ranks[1]["calls"] == 5
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP ranks still hold the same weights
    from safetensors.torch import load_file

    weights = {s: load_file(out / "checkpoints" / f"step_{s:07d}" / "model.safetensors") for s in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3: no update
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # step 4: trained on
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")))).Reload()
    assert [e.value for e in events.Scalars("train/nonfinite_steps")][-1] == 1


@pytest.mark.slow
@pytest.mark.multiprocess
# ZeRO-3 runs in fp32 here: with bf16, DeepSpeed 0.19.8 fails at start-up on CPU in its ZeRO-3
# partition defragmentation (tensors of mixed dtypes) for this tiny model.
@pytest.mark.parametrize("stage, precision", [(2, "bf16"), (3, "no")])
def test_deepspeed_zero_train_save_resume(shard_dir, tmp_path, stage, precision):
    out = tmp_path / "run"
    ds = launch(2, "--use_deepspeed", "--deepspeed_config_file", str(ROOT / f"launch/ds_zero{stage}.json"))
    first = run(overrides(shard_dir, out, max_steps=2, save_every=2, eval_every=2, mixed_precision=precision), ds)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"2 process(es) on cpu, precision {precision}" in first.stdout
    assert (out / "checkpoints" / "step_0000002" / "pytorch_model").is_dir()  # DeepSpeed's own sharded layout
    second = run([*overrides(shard_dir, out, max_steps=4, save_every=2, eval_every=2, mixed_precision=precision),
                  "--resume", "latest"], ds)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    assert steps_of(out) == ["step_0000002", "step_0000004"]

    model = read_bundle(out / "export")  # full weights, gathered from the shards
    assert sum(p.numel() for p in model.parameters()) > 500_000


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eval_with_two_processes_matches_one(shard_dir, tmp_path):
    """`vmr eval --checkpoint` under accelerate launch: each rank predicts its share, rank 0 gathers;
    the predictions are the single-process ones, every query once."""
    from vmr.model import VideoMomentRetrievalModel

    cfg = load_config(TINY, ["data.sampling.size=16"])
    write_bundle(VideoMomentRetrievalModel.from_config(cfg.model), tmp_path / "bundle", cfg)
    rows = {}
    for n in (1, 2):
        out = tmp_path / f"preds{n}.jsonl"
        args = ["eval", "--checkpoint", str(tmp_path / "bundle"), "--shards", f"{shard_dir}/val-*.tar",
                "--predictions-out", str(out), "--json", str(tmp_path / f"metrics{n}.json")]
        head = [*launch(2, "--config_file", str(ROOT / "launch/cpu_2proc.yaml")), "-m", "vmr.cli"] if n == 2 else [
            str(BIN / "vmr")]
        result = subprocess.run([*head, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[n] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows[2]) == len({r["qid"] for r in rows[2]}) == len(rows[1]) > 0
    one = {r["qid"]: r for r in rows[1]}
    for row in rows[2]:
        flat = lambda r: [v for window in r["pred_relevant_windows"] for v in window]  # noqa: E731
        assert flat(row) == pytest.approx(flat(one[row["qid"]]), abs=1e-3)
    assert json.loads((tmp_path / "metrics2.json").read_text())["brief"] == pytest.approx(
        json.loads((tmp_path / "metrics1.json").read_text())["brief"], abs=0.01, nan_ok=True)  # empty ranges: NaN


def test_cpu_threads_leave_the_loader_workers_their_cores():
    from vmr.runtime import cpu_threads

    assert cpu_threads(workers=1, local_processes=1, cores=2) == 1
    assert cpu_threads(workers=0, local_processes=1, cores=2) == 2
    assert cpu_threads(workers=2, local_processes=2, cores=16) == 6
    assert cpu_threads(workers=4, local_processes=2, cores=2) == 1  # never below one
