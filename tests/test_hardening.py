"""Bad and hostile input, one test per case: every input works or stops with one line naming the
file, key or value (exit 2, no traceback); nothing hangs (each wait here is bounded by a timeout);
nothing partly written looks complete; nothing valid is dropped silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmr.bundle import write_bundle
from vmr.cli import main
from vmr.data.shards import read_manifest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def one_line_error(capsys, code: int, *needles: str) -> str:
    """The command failed with exit 2 and a single line holding every needle."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in last, last
    return last


def build(videos: Path, annotations: Path, out: Path, *extra: str) -> int:
    return main(["shards", "build", "--videos", str(videos), "--annotations", str(annotations), "--out", str(out),
                 *extra])


def qvh_line(qid, vid, **changes) -> dict:
    row = {"qid": qid, "query": "a red circle grows", "vid": vid, "duration": 6.0, "relevant_windows": [[1.0, 3.0]]}
    row.update(changes)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_video(synth: Path) -> str:
    return sorted(p.stem for p in (synth / "videos").glob("*.mp4"))[0]


# ----- annotations and shard building --------------------------------------------------------------


def test_a_json_list_in_a_jsonl_file_is_one_line(synth_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    (tmp_path / "list.jsonl").write_text(json.dumps(rows))
    code = build(synth_dir / "videos", tmp_path / "list.jsonl", tmp_path / "out")
    one_line_error(capsys, code, "list.jsonl", "one JSON object per line")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_file_without_one_usable_row_is_an_error_not_an_empty_split(synth_dir, tmp_path, capsys):
    (tmp_path / "seed.json").write_text(json.dumps([{"vid": "x", "relevant_windows": [[0, 1]]}] * 3))
    code = build(synth_dir / "videos", tmp_path / "seed.json", tmp_path / "out")
    one_line_error(capsys, code, "seed.json", "video_id", "2 more")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("change, reason", [
    ({"qid": {"a": 1}}, "qid must be a number or a non-empty string"),
    ({"qid": [1, 2]}, "qid must be a number or a non-empty string"),
    ({"query": None}, "query must be a string"),
    ({"relevant_clip_ids": [0], "saliency_scores": "bad"}, "saliency_scores must be one list"),
    ({"relevant_clip_ids": "0", "saliency_scores": [[1, 2, 3]]}, "relevant_clip_ids must be a list"),
    ({"relevant_windows": [[1, "x"]]}, "is not [start, end]"),
    ({"vid": None}, "vid must be"),
])
def test_malformed_fields_skip_their_query_with_the_reason(synth_dir, tmp_path, capsys, change, reason):
    vid = first_video(synth_dir)
    rows = [qvh_line(1, vid), {**qvh_line(2, vid, query="a blue square shrinks"), **change}]
    code = build(synth_dir / "videos", write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "out")
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["queries"] == 1  # the good query is kept
    assert [s for s in manifest["skipped"] if reason in s["reason"] and "a.jsonl:2" in s["reason"]], manifest["skipped"]
    assert "Traceback" not in capsys.readouterr().err


def test_video_ids_cannot_leave_the_videos_folder(synth_dir, tmp_path, capsys):
    """QVHighlights vids, seed file names and Charades ids that lead outside --videos are skipped
    with the reason; the file outside is never read or packed."""
    secret_dir = tmp_path / "outside"
    secret_dir.mkdir()
    source = synth_dir / "videos" / f"{first_video(synth_dir)}.mp4"
    shutil.copy(source, secret_dir / "secret.mp4")  # a real video, so only the check can stop it
    videos = tmp_path / "videos"
    shutil.copytree(synth_dir / "videos", videos)
    bad_ids = ["../outside/secret", str(secret_dir / "secret")]
    files = {
        "q.jsonl": "".join(json.dumps(qvh_line(i, v)) + "\n" for i, v in enumerate(bad_ids))
                   + json.dumps(qvh_line(9, first_video(synth_dir))) + "\n",
        "seed.json": json.dumps([{"id": 0, "video_id": "../outside/secret.mp4", "query": "a red circle grows",
                                  "start_frame": 1, "end_frame": 5, "description": ""},
                                 {"id": 1, "video_id": f"{first_video(synth_dir)}.mp4", "query": "a red circle grows",
                                  "start_frame": 1, "end_frame": 5, "description": ""}]),
        "charades.txt": f"../outside/secret 1.0 3.0##a red circle grows\n{first_video(synth_dir)} 1.0 3.0##a red circle\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out-{name}"
        assert build(videos, tmp_path / name, out) == 0
        manifest = read_manifest(out)
        outside = [s for s in manifest["skipped"] if "points outside the videos folder" in s["reason"]]
        assert len(outside) == (2 if name == "q.jsonl" else 1), manifest["skipped"]
        assert manifest["splits"]["train"]["samples"] == 1
        packed = b"".join(p.read_bytes() for p in out.glob("*.tar"))
        assert b"secret" not in packed
    capsys.readouterr()


def _slow_build(synth_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A re-encoding build in its own process (slow enough to be killed part way)."""
    return subprocess.Popen([str(BIN / "vmr"), "shards", "build", "--videos", str(synth_dir / "videos"),
                             "--annotations", str(synth_dir / "train.jsonl"), str(synth_dir / "val.jsonl"),
                             "--out", str(out), "--fps", "5", "--size", "32", "--keyframe-interval", "0",
                             "--max-videos-per-shard", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after_first_staged_shard(process: subprocess.Popen, out: Path, split: str = "train") -> None:
    deadline = time.monotonic() + 60
    while not list((out / f".vmr-build-{split}").glob(f"{split}-*.tar")):
        assert process.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline, "no shard was staged within 60 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_killed_build_changes_nothing_and_can_be_redone(synth_dir, tmp_path):
    out = tmp_path / "out"
    _kill_after_first_staged_shard(_slow_build(synth_dir, out), out)
    # The killed build's lock stays (its holder is gone: the next build takes it over).
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".vmr-build-") and p.name != ".vmr-lock"]
    assert visible == [], visible  # no shard, no manifest, no temporary file in the output folder
    redo = _slow_build(synth_dir, out)  # no --overwrite needed: nothing was ever built
    assert redo.wait(timeout=120) == 0, redo.stderr.read()
    assert "removing an unfinished build" in redo.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *[f"train-{i:06d}.tar" for i in range(4)]])
    assert main(["shards", "verify", str(out)]) == 0


def test_a_killed_overwrite_keeps_the_old_split_whole(synth_dir, tmp_path):
    out = tmp_path / "out"
    # The old split: 2 videos (one shard), under its manifest.
    rows = (synth_dir / "train.jsonl").read_text().splitlines()
    vids = sorted({json.loads(r)["vid"] for r in rows})[:2]
    (tmp_path / "two.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["vid"] in vids))
    assert build(synth_dir / "videos", tmp_path / "two.jsonl", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _kill_after_first_staged_shard(_slow_build(synth_dir, out, "--overwrite"), out)
    after = {p.name: p.read_bytes() for p in out.iterdir()
             if not p.name.startswith(".vmr-build-") and p.name != ".vmr-lock"}  # the killed run's stale lock
    assert after == before  # the old shards and manifest, byte for byte, and nothing beside them
    assert main(["shards", "verify", str(out)]) == 0
    redo = _slow_build(synth_dir, out, "--overwrite")
    assert redo.wait(timeout=120) == 0, redo.stderr.read()
    assert read_manifest(out)["splits"]["train"]["samples"] == 4
    assert main(["shards", "verify", str(out)]) == 0


def test_a_switch_killed_half_way_is_finished_by_the_next_command(synth_dir, tmp_path, capsys):
    """The state a kill during the switch leaves (journal written, one new shard moved in, the old
    manifest): the next `verify` finishes the switch."""
    from vmr.data.shards import build_shards

    out = tmp_path / "out"
    build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], tmp_path / "new", max_videos_per_shard=2,
                 progress=False)
    new_manifest = read_manifest(tmp_path / "new")
    old = build_shards(synth_dir / "videos", [synth_dir / "val.jsonl"], out, split="train", progress=False)
    staging = out / ".vmr-build-train"
    staging.mkdir()
    for shard in new_manifest["splits"]["train"]["shards"]:
        shutil.copy(tmp_path / "new" / shard["path"], staging / shard["path"])
    journal = {"split": "train", "entry": new_manifest["splits"]["train"], "old": [s["path"] for s in old["shards"]],
               "skipped": []}
    (out / ".vmr-commit-train.json").write_text(json.dumps(journal))
    os.replace(staging / "train-000000.tar", out / "train-000000.tar")  # the kill came after one move
    assert main(["shards", "verify", str(out)]) == 0
    assert "finishing the interrupted switch" in capsys.readouterr().err
    assert read_manifest(out)["splits"]["train"] == new_manifest["splits"]["train"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar"]


def mount_tmpfs(mount: Path, size: str) -> None:
    """A small file system of its own (tmpfs), for out-of-space cases; needs root."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip()[:100]})")


@pytest.fixture
def small_disk(tmp_path):
    mount_tmpfs(tmp_path / "disk", "256k")
    yield tmp_path / "disk"
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


@pytest.mark.parametrize("reencode", [False, True])
def test_a_full_disk_stops_the_build_and_changes_nothing(synth_dir, tmp_path, small_disk, capsys, reencode):
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for i in range(20):  # about 400 kB of video: more than the disk holds
        for src in sorted((synth_dir / "videos").glob("*.mp4")):
            shutil.copy(src, videos / f"v{i}_{src.name}")
    for i, path in enumerate(sorted(videos.iterdir())):
        rows.append(qvh_line(i, path.stem))
    out = small_disk / "out"
    extra = ["--fps", "5", "--size", "64", "--keyframe-interval", "0"] if reencode else []
    code = build(videos, write_jsonl(tmp_path / "a.jsonl", rows), out, *extra)
    one_line_error(capsys, code, "no space left on the disk at", str(small_disk))
    assert [p.name for p in out.iterdir()] == []  # no shard, no temporary file, no staging folder


# ----- the stream ------------------------------------------------------------------------------------

TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def train_run(shards: str, out: Path, *extra: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """`vmr train` on the tiny config; a hang fails the test at ``timeout`` seconds."""
    return subprocess.run([str(BIN / "vmr"), "train", "--config", str(TINY_CONFIG), f"data.train_shards={shards}",
                           "data.val_shards=[]", "data.sampling.size=16", "data.num_workers=1", f"train.output_dir={out}",
                           "train.max_steps=3", "train.batch_size=2", "train.save_every=0", *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def last_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


def write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> Path:
    import webdataset as wds

    with open(path, "wb") as f:
        writer = wds.TarWriter(f)
        for key, video, meta in samples:
            writer.write({"__key__": key, "mp4": video, "json": json.dumps(meta)})
        writer.close()
    return path


def shard_samples(shard_dir: Path, split: str = "train") -> list[tuple[str, bytes, dict]]:
    from vmr.data.tars import iter_shard

    return [s for tar in sorted(shard_dir.glob(f"{split}-*.tar")) for s in iter_shard(tar)]


def test_shards_that_are_not_tars_stop_training_with_a_reason(shard_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(shard_dir / "manifest.json", bad / "manifest.json")
    for tar in shard_dir.glob("train-*.tar"):
        (bad / tar.name).write_bytes(os.urandom(3000))
    line = last_line(train_run(f"{bad}/train-*.tar", tmp_path / "run"))
    assert "could not be read; last: " in line and str(bad) in line


def test_an_unreachable_url_stops_training_with_a_reason(tmp_path):
    from .conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/x.tar"  # nobody listens: connection refused
    line = last_line(train_run(url, tmp_path / "run", "data.epoch_samples=4"))
    assert "could not be read; last: " in line and url in line


def test_pipe_urls_need_an_explicit_switch(shard_dir, tmp_path):
    tar = sorted(shard_dir.glob("train-*.tar"))[0]
    line = last_line(train_run(f"pipe:cat {tar}", tmp_path / "run", "data.epoch_samples=4"))
    assert "runs a shell command; set data.allow_pipe=true" in line
    result = train_run(f"pipe:cat {tar}", tmp_path / "run2", "data.epoch_samples=4", "data.allow_pipe=true")
    assert result.returncode == 0, result.stderr[-2000:]


def test_only_corrupt_samples_stop_training_with_one_line(shard_dir, tmp_path):
    samples = [(key, b"not a video", meta) for key, _, meta in shard_samples(shard_dir)]
    write_tar(tmp_path / "bad-000000.tar", samples)
    line = last_line(train_run(str(tmp_path / "bad-000000.tar"), tmp_path / "run", "data.epoch_samples=4"))
    assert "50 shards or samples in a row could not be read" in line and "bad-000000.tar key" in line


def test_each_bad_sample_counts_once_per_read_and_training_says_so(shard_dir, tmp_path):
    from vmr.config import DataConfig, SamplingConfig
    from vmr.data.stream import make_loader, skipped
    from vmr.text import load_tokenizer

    good = shard_samples(shard_dir)
    samples = []
    for i in range(4):  # 12 samples, 3 of them corrupt, in 2 shards
        for j, (key, video, meta) in enumerate(good):
            samples.append((f"{key}_{i}", video[: len(video) // 3] if (i, j) in {(0, 1), (1, 2), (3, 0)} else video,
                            meta))
    write_tar(tmp_path / "mixed-000000.tar", samples[:6])
    write_tar(tmp_path / "mixed-000001.tar", samples[6:])
    data = DataConfig(sampling=SamplingConfig(fps=2.0, size=16))
    for workers in (0, 2):
        loader = make_loader(f"{tmp_path}/mixed-*.tar", data, load_tokenizer("synthetic"), batch_size=2,
                             train=False, rank=0, world=1, num_workers=workers)
        assert sum(len(b["video_id"]) for b in loader) == 9
        assert skipped(loader) == 3
    result = train_run(f"{tmp_path}/mixed-*.tar", tmp_path / "run", "data.epoch_samples=12", "train.max_steps=6")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = [line for line in result.stderr.splitlines() if "unreadable shard or sample read(s) were skipped" in line]
    assert summary and "mixed-00000" in summary[0], result.stderr[-2000:]


def test_eval_on_unreadable_shards_is_an_error_not_nan(shard_dir, tmp_path, capsys):
    import dataclasses

    from vmr import load_config
    from vmr.model import VideoMomentRetrievalModel

    cfg = load_config(TINY_CONFIG, ["data.sampling.size=16", "data.sampling.window=8"])
    write_bundle(VideoMomentRetrievalModel.from_config(cfg.model), tmp_path / "bundle", dataclasses.replace(cfg))
    (tmp_path / "junk-000000.tar").write_bytes(os.urandom(2000))
    code = main(["eval", "--checkpoint", str(tmp_path / "bundle"), "--shards", str(tmp_path / "junk-000000.tar")])
    one_line_error(capsys, code, "no video of", "junk-000000.tar could be read", "1 unreadable")


# ----- training -------------------------------------------------------------------------------------


def test_a_checkpoint_on_a_full_disk_says_so_and_keeps_the_last_one(shard_dir, tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "64m")
    try:
        out = disk / "run"
        shards = f"{shard_dir}/train-*.tar"
        first = train_run(shards, out, "train.max_steps=2", "train.save_every=2")
        assert first.returncode == 0, first.stderr[-2000:]
        # Fill the disk to within 1 MB: the next checkpoint (several MB) cannot fit.
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - (1 << 20)))
        second = train_run(shards, out, "train.max_steps=4", "train.save_every=2", "--resume", "latest")
        line = last_line(second)
        assert "checkpoint of step 4 not written: no space left on the disk at" in line and str(disk) in line
        assert "step_0000002 is intact" in line
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]  # no half checkpoint
        (disk / "filler").unlink()
        third = train_run(shards, out, "train.max_steps=4", "train.save_every=2", "--resume", "latest")
        assert third.returncode == 0, third.stderr[-2000:]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def one_video_shards(synth_dir: Path, out: Path) -> Path:
    """All 4 sample videos as one training split of 4 shards (one video each)."""
    from vmr.data.shards import build_shards

    rows = (synth_dir / "train.jsonl").read_text() + (synth_dir / "val.jsonl").read_text()
    (out.parent / "all.jsonl").write_text(rows)
    build_shards(synth_dir / "videos", [out.parent / "all.jsonl"], out, fps=2.0, size=16, keyframe_interval=0,
                 max_videos_per_shard=1, progress=False)
    return out


def test_a_training_epoch_reads_every_video_once_over_ranks_and_workers(synth_dir, tmp_path):
    from vmr.config import DataConfig, SamplingConfig
    from vmr.data.stream import make_loader
    from vmr.text import load_tokenizer

    shards = one_video_shards(synth_dir, tmp_path / "shards")
    data = DataConfig(sampling=SamplingConfig(fps=2.0, size=16), temporal_crop=0.0)
    for epoch in range(2):
        seen = []
        for rank in (0, 1):
            loader = make_loader(str(shards), data, load_tokenizer("synthetic"), batch_size=1,
                                 train=True, rank=rank, world=2, num_workers=2)
            loader.dataset.set_epoch(epoch)
            seen += [vid for batch in loader for vid in batch["video_id"]]
        every = {json.loads(line)["vid"] for name in ("train.jsonl", "val.jsonl")
                 for line in (synth_dir / name).read_text().splitlines()}
        assert sorted(seen) == sorted(every), seen  # each of the 4 videos exactly once


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_machines_over_loopback_train_checkpoint_and_resume(synth_dir, tmp_path):
    """Two `accelerate launch` processes as machine 0 and machine 1 (one rank each) of one run."""
    from .conftest import free_port

    shards = one_video_shards(synth_dir, tmp_path / "shards")
    out = tmp_path / "run"

    def both(max_steps: int, *extra: str) -> list[subprocess.CompletedProcess]:
        port = free_port()
        procs = []
        for machine in (0, 1):
            command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                       "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port",
                       str(port), "--rdzv_backend", "static", "-m", "vmr.train", "--config", str(TINY_CONFIG),
                       f"data.train_shards={shards}", "data.val_shards=[]", "data.sampling.size=16",
                       "data.num_workers=1", f"train.output_dir={out}", f"train.max_steps={max_steps}",
                       "train.batch_size=1", "train.save_every=2", *extra]
            procs.append(subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        return results

    first = both(4)
    for result in first:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in first[0].stdout and "2 steps per epoch" in first[0].stdout
    checkpoint = out / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl",
                                                                           "random_states_1.pkl"]
    second = both(6, "--resume", "latest")
    for result in second:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in second[0].stdout and "at step 4" in second[0].stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004",
                                                                      "step_0000006"]


# ----- siblings: the same kinds of input at other places ------------------------------------------------


def test_outputs_that_cannot_be_written_are_one_line(synth_dir, tmp_path, capsys):
    from .test_metrics import gt_row, pred_row

    gt = write_jsonl(tmp_path / "gt.jsonl", [gt_row(1, [[0, 10]])])
    preds = write_jsonl(tmp_path / "p.jsonl", [pred_row(1, [[0, 10, 0.9]])])
    (tmp_path / "a_folder").mkdir()
    code = main(["eval", "--predictions", str(preds), "--ground-truth", str(gt), "--json", str(tmp_path / "a_folder")])
    one_line_error(capsys, code, "a_folder: cannot write it")
    (tmp_path / "a_file").write_text("x")
    code = build(synth_dir / "videos", synth_dir / "train.jsonl", tmp_path / "a_file")
    one_line_error(capsys, code, "a_file is a file, not a folder")


def test_a_damaged_bundle_is_one_line(tmp_path, capsys, synth_dir):
    from vmr import load_config
    from vmr.model import VideoMomentRetrievalModel

    cfg = load_config(TINY_CONFIG)
    write_bundle(VideoMomentRetrievalModel.from_config(cfg.model), tmp_path / "bundle", cfg)
    weights = tmp_path / "bundle" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    code = main(["predict", "--checkpoint", str(tmp_path / "bundle"), "--video", str(video), "--query", "a red circle"])
    one_line_error(capsys, code, "model.safetensors: not readable as safetensors weights")
    # A bundle whose config does not describe its weights (e.g. the model's layers changed since).
    write_bundle(VideoMomentRetrievalModel.from_config(cfg.model), tmp_path / "bundle", cfg)
    config = tmp_path / "bundle" / "config.yaml"
    config.write_text(config.read_text().replace("motion: true", "motion: false"))
    code = main(["predict", "--checkpoint", str(tmp_path / "bundle"), "--video", str(video), "--query", "a red circle"])
    one_line_error(capsys, code, "its weights do not fit its config.yaml", "unexpected")


def test_resuming_from_a_folder_that_is_not_a_checkpoint_is_one_line(shard_dir, tmp_path):
    (tmp_path / "not_a_checkpoint").mkdir()
    line = last_line(train_run(f"{shard_dir}/train-*.tar", tmp_path / "run", "--resume",
                               str(tmp_path / "not_a_checkpoint")))
    assert "--resume: cannot load" in line and "not_a_checkpoint" in line
