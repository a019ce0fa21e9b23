"""The other standard benchmarks: ActivityNet Captions and TACoS in their own release layouts, the
highlight-detection JSONL of TVSum and YouTube Highlights, their protocols against naive
references written from the papers' definitions, and a few training steps on each preset."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vmr.cli import main
from vmr.config import load_config
from vmr.data.annotations import check_query, detect_format, read_annotations
from vmr.errors import UserError
from vmr.eval.metrics import BadInput, brief_keys, evaluate
from vmr.spans import iou

ROOT = Path(__file__).parents[1]
TACOS_FPS = 29.4  # TACoS's own rate: frame numbers are not whole seconds


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ----- readers ------------------------------------------------------------------------------------


def test_activitynet_captions_layout(tmp_path):
    path = write(tmp_path / "val_1.json", json.dumps({
        "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 84.2]],
                          "sentences": ["A young woman is seen standing.", " She then dances.", "She ends."]},
        "v_broken": {"duration": 10.0, "timestamps": [[0, 1]], "sentences": ["one", "two"]},
        "v_badstamp": {"duration": 10.0, "timestamps": [[0, 1], "soon"], "sentences": ["fine", "not fine"]},
    }))
    assert detect_format(path) == "activitynet"
    records, skips = read_annotations(path)
    assert [(r.qid, r.video_id, r.moments) for r in records] == [
        ("v_QOlSCBRmfWY_0", "v_QOlSCBRmfWY", [(0.83, 19.86)]),
        ("v_QOlSCBRmfWY_1", "v_QOlSCBRmfWY", [(17.37, 60.81)]),
        ("v_QOlSCBRmfWY_2", "v_QOlSCBRmfWY", [(56.26, 82.73)]),  # cut to the annotated duration
        ("v_badstamp_0", "v_badstamp", [(0.0, 1.0)]),
    ]
    assert all(r.unit == "seconds" and check_query(r) is None for r in records)
    reasons = {s.video_id: s.reason for s in skips}
    assert "v_broken" in reasons and "same length" in reasons["v_broken"]
    assert "val_1.json: video v_badstamp sentence 1" in reasons["v_badstamp"]


def test_tacos_frames_become_seconds_with_the_files_own_fps(tmp_path):
    path = write(tmp_path / "test.json", json.dumps({
        "s30-d52.avi": {"timestamps": [[141, 354], [7000, 7400]], "sentences": ["He takes out a knife.", "He washes"],
                        "fps": TACOS_FPS, "num_frames": 7346},
        "s13-d21.avi": {"timestamps": [[10, 20]], "sentences": ["x"], "fps": 0, "num_frames": 100},
    }))
    assert detect_format(path) == "tacos"
    records, skips = read_annotations(path)
    assert [(r.qid, r.video_id, r.video_file) for r in records] == [
        ("s30-d52_0", "s30-d52", "s30-d52.avi"), ("s30-d52_1", "s30-d52", "s30-d52.avi")]
    (start, end), = records[0].moments
    assert math.isclose(start, 141 / TACOS_FPS) and math.isclose(end, 354 / TACOS_FPS)
    assert math.isclose(records[1].moments[0][1], 7346 / TACOS_FPS), "an end past num_frames is cut to it"
    assert len(skips) == 1 and "s13-d21.avi" in skips[0].reason and "fps must be positive" in skips[0].reason


def test_highlight_jsonl_keeps_labels_and_domain(tmp_path):
    rows = [
        {"qid": "tv_0", "query": "Changing Vehicle Tire", "vid": "sTEELN-vY30", "duration": 8.0, "domain": "VT",
         "label": [[1, 2, 5], [2, 2, 3], [4, 5, 5], [1, 1, 1]]},
        {"qid": 3, "query": "dog", "vid": "yt_dog_01", "duration": 6, "domain": "dog", "label": [-1, 1, 1]},
        {"qid": 4, "query": "dog", "vid": "yt_dog_02", "domain": "dog", "label": [[1, 2], [3]]},
        {"qid": 5, "query": "dog", "vid": "yt_dog_03", "domain": "dog", "label": []},
    ]
    path = write(tmp_path / "tvsum_val.jsonl", jsonl(rows))
    assert detect_format(path) == "highlights"
    records, skips = read_annotations(path)
    assert [(r.qid, r.moments, r.tags) for r in records] == [("tv_0", [], {"domain": "VT"}),
                                                             (3, [], {"domain": "dog"})]
    assert records[0].saliency == {"clip_seconds": 2.0, "label": [[1.0, 2.0, 5.0], [2.0, 2.0, 3.0], [4.0, 5.0, 5.0],
                                                                  [1.0, 1.0, 1.0]]}
    assert records[1].saliency["label"] == [[-1.0], [1.0], [1.0]]
    assert all(check_query(r) is None for r in records), "no windows is fine when the query has a label"
    assert [s.qid for s in skips] == [4, 5]
    assert "same number of annotator scores" in skips[0].reason and "non-empty list" in skips[1].reason


def test_converted_jsonl_with_string_qids_reads_as_qvhighlights(tmp_path):
    path = write(tmp_path / "tacos_val_release.jsonl", jsonl([
        {"qid": "s30-d52_0", "query": "He takes out a knife.", "vid": "s30-d52", "duration": 249.9,
         "relevant_windows": [[4.8, 12.0]]}]))
    assert detect_format(path) == "qvhighlights"
    records, _ = read_annotations(path)
    assert records[0].qid == "s30-d52_0" and records[0].saliency is None


def test_an_unknown_layout_is_one_line_listing_the_formats(tmp_path):
    for name, text in [("ann.json", json.dumps({"v1": {"start": 0, "caption": "x"}})), ("ann.txt", "hello\n")]:
        with pytest.raises(UserError) as error:
            detect_format(write(tmp_path / name, text))
        message = str(error.value)
        assert "\n" not in message and name in message
        for known in ("QVHighlights JSONL", "Charades-STA", "ActivityNet Captions", "TACoS", "TVSum"):
            assert known in message


# ----- protocols against naive references ---------------------------------------------------------


def naive_grounding(truth: list[dict], preds: list[dict], thresholds) -> dict:
    """R@K at each IoU threshold and mIoU, straight from the definition."""
    out = {}
    by_qid = {p["qid"]: p for p in preds}
    for k in (1, 5):
        for t in thresholds:
            hits = [any(iou(w[:2], g) >= t for w in by_qid[row["qid"]]["pred_relevant_windows"][:k]
                        for g in row["relevant_windows"]) for row in truth]
            out[f"R{k}@{t}"] = round(100 * sum(hits) / len(hits), 2)
    first = [max(iou(by_qid[row["qid"]]["pred_relevant_windows"][0][:2], g) for g in row["relevant_windows"])
             for row in truth]
    out["mIoU"] = round(100 * sum(first) / len(first), 2)
    return out


def naive_ap(ranked: list[int]) -> float:
    """Trapezoidal AP: recall steps weighted by the mean of the precision before and after."""
    total = sum(ranked)
    if total == 0:
        return 0.0
    recall = [sum(ranked[:k]) / total for k in range(len(ranked) + 1)]
    precision = [1.0] + [sum(ranked[:k]) / k for k in range(1, len(ranked) + 1)]
    return sum((recall[k] - recall[k - 1]) * (precision[k] + precision[k - 1]) / 2 for k in range(1, len(ranked) + 1))


def naive_highlights(truth: list[dict], preds: list[dict], top: int | None) -> dict:
    by_qid, domains = {p["qid"]: p for p in preds}, {}
    for row in truth:
        scores = by_qid[row["qid"]]["pred_saliency_scores"]
        order = sorted(range(len(row["label"])), key=lambda i: (-scores[i], i))
        if top is None:  # YouTube Highlights: clips above 0, the whole ranking
            ap = naive_ap([int(statistics.mean(row["label"][i]) > 0) for i in order])
        else:  # TVSum: each annotator's clips above their median, the top 5
            aps = []
            for a in range(len(row["label"][0])):
                column = [clip[a] for clip in row["label"]]
                median = statistics.median(column)
                aps.append(naive_ap([int(column[i] > median) for i in order][:top]))
            ap = statistics.mean(aps)
        domains.setdefault(row["domain"], []).append(ap)
    return {"HL-mAP": round(100 * statistics.mean(statistics.mean(v) for v in domains.values()), 2),
            **{d: round(100 * statistics.mean(v), 2) for d, v in domains.items()}}


def random_grounding(rng, n: int) -> tuple[list[dict], list[dict]]:
    truth, preds = [], []
    for qid in range(n):
        duration = rng.uniform(30, 600)
        s = rng.uniform(0, duration - 5)
        truth.append({"qid": qid, "duration": duration,
                      "relevant_windows": [[s, min(duration, s + rng.uniform(2, duration / 3))]]})
        windows = []
        for _ in range(rng.randint(1, 8)):
            a = rng.uniform(0, duration - 1)
            windows.append([a, rng.uniform(a + 0.5, duration), rng.random()])
        windows.sort(key=lambda w: -w[2])
        preds.append({"qid": qid, "pred_relevant_windows": windows})
    return truth, preds


@pytest.mark.parametrize("protocol", ["charades", "activitynet", "tacos"])
def test_grounding_protocols_match_the_naive_reference(protocol):
    import random

    rng = random.Random(3)
    truth, preds = random_grounding(rng, 60)
    thresholds = (0.1, 0.3, 0.5, 0.7) if protocol == "tacos" else (0.3, 0.5, 0.7)
    brief = evaluate(preds, truth, protocol)[0]["brief"]
    assert dict(brief) == naive_grounding(truth, preds, thresholds)
    assert tuple(brief) == brief_keys(protocol)


@pytest.mark.parametrize("protocol", ["tvsum", "youtube_highlights"])
def test_highlight_protocols_match_the_naive_reference(protocol):
    import random

    rng = random.Random(5)
    truth, preds = [], []
    for qid in range(24):
        clips = rng.randint(6, 40)
        if protocol == "tvsum":
            label = [[rng.randint(1, 5) for _ in range(20)] for _ in range(clips)]
        else:
            label = [[rng.choice([-1, 1])] for _ in range(clips)]
        truth.append({"qid": qid, "vid": f"v{qid}", "domain": f"d{qid % 3}", "label": label})
        # Ties on purpose: scores on a coarse grid, broken by clip order in both.
        preds.append({"qid": qid, "pred_saliency_scores": [rng.randint(0, 6) / 6 for _ in range(clips)]})
    metrics = evaluate(preds, truth, protocol)[0]
    expected = naive_highlights(truth, preds, 5 if protocol == "tvsum" else None)
    assert metrics["brief"]["HL-mAP"] == expected["HL-mAP"]
    assert {d: v["HL-mAP"] for d, v in metrics["domains"].items()} == {d: expected[d] for d in ("d0", "d1", "d2")}
    assert all(v["videos"] == 8 for v in metrics["domains"].values())


def test_highlight_protocols_on_a_hand_computed_file():
    # One annotator: clips 0 and 2 are above the median (1); the prediction ranks 0, 1, 2, ...
    # Ranked labels 1, 0, 1, 0, 0: AP = 0.5 * (1 + 1) / 2 + 0.5 * (1/2 + 2/3) / 2 = 0.791666...
    truth = [{"qid": 1, "label": [[3], [1], [2], [1], [0]], "domain": "VT"}]
    preds = [{"qid": 1, "pred_saliency_scores": [0.9, 0.8, 0.7, 0.6, 0.5]}]
    assert evaluate(preds, truth, "tvsum")[0]["brief"]["HL-mAP"] == 79.17
    # YouTube Highlights: positives are labels above 0, here clips 0 and 2 (label 1), the same ranking.
    truth = [{"qid": 1, "label": [1, -1, 1, -1, -1], "domain": "dog"}]
    assert evaluate(preds, truth, "youtube_highlights")[0]["brief"]["HL-mAP"] == 79.17


def test_highlight_protocols_refuse_what_they_cannot_score():
    truth = [{"qid": 1, "relevant_windows": [[0, 2]]}]
    with pytest.raises(BadInput, match="qid 1: the ground truth has no 'label'"):
        evaluate([{"qid": 1, "pred_saliency_scores": [1.0]}], truth, "tvsum")
    truth = [{"qid": 1, "label": [[1], [2]]}]
    with pytest.raises(BadInput, match="qid 1: no pred_saliency_scores"):
        evaluate([{"qid": 1, "pred_relevant_windows": [[0, 1, 1.0]]}], truth, "tvsum")
    with pytest.raises(BadInput, match="--protocol tvsum or youtube_highlights"):
        evaluate([{"qid": 1, "pred_relevant_windows": [[0, 1, 1.0]]}], truth, "qvhighlights")


# ----- each preset trains on its data shape -------------------------------------------------------


def _synth_rows(synth: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (synth / f"{split}.jsonl").read_text().splitlines()]


def layout(benchmark: str, rows: list[dict], videos_dir: Path) -> tuple[str, str]:
    """The sample data's queries written in ``benchmark``'s own release layout: (file name, text)."""
    videos: dict[str, list[dict]] = {}
    for row in rows:
        videos.setdefault(row["vid"], []).append(row)
    if benchmark == "activitynet_captions":
        ann = {vid: {"duration": qs[0]["duration"], "timestamps": [q["relevant_windows"][0] for q in qs],
                     "sentences": [q["query"] for q in qs]} for vid, qs in videos.items()}
        # A video without any usable query: its only sentence lies past the end of the real video.
        first = next(iter(videos))
        ann["v_late"] = {"duration": 500.0, "timestamps": [[300.0, 320.0]], "sentences": ["too late"]}
        (videos_dir / "v_late.mp4").write_bytes((videos_dir / f"{first}.mp4").read_bytes())
        return "ann.json", json.dumps(ann)
    if benchmark == "tacos":
        ann = {f"{vid}.mp4": {"timestamps": [[round(s * TACOS_FPS), round(e * TACOS_FPS)]
                                             for s, e in (q["relevant_windows"][0] for q in qs)],
                              "sentences": [q["query"] for q in qs], "fps": TACOS_FPS,
                              "num_frames": int(qs[0]["duration"] * TACOS_FPS)} for vid, qs in videos.items()}
        return "ann.json", json.dumps(ann)
    lines = []
    for k, q in enumerate(rows):  # one highlight row per query: the val split has one video
        clips, inside = math.ceil(q["duration"] / 2), set(q["relevant_clip_ids"])
        if benchmark == "tvsum":  # 3 annotators, 1-5
            label = [[3 + (c in inside) + (c + a) % 2 for a in range(3)] for c in range(clips)]
        else:  # one annotator, -1/1
            label = [1 if c in inside else -1 for c in range(clips)]
        lines.append({"qid": f"{q['vid']}_{k}", "query": q["query"], "vid": q["vid"], "duration": q["duration"],
                      "domain": "even" if k % 2 == 0 else "odd", "label": label})
    return "ann.jsonl", jsonl(lines)


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["activitynet_captions", "tacos", "tvsum", "youtube_highlights"])
def test_each_preset_builds_trains_and_scores(benchmark, synth_copy, tmp_path, capsys):
    """Shards from the benchmark's own layout, a few training steps of its preset (the tiny model in
    place of CLIP ViT-B/32) validated with its protocol, then ``vmr eval`` on the bundle."""
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        name, text = layout(benchmark, _synth_rows(synth_copy, split), synth_copy / "videos")
        annotations = write(tmp_path / f"{split}-{name}", text)
        assert main(["shards", "build", "--videos", str(synth_copy / "videos"), "--annotations", str(annotations),
                     "--out", str(shards), "--split", split, "--fps", "2", "--size", "16",
                     "--keyframe-interval", "0"]) == 0
    built = capsys.readouterr().out
    if benchmark == "activitynet_captions":
        assert "skipped 1 video(s) and 1 query(ies)" in built, built  # v_late, and its one sentence

    preset = yaml.safe_load((ROOT / "configs" / f"{benchmark}.yaml").read_text())
    preset["model"] = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    config = write(tmp_path / "preset.yaml", yaml.safe_dump(preset))
    out = tmp_path / "run"
    overrides = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
                 "data.sampling.size=16", "data.num_workers=0", f"train.output_dir={out}", "train.max_steps=3",
                 "train.batch_size=2", "train.warmup_steps=1", "train.save_every=0", "train.eval_every=3",
                 "train.eval_batch_size=2", "train.log_every=1", "train.mixed_precision=no"]
    result = subprocess.run([str(Path(sys.executable).parent / "vmr"), "train", "--config", str(config), *overrides],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                 "PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(out / "config.yaml")
    protocol = cfg.train.eval_protocol
    assert protocol == {"activitynet_captions": "activitynet"}.get(benchmark, benchmark)
    assert f"{cfg.train.best_metric} " in result.stderr + result.stdout

    metrics = tmp_path / "metrics.json"
    argv = ["eval", "--checkpoint", str(out / "export"), "--shards", f"{shards}/val-*.tar", "--protocol", protocol,
            "--json", str(metrics)]
    highlights = benchmark in ("tvsum", "youtube_highlights")
    assert main(argv + (["--group-by", "domain"] if highlights else [])) == 0
    saved = json.loads(metrics.read_text())
    assert set(saved["brief"]) == set(brief_keys(protocol))
    assert all(0 <= v <= 100 for v in saved["brief"].values())
    if highlights:
        assert set(saved["domains"]) == {"even", "odd"}
        assert set(saved["groups"]["groups"]) == {"even", "odd"}
        assert "| domain | HL-mAP |" in capsys.readouterr().out


def test_eval_reads_each_layout_as_ground_truth(tmp_path, capsys):
    anet = write(tmp_path / "val_2.json", json.dumps({
        "v_a": {"duration": 100.0, "timestamps": [[10, 30], [50, 120]], "sentences": ["one", "two"]}}))
    preds = write(tmp_path / "preds.jsonl", jsonl([
        {"qid": "v_a_0", "pred_relevant_windows": [[12, 30, 0.9], [0, 5, 0.1]]},
        {"qid": "v_a_1", "pred_relevant_windows": [[0, 10, 0.9], [60, 100, 0.5]]}]))
    out = tmp_path / "m.json"
    assert main(["eval", "--predictions", str(preds), "--ground-truth", str(anet), "--protocol", "activitynet",
                 "--json", str(out)]) == 0
    brief = json.loads(out.read_text())["brief"]
    assert brief["R1@0.5"] == 50.0 and brief["R5@0.7"] == 100.0  # [50, 120] is cut to [50, 100]
    assert "| R1@0.3 | R1@0.5 | R1@0.7 | R5@0.5 | R5@0.7 | mIoU |" in capsys.readouterr().out

    truth = write(tmp_path / "tvsum.jsonl", jsonl([{"qid": 1, "query": "q", "vid": "v", "domain": "VT",
                                                    "label": [[3], [1], [2], [1], [0]]}]))
    write(preds, jsonl([{"qid": 1, "pred_saliency_scores": [0.9, 0.8, 0.7, 0.6, 0.5]}]))
    assert main(["eval", "--predictions", str(preds), "--ground-truth", str(truth), "--protocol", "tvsum",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["domains"] == {"VT": {"HL-mAP": 79.17, "videos": 1}}
    capsys.readouterr()
    assert main(["eval", "--predictions", str(preds), "--ground-truth", str(truth)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "qid 1: the ground truth has no relevant_windows" in err and "--protocol tvsum" in err


@pytest.mark.parametrize("fmt, text, reason", [
    ("activitynet", '{"v_a": {"duration": 5, "timestamps": [[0, 1]], "sentences": ["x"]', "not valid JSON"),
    ("activitynet", "[1, 2]", "holds one JSON object"),
    ("tacos", '{"v": ' + "[" * 100000 + "]" * 100000 + "}", "not valid JSON"),
    ("tacos", '{"v.avi": {"timestamps": [[0, 10]], "sentences": ["x"], "fps": "fast"}}', "fps must be a finite number"),
    ("activitynet", '{"v_a": {"duration": 5, "timestamps": [[0, 1]], "sentences": [7]}}', "sentence must be a string"),
    ("highlights", '{"qid": 1, "query": "q", "vid": "v", "label": [[1, NaN]]}\n', "finite number"),
])
def test_bad_files_of_the_new_layouts_are_one_line(fmt, text, reason, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    annotations = write(tmp_path / "ann.json", text)
    assert main(["shards", "build", "--videos", str(tmp_path / "videos"), "--annotations", str(annotations),
                 "--out", str(tmp_path / "out"), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ann.json" in err and reason in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()
