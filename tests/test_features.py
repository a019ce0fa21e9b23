"""The frozen-feature cache: extraction from real video shards (also resumed, and by two processes
under `accelerate launch`), training and evaluation on feature shards with the same loop and model,
a cache that does not fit the model refused, and the field's released .npz layout imported,
trained on and scored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vmr.bundle import read_bundle
from vmr.cli import main
from vmr.config import load_config
from vmr.data.tars import TIMES, TOKENS, iter_shard
from vmr.data.video import open_video, sample_frames, sample_times

from .conftest import free_port

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
SMALL = ["data.sampling.size=16", "model.freeze_clip=true"]


def extract(shard_dir: Path, out: Path, *extra: str) -> int:
    return main(["features", "extract", "--config", str(TINY), "--shards", str(shard_dir), "--out", str(out),
                 *extra, *SMALL])


def samples(folder: Path) -> dict[str, dict]:
    import webdataset as wds

    return {s["__key__"]: s for tar in sorted(folder.glob("*.tar"))
            for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)}


def array(data: bytes):
    import io

    return np.load(io.BytesIO(data))


def train_args(features: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(TINY), f"data.train_shards={features}/train-*.tar",
            f"data.val_shards={features}/val-*.tar", "data.num_workers=0", f"train.output_dir={out}",
            "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1", "train.save_every=0",
            "train.eval_every=0", "train.log_every=1", *SMALL, *extra]


@pytest.fixture(scope="module")
def features(shard_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features")
    assert extract(shard_dir, out) == 0
    return out


def test_extraction_caches_every_frame_once_as_the_model_encodes_it(shard_dir, features):
    manifest = json.loads((features / "manifest.json").read_text())
    extractor = manifest["extractor"]
    assert manifest["kind"] == "features" and extractor["tokens"] == 1 + 16 and extractor["width"] == 64
    assert extractor["sampling"]["fps"] == 2.0 and extractor["dtype"] == "float16"
    assert set(manifest["splits"]) == {"train", "val"}
    cached = samples(features)
    videos = {key: (video, meta) for tar in sorted(shard_dir.glob("*.tar")) for key, video, meta in iter_shard(tar)}
    assert set(cached) == set(videos)
    # The naive reference: decode the video and run the same frozen tower on it.
    cfg = load_config(TINY, SMALL)
    torch.manual_seed(cfg.train.seed)
    from vmr.model import VideoMomentRetrievalModel

    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).eval()
    for key, (video, meta) in videos.items():
        sample = cached[key]
        assert json.loads(sample["json"]) == meta  # the same json as the video shard
        tokens, times = array(sample[TOKENS]), array(sample[TIMES])
        grid = sample_times(meta["duration"], "uniform", 2.0, 1 << 30)
        frames, pts = sample_frames(open_video(video), grid, 16)
        assert tokens.dtype == np.float16 and tokens.shape == (len(grid), 17, 64)
        assert times.tolist() == pytest.approx(pts)
        with torch.no_grad():
            reference = model.towers.encode_frames(frames)
        assert np.abs(tokens.astype(np.float32) - reference.numpy()).max() < 2e-2


def test_train_and_eval_on_feature_shards(features, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(features, out)) == 0
    bundle = out / "export"
    cache = json.loads((bundle / "features.json").read_text())  # the bundle says what it was trained on
    assert cache["kind"] == "clip" and cache["tokens"] == 17
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(bundle), "--shards", f"{features}/val-*.tar", "--json",
                 str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["brief"]["MR-full-R1@0.5"] <= 100
    # The bundle's frozen tower is the one that made the cache (same seed), so it reads videos too ...
    from vmr.cache import vision_fingerprint

    model = read_bundle(bundle)
    assert vision_fingerprint(model) == cache["vision_sha256"]
    # ... and a model whose tower differs from the cache's reads only the cache.
    torch.nn.init.zeros_(model.towers.vision.post_layernorm.weight)
    from vmr.cache import check_reads_videos
    from vmr.errors import UserError

    with pytest.raises(UserError, match="trained on features of another vision tower"):
        check_reads_videos(model)
    # Feature shards are no input for an extraction.
    assert main(["features", "extract", "--config", str(TINY), "--shards", str(features), "--out",
                 str(tmp_path / "again"), *SMALL]) == 2
    assert "feature shards already" in capsys.readouterr().err


def test_pooled_only_cache_trains(shard_dir, tmp_path):
    assert extract(shard_dir, tmp_path / "pooled", "--pooled-only") == 0
    tokens = array(next(iter(samples(tmp_path / "pooled").values()))[TOKENS])
    assert tokens.shape[1:] == (1, 64)
    assert main(train_args(tmp_path / "pooled", tmp_path / "run")) == 0


def test_augmented_views_are_stored_for_training_and_drawn_at_random(shard_dir, features, tmp_path, capsys):
    import random

    from vmr.data.decode import decode_features
    from vmr.data.tars import VIEW_TIMES, VIEWS

    out = tmp_path / "views"
    assert extract(shard_dir, out, "--views", "3") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extractor"]["views"] == 3
    assert manifest["extractor"]["augmentation"] == {"temporal_jitter": True, "scale_jitter": [0.7, 1.0]}
    plain, cached = samples(features), samples(out)
    cfg = load_config(TINY, SMALL)
    val = {key for tar in shard_dir.glob("val-*.tar") for key, _, _ in iter_shard(tar)}
    assert val and val < set(cached)
    augmented = []
    for key, sample in cached.items():
        tokens, times = array(sample[TOKENS]), array(sample[TIMES])
        # The plain view is exactly the cache of one view: evaluation sees the same either way.
        assert np.array_equal(tokens, array(plain[key][TOKENS])) and np.array_equal(times, array(plain[key][TIMES]))
        if key in val:
            assert VIEWS not in sample  # evaluation reads only the plain view
            continue
        views, view_times = array(sample[VIEWS]), array(sample[VIEW_TIMES])
        assert views.dtype == np.float16 and views.shape == (2, *tokens.shape) and view_times.shape == (2, len(times))
        assert all(np.all(np.diff(t) > 0) and t.min() >= 0 and t.max() <= times.max() + 0.5 for t in view_times)
        # (A crop can draw the whole frame, and at the shards' own rate a random time in a bin is
        # the same frame: a single view may equal the plain one, but not all of them.)
        augmented += [not np.array_equal(view, tokens) for view in views]
        # Training draws every view of a video, each whole (its tokens with its own times).
        drawn = set()
        for seed in range(40):
            item = next(decode_features(sample, cfg.data, random.Random(seed), train=True))
            frames = item["frames"].numpy()
            for v, candidate in enumerate([tokens, *views]):
                first = [i for i in range(len(candidate) - len(frames) + 1)
                         if np.array_equal(candidate[i:i + len(frames)], frames)]
                if first:
                    drawn.add(v)
                    source = times if v == 0 else view_times[v - 1]
                    offset = item["offset"]
                    assert np.allclose(np.array(item["times"]) + offset, source[first[0]:first[0] + len(frames)],
                                       atol=1e-6)
        assert drawn == {0, 1, 2}
    assert sum(augmented) > len(augmented) / 2
    # Drawn from each video's own seed: another extraction draws the same views.
    assert extract(shard_dir, tmp_path / "again", "--views", "3") == 0
    again = samples(tmp_path / "again")
    assert all(np.array_equal(array(again[key][VIEWS]), array(sample[VIEWS]))
               for key, sample in cached.items() if key not in val)
    # Resuming into it with other views is refused, naming what differs.
    capsys.readouterr()
    assert extract(shard_dir, out, "--views", "2") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "was extracted with another number of views (--views);" in errors[0]
    assert errors[0].startswith("vmr features: error:")  # not behind the progress bar
    assert main(train_args(out, tmp_path / "run")) == 0


def test_an_interrupted_extraction_resumes_without_redoing_finished_shards(shard_dir, tmp_path, capsys):
    from vmr.data.sources import expand_shards
    from vmr.features import extract_features
    from vmr.model import VideoMomentRetrievalModel

    cfg = load_config(TINY, SMALL)
    torch.manual_seed(cfg.train.seed)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling)
    urls = expand_shards(str(shard_dir))
    out = tmp_path / "features"
    # As if killed after two shards, and in the middle of the third (a temporary file left over).
    extract_features(model, model.sampling, urls[:2], out, progress=False)
    (out / f".{Path(urls[2]).name}.tmp-99999").write_bytes(b"half a tar")
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert extract(shard_dir, out) == 0
    assert "(2 shard(s) already done)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in done} == done
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(Path(u).name for u in urls)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["splits"].values()) == len(samples(shard_dir))


def test_a_cache_that_does_not_fit_the_model_is_refused(features, tmp_path, capsys):
    assert main(train_args(features, tmp_path / "a", "data.sampling.fps=1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit the model: it holds 2 frames/s, the model samples 1" in err
    assert main(train_args(features, tmp_path / "b", "model.projection_dim=32")) == 2
    assert "its features are 64-d, the model reads 32-d" in capsys.readouterr().err
    assert main(train_args(features, tmp_path / "c", "model.patch_size=16")) == 2
    assert "it has 17 tokens per frame, the model's tower makes 5" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_extract_every_video_exactly_once(shard_dir, tmp_path):
    out = tmp_path / "features"
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "vmr.cli", "features", "extract", "--config", str(TINY), "--shards", str(shard_dir),
               "--out", str(out), *SMALL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [s["__key__"] for tar in sorted(out.glob("*.tar")) for s in samples_of(tar)]
    expected = [key for tar in sorted(shard_dir.glob("*.tar")) for key, _, _ in iter_shard(tar)]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
    records = [json.loads(p.read_text()) for p in (out / ".done").glob("*.json")]
    assert len(records) == len(expected)  # one record per shard (one video per shard here)


def samples_of(tar: Path):
    import webdataset as wds

    return list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))


def write_release(root: Path, videos: dict[str, int]) -> tuple[list[Path], Path]:
    """.npz files in the Moment-DETR / Lighthouse release layout: two video feature folders of
    different widths and lengths, and per-query CLIP text token features."""
    rng = np.random.default_rng(0)
    clip, slowfast, text = root / "clip_features", root / "slowfast_features", root / "clip_text_features"
    for folder in (clip, slowfast, text):
        folder.mkdir(parents=True)
    rows = []
    for i, (vid, clips) in enumerate(videos.items()):
        np.savez(clip / f"{vid}.npz", features=rng.normal(size=(clips, 8)).astype(np.float32))
        np.savez(slowfast / f"{vid}.npz", features=rng.normal(size=(clips + 1, 12)).astype(np.float32))
        for j in range(2):
            qid = 10 * i + j
            np.savez(text / f"qid{qid}.npz", last_hidden_state=rng.normal(size=(5 + j, 6)).astype(np.float32))
            start = 2 * (j * 4 + 1)
            rows.append({"qid": qid, "query": f"event {j}", "vid": vid, "duration": 2 * clips,
                         "relevant_windows": [[start, start + 6]], "relevant_clip_ids": [start // 2, start // 2 + 1],
                         "saliency_scores": [[2, 3, 4], [1, 2, 3]]})
    annotations = root / "ann.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [clip, slowfast], annotations


def test_released_features_import_train_and_eval(tmp_path, capsys):
    folders, annotations = write_release(tmp_path, {"vidA_0.0_30.0": 15, "vidB_30.0_60.0": 15, "vidC": 12})
    out = tmp_path / "imported"
    for split in ("train", "val"):
        assert main(["features", "import", "--video-features", *map(str, folders), "--text-features",
                     str(tmp_path / "clip_text_features"), "--annotations", str(annotations), "--out", str(out),
                     "--split", split]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extractor"]["width"] == 20 and manifest["extractor"]["text_width"] == 6
    sample = next(s for s in samples(out).values() if json.loads(s["json"])["video_id"] == "vidC")
    tokens = array(sample[TOKENS]).astype(np.float32)
    assert tokens.shape == (12, 1, 20)  # truncated to the shorter folder, concatenated
    assert np.linalg.norm(tokens[:, 0, :8], axis=1) == pytest.approx(1.0, abs=1e-2)  # each part L2-normalised
    assert array(sample[TIMES]).tolist() == pytest.approx([2 * i + 1 for i in range(12)])
    run = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs" / "qvhighlights_features.yaml"),
                 f"data.train_shards={out}/train-*.tar", f"data.val_shards={out}/val-*.tar", "data.num_workers=0",
                 "model.feature_dim=20", "model.text_feature_dim=6", f"train.output_dir={run}", "train.max_steps=3",
                 "train.batch_size=2", "train.warmup_steps=1", "train.save_every=0", "train.eval_every=0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--shards", f"{out}/val-*.tar", "--json",
                 str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"brief", "HL-min-Fair", "full"} <= set(metrics) and 0 <= metrics["brief"]["MR-full-mAP"] <= 100
    # Such a model reads features, not videos: a one-line refusal.
    video = tmp_path / "v.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=2:duration=4",
                    "-pix_fmt", "yuv420p", str(video)], check=True)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--video", str(video), "--query", "x"]) == 2
    assert "reads imported 20-d features, not videos" in capsys.readouterr().err


def test_a_bad_release_folder_is_one_line(tmp_path, capsys):
    folders, annotations = write_release(tmp_path, {"vidA": 10})
    np.savez(folders[0] / "vidA.npz", feats=np.zeros((10, 8)))
    assert main(["features", "import", "--video-features", *map(str, folders), "--annotations", str(annotations),
                 "--out", str(tmp_path / "out")]) == 2
    assert "vidA.npz: holds feats, expected features" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written
