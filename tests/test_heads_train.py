"""The published heads in vmr's training loop: one process (train, validate, export, predict, eval),
and two processes under accelerate launch with DDP and with DeepSpeed ZeRO-2, on the tiny shards."""

from __future__ import annotations

import json

import pytest

from vmr.bundle import read_bundle
from vmr.cli import main

from .test_train import ROOT, launch, overrides, run, steps_of

HEAD = ["model.detr.dim_feedforward=64"]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["moment_detr", "qd_detr"])
def test_a_published_head_trains_exports_predicts_and_evaluates(head, shard_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = run([*overrides(shard_dir, out), f"model.head={head}", *HEAD])
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_of(out) == ["step_0000002", "step_0000004"]
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    assert main(["predict", "--checkpoint", str(out), "--video", str(video), "--query", "a red circle grows",
                 "--query", "a blue square spins", "--top-k", "3"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 2 and all(1 <= len(a["moments"]) <= 3 for a in answers)
    assert all(0 <= m["start"] <= m["end"] <= a["duration"] for a in answers for m in a["moments"])
    metrics = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(out / "export"), "--shards", f"{shard_dir}/val-*.tar",
                 "--json", str(metrics)]) == 0
    assert 0 <= json.loads(metrics.read_text())["brief"]["MR-full-R1@0.5"] <= 100
    # The collection search's shortlist is vmr's head's: refused in one line, before any work.
    capsys.readouterr()
    assert main(["index", "--checkpoint", str(out), "--videos", str(synth_dir / "videos"),
                 "--out", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert f"model.head {head} cannot search a collection" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "index").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("head", ["moment_detr", "qd_detr"])
def test_a_published_head_trains_with_ddp(head, shard_dir, tmp_path):
    out = tmp_path / "run"
    result = run([*overrides(shard_dir, out), f"model.head={head}", *HEAD],
                 launcher=launch(2, "--config_file", str(ROOT / "launch/cpu_2proc.yaml")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    assert steps_of(out) == ["step_0000002", "step_0000004"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("head", ["moment_detr", "qd_detr"])
def test_a_published_head_trains_with_zero2_and_resumes(head, shard_dir, tmp_path):
    out = tmp_path / "run"
    ds = launch(2, "--use_deepspeed", "--deepspeed_config_file", str(ROOT / "launch/ds_zero2.json"))
    first = run([*overrides(shard_dir, out, max_steps=2, save_every=2, eval_every=2, mixed_precision="bf16"),
                 f"model.head={head}", *HEAD], ds)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run([*overrides(shard_dir, out, max_steps=4, save_every=2, eval_every=2, mixed_precision="bf16"),
                  f"model.head={head}", *HEAD, "--resume", "latest"], ds)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and steps_of(out) == ["step_0000002", "step_0000004"]

    model = read_bundle(out / "export")
    assert model.config.head == head
