"""A split built in parts (``vmr shards build --part I/N``) and merged: the same samples as one
build, whatever the order of the parts, the machine or a part killed half way."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmr.cli import main
from vmr.data.manifest import read_manifest
from vmr.data.parts import part_from_env, part_of, record_path
from vmr.data.shards import build_shards
from vmr.data.tars import iter_shard
from vmr.data.video import open_video
from vmr.errors import UserError

from .test_hardening import one_line_error

BIN = Path(sys.executable).parent
SETTINGS = dict(fps=2.0, size=16, keyframe_interval=0, max_videos_per_shard=1, progress=False)
FLAGS = ["--fps", "2", "--size", "16", "--keyframe-interval", "0", "--max-videos-per-shard", "1"]


def contents(folder: Path) -> dict:
    """video id -> (its json, sha256 of its bytes, its decoded frames as bytes), over the split's
    shards as its manifest lists them."""
    out = {}
    for shard in read_manifest(folder)["splits"]["train"]["shards"]:
        for _, video, meta in iter_shard(folder / shard["path"]):
            decoder = open_video(video)
            frames = decoder.get_frames_in_range(0, len(decoder)).data.numpy().tobytes()
            out[meta["video_id"]] = (meta, hashlib.sha256(video).hexdigest(), hashlib.sha256(frames).hexdigest())
    return out


def same_split(a: Path, b: Path) -> None:
    assert contents(a) == contents(b)
    ma, mb = read_manifest(a), read_manifest(b)
    for key in ("samples", "queries"):
        assert ma["splits"]["train"][key] == mb["splits"]["train"][key]
    assert sorted(map(json.dumps, ma["skipped"]), key=str) == sorted(map(json.dumps, mb["skipped"]), key=str)


@pytest.fixture(scope="module")
def whole(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], out, **SETTINGS)
    return out


def test_three_parts_one_after_the_other_hold_what_one_build_holds(synth_dir, whole, tmp_path, capsys):
    for index in range(3):
        result = build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], tmp_path, part=(index, 3), **SETTINGS)
        assert (result["merged"] is not None) == (index == 2)  # the last part merges
    same_split(whole, tmp_path)
    assert read_manifest(tmp_path)["splits"]["train"]["params"]["parts"] == 3
    assert main(["shards", "verify", str(tmp_path)]) == 0
    # A finished part run again does nothing, and the merged split stays as it is.
    before = (tmp_path / "manifest.json").read_text()
    assert main(["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations",
                 str(synth_dir / "train.jsonl"), "--out", str(tmp_path), *FLAGS, "--part", "1/3"]) == 0
    assert (tmp_path / "manifest.json").read_text() == before
    # Run again with other settings, it says so rather than keep the old part silently.
    capsys.readouterr()
    one_line_error(capsys, main(["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations",
                                 str(synth_dir / "train.jsonl"), "--out", str(tmp_path), *FLAGS[:3], "24", *FLAGS[4:],
                                 "--part", "1/3"]), "was built with another size; pass --overwrite")


@pytest.mark.multiprocess
def test_three_parts_at_the_same_time_in_separate_processes(synth_dir, whole, tmp_path):
    command = [str(BIN / "vmr"), "shards", "build", "--videos", str(synth_dir / "videos"), "--annotations",
               str(synth_dir / "train.jsonl"), "--out", str(tmp_path), *FLAGS]
    procs = [subprocess.Popen([*command, "--part", f"{i}/3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    same_split(whole, tmp_path)


def test_the_launcher_environment_picks_the_part(synth_dir, tmp_path, monkeypatch, capsys):
    assert part_from_env({}) is None
    assert part_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one task: a whole build
    assert part_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4, "RANK/WORLD_SIZE")
    assert part_from_env({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}) \
        == (2, 4, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}
    assert part_from_env(srun) == (1, 2, "SLURM_PROCID/SLURM_STEP_NUM_TASKS")
    # A batch script (sbatch --ntasks 2) runs once with these set: a whole build, not part 0 of 2.
    assert part_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}) is None
    with pytest.raises(UserError, match="RANK/WORLD_SIZE"):
        part_from_env({"RANK": "5", "WORLD_SIZE": "4"})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations",
                 str(synth_dir / "train.jsonl"), "--out", str(tmp_path), *FLAGS]) == 0
    assert "part 1 of 2 (parts 0-1) of split 'train', from RANK/WORLD_SIZE" in capsys.readouterr().err
    assert record_path(tmp_path, "train", 1).is_file() and not record_path(tmp_path, "train", 0).exists()


def test_annotation_files_in_another_order_deal_every_video_to_the_same_part(synth_dir, tmp_path):
    files = [synth_dir / "train.jsonl", synth_dir / "val.jsonl"]
    for name, order in (("ab", files), ("ba", files[::-1])):
        for index in range(2):
            build_shards(synth_dir / "videos", order, tmp_path / name, part=(index, 2), **SETTINGS)
    for index in range(2):
        a, b = (json.loads(record_path(tmp_path / n, "train", index).read_text()) for n in ("ab", "ba"))
        assert sorted(a["videos"]) == sorted(b["videos"]) and all(part_of(v, 2) == index for v in a["videos"])


def test_a_part_killed_mid_way_is_redone_from_scratch(synth_dir, tmp_path):
    """Killed after its first shard was staged (as tests/test_hardening.py kills a whole build), and
    at the worst moment (shards moved in, record not yet written): the same command redoes it and
    gives the same part as a run that was never interrupted."""
    annotations = [synth_dir / "train.jsonl", synth_dir / "val.jsonl"]  # 4 videos, 1 per shard: time to kill
    slow = ["--fps", "5", "--size", "32", "--keyframe-interval", "0", "--max-videos-per-shard", "1", "--part", "0/1"]
    reference = tmp_path / "reference"
    build_shards(synth_dir / "videos", annotations, reference, fps=5.0, size=32, keyframe_interval=0,
                 max_videos_per_shard=1, progress=False, part=(0, 1))
    out = tmp_path / "out"
    command = ["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations", *map(str, annotations),
               "--out", str(out), *slow]
    proc = subprocess.Popen([str(BIN / "vmr"), *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob(".vmr-build-train-p0000/train-p0000-*.tar")):
        assert proc.poll() is None, "the part ended before it could be killed"
        assert time.monotonic() < deadline, "no shard was staged within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not record_path(out, "train", 0).exists() and not (out / "manifest.json").exists()
    assert main(command) == 0
    record_path(out, "train", 0).unlink()  # shards in place, no record: not finished
    assert main(command) == 0
    ours, theirs = (json.loads(record_path(d, "train", 0).read_text()) for d in (out, reference))
    assert ours["shards"] == theirs["shards"] and ours["videos"] == theirs["videos"]
    assert not list(out.glob(".vmr-build-*")) and not list(out.glob(".vmr-lock*"))


def test_merge_refuses_a_missing_part_a_duplicated_video_and_a_damaged_shard(synth_dir, tmp_path, capsys):
    for index in range(3):
        build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], tmp_path, part=(index, 3), **SETTINGS)
    merged = (tmp_path / "manifest.json").read_text()
    merge = ["shards", "merge", "--out", str(tmp_path), "--split", "train"]

    moved = record_path(tmp_path, "train", 1).rename(tmp_path / "aside.json")
    one_line_error(capsys, main(merge), "part(s) 1 of 3 of split 'train' not built yet")
    moved.rename(record_path(tmp_path, "train", 1))

    records = [json.loads(record_path(tmp_path, "train", i).read_text()) for i in range(3)]
    donor = next(i for i in range(3) if records[i]["videos"])
    taker = (donor + 1) % 3
    tampered = {**records[taker], "videos": [*records[taker]["videos"], records[donor]["videos"][0]]}
    record_path(tmp_path, "train", taker).write_text(json.dumps(tampered))
    one_line_error(capsys, main(merge), f"is in part {min(donor, taker)} and part {max(donor, taker)}")
    record_path(tmp_path, "train", taker).write_text(json.dumps(records[taker]))

    shard = tmp_path / records[donor]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line_error(capsys, main(merge), f"{shard.name}: its sha256 differs")
    assert (tmp_path / "manifest.json").read_text() == merged  # nothing merged by any of them

    one_line_error(capsys, main(["shards", "merge", "--out", str(tmp_path), "--split", "val"]),
                   "no part of split 'val' is recorded")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
@pytest.mark.multiprocess
def test_training_and_extraction_read_a_merged_split_over_http(synth_dir, tmp_path):
    """A cluster without a shared file system reads the merged split from a web server."""
    out = tmp_path / "shards"
    for index in range(2):
        build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], out, part=(index, 2), **SETTINGS)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        split = read_manifest(out)["splits"]["train"]
        urls = "[" + ",".join(f"{base}/{s['path']}" for s in split["shards"]) + "]"
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        train = [str(BIN / "vmr"), "train", "--config", "configs/tiny.yaml", f"data.train_shards={urls}",
                 f"data.val_shards={urls}", f"data.epoch_samples={split['samples']}", "data.sampling.size=16",
                 "data.num_workers=1", "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}"]
        result = subprocess.run(train, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "step 2: MR-full-R1@0.5" in result.stderr + result.stdout  # validation read them too
        extract = [str(BIN / "vmr"), "features", "extract", "--config", "configs/tiny.yaml", "--shards",
                   *(f"{base}/{s['path']}" for s in split["shards"]), "--out", str(tmp_path / "features"),
                   "data.sampling.size=16"]
        result = subprocess.run(extract, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert read_manifest(tmp_path / "features")["splits"]["train"]["samples"] == split["samples"]
    finally:
        server.shutdown()


def test_a_split_built_whole_is_replaced_by_its_parts_only_with_overwrite(synth_dir, whole, tmp_path, capsys):
    out = tmp_path / "out"
    build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], out, **SETTINGS)
    part = ["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations", str(synth_dir / "train.jsonl"),
            "--out", str(out), *FLAGS]
    one_line_error(capsys, main([*part, "--part", "0/2"]), "built whole; pass --overwrite")
    assert main([*part, "--part", "0/2", "--overwrite"]) == 0 and main([*part, "--part", "1/2", "--overwrite"]) == 0
    assert not list(out.glob("train-0*.tar"))  # the whole build's shards, replaced
    same_split(whole, out)
