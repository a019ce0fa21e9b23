import json
from itertools import pairwise
from pathlib import Path

import pytest
import webdataset as wds

from vmr.cli import main
from vmr.data.shards import build_shards, read_manifest
from vmr.data.tars import ShardWriter, iter_shard
from vmr.data.video import keyframe_times


def _samples(out: Path) -> dict:
    """video_id -> metadata of every sample in every shard of a folder."""
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for key, video, meta in iter_shard(tar):
            assert "." not in key and video
            found[meta["video_id"]] = meta
    return found


def _qvh_rows(synth: Path) -> list[dict]:
    return [json.loads(line) for name in ("train.jsonl", "val.jsonl")
            for line in (synth / name).read_text().splitlines()]


def test_qvhighlights_build_one_sample_per_video(synth_dir, tmp_path, capsys):
    out = tmp_path / "shards"
    code = main(["shards", "build", "--videos", str(synth_dir / "videos"), "--annotations",
                 str(synth_dir / "train.jsonl"), str(synth_dir / "val.jsonl"), "--out", str(out)])
    assert code == 0
    assert "4 videos, 12 queries" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["splits"]["train"]["samples"] == 4 and manifest["skipped"] == []
    samples = _samples(out)
    rows = _qvh_rows(synth_dir)
    assert set(samples) == {r["vid"] for r in rows}  # the real ids, dots included
    by_qid = {q["qid"]: q for meta in samples.values() for q in meta["queries"]}
    for row in rows:
        assert by_qid[row["qid"]]["windows"] == row["relevant_windows"]
        assert by_qid[row["qid"]]["saliency"]["clip_ids"] == row["relevant_clip_ids"]
        # Fields beyond the schema (tags) travel with the query, for `vmr eval --group-by`.
        assert by_qid[row["qid"]]["tags"] == {"told_apart_by": row["told_apart_by"]}
    meta = next(iter(samples.values()))
    assert {"duration", "fps", "num_frames", "width", "height"} <= set(meta)
    # Without re-encode options the bytes are the source file's.
    tar = out / "train-000000.tar"
    first = next(iter(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)))
    vid = json.loads(first["json"])["video_id"]
    assert first["mp4"] == (synth_dir / "videos" / f"{vid}.mp4").read_bytes()


def test_seed_frames_become_seconds_with_the_real_fps(synth_dir, tmp_path):
    build_shards(synth_dir / "videos", [synth_dir / "annotations.json"], tmp_path, progress=False)
    seed_windows = {(m["video_id"], q["query"]): q["windows"]
                    for m in _samples(tmp_path).values() for q in m["queries"]}
    expected = {(r["vid"], r["query"]): r["relevant_windows"] for r in _qvh_rows(synth_dir)}
    assert seed_windows == expected


def test_charades_build(synth_dir, tmp_path):
    lines = [f"{r['vid']} {r['relevant_windows'][0][0]} {r['relevant_windows'][0][1]}##{r['query']}"
             for r in _qvh_rows(synth_dir)]
    annotations = tmp_path / "charades_sta_test.txt"
    annotations.write_text("\n".join(lines) + "\n")
    result = build_shards(synth_dir / "videos", [annotations], tmp_path / "out", split="test", progress=False)
    assert (result["samples"], result["queries"]) == (4, 12)
    assert (tmp_path / "out" / "test-000000.tar").is_file()


def test_bad_inputs_are_skipped_and_everything_valid_is_written(synth_copy, tmp_path, capsys):
    videos = synth_copy / "videos"
    (videos / "empty.mp4").write_bytes(b"")
    good = (videos / "synth_0000.mp4").read_bytes()
    (videos / "trunc.mp4").write_bytes(good[: len(good) // 2])
    (videos / "text.mp4").write_text("this is not a video\n")
    real = _qvh_rows(synth_copy)
    vid = real[0]["vid"]
    bad_rows = [
        {"qid": 100, "query": "q", "vid": "empty", "relevant_windows": [[0, 1]]},
        {"qid": 101, "query": "q", "vid": "trunc", "relevant_windows": [[0, 1]]},
        {"qid": 102, "query": "q", "vid": "text", "relevant_windows": [[0, 1]]},
        {"qid": 103, "query": "q", "vid": "ghost", "relevant_windows": [[0, 1]]},
        {"qid": 104, "query": "  ", "vid": vid, "relevant_windows": [[0, 1]]},
        {"qid": 105, "query": "q", "vid": vid, "relevant_windows": [[3, 2]]},
        {"qid": 106, "query": "q", "vid": vid, "relevant_windows": [[100, 120]]},
        {**real[1], "query": "a copy with the same qid"},
    ]
    annotations = tmp_path / "all.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in real + bad_rows))
    out = tmp_path / "shards"
    argv = ["shards", "build", "--videos", str(videos), "--annotations", str(annotations), "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "4 videos, 12 queries" in captured.out and "skipped 4 video(s) and 4 query(ies)" in captured.out
    skipped = read_manifest(out)["skipped"]
    reasons = {(s["video_id"], s.get("qid")): s["reason"] for s in skipped}
    assert "corrupt" in reasons[("empty", None)]
    assert "corrupt" in reasons[("trunc", None)]
    assert "corrupt" in reasons[("text", None)]
    assert "not found" in reasons[("ghost", None)]
    assert "empty query" in reasons[(vid, 104)]
    assert "end <= start" in reasons[(vid, 105)]
    assert "outside the video" in reasons[(vid, 106)]
    assert "duplicate qid" in reasons[(real[1]["vid"], real[1]["qid"])]
    assert all(s["split"] == "train" for s in skipped)
    assert len(_samples(out)) == 4

    # --strict: the same build writes the same shards, then exits non-zero with one line.
    assert main([*argv, "--overwrite", "--strict"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("vmr shards: error: --strict: 8 item(s) skipped")
    assert len(_samples(out)) == 4


def test_output_does_not_depend_on_workers_and_reencode_applies(synth_dir, tmp_path):
    args = dict(fps=2.0, size=16, keyframe_interval=1.0, max_videos_per_shard=2, progress=False)
    annotations = [synth_dir / "train.jsonl", synth_dir / "val.jsonl"]
    one = build_shards(synth_dir / "videos", annotations, tmp_path / "w1", workers=1, **args)
    two = build_shards(synth_dir / "videos", annotations, tmp_path / "w2", workers=2, **args)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert len(one["shards"]) == 2
    assert not list((tmp_path / "w2").glob(".*")), "no temporary files left behind"
    for meta in _samples(tmp_path / "w1").values():
        assert meta["fps"] == 2.0 and min(meta["width"], meta["height"]) == 16
    tar = tmp_path / "w1" / "train-000000.tar"
    key, video, meta = next(iter_shard(tar))
    times = keyframe_times(video) + [meta["duration"]]
    assert max(b - a for a, b in pairwise(times)) <= 1.0 + 1e-6


def test_keyframe_interval_zero_makes_every_frame_a_keyframe(synth_dir, tmp_path):
    build_shards(synth_dir / "videos", [synth_dir / "val.jsonl"], tmp_path, size=16, fps=2.0,
                 keyframe_interval=0, progress=False)
    key, video, meta = next(iter_shard(tmp_path / "train-000000.tar"))
    assert len(keyframe_times(video)) == meta["num_frames"]


def test_existing_split_needs_overwrite_and_splits_accumulate(synth_dir, tmp_path, capsys):
    base = ["shards", "build", "--videos", str(synth_dir / "videos"), "--out", str(tmp_path)]
    assert main([*base, "--annotations", str(synth_dir / "train.jsonl"), "--max-videos-per-shard", "1"]) == 0
    assert len(list(tmp_path.glob("train-*.tar"))) == 3
    assert main([*base, "--annotations", str(synth_dir / "train.jsonl")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*base, "--annotations", str(synth_dir / "train.jsonl"), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar"]  # stale ones gone
    assert main([*base, "--annotations", str(synth_dir / "val.jsonl"), "--split", "val"]) == 0
    manifest = read_manifest(tmp_path)
    assert set(manifest["splits"]) == {"train", "val"}
    assert manifest["splits"]["train"]["samples"] == 3 and manifest["splits"]["val"]["samples"] == 1


def test_an_interrupted_shard_never_gets_its_final_name(synth_dir, tmp_path):
    writer = ShardWriter(tmp_path, "train", max_bytes=1 << 30, max_videos=None)
    meta = {"video_id": "v", "queries": [{"qid": 1}]}
    writer.write("v", {"mp4": (synth_dir / "videos" / "synth_0000.mp4").read_bytes()}, meta)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def built(synth_dir, tmp_path) -> Path:
    out = tmp_path / "shards"
    build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], out, max_videos_per_shard=2, progress=False)
    return out


def test_verify_passes_on_a_good_build(built, capsys):
    assert main(["shards", "verify", str(built)]) == 0
    assert "ok: 2 shard(s), 3 videos, 9 queries" in capsys.readouterr().out


def test_verify_catches_a_flipped_byte(built, capsys):
    shard = built / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["shards", "verify", str(built)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar" in err and "sha256" in err
    assert "train-000000.tar" not in err


def test_verify_catches_a_missing_shard(built, capsys):
    (built / "train-000000.tar").unlink()
    assert main(["shards", "verify", str(built)]) == 1
    assert "train-000000.tar: shard listed in the manifest is missing" in capsys.readouterr().err


def test_verify_names_the_key_of_an_undecodable_video(built, synth_dir, capsys):
    # Rewrite one shard with a sample whose video bytes are garbage, and a manifest that matches
    # its new hash, so only the decode check can catch it.
    shard = built / "train-000000.tar"
    samples = list(iter_shard(shard))
    with open(shard, "wb") as f:
        writer = wds.TarWriter(f, mtime=0)
        for i, (key, video, meta) in enumerate(samples):
            writer.write({"__key__": key, "mp4": b"\x00" * 500 if i == 1 else video, "json": json.dumps(meta)})
        writer.close()
    manifest = read_manifest(built)
    import hashlib
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (built / "manifest.json").write_text(json.dumps(manifest))
    assert main(["shards", "verify", str(built)]) == 1
    err = capsys.readouterr().err
    assert f"key {samples[1][0]}: cannot decode" in err


def test_verify_without_manifest_is_a_one_line_error(tmp_path, capsys):
    assert main(["shards", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "manifest.json" in err
