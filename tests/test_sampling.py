"""The sampling spec on real videos with odd timing, made by ffmpeg here: variable frame rate (what
phones record), a stream that starts at 2.5 s, rotation metadata, several streams in one file, and
a 10-minute video. Each goes through shard build, verify, the loader, ``vmr predict`` and the demo,
and every path must give the same frames at the same times: the centres of the 1/fps bins of the
video's real length."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmr.bundle import write_bundle
from vmr.cli import main
from vmr.config import DataConfig, SamplingConfig, load_config
from vmr.data.shards import build_shards
from vmr.data.stream import make_loader, skipped
from vmr.data.tars import iter_shard
from vmr.data.verify import verify_shards
from vmr.data.video import probe, sample_times, training_span
from vmr.model import VideoMomentRetrievalModel
from vmr.spans import frame_windows
from vmr.text import load_tokenizer

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"
SPEC = SamplingConfig(fps=2.0, window=6, size=16, frames="uniform")  # 6-s videos: 12 frames, 3 windows

# name -> ffmpeg arguments after `ffmpeg -y`; every file shows 6 s of a moving test pattern.
ODD = {
    # The recipe: 30 frames at 30 fps, then every 7th frame (51 frames, gaps of 1/30 to 7/30 s).
    "vfr": ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=30:duration=6", "-vf", r"select='lt(n\,30)+not(mod(n\,7))'",
            "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p"],
    "late_start": ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=6", "-c:v", "libx264", "-pix_fmt",
                   "yuv420p", "-output_ts_offset", "2.5"],
    # A landscape recording tagged to be shown in portrait (set on a stream copy of "late_start"'s
    # source; an encoder drops the tag).
    "rotated": ["-i", "{plain}", "-c", "copy", "-metadata:s:v:0", "rotate=90"],
    "multi_stream": ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=6", "-f", "lavfi", "-i",
                     "testsrc2=size=96x64:rate=5:duration=6", "-f", "lavfi", "-i", "sine=duration=6", "-map", "0",
                     "-map", "1", "-map", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"],
}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("odd")
    (out / "videos").mkdir()
    plain = out / "plain.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=6", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(plain))
    rows = []
    for i, (name, args) in enumerate(ODD.items()):
        ffmpeg(*(a.format(plain=plain) for a in args), str(out / "videos" / f"{name}.mp4"))
        rows.append({"qid": i, "query": "the pattern moves", "vid": name, "duration": 6,
                     "relevant_windows": [[2, 4]]})
    (out / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def grid(duration: float, fps: float = SPEC.fps) -> list[float]:
    return sample_times(duration, "uniform", fps, 1 << 30)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """An untrained tiny model trained at SPEC's rate: the timing, not the accuracy, is tested."""
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=SPEC)
    out = tmp_path_factory.mktemp("bundle") / "export"
    write_bundle(model, out, cfg)
    return out


@pytest.mark.parametrize("reencode", [False, True], ids=["source-bytes", "re-encoded"])
def test_odd_videos_build_verify_and_load_at_their_real_times(odd_dir, tmp_path, reencode):
    options = {"fps": 10.0, "size": 32, "keyframe_interval": 0} if reencode else {}
    build_shards(odd_dir / "videos", [odd_dir / "ann.jsonl"], tmp_path, progress=False, **options)
    totals, problems = verify_shards(tmp_path, progress=False)
    assert problems == [] and totals["samples"] == len(ODD)
    metas = {meta["video_id"]: meta for tar in tmp_path.glob("train-*.tar") for _, _, meta in iter_shard(tar)}
    for name, meta in metas.items():
        assert meta["duration"] == pytest.approx(6.0, abs=0.25), name  # the real length, not a header's guess
        assert meta["start"] == pytest.approx(2.5 if name == "late_start" and not reencode else 0.0, abs=1e-3)
    if not reencode:  # rotation applied: portrait frames
        assert (metas["rotated"]["width"], metas["rotated"]["height"]) == (48, 64)

    data = DataConfig(sampling=SPEC, num_workers=0)
    tokenizer = load_tokenizer("synthetic")
    seen: dict[str, list[float]] = {name: [] for name in ODD}
    loader = make_loader(str(tmp_path), data, tokenizer, batch_size=2, train=False, rank=0, world=1)
    for batch in loader:
        for i, vid in enumerate(batch["video_id"]):
            first, end = batch["own"][i].tolist()
            seen[vid] += (batch["frame_times"][i, first:end].double() + batch["offset"][i]).tolist()
    assert skipped(loader) == 0
    for name, times in seen.items():
        assert times == pytest.approx(grid(metas[name]["duration"]), abs=0.26), name  # every frame at its bin

    # Training draws decode too (the VFR source bytes used to fail on every one).
    training = make_loader(str(tmp_path), DataConfig(sampling=dataclasses.replace(SPEC, frames="random"), num_workers=0),
                           tokenizer, batch_size=2, train=True, rank=0, world=1, epoch_batches=6)
    batches = list(training)
    assert len(batches) == 6 and skipped(training) == 0
    assert all(int(b["frame_mask"].sum(1).max()) == SPEC.window for b in batches)


def test_predict_on_odd_videos_scores_the_whole_video_at_the_trained_rate(odd_dir, bundle, capsys):
    for name in ODD:
        path = odd_dir / "videos" / f"{name}.mp4"
        assert main(["predict", "--checkpoint", str(bundle), "--video", str(path), "--query", "the pattern moves"]) == 0
        result = json.loads(capsys.readouterr().out)
        duration = probe(path).duration
        assert result["duration"] == pytest.approx(duration, abs=1e-3) and duration == pytest.approx(6.0, abs=0.25)
        assert result["frame_times"] == pytest.approx(grid(duration), abs=0.26), name
        assert result["sampling"] == {"fps": 2.0, "window": 6, "windows": 3, "frames": len(grid(duration))}
        assert all(0 <= m["start"] < m["end"] <= duration + 1e-3 for m in result["moments"])
    # Overrides of the rate and the window.
    path = odd_dir / "videos" / "vfr.mp4"
    assert main(["predict", "--checkpoint", str(bundle), "--video", str(path), "--query", "x", "--fps", "4",
                 "--window", "100"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["sampling"]["windows"] == 1 and len(result["frame_times"]) == len(grid(result["duration"], 4.0))
    assert "(4 frames/s), in 1 window(s)" in captured.err
    assert main(["predict", "--checkpoint", str(bundle), "--video", str(path), "--query", "x", "--fps", "0"]) == 2
    assert "--fps must be a positive number" in capsys.readouterr().err


def test_a_vfr_upload_in_the_demo(odd_dir, bundle, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("VMR_DEMO_CHECKPOINT", str(bundle))
    at = AppTest.from_file(str(Path(__file__).parents[1] / "vmr" / "demo" / "app.py"), default_timeout=120).run()
    assert any("Time resolution" in m.value and "every 0.50 s" in m.value for m in at.sidebar.markdown)
    at.radio[0].set_value("Upload a video").run()
    at.file_uploader[0].set_value(("phone.mp4", (odd_dir / "videos" / "vfr.mp4").read_bytes(), "video/mp4")).run()
    at.text_input[0].set_value("the pattern moves").run()
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.dataframe[0].value) >= 1
    assert any("frames scored over" in c.value for c in at.caption)


@pytest.mark.slow
def test_a_ten_minute_video_is_scored_at_the_trained_rate_in_bounded_memory(tmp_path, bundle):
    video = tmp_path / "long.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=2:duration=600", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-g", "20", str(video))
    # A fresh interpreter whose only child is `vmr predict`: its peak RSS is the child's own.
    script = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
              "text=True); print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr, "
              "'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    vmr = str(Path(sys.executable).parent / "vmr")
    run = json.loads(subprocess.run([sys.executable, "-c", script, vmr, "predict", "--checkpoint", str(bundle),
                                     "--video", str(video), "--query", "a red circle blinks"],
                                    capture_output=True, text=True, check=True).stdout)
    assert run["rc"] == 0, run["err"]
    result = json.loads(run["out"])
    times = result["frame_times"]
    # One frame per 0.5-s bin to the end: each bin's frame, at its real presentation time.
    assert len(set(times)) == 1200 and times == pytest.approx(grid(600.0), abs=0.26)
    assert result["sampling"]["windows"] == len(frame_windows(1200, SPEC.window, SPEC.overlap)) == 300
    assert run["rss_kb"] < 1.5 * 2**20, f"peak RSS {run['rss_kb'] / 2**10:.0f} MB"
    assert "scored 1200 frames of 600.0 s" in run["err"]


@settings(max_examples=300, deadline=None)
@given(duration=st.floats(1.0, 1200.0), fps=st.sampled_from([0.5, 1.0, 2.0]), window=st.integers(1, 80),
       start=st.floats(0.0, 1.0), length=st.floats(0.01, 1.0), negatives=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 10**6))
def test_training_windows_hold_the_queries_moments(duration, fps, window, start, length, negatives, seed):
    spec = SamplingConfig(fps=fps, window=window, negatives=negatives)
    lo = start * duration * 0.99
    moments = (lo, min(duration, lo + length * duration))
    span = training_span(duration, moments, spec, random.Random(seed), crop=0.5)
    assert 0.0 <= span[0] < span[1] <= duration + 1e-6
    if duration <= window / fps:  # the whole video, or a crop around the moments
        assert span == (0.0, duration) or span[0] <= moments[0] and moments[1] <= span[1]
        return
    assert span[1] - span[0] == pytest.approx(window / fps)  # the trained rate: never thinned
    if negatives == 0.0:
        if moments[1] - moments[0] <= window / fps:
            assert span[0] <= moments[0] + 1e-6 and moments[1] <= span[1] + 1e-6
        else:
            assert moments[0] - 1e-6 <= span[0] and span[1] <= moments[1] + 1e-6


def test_long_videos_train_on_windows_at_the_trained_rate(tmp_path):
    (tmp_path / "videos").mkdir()
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=4:duration=120", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           str(tmp_path / "videos" / "long.mp4"))
    rows = [{"qid": 1, "query": "late", "vid": "long", "duration": 120, "relevant_windows": [[100, 104]]},
            {"qid": 2, "query": "early", "vid": "long", "duration": 120, "relevant_windows": [[10, 12]]}]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_shards(tmp_path / "videos", [tmp_path / "ann.jsonl"], tmp_path / "shards", progress=False)
    spec = SamplingConfig(fps=2.0, window=16, size=16, frames="uniform", negatives=0.0)  # 8-s windows, 120-s video
    data = DataConfig(sampling=spec, num_workers=0, queries_per_video=2)
    loader = make_loader(str(tmp_path / "shards"), data, load_tokenizer("synthetic"), batch_size=1, train=True,
                         rank=0, world=1, epoch_batches=12)
    for batch in loader:
        times = batch["frame_times"][0].double()
        assert len(times) == 16 and float(batch["duration"][0]) == pytest.approx(8.0)
        # 0.5 s apart (to the 0.25-s frame interval of the 4-fps file), inside the window.
        assert torch.allclose(times[1:] - times[:-1], torch.full((15,), 0.5, dtype=torch.float64), atol=0.26)
        assert 0 <= times.min() and times.max() <= 8.0
        # The two moments are 88 s apart: one window holds one query, and holds its moment whole.
        assert len(batch["qid"]) == 1 and batch["moment_mask"][0].sum() == 1
        start, end = batch["moments"][0, 0].tolist()
        assert end - start == pytest.approx(4.0 if batch["qid"][0] == 1 else 2.0, abs=1e-4)
    # Evaluation sees the whole video: 240 frames in overlapping 16-frame windows.
    evaluation = make_loader(str(tmp_path / "shards"), data, load_tokenizer("synthetic"), batch_size=4,
                             train=False, rank=0, world=1)
    owned = sum(int(b["own"][:, 1].sub(b["own"][:, 0]).sum()) for b in evaluation)
    assert owned == 240
