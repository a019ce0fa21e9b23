"""Encode once, ask many (vmr/encode.py) and searching a collection (vmr index, vmr search): answers
equal to decoding and running the towers for every window, saved and reloaded encodings, several
queries in one `vmr predict`, indexes built in parts and resumed, a search that finds the video
holding the exact event on hand-made data, and one-line refusals of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vmr.bundle import write_bundle
from vmr.cli import main
from vmr.config import load_config
from vmr.data.video import open_video, probe, sample_frames, sample_times
from vmr.encode import encode_video, load_encoding
from vmr.model import VideoMomentRetrievalModel, frame_outputs, rank_moments
from vmr.search import Index
from vmr.spans import windows_over

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
QUERIES = ["a red circle blinks", "a blue square grows", "the green triangle moves left"]


def tiny_model(window: int = 5, seed: int = 0):
    """An untrained tiny model reading 2 frames/s in windows of ``window`` frames: the synth videos
    (6-9 s) span several overlapping windows."""
    cfg = load_config(TINY, [f"data.sampling.window={window}", "data.sampling.size=32"])
    torch.manual_seed(seed)
    return VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).eval(), cfg


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    model, cfg = tiny_model()
    return write_bundle(model, tmp_path_factory.mktemp("bundle") / "export", cfg)


def reference(model, path: Path, query: str) -> dict:
    """What the model says without encoding anything ahead: every window decoded from the file and
    run through both towers and every layer, as a whole-video pass did before encodings existed."""
    info = probe(path)
    decoder = open_video(path)
    spec = model.sampling
    frames, times = sample_frames(decoder, sample_times(info.duration, "uniform", spec.fps, 1 << 30), spec.size,
                                  info.start)
    merged = {"times": [], "relevance": [], "saliency": [], "starts": [], "ends": []}
    for first, end, own, start, stop in windows_over(times, info.duration, spec.window, spec.overlap):
        window_frames, _ = sample_frames(decoder, times[first:end], spec.size, info.start)  # decoded again
        local = torch.tensor(times[first:end], dtype=torch.float)[None] - start
        with torch.no_grad():
            outputs = model(window_frames[None], model.tokenize([query]), frame_times=local,
                            duration=torch.tensor([stop - start]))
        part = frame_outputs(outputs, torch.tensor([own]), torch.tensor([start]), torch.tensor([info.duration]))[0]
        for key in merged:
            merged[key] += part[key]
    assert len(frames) == len(merged["times"])  # every frame reported once
    return merged


def test_an_encoded_video_answers_every_query_as_a_full_pass_does(synth_dir):
    model, _ = tiny_model()
    path = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    video = encode_video(model, path)
    answers = video.ask(model, QUERIES, top_k=3)
    assert answers[0]["sampling"]["windows"] > 2  # longer than one window
    for query, answer in zip(QUERIES, answers, strict=True):
        expected = reference(model, path, query)
        assert answer["frame_times"] == pytest.approx(expected["times"], abs=1e-4)
        assert answer["frame_scores"] == pytest.approx(expected["relevance"], abs=1e-4)
        moments = rank_moments(expected, 3, model.config.nms_iou)
        assert [x for m in answer["moments"] for x in (m["start"], m["end"], m["score"])] == pytest.approx(
            [x for m in moments for x in m], abs=1e-3)
    # The same video given as bytes encodes the same.
    again = encode_video(model, path.read_bytes())
    assert torch.equal(again.tokens, video.tokens) and again.times == video.times
    assert video.nbytes == video.tokens.numel() * 4 and video.bytes_per_minute() > 0


def test_a_saved_encoding_reloads_and_answers_the_same(bundle, synth_dir, tmp_path):
    model, _ = tiny_model()
    video = encode_video(model, sorted((synth_dir / "videos").glob("*.mp4"))[1])
    video.save(tmp_path / "enc")
    loaded = load_encoding(tmp_path / "enc", model)
    assert loaded.video_id == video.video_id and loaded.times == pytest.approx(video.times)
    assert loaded.tokens.dtype == torch.float16  # stored as extraction stores features
    for before, after in zip(video.ask(model, QUERIES), loaded.ask(model, QUERIES), strict=True):
        assert after["frame_scores"] == pytest.approx(before["frame_scores"], abs=2e-2)
    video.save(tmp_path / "enc")  # its own folder: saved again in place
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty and not an encoding"):
        video.save(tmp_path / "other")
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(synth_dir / "videos"),
                 "--out", str(tmp_path / "index")]) == 0
    with pytest.raises(Exception, match="not a saved encoding"):  # an index is never replaced by one video
        video.save(tmp_path / "index")
    # Another model's tower: refused in one line.
    other, _ = tiny_model(seed=1)
    with pytest.raises(Exception, match="another vision tower"):
        load_encoding(tmp_path / "enc", other)


def test_predict_answers_several_queries_from_one_encoding(bundle, synth_dir, capsys):
    video = str(sorted((synth_dir / "videos").glob("*.mp4"))[0])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(bundle), "--video", video, "--query", QUERIES[0],
                 "--query", QUERIES[1]]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [answer["query"] for answer in both] == QUERIES[:2]
    for answer in both:
        assert main(["predict", "--checkpoint", str(bundle), "--video", video, "--query", answer["query"]]) == 0
        assert json.loads(capsys.readouterr().out) == answer


def test_an_index_built_in_parts_and_resumed_equals_one_built_at_once(bundle, synth_dir, tmp_path, capsys):
    from vmr.bundle import load_model
    from vmr.features import extract_features, video_parts, write_manifest

    videos = tmp_path / "videos"
    shutil.copytree(synth_dir / "videos", videos)
    whole = tmp_path / "whole"
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(videos), "--out", str(whole)]) == 0
    model, _ = load_model(bundle)
    files = sorted(videos.glob("*.mp4"))
    parted = tmp_path / "parted"
    for rank in (0, 1):  # what two processes under accelerate launch do, one after the other
        extractor = extract_features(model, model.sampling, video_parts(files, 1), parted, rank=rank, world=2,
                                     progress=False)["extractor"]
    write_manifest(parted, extractor)
    shutil.copy(whole / "index.json", parted / "index.json")
    one, two = Index.open(whole, model), Index.open(parted, model)  # the parted one's keys are made here
    assert sorted(one.ids) == sorted(two.ids) == [f.stem for f in files]
    for n, video in enumerate(one.ids):
        a, b = one.load(n), two.load(two.ids.index(video))
        assert torch.equal(a.tokens, b.tokens) and a.times == b.times
    keys = [np.load(ix.collection.root / "keys.npy") for ix in (one, two)]
    assert sorted(map(bytes, keys[0])) == sorted(map(bytes, keys[1]))  # the same keys, whatever the parts
    assert one.search(QUERIES[0], candidates=0) == two.search(QUERIES[0], candidates=0)
    # Resumed: nothing is encoded again; a video added to the folder redoes only its part.
    capsys.readouterr()
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(videos), "--out", str(parted),
                 "--videos-per-part", "1"]) == 0
    assert "0 video(s)" not in capsys.readouterr().out
    shutil.copy(files[0], videos / "zz_added.mp4")
    assert main(["index", "--checkpoint", str(bundle), "--videos", str(videos), "--out", str(parted),
                 "--videos-per-part", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{len(files)} shard(s) already done" in out and "this process: 1 videos" in out
    assert len(Index.open(parted, model)) == len(files) + 1


def test_two_processes_index_a_folder_and_list_a_broken_video(bundle, synth_dir, tmp_path):
    import subprocess
    import sys

    from vmr.bundle import load_model

    from .conftest import free_port

    videos = tmp_path / "videos"
    shutil.copytree(synth_dir / "videos", videos)
    good = sorted(p.stem for p in videos.glob("*.mp4"))
    data = (videos / f"{good[0]}.mp4").read_bytes()
    (videos / "broken.mp4").write_bytes(data[: len(data) // 3])
    out = tmp_path / "index"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "vmr.cli", "index", "--checkpoint", str(bundle), "--videos", str(videos),
               "--videos-per-part", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["key"] for s in manifest["skipped"]] == ["broken"]
    model, _ = load_model(bundle)
    index = Index.open(out, model)
    assert sorted(index.ids) == good
    assert len(list(index.collection.root.glob("0*.json"))) == sum(len(s["shards"]) for s in manifest["splits"].values())
    assert json.loads((out / "index.json").read_text())["videos"] == str(videos.resolve())


def test_the_shortlist_keeps_what_an_exhaustive_search_finds(bundle, shard_dir, tmp_path, capsys):
    """Over video shards: the rerank, from the prepared rows the index stores (vmr/prepared.py), scores
    every frame of every window as the model does from the video's tokens; the search's best moment is
    the best of every video's own answer (times its presence), and a shortlist as long as the
    collection changes nothing."""
    from vmr.bundle import load_model

    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--shards", str(shard_dir), "--out", str(index)]) == 0
    model, _ = load_model(bundle)
    opened = Index.open(index, model)
    result = opened.search(QUERIES[1], top_k=3, candidates=0)
    # Each video's best moment by its own answer, times the video's presence: the best of them leads.
    presence = {r["video"]: r["presence"] for r in opened.search(QUERIES[1], top_k=1000, candidates=0)["results"]}
    videos = [opened.load(n) for n in range(len(opened))]
    text = opened._sentence(QUERIES[1])[0]
    for n, video in enumerate(videos):  # several overlapping windows each (5 frames)
        assert len(list(video.windows())) > 1
        stored, own = opened._rerank([n], text)[0][0], video.scores(model, [QUERIES[1]])[0]
        assert stored["times"] == own["times"]
        for key in ("relevance", "saliency", "starts", "ends"):
            assert stored[key] == pytest.approx(own[key], abs=2e-3), key
    best = max(((v.video_id, m["score"] * presence[v.video_id]) for v in videos
                for m in v.ask(model, QUERIES[1])[0]["moments"]), key=lambda vm: vm[1])
    top = result["results"][0]
    assert (top["video"], top["score"]) == (best[0], pytest.approx(best[1], abs=2e-3))
    assert top["score"] == pytest.approx(top["relevance"] * top["presence"], abs=2e-3)
    assert opened.search(QUERIES[1], top_k=3, candidates=len(opened))["results"] == result["results"]
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--query", QUERIES[1], "--top-k", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["results"]) == 2 and printed["reranked"] == min(20, len(opened))


SENTENCES = ["a red circle blinks", "a blue square grows", "a green triangle moves left",
             "a yellow circle shrinks", "a red square moves up", "a blue triangle moves down"]
CONCEPTS = np.eye(8, dtype=np.float32)[:6] * 3  # each object a direction of its own


def test_contrast_weighs_the_best_videos_by_the_query_against_its_near_misses(bundle, shard_dir, synth_dir, tmp_path,
                                                                              capsys):
    """With contrast sentences, the CONTRAST_VIDEOS best videos are asked again with the query's nearest
    sentences (most words shared, ties alphabetical; never its own words reordered), all in one forward
    per window, each as it alone would be; a moment's share is the query's softmax share of the relevance
    logits at the frame that proposed it (computed here from a full pass over the video); each contrasted
    video's best moment by relevance x presence x share leads, the rest follow as without contrast.
    ``vmr search --contrast`` reads any annotation file."""
    import math

    from vmr.bundle import load_model
    from vmr.search import CONTRAST_SENTENCES, CONTRAST_VIDEOS

    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--shards", str(shard_dir), "--out", str(index)]) == 0
    model, _ = load_model(bundle)
    opened = Index.open(index, model)
    assert len(opened) > CONTRAST_VIDEOS
    query = QUERIES[1]  # a blue square grows
    plain = opened.search(query, top_k=1000, candidates=0)
    assert all("contrast" not in r for r in plain["results"])
    opened.set_contrast(["a red square grows", "a blue square shrinks", "a square blue grows", "a blue circle grows",
                         "the green triangle moves left", "a blue square moves up", query])
    misses = opened.contrast.nearest(query, CONTRAST_SENTENCES)
    assert misses == ["a blue circle grows", "a blue square shrinks", "a red square grows", "a blue square moves up",
                      "the green triangle moves left"]
    with torch.no_grad():
        together = opened._rerank([0, 1], model.encode_queries(misses)[0])
        for j, miss in enumerate(misses):
            alone = opened._rerank([0, 1], opened._sentence(miss)[0])
            for n in (0, 1):
                assert together[n][j]["relevance"] == pytest.approx(alone[n][0]["relevance"], abs=1e-4), (miss, n)

    result = opened.search(query, top_k=1000, candidates=0)
    contrasted = [r for r in result["results"] if "contrast" in r]
    chosen = {v for v, _ in plain["ranked_videos"][:CONTRAST_VIDEOS]}
    assert {r["video"] for r in contrasted} == chosen and len(contrasted) < len(result["results"])
    # Each contrasted video's best moment by relevance x presence x share leads; the rest as without contrast.
    leads, rest = result["results"][:CONTRAST_VIDEOS], result["results"][CONTRAST_VIDEOS:]
    assert {r["video"] for r in leads} == chosen
    for r in leads:
        assert r["score"] == pytest.approx(r["relevance"] * r["presence"] * r["contrast"], abs=2e-3)
        assert r["relevance"] * r["contrast"] == pytest.approx(max(o["relevance"] * o["contrast"] for o in contrasted
                                                                   if o["video"] == r["video"]), abs=1e-4)
    assert all(r["score"] == pytest.approx(r["relevance"] * r["presence"], abs=2e-3) for r in rest)
    for part in (leads, rest):
        assert [r["score"] for r in part] == sorted((r["score"] for r in part), reverse=True)
    assert [v for v, _ in result["ranked_videos"][:CONTRAST_VIDEOS]] == [r["video"] for r in leads]
    logit = lambda p: math.log(p) - math.log(1 - p)  # noqa: E731
    for r in contrasted:
        video = opened.load(opened.ids.index(r["video"]))
        own, *others = video.scores(model, [query, *misses])
        frame = min(range(len(own["starts"])), key=lambda f: abs(own["starts"][f] - r["start"]) + abs(own["ends"][f] - r["end"])
                    + abs(own["relevance"][f] - r["relevance"]))
        logits = [logit(own["relevance"][frame])] + [logit(o["relevance"][frame]) for o in others]
        share = 1 / sum(math.exp(x - logits[0]) for x in logits)
        assert r["contrast"] == pytest.approx(share, abs=2e-3)

    capsys.readouterr()
    assert main(["search", "--index", str(index), "--query", query, "--contrast", str(synth_dir / "train.jsonl")]) == 0
    assert "contrast" in json.loads(capsys.readouterr().out)["results"][0]


def place_event(clips: np.ndarray, j: int, start: int, vid: str, rows: list, owners: dict) -> None:
    """Object ``j`` in clips start..start+2 of video ``vid`` (20 two-second clips), and its query."""
    clips[start:start + 3] += CONCEPTS[j]
    rows.append({"qid": len(rows), "query": SENTENCES[j], "vid": vid, "duration": 40,
                 "relevant_windows": [[2 * start, 2 * start + 6]],
                 "relevant_clip_ids": [start, start + 1, start + 2], "saliency_scores": [[4, 4, 4]] * 3})
    owners.setdefault(SENTENCES[j], set()).add(vid)


def write_release(root: Path, clips: dict[str, np.ndarray], rows: list) -> tuple[Path, Path]:
    """The videos' features (one .npz each) and their annotations, in the released-features layout."""
    folder = root / "features"
    folder.mkdir(parents=True)
    for vid, features in clips.items():
        np.savez(folder / f"{vid}.npz", features=features)
    annotations = root / "ann.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, annotations


def train_on_features(index: Path, run: Path, steps: int, *overrides: str) -> Path:
    """The tiny preset trained on an imported 8-wide feature release; its bundle."""
    assert main(["train", "--config", str(TINY), f"data.train_shards={index}/train-*.tar", "data.val_shards=[]",
                 "data.num_workers=0", "data.sampling.fps=0.5", "data.sampling.window=20", "model.feature_dim=8",
                 f"train.output_dir={run}", f"train.max_steps={steps}", "train.batch_size=6", "train.warmup_steps=10",
                 "train.save_every=0", "train.eval_every=0", "train.log_every=50", *overrides]) == 0
    return run / "export"


def handmade_release(root: Path, videos: int = 36) -> tuple[Path, Path, dict[str, set[str]]]:
    """Videos of 20 two-second clips in the released-features layout. Six objects, each a direction
    of its own; each video shows two of them, three clips each, at random places (the rest is faint
    noise), and has a query for each. A model must read the sentence to tell the two apart."""
    rng = np.random.default_rng(3)
    rows, owners, clips = [], {}, {}
    for i in range(videos):
        vid = f"video{i}"
        clips[vid] = rng.normal(scale=0.3, size=(20, 8)).astype(np.float32)
        first = int(rng.integers(0, 7))
        for j, start in zip(rng.choice(6, size=2, replace=False), (first, first + 3 + int(rng.integers(1, 8))),
                            strict=True):
            place_event(clips[vid], j, start, vid, rows, owners)
    return *write_release(root, clips, rows), owners


@pytest.mark.slow
def test_a_search_finds_the_video_holding_the_exact_event(tmp_path, capsys):
    folder, annotations, owners = handmade_release(tmp_path)
    index = tmp_path / "index"
    assert main(["features", "import", "--video-features", str(folder), "--annotations", str(annotations),
                 "--out", str(index), "--split", "train"]) == 0
    run = train_on_features(index, tmp_path / "run", 400)
    (index / "index.json").write_text(json.dumps({"checkpoint": str(run)}))
    for candidates in ("0", "20"):  # every video reranked, and a shortlist of 20 of the 36
        capsys.readouterr()
        assert main(["search", "--index", str(index), *sum((["--query", s] for s in owners), []), "--top-k", "1",
                     "--candidates", candidates]) == 0
        for found in json.loads(capsys.readouterr().out):
            assert found["results"][0]["video"] in owners[found["query"]], (candidates, found)


def test_bad_search_input_is_one_line(bundle, shard_dir, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--shards", str(shard_dir), "--out", str(index)]) == 0
    other = tmp_path / "other"
    model, cfg = tiny_model(seed=1)
    write_bundle(model, other, cfg)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not an annotation\n")
    cases = [
        (["search", "--index", str(tmp_path / "missing"), "--query", "a red circle"], "not an index"),
        (["search", "--index", str(index), "--query", "   "], "query"),
        (["search", "--index", str(index), "--query", "a red circle", "--checkpoint", str(other)],
         "another vision tower"),
        (["search", "--index", str(index), "--query", "a red circle", "--top-k", "0"], "--top-k"),
        (["search", "--index", str(shard_dir), "--query", "a red circle"], "not an index"),
        (["index", "--checkpoint", str(bundle), "--videos", str(tmp_path / "nothing"), "--out", str(tmp_path / "i2")],
         "not a folder"),
        (["index", "--checkpoint", str(bundle), "--shards", str(index), "--out", str(tmp_path / "i3")],
         "feature shards already"),
        (["search", "--index", str(index), "--query", "a red circle", "--contrast", str(tmp_path / "no.jsonl")],
         "--contrast"),
        (["search", "--index", str(index), "--query", "a red circle", "--contrast", str(garbage)], str(garbage)),
    ]
    for argv, reason in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and reason in err, (argv, err)
    (index / "index.json").write_text("{not json")
    assert main(["search", "--index", str(index), "--query", "a red circle"]) == 2
    assert "index.json" in capsys.readouterr().err
