"""Training for a collection (model.corpus, vmr/model/corpus.py) and the search it serves (vmr/ann.py,
vmr/search.py): which pairs are negatives, a search on hand-made data that only the negatives-aware
model gets right, an index larger than a memory cap answering, ``vmr search --queries`` writing a
prediction file ``vmr eval --protocol tvr`` scores, and one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vmr.cli import main
from vmr.model.corpus import corpus_batch, text_hash

from .test_search import CONCEPTS, TINY, place_event, train_on_features, write_release

ROOT = Path(__file__).parents[1]


def test_negatives_are_other_videos_that_lack_the_sentence():
    from vmr.config import CorpusConfig

    batch = {"video_id": ["a", "b", "a", "c"], "query": ["red", "blue", "green"],
             "video_index": torch.tensor([0, 1, 3, 0]),  # the last row is padding
             "sentences": [["red"], ["blue", "red"], ["red"], ["green"]]}
    out = corpus_batch(batch, CorpusConfig(negatives=3))
    pairs = sorted(map(tuple, out["negatives"].tolist()))
    # "red" (video a): not b (holds red), not the other window of a, so c only; "blue" (b): a, a, c;
    # "green" (c): a, b, a.
    assert pairs == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    assert out["query_hash"].tolist() == [text_hash("red"), text_hash("blue"), text_hash("green"), -2]
    assert out["sentence_hash"].shape == (4, 2) and out["sentence_hash"][0, 1] == -1
    assert len(corpus_batch(batch, CorpusConfig(negatives=1))["negatives"]) == 3  # one each


def test_near_miss_sentences_run_on_the_querys_own_video():
    """model.corpus.sentences: each query's video is paired with the bank's sentences that share the
    most words with the query and that the video does not hold; their tokens come after the batch's
    rows, and the head reads each pair as if that sentence had been asked of that video."""
    from vmr.config import CorpusConfig
    from vmr.model import batch_forward
    from vmr.model.corpus import SentenceBank, moment_level_loss, split_negatives

    from .test_search import tiny_model

    model, cfg = tiny_model(window=6)
    bank = SentenceBank(seed=0)
    bank.add(["a blue square grows"])  # an earlier batch's
    queries = ["a red circle grows", "a red square grows"]
    held = [["a red circle grows", "a green circle blinks"], ["a red square grows"]]
    text = model.tokenizer(queries, padding="max_length", max_length=12, return_tensors="pt")
    torch.manual_seed(0)
    batch = {"video_id": ["a", "b"], "query": queries, "video_index": torch.tensor([0, 1]), "sentences": held,
             "text_ids": text["input_ids"], "text_mask": text["attention_mask"],
             "videos": torch.randint(0, 255, (2, 6, 3, 32, 32), dtype=torch.uint8),
             "frame_mask": torch.ones(2, 6, dtype=torch.bool), "frame_times": torch.arange(6.0).expand(2, 6) / 2,
             "duration": torch.tensor([3.0, 3.0])}
    out = corpus_batch(batch, CorpusConfig(negatives=0, sentences=2), bank, model.tokenizer)
    # Query 0's nearest sentences not in video a: "a red square grows" (3 of 5 words), then "a blue square
    # grows" (2 of 6); query 1's: "a blue square grows" and "a red circle grows" (3 of 5 each).
    extra = model.tokenizer.batch_decode(out["text_ids"][2:], skip_special_tokens=True)
    pairs = {(extra[row - 2], video) for row, video in out["negatives"].tolist()}
    assert pairs == {("a red square grows", 0), ("a blue square grows", 0), ("a blue square grows", 1),
                     ("a red circle grows", 1)}
    assert len(extra) == 3 and out["text_mask"].shape == (5, 12)
    with torch.no_grad():
        outputs = batch_forward(model, out)
        for row, (rows, video) in enumerate(out["negatives"].tolist(), start=2):
            alone = model(batch["videos"][video:video + 1], {"input_ids": out["text_ids"][rows:rows + 1],
                          "attention_mask": out["text_mask"][rows:rows + 1]}, video_index=torch.tensor([0]),
                          frame_times=batch["frame_times"][:1], duration=batch["duration"][:1])
            assert torch.allclose(outputs["relevance_logits"][row], alone["relevance_logits"][0], atol=1e-5)
    own, negative = split_negatives(outputs, 2)
    assert negative["relevance_logits"].shape == (4, 6)
    absent, presence = moment_level_loss(own, negative, {"relevance": torch.ones(2, 6)}, "bce", 2.0)
    assert torch.isfinite(absent) and absent > 0 and torch.isfinite(presence)


def test_a_sentence_pool_finds_the_same_near_misses_as_the_scan():
    """vmr search --contrast's pool (built once, a count over the query's words' sentences) returns what
    nearest_sentences' scan over every sentence does: the same order, ties alphabetical, never the query's
    own words reordered, sentences sharing no word last."""
    import random

    from vmr.model.corpus import SentencePool, nearest_sentences, words

    rng = random.Random(3)
    vocabulary = ["a", "the", "red", "blue", "green", "circle", "square", "grows", "shrinks", "moves", "left", "up"]
    pool = {" ".join(rng.sample(vocabulary, rng.randint(1, 6))) for _ in range(400)} | {"!!", "a red circle grows", "grows circle red a"}
    indexed = SentencePool(list(pool) + ["a red circle grows"])  # a duplicate counts once
    scan = {s: words(s) for s in pool}
    assert len(indexed) == len(pool)
    for query in ["a red circle grows", "grows circle red a", "the blue square", "zebra", "a", "Red, RED left!"]:
        for k in (1, 8, 50, 1000):
            assert indexed.nearest(query, k) == nearest_sentences(query, scan, k), (query, k)
    assert "grows circle red a" not in indexed.nearest("a red circle grows", 1000)
    assert SentencePool([]).nearest("a red circle grows", 8) == [] and indexed.nearest("a", 0) == []


def one_event_release(root: Path, videos: int = 24) -> tuple[Path, Path, dict[str, set[str]]]:
    """Videos of 20 two-second clips, each showing ONE of six objects (three clips), with a query for
    it. An object is mostly what every object shares (a common direction, 2.5 long) and a little of its
    own (its direction, 1 long). Every training query occurs in its video, so a model trained on them
    alone finds the event by the common part, without reading the sentence; across videos only the
    sentence, through each object's small own part, tells them apart."""
    rng = np.random.default_rng(4)
    rows, owners, clips = [], {}, {}
    for i in range(videos):
        vid = f"video{i}"
        clips[vid] = rng.normal(scale=0.3, size=(20, 8)).astype(np.float32)
        start = int(rng.integers(0, 17))
        place_event(clips[vid], i % 6, start, vid, rows, owners)
        clips[vid][start:start + 3] += 2.5 * np.eye(8, dtype=np.float32)[7] - CONCEPTS[i % 6] * 2 / 3  # 3 -> 1 own
    return *write_release(root, clips, rows), owners


@pytest.mark.slow
def test_only_the_negatives_aware_model_ranks_the_right_video_first(tmp_path, capsys):
    from vmr.bundle import load_model
    from vmr.encode import open_encodings

    folder, annotations, owners = one_event_release(tmp_path)
    index = tmp_path / "index"
    assert main(["features", "import", "--video-features", str(folder), "--annotations", str(annotations),
                 "--out", str(index), "--split", "train"]) == 0
    plain, aware = (train_on_features(index, tmp_path / name, 300, f"model.corpus.enabled={flag}")
                    for name, flag in (("plain", "false"), ("aware", "true")))
    # The plain model: each video's best moment by its own score, the best over the collection.
    model, _ = load_model(plain)
    videos = list(open_encodings(index, model))
    plain_right = 0
    for sentence, holders in owners.items():
        best = max(((v.video_id, m["score"]) for v in videos for m in v.ask(model, sentence)[0]["moments"][:1]),
                   key=lambda vm: vm[1])
        plain_right += best[0] in holders
    # The negatives-aware one, through vmr search (its keys are made on first use).
    (index / "index.json").write_text(json.dumps({"checkpoint": str(aware)}))
    capsys.readouterr()
    assert main(["search", "--index", str(index), *sum((["--query", s] for s in owners), []), "--top-k", "1",
                 "--candidates", "0"]) == 0
    aware_right = sum(found["results"][0]["video"] in owners[found["query"]]
                      for found in json.loads(capsys.readouterr().out))
    assert aware_right == len(owners) and plain_right <= len(owners) // 2, (aware_right, plain_right)
    # A model trained without negatives cannot search a collection: one line.
    (index / "index.json").write_text(json.dumps({"checkpoint": str(plain)}))
    assert main(["search", "--index", str(index), "--query", "a red circle blinks"]) == 2
    assert "without model.corpus" in capsys.readouterr().err


def wide_release(root: Path, videos: int, frames: int = 400, width: int = 512) -> tuple[Path, Path]:
    rng = np.random.default_rng(videos)
    folder = root / f"features-{videos}"
    folder.mkdir(parents=True)
    rows = []
    for i in range(videos):
        np.savez(folder / f"video{i}.npz", features=rng.normal(size=(frames, width)).astype(np.float16))
        rows.append({"qid": i, "query": "a red circle blinks", "vid": f"video{i}", "duration": 2.0 * frames,
                     "relevant_windows": [[10, 20]]})
    annotations = root / f"ann-{videos}.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, annotations


RESIDENT = """
import sys, psutil
from vmr.cli import main
code = main(sys.argv[1:])
print(psutil.Process().memory_info().rss // 2**20)  # what the process holds once it has answered
sys.exit(code)
"""


@pytest.mark.slow
def test_an_index_larger_than_a_memory_cap_still_answers(tmp_path):
    """Two indexes of 400-frame videos of 512 numbers (feature_dim): 10 videos, and 250 (100 MB of
    tokens on disk). A search of the larger may hold at most 30 MB more than one of the smaller once it
    has answered: it reads only its candidates' prepared rows and frame times, never the collection's."""
    from vmr.bundle import write_bundle
    from vmr.config import load_config
    from vmr.model import VideoMomentRetrievalModel

    cfg = load_config(TINY, ["model.feature_dim=512", "data.sampling.fps=0.5", "data.sampling.window=200"])
    torch.manual_seed(0)
    bundle = write_bundle(VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling),
                          tmp_path / "bundle", cfg)
    held, cap = {}, 30
    for videos in (10, 250):
        folder, annotations = wide_release(tmp_path, videos)
        index = tmp_path / f"index-{videos}"
        assert main(["features", "import", "--video-features", str(folder), "--annotations", str(annotations),
                     "--out", str(index), "--split", "train"]) == 0
        (index / "index.json").write_text(json.dumps({"checkpoint": str(bundle)}))
        argv = [sys.executable, "-c", RESIDENT, "search", "--index", str(index), "--query", "a red circle blinks"]
        subprocess.run(argv, check=True, capture_output=True, timeout=300)  # the keys, made once
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        held[videos] = int(done.stdout.strip().splitlines()[-1])
        found = json.loads("\n".join(done.stdout.strip().splitlines()[:-1]))
        assert found["videos"] == videos and found["reranked"] == min(20, videos) and found["results"]
    tokens = sum(p.stat().st_size for p in (tmp_path / "index-250").glob("*.tar")) / 2**20
    assert tokens > 3 * cap and held[250] - held[10] < cap, (tokens, held)


def test_a_query_file_gives_a_prediction_file_the_corpus_protocol_scores(bundle, shard_dir, tmp_path, capsys):
    from vmr.data.tars import iter_shard

    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--shards", str(shard_dir / "val-*.tar"), "--out",
                 str(index)]) == 0
    truth = [{"desc_id": q["qid"], "desc": q["query"], "vid_name": meta["video_id"], "ts": q["windows"][0],
              "duration": meta["duration"]}
             for shard in sorted(shard_dir.glob("val-*.tar")) for _, _, meta in iter_shard(shard) for q in meta["queries"]]
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in truth))
    out = tmp_path / "predictions.json"
    assert main(["search", "--index", str(index), "--queries", str(queries), "--out", str(out), "--candidates", "3"]) == 0
    submission = json.loads(out.read_text())
    assert set(submission) == {"video2idx", "VCMR", "SVMR", "VR"}
    assert len(submission["VCMR"]) == len(truth) and all(len(e["predictions"]) <= 100 for e in submission["VCMR"])
    own = submission["SVMR"][0]
    assert {p[0] for p in own["predictions"]} == {submission["video2idx"][truth[0]["vid_name"]]}
    capsys.readouterr()
    assert main(["eval", "--protocol", "tvr", "--predictions", str(out), "--ground-truth", str(queries)]) == 0
    assert "| VCMR | 0.5 |" in capsys.readouterr().out
    # Bad query files and options: one line each, nothing written.
    bad = tmp_path / "bad.jsonl"
    for text, reason in (('{"desc_id": 1}\n', "'desc'"), ('{"desc": "a red circle"}\n', "desc_id"),
                         ('{"desc_id": 1, "desc": "a red circle", "vid_name": 5}\n', "vid_name"), ("[1]\n", "desc_id")):
        bad.write_text(text)
        assert main(["search", "--index", str(index), "--queries", str(bad), "--out", str(tmp_path / "p2.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and reason in err, err
    bad.write_text('{"desc_id": 1, "desc": "a red circle"}\n{"desc_id": 1, "desc": "a blue square"}\n')
    assert main(["search", "--index", str(index), "--queries", str(bad), "--out", str(tmp_path / "p2.json")]) == 2
    assert "desc_id 1 appears twice" in capsys.readouterr().err
    assert main(["search", "--index", str(index), "--queries", str(queries)]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "p2.json").exists()
    # --out on the query file is refused, not overwritten; an earlier prediction file is replaced.
    before = queries.read_bytes()
    assert main(["search", "--index", str(index), "--queries", str(queries), "--out", str(queries)]) == 2
    assert "not a TVR prediction file" in capsys.readouterr().err and queries.read_bytes() == before
    assert main(["search", "--index", str(index), "--queries", str(queries), "--out", str(out), "--candidates", "2"]) == 0
    assert json.loads(out.read_text())["VCMR"][0]["desc_id"] == truth[0]["desc_id"]


def test_damaged_keys_are_refused_or_rebuilt(bundle, shard_dir, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(bundle), "--shards", str(shard_dir / "val-*.tar"), "--out",
                 str(index)]) == 0
    root = next((index / "keys").iterdir())
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--query", "a red circle"]) == 0
    answer = json.loads(capsys.readouterr().out)
    (root / "collection.json").unlink()  # a merge that never finished: made again, the same answer
    assert main(["search", "--index", str(index), "--query", "a red circle"]) == 0
    assert json.loads(capsys.readouterr().out) == answer
    record = json.loads((root / "collection.json").read_text())
    (root / "collection.json").write_text(json.dumps({**record, "format": 1}))  # merged by an older version
    assert main(["search", "--index", str(index), "--query", "a red circle"]) == 0
    assert json.loads(capsys.readouterr().out) == answer
    assert json.loads((root / "collection.json").read_text())["format"] == record["format"]
    ids = json.loads((root / "ids.json").read_text())
    (root / "ids.json").write_text(json.dumps(["renamed", *ids[1:]]))
    assert main(["search", "--index", str(index), "--query", "a red circle"]) == 2
    assert "ids.json" in capsys.readouterr().err
    (root / "ids.json").write_text(json.dumps(ids))
    import tarfile

    shard = sorted(index.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".tokens.npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF  # the same size, other tokens: found when read
    shard.write_bytes(bytes(data))
    code = main(["search", "--index", str(index), "--query", "a red circle", "--candidates", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "rebuild the index" in err, err


def test_segment_keys_and_the_ivf_index_find_the_best_videos(monkeypatch):
    """The ANN keys are each video's frames averaged SEGMENT at a time; past FLAT_MAX the index is IVF-PQ,
    and a shortlist over it finds the videos that exact search over every frame finds."""
    from vmr import ann

    rng = np.random.default_rng(0)
    counts = rng.integers(1, 30, size=400)  # videos of 1 to 29 frames: short last segments, one-frame videos
    starts = np.concatenate([[0], np.cumsum(counts)])
    centres = rng.normal(size=(400, 32))
    keys = np.repeat(centres, counts, axis=0) + rng.normal(scale=0.3, size=(starts[-1], 32))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float16)
    segments, video = ann.segment_keys(keys, starts)
    assert (np.bincount(video) == -(-counts // ann.SEGMENT)).all()
    v = int(np.flatnonzero(counts > ann.SEGMENT + 1)[0])  # its second segment, by hand
    mean = keys[starts[v] + ann.SEGMENT:min(starts[v] + 2 * ann.SEGMENT, starts[v + 1])].astype(np.float32).mean(0)
    np.testing.assert_allclose(segments[np.flatnonzero(video == v)[1]], mean / np.linalg.norm(mean), rtol=1e-5)
    monkeypatch.setattr(ann, "FLAT_MAX", 100)
    index, kind = ann.ann_index(segments)
    assert kind == "ivfpq" and index.ntotal == len(segments)
    collection = ann.Collection.__new__(ann.Collection)  # the search alone, over these arrays
    collection.ids, collection.keys, collection.starts, collection.segment_video = list(range(400)), keys, starts, video
    collection.ann, collection.root = index, Path("keys")
    index.nprobe = ann.NPROBE
    for q in range(5):
        query = centres[q * 50] / np.linalg.norm(centres[q * 50])
        exact = np.maximum.reduceat(keys.astype(np.float32) @ query, starts[:-1])
        found = [video for video, _ in collection.shortlist(query, 10)]
        assert found[0] == np.argmax(exact) and len(set(found) & set(np.argsort(-exact)[:10])) >= 9
