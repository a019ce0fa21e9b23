"""The shared mechanisms that keep bad input harmless, each tested across its class: every reader of
a file (JSON manifests and records, YAML configs, npz, safetensors bundles, predictions) turns bad
content into one line naming the file and key; every writer of a folder refuses another kind, an
existing split or a second writer; names read from files stay inside their folder; numbers are
checked at their bounds; and a process group's threads are gone once it is released."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmr.cli import main

from .test_hardening import one_line_error

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
SMALL = ["data.sampling.size=16", "model.freeze_clip=true"]


def extract(shards: Path, out: Path, *extra: str) -> int:
    return main(["features", "extract", "--config", str(TINY), "--shards", str(shards), "--out", str(out), *extra,
                 *SMALL])


@pytest.fixture
def shards(shard_dir, tmp_path) -> Path:
    """A private copy of the session's shards (the tests below damage them)."""
    return Path(shutil.copytree(shard_dir, tmp_path / "shards"))


# ----- readers: one line naming the file and key, whatever the kind of file -----------------------


@pytest.mark.parametrize("damage, needle", [
    (lambda m: "{ not json", "not valid JSON"),
    (lambda m: json.dumps([1, 2]), "expected a JSON object"),
    (lambda m: json.dumps({**m, "splits": {"train": {}}}), "splits.train: 'shards' is missing"),
    (lambda m: json.dumps({**m, "splits": {"train": {"shards": [{"path": "../x.tar", "samples": 1, "queries": 1}]}}}),
     "not a plain file name"),
    (lambda m: json.dumps({**m, "splits": {"train": {"shards": [{"path": "a.tar", "samples": "3", "queries": 1}]}}}),
     "'samples' must be int"),
    (lambda m: json.dumps({**m, "kind": "pictures"}), "'kind' is 'pictures'"),
    (lambda m: b"\xff\xfe\x00binary", "not a text file"),
])
def test_a_damaged_manifest_is_one_line_for_every_reader(shards, tmp_path, capsys, damage, needle):
    manifest = shards / "manifest.json"
    text = damage(json.loads(manifest.read_text()))
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error(capsys, main(["shards", "verify", str(shards)]), "manifest.json", needle)
    one_line_error(capsys, extract(shards, tmp_path / "f"), "manifest.json", needle)
    one_line_error(capsys, main(["train", "--config", str(TINY), f"data.train_shards={shards}/train-*.tar",
                                 f"train.output_dir={tmp_path / 'run'}", *SMALL]), "manifest.json", needle)


@pytest.mark.parametrize("name, content, needle", [
    ("tower_config.json", b"{ broken", "tower_config.json: not valid JSON"),
    ("tower_config.json", b"[]", "tower_config.json: expected a JSON object"),
    ("tower_config.json", b'{"model_type": "siglip"}', "towers of kind 'siglip', but its config.yaml says model.backbone: clip"),
    ("tower_config.json", b'{"model_type": "clip", "vision_config": 3}', "not a usable inference bundle"),
    ("config.yaml", b"model:\n  hidden_dim: 64\n  num_heads: 4\n", "do not fit its config.yaml"),
    ("config.yaml", b"\x00\x01\xff", "config.yaml: not a text file"),
    ("model.safetensors", b"not weights at all", "model.safetensors: not readable as safetensors"),
])
def test_a_damaged_bundle_is_one_line(bundle, tmp_path, capsys, synth_dir, name, content, needle):
    broken = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    (broken / name).write_bytes(content)
    video = next((synth_dir / "videos").glob("*.mp4"))
    one_line_error(capsys, main(["predict", "--checkpoint", str(broken), "--video", str(video), "--query", "a red circle"]),
                   needle)


@pytest.mark.parametrize("rows, needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a text file"),
    (json.dumps({"qid": [1], "pred_relevant_windows": []}).encode(), "'qid' must be an integer or a string"),
    (json.dumps({"qid": 1, "pred_relevant_windows": [[0, 2, 0.5]], "pred_saliency_scores": [0.1, float("nan")]}).encode(),
     "pred_saliency_scores holds a value that is not a finite number"),
])
def test_bad_predictions_are_one_line(tmp_path, capsys, rows, needle):
    truth = tmp_path / "gt.jsonl"
    truth.write_text(json.dumps({"qid": 1, "query": "q", "vid": "v", "duration": 10, "relevant_windows": [[0, 4]],
                                 "relevant_clip_ids": [0, 1], "saliency_scores": [[1, 2, 3], [2, 2, 2]]}) + "\n")
    predictions = tmp_path / "p.jsonl"
    predictions.write_bytes(rows)
    one_line_error(capsys, main(["eval", "--predictions", str(predictions), "--ground-truth", str(truth)]), needle)


@pytest.mark.parametrize("change, needle", [
    ({"saliency_scores": [[1, 2, 3]]}, "one row per relevant_clip_ids entry"),
    ({"duration": "150"}, "duration must be a positive number"),
    ({"duration": -5}, "duration must be a positive number"),
    ({"relevant_clip_ids": [-1, 0]}, "non-negative integers"),
    ({"saliency_scores": [[1, 2, 9], [1, 1, 1]]}, "scores from 0 to 4"),
])
def test_every_ground_truth_field_that_enters_a_metric_is_checked(tmp_path, capsys, change, needle):
    row = {"qid": 1, "query": "q", "vid": "v", "duration": 10, "relevant_windows": [[0, 4]],
           "relevant_clip_ids": [0, 1], "saliency_scores": [[1, 2, 3], [2, 2, 2]]}
    truth = tmp_path / "gt.jsonl"
    truth.write_text(json.dumps({**row, **change}) + "\n")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"qid": 1, "pred_relevant_windows": [[0, 4, 0.9]],
                                       "pred_saliency_scores": [0.1] * 5}) + "\n")
    one_line_error(capsys, main(["eval", "--predictions", str(predictions), "--ground-truth", str(truth)]),
                   "qid 1", needle)


@pytest.mark.parametrize("args, needle", [
    (["model.patch_size=0"], "model.patch_size must be at least 1"),
    (["model.num_heads=0"], "model.num_heads must be at least 1"),
    (["data.sampling.fps=1e6"], "data.sampling.fps must be at most"),
    (["model.loss_giou=-1"], "model.loss_giou must be >= 0"),
    (["data.sampling.window=1000000"], "data.sampling.window must be at most"),
])
def test_config_numbers_are_checked_at_their_bounds(tmp_path, capsys, args, needle):
    one_line_error(capsys, main(["train", "--config", str(TINY), f"train.output_dir={tmp_path}", *args]), needle)


def test_a_config_that_is_a_folder_or_binary_is_one_line(tmp_path, capsys):
    one_line_error(capsys, main(["train", "--config", str(tmp_path)]), "a folder, not a file")
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"\x00\xff\xfe" * 10)
    one_line_error(capsys, main(["train", "--config", str(binary)]), "not a text file")


def test_command_line_numbers_and_queries_are_checked(bundle, shards, synth_dir, capsys):
    video = next((synth_dir / "videos").glob("*.mp4"))
    predict = ["predict", "--checkpoint", str(bundle), "--video", str(video)]
    one_line_error(capsys, main([*predict, "--query", "a red circle", "--clip-fps", "1e6"]),
                   "above the video's own")
    for query in ("😀😀", "\u200b\u200b", " ,.; "):
        one_line_error(capsys, main([*predict, "--query", query]), "tokenizes to nothing")
    one_line_error(capsys, main([*predict, "--query", "a red circle", "--window", "100000000"]), "--window")
    one_line_error(capsys, main(["eval", "--checkpoint", str(bundle), "--shards", str(shards), "--batch-size", "0"]),
                   "--batch-size")
    one_line_error(capsys, main(["demo", "--host", ""]), "--host")


# ----- writers: one kind per folder, one writer at a time, nothing replaced it did not make ------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_features_never_replace_video_shards(shards, tmp_path, capsys):
    before = snapshot(shards)
    one_line_error(capsys, extract(shards, shards), "holds the video shards being read")
    other = Path(shutil.copytree(shards, tmp_path / "other"))
    one_line_error(capsys, extract(shards, other), "holds video shards, not feature shards", "--overwrite")
    assert snapshot(shards) == before and snapshot(other) == before


def test_a_single_output_file_replaces_only_an_earlier_one_of_its_kind(tmp_path, capsys):
    """--json, --predictions-out, --out of one file: a slip onto an input (the ground truth, the
    predictions, an annotation file, a video) is one line before any work, and the file is unchanged;
    an earlier output of the same kind, or an empty file, is replaced."""
    truth = tmp_path / "gt.jsonl"
    truth.write_text(json.dumps({"qid": 1, "query": "q", "vid": "v", "duration": 10, "relevant_windows": [[0, 4]],
                                 "relevant_clip_ids": [0, 1], "saliency_scores": [[1, 2, 3], [2, 2, 2]]}) + "\n")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"qid": 1, "pred_relevant_windows": [[0, 4, 0.9]]}) + "\n")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(4000))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    evaluate = ["eval", "--predictions", str(predictions), "--ground-truth", str(truth), "--json"]
    for target in (truth, predictions, video):
        before = target.read_bytes()
        one_line_error(capsys, main([*evaluate, str(target)]), str(target), "not a metrics JSON")
        assert target.read_bytes() == before
    one_line_error(capsys, main([*evaluate, str(folder)]), "cannot write it (a folder")
    one_line_error(capsys, main(["bench", "search", "--quick", "--json", str(truth)]), "not a vmr bench report")
    metrics = tmp_path / "metrics.json"
    metrics.write_text("")
    for _ in range(2):  # an empty file, then the earlier metrics: replaced
        assert main([*evaluate, str(metrics)]) == 0
        assert "brief" in json.loads(metrics.read_text())


def test_training_never_writes_into_a_folder_of_other_files(shard_dir, tmp_path, capsys):
    data = tmp_path / "my-data"
    data.mkdir()
    (data / "config.yaml").write_text("my: settings\n")
    (data / "notes.txt").write_text("keep")
    before = snapshot(data)
    train = ["train", "--config", str(TINY), *SMALL, f"data.train_shards={shard_dir}/train-*.tar", "data.val_shards=[]",
             "data.num_workers=0", "train.max_steps=1"]
    one_line_error(capsys, main([*train, f"train.output_dir={data}"]), str(data), "not a run directory")
    assert snapshot(data) == before
    one_line_error(capsys, main([*train, f"train.output_dir={data / 'notes.txt'}"]), "is a file, not a folder")


def test_feature_import_refuses_video_shards_and_existing_splits(shards, tmp_path, capsys):
    release, annotations = write_release(tmp_path, {"vidA": 6})
    before = snapshot(shards)
    args = ["features", "import", "--video-features", str(release), "--annotations", str(annotations)]
    one_line_error(capsys, main([*args, "--out", str(shards), "--split", "val"]), "holds video shards")
    assert snapshot(shards) == before
    out = tmp_path / "imported"
    assert main([*args, "--out", str(out), "--split", "val"]) == 0
    capsys.readouterr()
    one_line_error(capsys, main([*args, "--out", str(out), "--split", "val"]), "split 'val' already exists")
    assert main([*args, "--out", str(out), "--split", "train"]) == 0  # another split joins the folder
    assert sorted(json.loads((out / "manifest.json").read_text())["splits"]) == ["train", "val"]


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(synth_dir, tmp_path, capsys):
    """A live process holds the lock: a build into the same folder stops with one line naming it;
    once the holder is gone, its lock is stale and the next build takes it over."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / ".vmr-lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                   "what": "vmr shards build --split train"}))
        from vmr.io import FolderLock

        with pytest.raises(Exception, match=f"another run writes here .*pid {holder.pid}"):
            with FolderLock(out, "test", wait_s=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert main(["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations",
                 str(synth_dir / "train.jsonl"), "--out", str(out)]) == 0
    assert not (out / ".vmr-lock").exists()


def test_a_resume_redoes_a_shard_that_changed_and_sweeps_temporaries(shards, tmp_path, capsys):
    out = tmp_path / "features"
    assert extract(shards, out) == 0
    first = sorted(out.glob("train-*.tar"))[0]
    good = first.read_bytes()
    first.write_bytes(good[:-100])  # truncated behind the record's back
    (out / ".train-000009.tar.tmp-12345").write_bytes(b"left by a killed run")
    capsys.readouterr()
    assert extract(shards, out) == 0
    err = capsys.readouterr().err
    assert "missing or changed since its record" in err and "removed temporary files" in err
    assert first.read_bytes() == good  # extracted again: the same bytes
    assert not list(out.glob(".*.tmp*"))
    assert main(["shards", "verify", str(out)]) == 0


def test_a_corrupt_done_record_is_one_line(shards, tmp_path, capsys):
    out = tmp_path / "features"
    assert extract(shards, out) == 0
    record = sorted((out / ".done").glob("*.json"))[0]
    for text, needle in (("{ half", "not valid JSON"), (json.dumps({"path": "../../etc/passwd"}), "not a plain file name"),
                         (json.dumps({"path": record.name[:-5], "split": "train", "samples": "2"}), "'samples' must be int")):
        record.write_text(text)
        one_line_error(capsys, extract(shards, out), record.name, needle)


# ----- names read from files stay inside their folder ------------------------------------------------


def write_release(root: Path, videos: dict[str, int], value: float | None = None) -> tuple[Path, Path]:
    """One folder of ``<vid>.npz`` features and a QVHighlights-style annotation file."""
    folder = root / "release"
    folder.mkdir(exist_ok=True)
    rows = []
    for i, (vid, clips) in enumerate(videos.items()):
        array = np.random.default_rng(i).normal(size=(clips, 8)).astype(np.float32)
        if value is not None:
            array[0, 0] = value
        if "/" not in vid:
            np.savez(folder / f"{vid}.npz", features=array)
        rows.append({"qid": i, "query": "an event", "vid": vid, "duration": 2 * clips, "relevant_windows": [[2, 6]]})
    annotations = root / "ann.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, annotations


@pytest.mark.parametrize("vid, value, needle", [
    ("../secret", None, "not a plain file name"),
    ("/etc/passwd", None, "not a plain file name"),
    ("vidA", float("nan"), "NaN or infinite"),
    ("vidA", float("inf"), "NaN or infinite"),
])
def test_feature_import_confines_names_and_refuses_non_finite_features(tmp_path, capsys, vid, value, needle):
    (tmp_path / "secret.npz").write_bytes(b"outside the folder")
    release, annotations = write_release(tmp_path, {vid: 6}, value)
    out = tmp_path / "out"
    code = main(["features", "import", "--video-features", str(release), "--annotations", str(annotations),
                 "--out", str(out)])
    one_line_error(capsys, code, needle)
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()


def test_a_journal_cannot_lead_outside_its_folder(shards, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    journal = {"split": "train", "entry": {"shards": []}, "old": ["../victim.txt"], "skipped": []}
    (shards / ".vmr-commit-train.json").write_text(json.dumps(journal))
    one_line_error(capsys, main(["shards", "verify", str(shards)]), ".vmr-commit-train.json", "not a plain file name")
    assert victim.read_text() == "keep me"
    journal["old"] = ["manifest.json"]  # inside, but not a shard of the split
    (shards / ".vmr-commit-train.json").write_text(json.dumps(journal))
    one_line_error(capsys, main(["shards", "verify", str(shards)]), "is not a shard of split 'train'")
    assert (shards / "manifest.json").is_file()


def test_a_cache_of_another_tower_is_refused(shards, tmp_path, bundle, capsys):
    """Features extracted by one tower, scored by a model whose tower differs (same sizes, other weights)."""
    out = tmp_path / "features"
    assert extract(shards, out, "train.seed=123") == 0  # a random tower of other weights
    capsys.readouterr()
    one_line_error(capsys, main(["eval", "--checkpoint", str(bundle), "--shards", f"{out}/val-*.tar"]),
                   "made by another vision tower")
    own = tmp_path / "own"  # the same model's own tower: accepted
    assert main(["features", "extract", "--checkpoint", str(bundle), "--shards", str(shards), "--out", str(own)]) == 0
    assert main(["eval", "--checkpoint", str(bundle), "--shards", f"{own}/val-*.tar"]) == 0


# ----- teardown: the group's threads end before the interpreter does ---------------------------------


def test_a_released_process_group_leaves_no_gloo_thread(tmp_path):
    """A one-rank gloo group, then transformers' CLIP imported (it imports the modules that capture
    the group in function defaults), then released: no gloo thread may remain (in a fresh process:
    this one has long imported them)."""
    script = """
import os
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1")
from vmr.runtime import gloo_threads, prepare_process_group, release_process_group
import torch.distributed as dist
prepare_process_group(training=True)
import time
dist.init_process_group("gloo")
for _ in range(100):  # the group's threads start and name themselves asynchronously: up to 10 s
    if gloo_threads():
        break
    time.sleep(0.1)
assert gloo_threads(), "a gloo group has threads"
import transformers.models.clip.modeling_clip  # noqa: F401
release_process_group()
left = gloo_threads()
assert not left, left
print("clean")
"""
    from .conftest import free_port

    result = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, "PORT": str(free_port())},
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr[-2000:]


def test_a_cached_sample_with_non_finite_tokens_is_refused_by_the_loader():
    """Feature shards made elsewhere may hold NaN: the loader's decode refuses the sample (the
    stream then counts and skips it, as it does an undecodable video)."""
    import io

    from vmr.config import DataConfig
    from vmr.data.decode import decode_features

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    tokens = np.zeros((4, 1, 8), dtype=np.float16)
    meta = {"video_id": "v", "duration": 4.0, "queries": [{"qid": 1, "query": "q", "windows": [[0.0, 2.0]]}]}
    sample = {"__key__": "v", "json": json.dumps(meta).encode(), "tokens.npy": npy(tokens),
              "times.npy": npy(np.arange(4) + 0.5)}
    assert len(list(decode_features(sample, DataConfig(), None, train=False))) >= 1
    tokens[2, 0, 3] = np.nan
    with pytest.raises(ValueError, match="tokens.npy holds NaN or infinite values"):
        list(decode_features({**sample, "tokens.npy": npy(tokens)}, DataConfig(), None, train=False))


def test_a_shard_rate_is_bounded_and_never_above_the_video_s_own(synth_dir, tmp_path, capsys):
    args = ["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations", str(synth_dir / "val.jsonl"),
            "--out", str(tmp_path / "out")]
    one_line_error(capsys, main([*args, "--fps", "1e9"]), "--fps must be in (0, 240]")
    assert main([*args, "--fps", "200"]) == 0  # the synthetic videos run at 5 frames/s: kept at 5
    from vmr.data.tars import iter_shard

    rates = {meta["fps"] for tar in (tmp_path / "out").glob("*.tar") for _, _, meta in iter_shard(tar)}
    assert rates == {5.0}
