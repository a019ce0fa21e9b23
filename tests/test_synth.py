import json
import math
import shutil
from itertools import pairwise

import numpy as np
import torch
from torchcodec.decoders import VideoDecoder

from vmr.cli import main
from vmr.data.video import keyframe_times
from vmr.spans import clip_relevance, frames_to_seconds
from vmr.synth import COLOURS, Event, render_video, synthesize

from .conftest import TINY


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_outputs_and_schemas(synth_dir):
    seed = json.loads((synth_dir / "annotations.json").read_text())
    train, val = _rows(synth_dir / "train.jsonl"), _rows(synth_dir / "val.jsonl")
    videos = sorted(p.stem for p in (synth_dir / "videos").glob("*.mp4"))
    assert len(videos) == TINY["videos"]
    assert len(train) + len(val) == TINY["videos"] * TINY["queries_per_video"]
    assert {r["vid"] for r in train}.isdisjoint({r["vid"] for r in val}), "split must be by video"
    assert val, "val_fraction 0.2 of 4 videos holds one out"
    assert any("." in v for v in videos), "some ids look like QVHighlights ids, with dots"
    assert set(seed[0]) == {"id", "video_id", "query", "start_frame", "end_frame", "description"}
    assert set(train[0]) >= {"qid", "query", "vid", "duration", "relevant_windows", "relevant_clip_ids",
                             "saliency_scores"}


def test_seed_frames_and_qvh_seconds_agree(synth_dir):
    fps = TINY["fps"]
    seed = json.loads((synth_dir / "annotations.json").read_text())
    by_query = {}
    for row in seed:
        by_query.setdefault((row["video_id"], row["query"]), []).append(
            frames_to_seconds(row["start_frame"], row["end_frame"], fps))
    some_twice = False
    for row in _rows(synth_dir / "train.jsonl") + _rows(synth_dir / "val.jsonl"):
        windows = by_query[(row["vid"] + ".mp4", row["query"])]
        assert [list(w) for w in windows] == row["relevant_windows"]
        some_twice |= len(windows) > 1
        assert all(0 <= s < e <= row["duration"] + 1e-9 for s, e in windows)
        fractions = clip_relevance(windows, row["duration"])
        assert row["relevant_clip_ids"] == [c for c, f in enumerate(fractions) if f > 0]
        assert all(len(s) == 3 and all(1 <= v <= 4 for v in s) for s in row["saliency_scores"])
    # 12 queries at P(twice) = 0.25: with this seed at least one happens twice.
    assert some_twice


def test_videos_are_h264_with_a_keyframe_every_second(synth_dir):
    for path in (synth_dir / "videos").glob("*.mp4"):
        decoder = VideoDecoder(str(path))
        assert decoder.metadata.codec == "h264"
        assert decoder.metadata.average_fps == TINY["fps"]
        times = keyframe_times(path) + [decoder.metadata.duration_seconds]
        assert max(b - a for a, b in pairwise(times)) <= 1.0 + 1e-6


def test_same_seed_gives_identical_files_and_frames(synth_dir, tmp_path):
    again = tmp_path / "again"
    synthesize(again, **TINY, progress=False)
    for name in ("annotations.json", "train.jsonl", "val.jsonl"):
        assert (again / name).read_bytes() == (synth_dir / name).read_bytes()
    for path in (synth_dir / "videos").glob("*.mp4"):
        a = VideoDecoder(str(path)).get_frames_in_range(0, 10**6).data
        b = VideoDecoder(str(again / "videos" / path.name)).get_frames_in_range(0, 10**6).data
        assert torch.equal(a, b)


def test_other_seed_gives_other_data(synth_dir, tmp_path):
    other = tmp_path / "other"
    synthesize(other, **{**TINY, "seed": 8}, progress=False)
    assert (other / "annotations.json").read_bytes() != (synth_dir / "annotations.json").read_bytes()


def test_an_event_is_drawn_exactly_during_its_window():
    # One red circle moving right during frames 10..19 of 30: its colour is on screen then only.
    event = Event("red", "circle", "moves right", first=10, last=19, x=0.2, y=0.5)
    frames = render_video([event], n_frames=30, fps=10.0, size=48, tint=np.zeros(3))
    red = torch.tensor(COLOURS["red"]).view(1, 3, 1, 1)
    on = (frames.int() - red).abs().sum(1).lt(30).flatten(1).sum(1)  # red pixels per frame
    assert on[10:20].min() > 20 and on[:10].max() == 0 and on[20:].max() == 0
    # It moves right: the red pixels' mean column grows over the window.
    cols = [(frames[i].int() - red[0]).abs().sum(0).lt(30).nonzero()[:, 1].float().mean() for i in (10, 19)]
    assert cols[1] - cols[0] > 0.3 * 48


def test_blinking_is_visible_at_low_sampling_rates():
    event = Event("blue", "square", "blinks", first=0, last=59, x=0.5, y=0.5)
    frames = render_video([event], n_frames=60, fps=10.0, size=32, tint=np.zeros(3))
    blue = torch.tensor(COLOURS["blue"]).view(1, 3, 1, 1)
    visible = (frames.int() - blue).abs().sum(1).lt(30).flatten(1).any(1)
    for step in (5, 10):  # sampled at 2 fps and at 1 fps, both states appear
        assert visible[::step].any() and not visible[::step].all()


def test_cli_bad_values_are_one_line_errors(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--videos", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--videos" in err
    assert main(["synth", "--out", str(tmp_path), "--queries-per-video", "999"]) == 2
    assert "--queries-per-video" in capsys.readouterr().err


def test_durations_respect_bounds(synth_dir):
    for row in _rows(synth_dir / "train.jsonl"):
        assert TINY["min_duration"] - 0.2 <= row["duration"] <= TINY["max_duration"] + 0.2
        assert math.isclose(row["duration"] * TINY["fps"], round(row["duration"] * TINY["fps"]))


def test_told_apart_by_names_the_only_differing_attribute(synth_dir):
    from vmr.synth import told_apart_by

    red_circle_grows = ("red", "circle", "grows")
    assert told_apart_by(red_circle_grows, []) == "alone"
    assert told_apart_by(red_circle_grows, [("blue", "square", "grows")]) == "several"
    assert told_apart_by(red_circle_grows, [("blue", "circle", "grows")]) == "colour"
    # Two close neighbours: the action is reported first (it is the hardest to see).
    assert told_apart_by(red_circle_grows, [("red", "square", "grows"), ("red", "circle", "blinks")]) == "action"
    # Written into the annotations, consistent with each video's own queries.
    rows = _rows(synth_dir / "train.jsonl") + _rows(synth_dir / "val.jsonl")
    by_video: dict[str, list[tuple[str, ...]]] = {}
    for row in rows:
        words = row["query"].split()  # "a <colour> <shape> <action...>"
        by_video.setdefault(row["vid"], []).append((words[1], words[2], " ".join(words[3:])))
    for row in rows:
        words = row["query"].split()
        mine = (words[1], words[2], " ".join(words[3:]))
        assert row["told_apart_by"] == told_apart_by(mine, [t for t in by_video[row["vid"]] if t != mine])


def test_synth_writes_over_its_own_output_and_nothing_else(synth_dir, tmp_path, capsys):
    small = ["--videos", "2", "--queries-per-video", "2", "--min-duration", "6", "--max-duration", "7",
             "--fps", "5", "--size", "32"]
    # A user's file in the folder (or a user's video in its videos/) is never written over.
    for name in ("notes.txt", "xtrain.jsonl", "videos/synthetic_holiday.mp4"):
        mine = tmp_path / name.replace("/", "-")
        (mine / name).parent.mkdir(parents=True)
        (mine / name).write_text("keep")
        assert main(["synth", "--out", str(mine), *small]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and name in err and "did not write" in err
        assert (mine / name).read_text() == "keep"
        assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == sorted({name, *name.split("/")[:-1]})
    # Its own earlier output is replaced whole: a smaller set leaves none of the larger one's videos.
    again = tmp_path / "again"
    shutil.copytree(synth_dir, again)
    assert main(["synth", "--out", str(again), *small]) == 0
    named = {f"{row['vid']}.mp4" for split in ("train", "val") for row in _rows(again / f"{split}.jsonl")}
    assert {p.name for p in (again / "videos").iterdir()} == named and len(named) == 2
