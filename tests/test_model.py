"""The model on tiny random CLIPs: shapes, masks, query sensitivity, gradients, decoding,
from_pretrained round trips, and overfitting one real batch from the shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vmr import load_config
from vmr.bundle import read_bundle, write_bundle
from vmr.config import DataConfig, SamplingConfig
from vmr.data.stream import make_loader
from vmr.model import VideoMomentRetrievalModel, decode_moments, moment_losses
from vmr.model.losses import giou_1d
from vmr.text import load_tokenizer

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def tiny_model(**changes) -> VideoMomentRetrievalModel:
    cfg = load_config(TINY).model
    torch.manual_seed(0)
    return VideoMomentRetrievalModel.from_config(dataclasses.replace(cfg, **changes)).eval()


def frames(b=2, t=6, size=32, seed=0):
    return torch.randint(0, 256, (b, t, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_output_shapes_with_several_queries_per_video():
    model = tiny_model()
    text = model.tokenize(["a red circle spins", "a blue square moves left", "the green triangle jumps"])
    out = model(frames(), text, video_index=torch.tensor([0, 0, 1]))
    assert out["relevance_logits"].shape == out["saliency"].shape == out["frame_mask"].shape == (3, 6)
    assert out["boundaries"].shape == (3, 6, 2) and (out["boundaries"] >= 0).all()
    assert out["duration"].tolist() == [6.0, 6.0, 6.0]


def test_original_constructor_arguments():
    model = VideoMomentRetrievalModel(model_name="unused-for-random-init", temporal_modeling=False,
                                      freeze_backbone=True, init="random", tokenizer="synthetic", image_size=32,
                                      patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                                      text_layers=1, text_heads=2, projection_dim=32, hidden_dim=32, num_heads=2)
    assert not model.config.temporal_modeling
    assert not any(p.requires_grad for p in model.towers.parameters())


def test_padded_frames_and_padded_words_change_nothing():
    model = tiny_model()
    video = frames(b=1, t=5)
    text = model.tokenize(["a red circle spins"])
    alone = model(video, text)
    # Same video padded with 3 junk frames, in a batch with a longer query (so the first is padded).
    padded = torch.cat([video, frames(b=1, t=3, seed=1)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    both = model.tokenize(["a red circle spins", "the big blue square moves quickly to the left"])
    assert both["attention_mask"][0].sum() < both["attention_mask"][1].sum()
    batch = model(padded, both, frame_mask=mask, video_index=torch.tensor([0, 0]))
    for key in ("relevance_logits", "saliency", "boundaries"):
        torch.testing.assert_close(batch[key][0, :5], alone[key][0], atol=1e-5, rtol=1e-4)


def test_different_queries_give_different_outputs():
    """The original model was blind to the query; this one must not be, even untrained."""
    model = tiny_model()
    text = model.tokenize(["a red circle spins", "a blue square jumps"])
    out = model(frames(b=1), text)
    assert (out["relevance_logits"][0] - out["relevance_logits"][1]).abs().max() > 1e-4
    assert (out["boundaries"][0] - out["boundaries"][1]).abs().max() > 1e-6


CORPUS_ONLY = ("head.keys.", "head.presence_head.")


def _targets(q: int, t: int) -> dict:
    relevance = torch.zeros(q, t)
    relevance[:, 1:3] = 1
    return {"relevance": relevance, "moments": torch.tensor([[[1.0, 3.0]]] * q),
            "moment_mask": torch.ones(q, 1, dtype=torch.bool), "moment_frames": torch.tensor([[[1, 2]]] * q),
            "saliency": relevance * 0.75, "has_saliency": torch.tensor([True] + [False] * (q - 1))}


@pytest.mark.parametrize("freeze", [False, True])
def test_gradients_reach_every_trainable_parameter(freeze):
    model = tiny_model(freeze_backbone=freeze, dropout=0.1).train()
    text = model.tokenize(["a red circle spins", "a blue square jumps"])
    out = model(frames(b=1), text)
    moment_losses(out, _targets(2, 6), model.config)["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith(CORPUS_ONLY):  # trained by model.corpus's losses alone (test_corpus_search.py)
            continue
        if name.startswith("towers.") and freeze:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
            if "token_embedding" not in name:  # rows of words absent from these queries stay 0
                assert p.grad.abs().sum() > 0, name


def test_queries_without_moments_train_the_saliency_head_alone():
    """Highlight-detection data (no moments): the relevance and boundary losses do not see those
    queries, so the relevance head gets no gradient from them; saliency trains as usual."""
    model = tiny_model(dropout=0.0).train()
    out = model(frames(b=1), model.tokenize(["a red circle spins", "a blue square jumps"]))
    targets = {**_targets(2, 6), "has_saliency": torch.tensor([True, True])}
    targets["moment_mask"] = torch.zeros(2, 1, dtype=torch.bool)
    targets["relevance"] = torch.zeros(2, 6)
    mixed = moment_losses(out, {**targets, "has_moments": torch.tensor([True, False])}, model.config)
    only_first = moment_losses({k: v[:1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v for k, v in out.items()},
                               {k: v[:1] for k, v in {**targets, "has_moments": torch.tensor([True, False])}.items()},
                               model.config)
    torch.testing.assert_close(mixed["relevance"], only_first["relevance"])
    none = moment_losses(out, {**targets, "has_moments": torch.tensor([False, False])}, model.config)
    assert none["relevance"] == 0 and none["l1"] == 0 and none["saliency"] > 0
    none["loss"].backward()
    assert model.head.relevance_head.weight.grad is None or model.head.relevance_head.weight.grad.abs().sum() == 0
    assert model.head.saliency_head.weight.grad.abs().sum() > 0


def test_decoding_hand_built_outputs():
    # 4 frames at 0, 1, 2, 3 s of a 4-s video. Frame 2 is the most relevant and points 1 s back
    # and 0.5 s ahead; frame 1 proposes nearly the same window (suppressed by NMS); frame 3 points
    # past the end (clipped to 4 s); frame 0 is padding.
    logit = lambda p: torch.logit(torch.tensor(p))  # noqa: E731
    outputs = {
        "relevance_logits": torch.stack([logit(0.99), logit(0.8), logit(0.9), logit(0.5)])[None],
        "boundaries": torch.tensor([[[0.0, 0.0], [0.0, 0.4], [0.25, 0.125], [0.25, 1.0]]]),
        "saliency": torch.zeros(1, 4),
        "frame_mask": torch.tensor([[False, True, True, True]]),
        "frame_times": torch.tensor([[0.0, 1.0, 2.0, 3.0]]),
        "duration": torch.tensor([4.0]),
    }
    result = decode_moments(outputs, top_k=5, nms_iou=0.5)[0]
    moments = [(round(s, 4), round(e, 4), round(p, 4)) for s, e, p in result["moments"]]
    assert moments == [(1.0, 2.5, 0.9), (2.0, 4.0, 0.5)]  # (1.0, 2.6, 0.8) has IoU 0.94 with the first
    assert result["frame_times"] == [1.0, 2.0, 3.0]
    assert [round(p, 4) for p in result["frame_scores"]] == [0.8, 0.9, 0.5]
    assert decode_moments(outputs, top_k=1, nms_iou=0.5)[0]["moments"][0][:2] == pytest.approx((1.0, 2.5))


def test_giou_1d():
    a = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [0.5, 1.5], [2.0, 3.0]])
    # identical: 1; overlap 0.5 over union 1.5: 1/3; disjoint, hull 3, union 2: 0 - 1/3
    torch.testing.assert_close(giou_1d(a, b), torch.tensor([1.0, 1 / 3, -1 / 3]), atol=1e-5, rtol=0)


def test_retrieve_moments_in_seconds():
    model = tiny_model()
    many = model.sampling.window + 20  # two windows
    moments, scores = model.retrieve_moments(frames(b=1, t=many)[0], "a red circle spins", top_k=3,
                                             frame_times=[i * 0.5 for i in range(many)])
    assert len(scores) == many  # every frame scored, none thinned
    assert 1 <= len(moments) <= 3
    assert all(0 <= m["start"] < m["end"] <= many * 0.5 for m in moments)
    assert [m["score"] for m in moments] == sorted((m["score"] for m in moments), reverse=True)
    with pytest.raises(ValueError, match="empty"):
        model.retrieve_moments(frames(b=1)[0], "  ")


def test_whole_video_scoring_equals_one_forward_per_window():
    model = tiny_model()
    model.sampling = SamplingConfig(fps=2.0, window=8, overlap=0.25)
    video = frames(b=1, t=19, seed=3)[0]
    times = [(i + 0.5) / 2 for i in range(19)]
    moments, scores = model.retrieve_moments(video, "a red circle spins", top_k=5)  # default times: 1/fps bins
    assert len(scores) == 19
    # The naive reference: each window on its own, each frame taken from the window that owns it.
    from vmr.spans import frame_windows

    reference = []
    for first, end, own_first, own_end in frame_windows(19, 8, 0.25):
        out = model(video[None, first:end], model.tokenize(["a red circle spins"]),
                    frame_times=torch.tensor([times[first:end]]) - first / 2, duration=torch.tensor([(end - first) / 2]))
        reference += torch.sigmoid(out["relevance_logits"][0, own_first - first:own_end - first]).tolist()
    assert scores == pytest.approx(reference, abs=1e-5)
    assert all(0 <= m["start"] < m["end"] <= 19 / 2 + 1e-6 for m in moments)
    # One window covering the whole video: the same as a single forward.
    model.sampling = SamplingConfig(fps=2.0, window=32)
    _, whole = model.retrieve_moments(video, "a red circle spins")
    single = model(video[None], model.tokenize(["a red circle spins"]), frame_times=torch.tensor([times]),
                   duration=torch.tensor([9.5]))
    assert whole == pytest.approx(torch.sigmoid(single["relevance_logits"][0]).tolist(), abs=1e-5)


def test_the_bundle_carries_the_sampling_spec_and_retrieve_moments_uses_it(tmp_path):
    model = tiny_model()
    model.sampling = SamplingConfig(fps=4.0, window=6, size=32, overlap=0.5)
    write_bundle(model, tmp_path / "bundle")
    loaded = read_bundle(tmp_path / "bundle")
    assert loaded.sampling == model.sampling
    assert load_config(tmp_path / "bundle" / "config.yaml").data.sampling == model.sampling
    moments, scores = loaded.retrieve_moments(frames(b=1, t=20)[0], "a red circle spins", top_k=3)
    assert len(scores) == 20
    assert all(0 <= m["start"] < m["end"] <= 20 / 4 + 1e-6 for m in moments)  # 20 frames at 4/s: 5 s


def test_clip_from_pretrained_directory(tmp_path):
    """The pretrained path (hub name or local directory) on a tiny CLIP saved to disk."""
    from transformers import CLIPModel

    from vmr.model.backbone import random_tower_config

    cfg = load_config(TINY).model
    clip = CLIPModel(random_tower_config(cfg, load_tokenizer("synthetic")))
    clip.save_pretrained(tmp_path / "clip")
    model = VideoMomentRetrievalModel.from_config(dataclasses.replace(cfg, init="pretrained", name=str(tmp_path / "clip")))
    torch.testing.assert_close(model.towers.vision.state_dict(), clip.vision_model.state_dict())
    torch.testing.assert_close(model.towers.text_projection.weight, clip.text_projection.weight)


def test_bundle_round_trip(tmp_path):
    model = tiny_model()
    write_bundle(model, tmp_path / "bundle")
    files = {p.name for p in (tmp_path / "bundle").iterdir()}
    assert {"model.safetensors", "config.yaml", "tower_config.json", "tokenizer.json",
            "preprocessor_config.json"} <= files
    loaded = read_bundle(tmp_path / "bundle")
    text = model.tokenize(["a red circle spins"])
    torch.testing.assert_close(loaded(frames(b=1), text), model(frames(b=1), text))
    write_bundle(model, tmp_path / "bundle")  # overwriting an existing bundle works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    # A bundle written before other backbones names its towers' config clip_config.json: still read.
    (tmp_path / "bundle" / "tower_config.json").rename(tmp_path / "bundle" / "clip_config.json")
    old = read_bundle(tmp_path / "bundle")
    torch.testing.assert_close(old(frames(b=1), text), model(frames(b=1), text))


def test_from_pretrained_names_a_missing_file(tmp_path):
    from vmr.errors import UserError

    with pytest.raises(UserError, match="model.safetensors"):
        read_bundle(tmp_path)


@pytest.mark.slow
def test_overfits_one_real_batch(shard_dir):
    data = DataConfig(sampling=SamplingConfig(fps=2.0, size=16, window=16), num_workers=0, temporal_crop=0.0,
                      scale_jitter=(1.0, 1.0))
    loader = make_loader(str(shard_dir / "train-*.tar"), data, load_tokenizer("synthetic"), batch_size=2,
                         train=False, rank=0, world=1)
    batch = next(iter(loader))
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    text = {"input_ids": batch["text_ids"], "attention_mask": batch["text_mask"]}
    losses = []
    for _ in range(150):
        out = model(batch["videos"], text, frame_mask=batch["frame_mask"], video_index=batch["video_index"],
                    frame_times=batch["frame_times"], duration=batch["duration"])
        loss = moment_losses(out, batch, model.config)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    text_queries = ["a red circle spins", "a blue square jumps"]
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(gradient_checkpointing=checkpointing).train()
        assert model.towers.vision.encoder.gradient_checkpointing is checkpointing
        assert model.towers.text.encoder.gradient_checkpointing is checkpointing
        out = model(frames(b=1), model.tokenize(text_queries))
        moment_losses(out, _targets(2, 6), model.config)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("span", [1, 2])
def test_neighbour_changes_against_a_loop(span):
    """The arithmetic (shape-stable) version against frame-by-frame differences: a missing or padded
    neighbour means no change."""
    from vmr.model.blocks import neighbour_changes

    patches = torch.randn(2, 5, 3, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = neighbour_changes(patches, mask, span)
    assert out.shape == (2, 5, 3, 8 * span)

    def ok(b: int, t: int, u: int) -> bool:
        return 0 <= u < 5 and bool(mask[b, u]) and bool(mask[b, t])

    for b in range(2):
        for t in range(5):
            expected = []
            for k in range(1, span + 1):
                expected.append(patches[b, t] - patches[b, t - k] if ok(b, t, t - k) else torch.zeros(3, 4))
                expected.append(patches[b, t + k] - patches[b, t] if ok(b, t, t + k) else torch.zeros(3, 4))
            torch.testing.assert_close(out[b, t], torch.cat(expected, dim=-1))


def test_motion_features_see_the_order_of_frames():
    """With motion on, what a query pools at a frame depends on its neighbours, not only on the
    frame itself: swapping the two frames after frame 1 changes frame 1's pooled feature."""
    from vmr.model.blocks import QueryPool

    torch.manual_seed(0)
    pool = QueryPool(8, 2, motion=True)
    patches, sentence = torch.randn(1, 4, 3, 8), torch.randn(1, 8)
    mask, index = torch.ones(1, 4, dtype=torch.bool), torch.tensor([0])
    swapped = patches[:, [0, 1, 3, 2]]
    assert (pool(sentence, patches, index, mask)[0, 1] - pool(sentence, swapped, index, mask)[0, 1]).abs().max() > 1e-4
    pool.motion = None  # frame by frame only: frame 1 cannot tell
    torch.testing.assert_close(pool(sentence, patches, index, mask)[0, 1], pool(sentence, swapped, index, mask)[0, 1])


def _fixed_shape_batch(shard_dir, model, cfg) -> dict:
    data = dataclasses.replace(cfg.data, sampling=dataclasses.replace(cfg.data.sampling, size=16, window=64),
                               num_workers=0)
    return next(iter(make_loader(str(shard_dir), data, model.tokenizer, 2, train=True, rank=0, world=1,
                                 epoch_batches=1)))


@pytest.mark.slow
def test_the_compiled_model_gives_the_eager_outputs_and_gradients(shard_dir):
    """train.compile: torch.compile (inductor, fixed shapes, as the loop compiles it) of the whole
    model, forward and backward through the losses, on a real training batch."""
    from vmr.model import batch_forward

    cfg = load_config(TINY, ["model.dropout=0"])
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).train()
    batch = _fixed_shape_batch(shard_dir, model, cfg)

    def run(forward):
        model.zero_grad(set_to_none=True)
        outputs = batch_forward(forward, batch)
        losses = moment_losses(outputs, batch, cfg.model)
        losses["loss"].backward()
        # (model.corpus's key and presence layers: outputs no loss here reads; compiled code may give them zeros)
        return outputs, losses, {n: p.grad.clone() for n, p in model.named_parameters()
                                 if p.grad is not None and not n.startswith(CORPUS_ONLY)}

    eager, compiled = run(model), run(torch.compile(model, backend="inductor", dynamic=False))
    for key in ("relevance_logits", "boundaries", "saliency"):
        torch.testing.assert_close(compiled[0][key], eager[0][key], rtol=1e-4, atol=1e-5)
    for key in eager[1]:
        torch.testing.assert_close(compiled[1][key], eager[1][key], rtol=1e-4, atol=1e-6)
    assert eager[2].keys() == compiled[2].keys() and len(eager[2]) > 100
    for name in eager[2]:  # key biases have no gradient in exact arithmetic: noise of ~1e-10 either way
        torch.testing.assert_close(compiled[2][name], eager[2][name], rtol=1e-3, atol=1e-6, msg=name)


def test_padding_queries_and_frames_change_no_loss(shard_dir):
    """A fixed-shape batch's padding (queries after the real ones, frames after each window's end)
    weighs nothing: the losses equal those of the same batch cut to its real queries and frames."""
    from vmr.model import batch_forward

    cfg = load_config(TINY, ["model.dropout=0"])
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).eval()
    batch = _fixed_shape_batch(shard_dir, model, cfg)
    q, t = int(batch["query_mask"].sum()), int(batch["frame_mask"].sum(1).max())
    assert q < len(batch["query_mask"]) and t < batch["videos"].shape[1], "the batch must hold padding"
    cut = dict(batch)
    for key in ("videos", "frame_mask", "frame_times"):
        cut[key] = batch[key][:, :t]
    for key in ("text_ids", "text_mask", "moments", "moment_mask", "moment_frames", "has_saliency", "has_moments",
                "video_index"):
        cut[key] = batch[key][:q]
    for key in ("relevance", "saliency"):
        cut[key] = batch[key][:q, :t]
    width = int(cut["text_mask"].sum(1).max())
    cut["text_ids"], cut["text_mask"] = cut["text_ids"][:, :width], cut["text_mask"][:, :width]
    del cut["query_mask"]
    with torch.no_grad():
        padded = moment_losses(batch_forward(model, batch), batch, cfg.model)
        plain = moment_losses(batch_forward(model, cut), cut, cfg.model)
    for key in plain:
        torch.testing.assert_close(padded[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("motion", [False, True])
def test_query_pool_reads_each_videos_patches_once_for_all_its_sentences(motion):
    """A search asks each video several sentences in a row (video_index 0, 0, 0, 1, 1, 1): the pool
    then attends without copying the patches per sentence, and must answer what the copying path
    (any other order of videos) answers for the same pairs."""
    from vmr.model.blocks import QueryPool

    torch.manual_seed(0)
    pool = QueryPool(16, heads=2, motion=motion).eval()
    patches, mask = torch.randn(2, 5, 4, 16), torch.ones(2, 5, dtype=torch.bool)
    sentences = torch.randn(6, 16)
    keys, values = pool.prepare(patches, mask)
    grouped = pool.attend(sentences, keys, values, torch.tensor([0, 0, 0, 1, 1, 1]))
    order = torch.tensor([3, 0, 4, 1, 5, 2])  # videos 1, 0, 1, 0, 1, 0: the copying path
    mixed = pool.attend(sentences[order], keys, values, torch.tensor([1, 0, 1, 0, 1, 0]))
    assert grouped.shape == (6, 5, 16)
    torch.testing.assert_close(mixed, grouped[order], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grouped[0], grouped[1])  # each sentence its own answer
