import json
import random

import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from torchcodec.decoders import VideoDecoder

from vmr.config import DataConfig, SamplingConfig
from vmr.data.collate import Collator
from vmr.data.decode import _swap_left_right
from vmr.data.sources import expand_shards
from vmr.data.stream import VideoMomentDataset, make_loader, skipped
from vmr.data.tars import iter_shard
from vmr.data.video import inference_windows, sample_times
from vmr.errors import UserError
from vmr.spans import frame_targets
from vmr.text import load_tokenizer

from .conftest import TINY

TOKENIZER = load_tokenizer("synthetic")


def _data(sampling: dict | None = None, **changes) -> DataConfig:
    spec = SamplingConfig(**{"fps": 2.0, "size": 16, "window": 32, **(sampling or {})})
    return DataConfig(**{"sampling": spec, "num_workers": 0, **changes})


def _all_samples(shard_dir, split):
    return {meta["video_id"]: (video, meta) for tar in sorted(shard_dir.glob(f"{split}-*.tar"))
            for _, video, meta in iter_shard(tar)}


def test_evaluation_reads_every_window_of_the_whole_video_as_torchcodec_decodes_it(shard_dir):
    data = _data({"window": 5})  # 6-9 s videos at 2 frames/s: 12-18 frames, 3-4 overlapping windows each
    samples = _all_samples(shard_dir, "train")
    loader = make_loader(str(shard_dir / "train-*.tar"), data, TOKENIZER, batch_size=2,
                         train=False, rank=0, world=1)
    owned = {vid: [] for vid in samples}
    for batch in loader:
        for i, vid in enumerate(batch["video_id"]):
            video, meta = samples[vid]
            k, count = batch["window"][i].tolist()
            windows = inference_windows(meta["duration"], data.sampling)
            assert count == len(windows) > 1
            direct = VideoDecoder(video, seek_mode="exact").get_frames_played_at(windows[k].times)
            n = int(batch["frame_mask"][i].sum())
            assert n == len(windows[k].times) == 5
            assert torch.equal(batch["videos"][i, :n], direct.data)
            offset = float(batch["offset"][i])
            assert torch.allclose(batch["frame_times"][i, :n].double() + offset, direct.pts_seconds.double(), atol=1e-5)
            first, end = batch["own"][i].tolist()
            owned[vid] += [round(t, 4) for t in (batch["frame_times"][i, first:end].double() + offset).tolist()]
    for vid, (_, meta) in samples.items():  # the windows' reports tile the video at the trained rate
        grid = sample_times(meta["duration"], "uniform", 2.0, 1 << 30)
        assert owned[vid] == pytest.approx(grid, abs=0.26), vid


def test_batch_layout_and_targets(shard_dir):
    loader = make_loader(str(shard_dir), _data(), TOKENIZER, batch_size=3, train=True,
                         rank=0, world=1, epoch_batches=2)
    batches = list(loader)
    assert len(batches) == 2
    data = _data()
    # Training batches have fixed shapes: frames per window, queries per batch, words per query.
    for batch in batches:
        assert batch["videos"].shape[:2] == (3, data.sampling.window)
        assert batch["text_ids"].shape == (3 * data.queries_per_video, data.max_text_len)
        assert batch["moments"].shape[1] == 4 and batch["query_mask"].shape == (3 * data.queries_per_video,)
    b = batches[0]
    n_videos, n_queries = b["videos"].shape[0], int(b["query_mask"].sum())
    assert len(b["qid"]) == len(b["ground_truth"]) == n_queries and b["query_mask"][:n_queries].all()
    assert not b["moment_mask"][n_queries:].any() and not b["relevance"][n_queries:].any()
    assert b["videos"].dtype == torch.uint8 and b["videos"].shape[2:] == (3, 16, 16)
    assert b["frame_mask"].shape == b["frame_times"].shape == (n_videos, b["videos"].shape[1])
    assert b["relevance"].shape == b["saliency"].shape == (b["text_ids"].shape[0], b["videos"].shape[1])
    assert n_queries <= n_videos * 4 and b["video_index"].max() < n_videos
    # The sentence ends with the end-of-text token, as CLIP's text tower expects.
    last = b["text_mask"].sum(1) - 1
    assert (b["text_ids"][torch.arange(n_queries), last[:n_queries]] == TOKENIZER.eos_token_id).all()
    assert b["has_saliency"][:n_queries].all(), "QVHighlights-style sample data has saliency"
    for q in range(n_queries):
        v = b["video_index"][q]
        times = b["frame_times"][v][b["frame_mask"][v]]
        inside = torch.zeros_like(times, dtype=torch.bool)
        for k in range(int(b["moment_mask"][q].sum())):
            s, e = b["moments"][q, k]
            assert 0 <= s < e <= b["duration"][v] + 1e-5
            first, last_ = b["moment_frames"][q, k]
            assert first <= last_
            inside |= (times >= s) & (times < e)
        # Positive frames are exactly those inside a window (or the nearest one to a tiny window).
        assert (b["relevance"][q, : len(times)].bool() | ~inside).all()


@settings(max_examples=200, deadline=None)
@given(duration=st.floats(2.0, 200.0), clip_fps=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       max_frames=st.integers(1, 64), seed=st.integers(0, 10**6), mode=st.sampled_from(["uniform", "random"]),
       data=st.data())
def test_windows_map_to_the_right_clip_indices(duration, clip_fps, max_frames, seed, mode, data):
    rng = random.Random(seed)
    crop = None
    if data.draw(st.booleans()):  # a temporal crop, as in training
        a = data.draw(st.floats(0, duration * 0.5))
        crop = (a, data.draw(st.floats(a + 0.5, duration)))
    times = sample_times(duration, mode, clip_fps, max_frames, rng=rng, jitter=True, span=crop)
    lo, hi = crop or (0.0, duration)
    assert all(lo <= t < hi for t in times) and times == sorted(times) and len(times) <= max_frames
    shifted = [t - lo for t in times]
    start = data.draw(st.floats(0, hi - lo - 0.01))
    window = (start, data.draw(st.floats(start + 0.01, hi - lo)))
    relevance, [(first, last)] = frame_targets([window], shifted)
    inside = [j for j, t in enumerate(shifted) if window[0] <= t < window[1]]
    if inside:
        assert (first, last) == (inside[0], inside[-1])
        assert [j for j, r in enumerate(relevance) if r] == inside
    else:  # no sampled frame falls inside: the one nearest the centre stands for it
        centre = sum(window) / 2
        assert first == last and abs(shifted[first] - centre) == min(abs(t - centre) for t in shifted)


@pytest.mark.parametrize("max_videos_per_shard", [1, None])
def test_two_ranks_two_workers_read_every_sample_once(synth_dir, tmp_path, max_videos_per_shard):
    from vmr.data.shards import build_shards

    # 3 shards < 4 (rank, worker) slots, or 1 shard: both splitting paths.
    build_shards(synth_dir / "videos", [synth_dir / "train.jsonl"], tmp_path, fps=2.0, size=16,
                 keyframe_interval=0, max_videos_per_shard=max_videos_per_shard, progress=False)
    expected = set(_all_samples(tmp_path, "train"))
    seen = []
    for rank in (0, 1):
        loader = make_loader(str(tmp_path), _data(), TOKENIZER, batch_size=1, train=False,
                             rank=rank, world=2, num_workers=2)
        seen += [vid for batch in loader for vid in batch["video_id"]]
    assert sorted(seen) == sorted(expected)


def test_many_shards_split_by_shard_and_training_steps_are_equal(shard_dir):
    expected = set(_all_samples(shard_dir, "train")) | set(_all_samples(shard_dir, "val"))
    seen = []
    for rank in (0, 1):  # 4 shards, 4 slots: one shard each
        loader = make_loader(str(shard_dir), _data(), TOKENIZER, batch_size=1, train=False,
                             rank=rank, world=2, num_workers=2)
        seen += [vid for batch in loader for vid in batch["video_id"]]
    assert sorted(seen) == sorted(expected)
    counts = []
    for rank in (0, 1):
        loader = make_loader(str(shard_dir / "train-*.tar"), _data(), TOKENIZER, batch_size=1,
                             train=True, rank=rank, world=2, num_workers=2)
        counts.append(sum(1 for _ in loader))
    # 3 training videos over 2 ranks at batch 1: ceil(3 / 2) = 2 steps on each rank.
    assert counts == [2, 2]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_video_is_skipped_and_counted(shard_dir, tmp_path, workers):
    samples = [s for tar in sorted(shard_dir.glob("train-*.tar")) for s in iter_shard(tar)]
    with open(tmp_path / "bad-000000.tar", "wb") as f:
        writer = wds.TarWriter(f)
        for i, (key, video, meta) in enumerate(samples):
            writer.write({"__key__": key, "mp4": video[: len(video) // 3] if i == 1 else video,
                          "json": json.dumps(meta)})
        writer.close()
    loader = make_loader(str(tmp_path / "bad-000000.tar"), _data(), TOKENIZER, batch_size=1,
                         train=False, rank=0, world=1, num_workers=workers)
    got = [vid for batch in loader for vid in batch["video_id"]]
    assert got == [samples[0][2]["video_id"], samples[2][2]["video_id"]]
    assert skipped(loader) == 1


def test_keyframes_sampling_and_resizing(shard_dir):
    data = _data({"frames": "keyframes", "size": 24, "window": 6}, temporal_crop=0.0)
    loader = make_loader(str(shard_dir / "train-*.tar"), data, TOKENIZER, batch_size=3, train=True,
                         rank=0, world=1, epoch_batches=1)
    batch = next(iter(loader))
    assert batch["videos"].shape[1:] == (6, 3, 24, 24)
    # Every stored frame is a keyframe at 2 fps: the sampled frames sit on the 0.5-second grid of
    # the video (frame times count from the window's start, which lies anywhere).
    times = (batch["frame_times"].double() + batch["offset"][:, None])[batch["frame_mask"]] * 2
    assert torch.allclose(times, times.round(), atol=1e-4)


def test_a_stream_of_only_corrupt_samples_stops_with_a_reason(shard_dir, tmp_path):
    key, video, meta = next(iter_shard(sorted(shard_dir.glob("train-*.tar"))[0]))
    with open(tmp_path / "bad-000000.tar", "wb") as f:
        writer = wds.TarWriter(f)
        writer.write({"__key__": key, "mp4": b"not a video", "json": json.dumps(meta)})
        writer.close()
    loader = make_loader(str(tmp_path / "bad-000000.tar"), _data(), TOKENIZER, batch_size=1,
                         train=True, rank=0, world=1, epoch_batches=1)
    with pytest.raises(UserError, match="50 shards or samples in a row could not be read; last: .*bad-000000.tar"):
        next(iter(loader))


def test_hflip_swaps_left_and_right():
    assert _swap_left_right("a red circle moves left") == "a red circle moves right"
    assert _swap_left_right("a right left") == "a left right"


def test_map_style_dataset_over_loose_files(synth_dir):
    for annotations in ("val.jsonl", "annotations.json"):
        dataset = VideoMomentDataset(synth_dir / "videos", synth_dir / annotations,
                                     SamplingConfig(fps=2.0, size=16, frames="uniform"))
        item = dataset[0]
        assert item["frames"].shape[1:] == (3, 16, 16) and item["frames"].dtype == torch.uint8
        # The whole video at 2 frames/s, at the centres of the 0.5-s bins.
        assert len(item["times"]) == item["frames"].shape[0] == int(item["duration"] * 2)
        batch = Collator(TOKENIZER, 32)([dataset[i] for i in range(min(2, len(dataset)))])
        assert batch["videos"].shape[0] == min(2, len(dataset))
    assert len(VideoMomentDataset(synth_dir / "videos", synth_dir / "annotations.json")) == TINY["videos"]


def test_map_style_dataset_keyframes_sampling_returns_the_key_frames(synth_dir):
    from vmr.data.video import keyframe_times

    dataset = VideoMomentDataset(synth_dir / "videos", synth_dir / "val.jsonl", SamplingConfig(size=16, frames="keyframes"))
    item = dataset[0]
    video = next((synth_dir / "videos").glob(f"{item['video_id']}.*"))
    assert item["times"] == pytest.approx(keyframe_times(video), abs=1e-4)
    uniform = VideoMomentDataset(synth_dir / "videos", synth_dir / "val.jsonl", SamplingConfig(size=16, frames="uniform"))
    assert len(uniform[0]["times"]) != len(item["times"])  # not the uniform grid under another name


def test_expand_shards(shard_dir):
    assert len(expand_shards(str(shard_dir / "train-{000000..000002}.tar"))) == 3
    assert expand_shards([str(shard_dir / "val-*.tar")]) == [str(shard_dir / "val-000000.tar")]
    assert expand_shards("pipe:cat x.tar", allow_pipe=True) == ["pipe:cat x.tar"]
    with pytest.raises(UserError, match="runs a shell command"):
        expand_shards("pipe:cat x.tar")
    with pytest.raises(UserError, match="does not exist"):
        expand_shards(str(shard_dir / "nope.tar"))
    with pytest.raises(UserError, match="no shard matches"):
        expand_shards(str(shard_dir / "*.zip"))


def test_device_batches_are_the_loaders_batches(shard_dir):
    """The training loop's input path (``device_batches``: each batch copied to the device while
    the step before it computes; a side stream on CUDA) yields exactly the loader's batches."""
    from vmr.data.prefetch import device_batches

    def loader():
        return make_loader(str(shard_dir), _data(num_workers=1), TOKENIZER, batch_size=2, train=True,
                           rank=0, world=1, epoch_batches=3)

    plain, moved = list(loader()), list(device_batches(loader(), torch.device("cpu")))
    assert len(plain) == len(moved) == 3
    for a, b in zip(plain, moved, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert b[key].device.type == "cpu" and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key
