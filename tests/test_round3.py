"""Reliability, round 3, mechanism by mechanism, each on several surfaces: nothing non-finite is
written (JSON writers, stored arrays, a bundle whose pixels would all become NaN); evaluation edge
cases of the ground truth; OSErrors about a user's path are one line; launcher variables choose
parts or join processes only when a launcher really set them."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmr.bundle import read_bundle
from vmr.cli import main
from vmr.data.tars import npy_bytes, npz_bytes
from vmr.errors import UserError
from vmr.eval.metrics import evaluate
from vmr.io import absent_when_not_finite, json_text
from vmr.runtime import check_launch_environment

from .test_hardening import one_line_error
from .test_reliability import BIN, SMALL, TINY
from .test_sampling import ffmpeg


def strict_json(text: str):
    """JSON as a strict reader takes it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise AssertionError(f"{constant} in the output")

    return json.loads(text, parse_constant=refuse)


# ----- 6. nothing non-finite is written ---------------------------------------------------------------


@pytest.mark.parametrize("value, where", [
    ({"a": [1.0, float("nan")]}, "a[1]"),
    ({"splits": {"train": {"duration": float("inf")}}}, "splits.train.duration"),
    ([{"score": -math.inf}], "[0].score"),
])
def test_the_json_writer_refuses_non_finite_numbers_naming_the_key(value, where):
    with pytest.raises(UserError) as refused:
        json_text(value, "out.json")
    assert str(refused.value).startswith(f"out.json: not written: {where} is")
    clean, absent = absent_when_not_finite(value)
    assert absent and strict_json(json.dumps(clean)) == clean


def test_stored_arrays_are_finite_or_not_written():
    with pytest.raises(UserError, match="v1: tokens.npy: not written: it holds NaN"):
        npy_bytes(np.array([[1.0, np.nan]], dtype=np.float32), "v1: tokens.npy")
    with pytest.raises(UserError, match="infinite"):  # float16 overflows to inf: refused too
        npy_bytes(np.array([7e4], dtype=np.float32).astype(np.float16))
    with pytest.raises(UserError, match="text.npz: 3"):
        npz_bytes({"3": np.array([np.inf])}, "text.npz")
    assert np.load(__import__("io").BytesIO(npy_bytes(np.arange(3)))).tolist() == [0, 1, 2]


def test_a_metric_over_no_ground_truth_is_written_as_absent_not_nan(tmp_path, capsys):
    # Every moment is short (< 10 s): the middle and long ranges have no ground truth.
    truth = [{"qid": q, "query": "x", "vid": f"v{q}", "duration": 30, "relevant_windows": [[2, 6]]} for q in (1, 2)]
    preds = [{"qid": q, "query": "x", "vid": f"v{q}", "pred_relevant_windows": [[2, 6, 1.0]]} for q in (1, 2)]
    (tmp_path / "gt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    out = tmp_path / "metrics.json"
    assert main(["eval", "--predictions", str(tmp_path / "p.jsonl"), "--ground-truth", str(tmp_path / "gt.jsonl"),
                 "--json", str(out)]) == 0
    metrics = strict_json(out.read_text())
    assert metrics["brief"]["MR-long-mAP"] is None and metrics["brief"]["MR-full-mAP"] == 100.0
    assert "brief.MR-long-mAP" in metrics["absent"]
    assert "written as null" in capsys.readouterr().err


def test_a_bundle_whose_pixels_would_become_nan_is_refused(bundle, tmp_path, synth_dir, capsys):
    import shutil

    broken = Path(shutil.copytree(bundle, tmp_path / "b"))
    config = broken / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "image_std": [0.0, 0.0, 0.0]}))
    with pytest.raises(UserError, match="image_std must be 3 finite numbers above 0"):
        read_bundle(broken)
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    code = main(["predict", "--checkpoint", str(broken), "--video", str(video), "--query", "a red circle"])
    one_line_error(capsys, code, "image_std")
    code = main(["index", "--checkpoint", str(broken), "--videos", str(synth_dir / "videos"), "--out",
                 str(tmp_path / "index")])
    one_line_error(capsys, code, "image_std")
    assert not (tmp_path / "index" / "index.json").exists()


# ----- 7. evaluation edge cases -----------------------------------------------------------------------


def qvh_row(qid, clips, scores):
    return {"qid": qid, "query": "x", "vid": f"v{qid}", "duration": 10, "relevant_windows": [[0, 4]],
            "relevant_clip_ids": clips, "saliency_scores": scores}


def test_highlights_with_other_rater_counts_and_no_relevant_clip_score_finite_numbers():
    preds = [{"qid": q, "pred_relevant_windows": [[0, 4, 1.0]], "pred_saliency_scores": [0.9, 0.8, 0.1, 0.1, 0.1]}
             for q in (1, 2, 3)]
    one_rater = evaluate(preds, [qvh_row(1, [0, 1], [[4], [3]]), qvh_row(2, [0, 1], [[4], [3]]),
                                 qvh_row(3, [0, 1], [[4], [3]])])[0]
    three = evaluate(preds, [qvh_row(q, [0, 1], [[4, 4, 4], [3, 3, 3]]) for q in (1, 2, 3)])[0]
    # One rater who agrees with three identical raters: the same figures.
    highlights = [key for key in three["brief"] if key.startswith("HL-")]
    assert [one_rater["brief"][k] for k in highlights] == [three["brief"][k] for k in highlights]
    assert len(highlights) == 6 and three["brief"]["HL-min-VeryGood-mAP"] == 100.0
    empty = evaluate(preds[:1], [qvh_row(1, [], [])])[0]  # nothing relevant: every clip is 0
    assert empty["brief"]["HL-min-Fair-mAP"] == 0.0 and empty["brief"]["HL-min-Fair-Hit1"] == 0.0


@pytest.mark.parametrize("protocol", ["tvsum", "youtube_highlights"])
def test_a_missing_highlight_prediction_scores_as_empty(protocol, tmp_path, capsys):
    label = [[5, 5], [1, 1], [1, 1], [1, 1], [1, 1], [1, 1]]  # the first clip is the highlight
    truth = [{"qid": q, "vid": f"v{q}", "domain": "d", "label": label} for q in (1, 2)]
    given = [{"qid": 1, "pred_saliency_scores": [0.9, 0.1, 0.1, 0.1, 0.1, 0.1]}]
    metrics, missing = evaluate(given, truth, protocol, allow_missing=True)
    assert missing == 1
    assert metrics["brief"]["HL-mAP"] == 50.0  # the found one 100, the missing one 0 (not its clip order's 100)


# ----- 8. OSErrors about a user's path: one line ---------------------------------------------------------


def test_out_naming_an_existing_file_is_one_line(bundle, shards_or_videos, tmp_path, capsys):
    videos, shards = shards_or_videos
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for args in (["index", "--checkpoint", str(bundle), "--videos", str(videos), "--out", str(taken)],
                 ["features", "extract", "--config", str(TINY), "--shards", str(shards), "--out", str(taken), *SMALL]):
        one_line_error(capsys, main(args), str(taken))
        assert taken.read_text() == "mine"


@pytest.fixture
def shards_or_videos(synth_dir, shard_dir):
    return synth_dir / "videos", shard_dir


def test_a_video_id_too_long_for_the_file_system_skips_its_row(synth_copy, tmp_path, capsys):
    rows = [json.loads(line) for line in (synth_copy / "train.jsonl").read_text().splitlines()]
    rows.append({**rows[0], "qid": 999, "vid": "v" * 300})
    (synth_copy / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    assert main(["shards", "build", "--videos", str(synth_copy / "videos"), "--annotations",
                 str(synth_copy / "train.jsonl"), "--out", str(out), "--split", "train"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["queries"] == len(rows) - 1
    assert any("v" * 50 in json.dumps(skip) for skip in manifest["skipped"])


# ----- launcher variables ---------------------------------------------------------------------------------


def test_stray_launcher_variables_stop_at_once_in_one_line():
    check_launch_environment({})
    check_launch_environment({"RANK": "0", "WORLD_SIZE": "1"})  # one process: fine
    check_launch_environment({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(UserError, match="without MASTER_ADDR, MASTER_PORT"):
        check_launch_environment({"RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="not numbers"):
        check_launch_environment({"RANK": "a", "WORLD_SIZE": "2"})


@pytest.mark.slow
def test_a_command_under_stray_rank_variables_exits_at_once(shard_dir, bundle, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(RANK="1", WORLD_SIZE="2")
    done = subprocess.run([str(BIN / "vmr"), "eval", "--checkpoint", str(bundle), "--shards", str(shard_dir)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "MASTER_ADDR" in done.stderr.strip().splitlines()[-1]


# ----- 4. reads checked against what wrote them ---------------------------------------------------------


@pytest.fixture(scope="module")
def index(bundle, synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(synth_dir / "videos"), "--out", str(out),
                 "--videos-per-part", "2"]) == 0
    return out


def search(folder: Path) -> int:
    return main(["search", "--index", str(folder), "--query", "a red circle"])


def damaged_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(skipped=[1]), "'skipped[0]' must be an object"),
    (lambda m: m.update(params=5), "'params' must be dict"),
    (lambda m: m["extractor"]["sampling"].update(colour="red"), "unknown key 'colour'"),
    (lambda m: m["extractor"].update(width="64"), "'width' must be int"),
])
def test_a_damaged_index_manifest_is_one_line(index, tmp_path, capsys, change, needle):
    import shutil

    copy = Path(shutil.copytree(index, tmp_path / "index"))
    damaged_manifest(copy, change)
    one_line_error(capsys, search(copy), needle)


def test_a_shard_copied_in_from_elsewhere_or_another_width_is_refused(index, tmp_path, capsys):
    import shutil

    copy = Path(shutil.copytree(index, tmp_path / "index"))
    shards = sorted(copy.glob("*.tar"))
    assert len(shards) >= 2
    shutil.copy(shards[1], shards[0])  # another part's shard under this one's name
    one_line_error(capsys, search(copy), shards[0].name, "listed in")
    copy = Path(shutil.copytree(index, tmp_path / "wider"))
    damaged_manifest(copy, lambda m: m["extractor"].update(width=m["extractor"]["width"] * 2))
    one_line_error(capsys, search(copy))


def test_a_sample_with_a_nan_duration_is_listed_not_silently_empty(index, tmp_path, capsys):
    import io
    import shutil
    import tarfile

    copy = Path(shutil.copytree(index, tmp_path / "index"))
    first = sorted(copy.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name.endswith(".json"):
                data = json.dumps({**json.loads(data), "duration": float("nan")}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    from vmr.data.tars import sha256_of

    def rerecord(manifest):  # the shard as the index recorded it: only the sample is wrong
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["path"] == first.name:
                    shard.update(bytes=first.stat().st_size, sha256=sha256_of(first))

    damaged_manifest(copy, rerecord)
    assert search(copy) == 0
    out = capsys.readouterr()
    strict_json(out.out)
    assert "unreadable video(s) left out" in out.err and "'duration' must be a positive number" in out.err


# ----- 1. nothing read or served from outside its folder ---------------------------------------------


def test_links_leading_outside_a_videos_folder_are_not_followed_unless_asked(bundle, synth_dir, tmp_path, capsys):
    from vmr.search import index_videos, read_index

    videos = tmp_path / "videos"
    videos.mkdir()
    originals = sorted((synth_dir / "videos").glob("*.mp4"))
    (videos / originals[0].name).write_bytes(originals[0].read_bytes())
    (videos / "elsewhere.mp4").symlink_to(originals[1])  # leads outside
    out = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(videos), "--out", str(out)]) == 0
    assert list(index_videos(read_index(out)).values()) == [videos / originals[0].name]
    assert json.loads((out / "manifest.json").read_text())["splits"]["videos"]["samples"] == 1
    followed = tmp_path / "followed"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(videos), "--out", str(followed),
                 "--follow-links"]) == 0
    assert sorted(p.name for p in index_videos(read_index(followed)).values()) == sorted([originals[0].name,
                                                                                         "elsewhere.mp4"])
    # The demo plays what index_videos lists: an index.json pointed at another folder serves no
    # file there but video files, and never one through a link leading out of it.
    record = {**read_index(out), "videos": "/etc"}
    assert all(p.suffix == ".mp4" for p in index_videos(record).values())


def test_shards_build_skips_a_video_that_is_a_link_leading_outside(synth_copy, tmp_path, capsys):
    first = sorted((synth_copy / "videos").glob("*.mp4"))[0]
    outside = tmp_path / "outside.mp4"
    first.rename(outside)
    first.symlink_to(outside)
    out = tmp_path / "shards"
    args = ["shards", "build", "--videos", str(synth_copy / "videos"), "--annotations", str(synth_copy / "train.jsonl"),
            "--out", str(out), "--split", "train"]
    assert main(args) == 0
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert any(first.stem == s.get("video_id") and "link leading outside" in s["reason"] for s in skipped), skipped
    assert main([*args, "--follow-links", "--overwrite"]) == 0
    assert not any(first.stem == s.get("video_id") for s in json.loads((out / "manifest.json").read_text())["skipped"])


# ----- 2. work known by its content, not its name -----------------------------------------------------------


def test_an_index_redoes_a_part_whose_videos_changed_under_the_same_names(bundle, synth_dir, tmp_path, capsys):
    from vmr.bundle import load_model
    from vmr.search import Index

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    originals = sorted((synth_dir / "videos").glob("*.mp4"))
    (a / "clip.mp4").write_bytes(originals[0].read_bytes())
    (b / "clip.mp4").write_bytes(originals[1].read_bytes())  # another video, the same name
    out = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(a), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(b), "--out", str(out)]) == 0
    assert "made from other sources" in capsys.readouterr().err
    from vmr.data.video import probe

    model, _ = load_model(bundle)
    opened = Index.open(out, model)
    assert len(opened) == 1
    video = opened.load(0)
    assert video.duration == pytest.approx(probe(originals[1]).duration)


def test_two_shards_of_one_name_are_refused_not_taken_as_done(shard_dir, bundle, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    other.mkdir()
    first = sorted(shard_dir.glob("train-*.tar"))[0]
    shutil.copy(sorted(shard_dir.glob("train-*.tar"))[1], other / first.name)
    for args in (["index", "--checkpoint", str(bundle)],
                 ["features", "extract", "--config", str(TINY), *SMALL]):
        code = main([*args, "--shards", str(first), str(other / first.name), "--out", str(tmp_path / "out")])
        one_line_error(capsys, code, "share the name", first.name)


def test_parts_built_from_different_annotation_files_do_not_merge(synth_copy, tmp_path, capsys):
    rows = (synth_copy / "train.jsonl").read_text().splitlines()
    (synth_copy / "fewer.jsonl").write_text("\n".join(rows[:-3]) + "\n")
    out = tmp_path / "shards"
    common = ["shards", "build", "--videos", str(synth_copy / "videos"), "--out", str(out), "--split", "train"]
    assert main([*common, "--annotations", str(synth_copy / "train.jsonl"), "--part", "0/2"]) == 0
    code = main([*common, "--annotations", str(synth_copy / "fewer.jsonl"), "--part", "1/2"])
    one_line_error(capsys, code, "annotations (their contents)", "nothing merged")
    assert not (out / "manifest.json").exists()


# ----- 3. a rebuild never breaks what is already whole -----------------------------------------------------


PART_SETTINGS = dict(fps=2.0, size=16, keyframe_interval=0, max_videos_per_shard=1, progress=False)


def whole_split(folder: Path, split: str = "train") -> None:
    """Every shard the manifest lists is there with its recorded size and sha256."""
    from vmr.data.tars import shard_damage

    for shard in json.loads((folder / "manifest.json").read_text())["splits"][split]["shards"]:
        assert shard_damage(folder, shard) is None, shard["path"]


def test_a_new_division_leaves_the_merged_split_whole_until_it_is_merged(synth_dir, tmp_path, capsys):
    from vmr.data.shards import build_shards
    from vmr.data.sources import expand_shards

    annotations = [synth_dir / "train.jsonl", synth_dir / "val.jsonl"]
    for index in range(2):
        build_shards(synth_dir / "videos", annotations, tmp_path, part=(index, 2), **PART_SETTINGS)
    merged = json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]
    build_shards(synth_dir / "videos", annotations, tmp_path, part=(0, 3), **PART_SETTINGS)  # another division
    assert json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"] == merged
    whole_split(tmp_path)
    # A glob over the folder reads the committed split only, not the new part's shards beside it.
    listed = sorted(str(tmp_path / s["path"]) for s in merged["shards"])
    assert sorted(expand_shards(str(tmp_path / "train-*.tar"))) == listed
    assert "not listed in their folder's manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_part_rebuild_leaves_the_split_whole(synth_dir, tmp_path):
    import signal
    import time

    from vmr.data.shards import build_shards

    annotations = [synth_dir / "train.jsonl", synth_dir / "val.jsonl"]
    for index in range(2):
        build_shards(synth_dir / "videos", annotations, tmp_path, part=(index, 2), **PART_SETTINGS)
    before = (tmp_path / "manifest.json").read_text()
    command = [str(BIN / "vmr"), "shards", "build", "--videos", str(synth_dir / "videos"), "--annotations",
               *map(str, annotations), "--out", str(tmp_path), "--fps", "5", "--size", "32", "--keyframe-interval",
               "0", "--max-videos-per-shard", "1", "--part", "0/2", "--overwrite"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".vmr-build-train-p0000/*.tar")):
        assert proc.poll() is None, "the part ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code, err = proc.wait(timeout=60), proc.stderr.read()
    assert code in (130, 2) and "Traceback" not in err, err[-1500:]  # interrupted (or stopped in one line)
    assert (tmp_path / "manifest.json").read_text() == before
    whole_split(tmp_path)


def test_an_evaluation_that_reads_fewer_queries_than_promised_says_so(shard_dir, bundle, tmp_path, capsys):
    import shutil
    import tarfile

    shards = Path(shutil.copytree(shard_dir, tmp_path / "shards"))
    target = sorted(shards.glob("train-*.tar"))[0]
    with tarfile.open(target, "w"):  # the shard, emptied of its sample (as a bad copy would leave it)
        pass
    code = main(["eval", "--checkpoint", str(bundle), "--shards", str(shards / "train-*.tar")])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    assert "the shards' manifest lists" in err and "were read and scored" in err


# ----- 5. work planned from what the stream holds, not from its container's promises -----------------------


@pytest.fixture(scope="module")
def odd_videos(tmp_path_factory) -> Path:
    """far.mp4: 2 frames, the second at 100,000 s (2.8 kB); short.avi: MJPEG in AVI whose index
    promises 10 frames, of which the last does not decode."""
    folder = tmp_path_factory.mktemp("odd")
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x64:r=1", "-frames:v", "2", "-vf", "setpts='if(eq(N,1),100000/TB,PTS)'",
           "-fps_mode", "passthrough", "-c:v", "libx264", str(folder / "far.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x64:r=5", "-t", "2", "-c:v", "mjpeg", str(folder / "whole.avi"))
    data = bytearray((folder / "whole.avi").read_bytes())
    last = data.rfind(b"\xff\xd8\xff")  # the last JPEG frame, wiped
    data[last:last + 400] = bytes(400)
    (folder / "short.avi").write_bytes(bytes(data))
    (folder / "whole.avi").unlink()
    return folder


def test_a_container_promising_a_frame_that_does_not_decode_is_read_as_what_decodes(odd_videos):
    from vmr.data.video import probe

    info = probe(odd_videos / "short.avi")
    assert info.num_frames == 9 and info.duration == pytest.approx(1.8)


def test_frames_are_planned_from_what_the_stream_holds(odd_videos, bundle, tmp_path, capsys):
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(bundle), "--video", str(odd_videos / "far.mp4"),
                 "--query", "a red circle"]) == 0
    answer = strict_json(capsys.readouterr().out)
    assert 1 <= len(answer["frame_times"]) <= 2
    out = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(odd_videos), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["videos"]["samples"] == 2 and not manifest["skipped"]  # the AVI is read, not skipped
    assert sum(s["bytes"] for s in manifest["splits"]["videos"]["shards"]) < 1_000_000
