"""SigLIP and SigLIP 2 towers beside CLIP's: tiny random towers saved and loaded through the real
``from_pretrained`` path, the interface against the transformers model called directly, padding,
training, bundles and ``vmr predict``, and caches refused across backbones."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vmr.bundle import read_bundle
from vmr.cli import main
from vmr.config import load_config
from vmr.errors import UserError
from vmr.model import VideoMomentRetrievalModel, batch_forward, moment_losses
from vmr.model.backbone import KINDS, random_tower_config
from vmr.text import load_tokenizer

from .test_hardening import one_line_error

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SIGLIPS = ["siglip", "siglip2"]
QUERIES = ["a red circle grows", "a small blue square moves to the left and then stops near the edge"]


def tiny_cfg(backbone: str, **fields):
    return dataclasses.replace(load_config(TINY, [f"model.backbone={backbone}"]).model, **fields)


def saved_towers(backbone: str, folder: Path):
    """A tiny random transformers model of ``backbone``'s kind and its processor, saved as a
    pretrained checkpoint would be."""
    import transformers

    from vmr.model.backbone import load_processor

    torch.manual_seed(0)
    cfg = tiny_cfg(backbone)
    towers = getattr(transformers, KINDS[backbone].model)(random_tower_config(cfg, load_tokenizer("synthetic")))
    towers.save_pretrained(folder)
    load_processor(cfg, towers.config).save_pretrained(folder)
    return towers.eval()


def pretrained(backbone: str, folder: Path) -> VideoMomentRetrievalModel:
    """The model on the saved towers (the synthetic vocabulary stands for the checkpoint's own)."""
    return VideoMomentRetrievalModel.from_config(tiny_cfg(backbone, init="pretrained", name=str(folder)))


@pytest.mark.parametrize("backbone", SIGLIPS)
def test_the_interface_matches_transformers_called_directly(backbone, tmp_path):
    """Frames through the checkpoint's own image processor and towers, text padded to the tower's
    length as SigLIP is used: the same tokens, pooled embedding and sentence embedding."""
    from PIL import Image

    reference = saved_towers(backbone, tmp_path / "towers")
    model = pretrained(backbone, tmp_path / "towers").eval()
    assert model.towers.kind == backbone and model.towers.grid == 16
    frames = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    processor = model.processor  # read back from the checkpoint folder
    inputs = processor([Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames], return_tensors="pt")
    with torch.no_grad():
        direct = reference.vision_model(**inputs)
        tokens = model.towers.encode_frames(frames)
    assert tokens.shape == (3, 17, 64)
    torch.testing.assert_close(tokens[:, 0], direct.pooler_output, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens[:, 1:], direct.last_hidden_state, atol=1e-4, rtol=1e-4)

    tokenizer = load_tokenizer("synthetic")
    ids = tokenizer(QUERIES, padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = reference.text_model(input_ids=ids)
        text, sentence = model.encode_queries(QUERIES)
    length = text["attention_mask"].shape[1]
    torch.testing.assert_close(sentence, direct.pooler_output, atol=1e-5, rtol=1e-5)
    mask = text["attention_mask"].bool()
    torch.testing.assert_close(text["features"][mask], direct.last_hidden_state[:, :length][mask], atol=1e-5, rtol=1e-5)


def test_clip_keeps_its_outputs(tmp_path):
    """CLIP's towers behind the interface give what CLIPModel itself gives for the same weights: the
    projected class token (its image embedding) then the projected patches, and the text
    embedding read at the end-of-text token."""
    from PIL import Image

    reference = saved_towers("clip", tmp_path / "towers")
    model = pretrained("clip", tmp_path / "towers").eval()
    frames = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    inputs = model.processor([Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames], return_tensors="pt")
    ids = load_tokenizer("synthetic")(QUERIES, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = reference.vision_model(**inputs).last_hidden_state
        direct = reference.visual_projection(reference.vision_model.post_layernorm(hidden))
        sentences = reference.text_projection(reference.text_model(input_ids=ids).pooler_output)
        tokens = model.towers.encode_frames(frames)
        sentence = model.encode_queries(QUERIES)[1]
    torch.testing.assert_close(tokens, direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sentence, sentences, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["clip", *SIGLIPS])
def test_padding_does_not_change_a_sentence(backbone):
    """A sentence's features are the same alone and beside a longer one (CLIP: causal, padding after
    it; SigLIP: always padded to the tower's full length)."""
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(tiny_cfg(backbone)).eval()
    with torch.no_grad():
        alone, alone_sentence = model.encode_queries(QUERIES[:1])
        both, both_sentence = model.encode_queries(QUERIES)
    n = int(alone["attention_mask"].sum())
    assert both["attention_mask"].shape[1] > n
    torch.testing.assert_close(both["features"][0, :n], alone["features"][0, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both_sentence[0], alone_sentence[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", SIGLIPS)
def test_siglip_trains_frozen_or_fine_tuned_with_checkpointing(backbone):
    """A few steps lower the loss; a frozen tower gets no gradient; gradient checkpointing gives the
    same gradients."""
    frames = torch.randint(0, 256, (1, 6, 3, 32, 32), dtype=torch.uint8)
    batch = {"relevance": torch.zeros(2, 6), "saliency": torch.zeros(2, 6), "has_saliency": torch.zeros(2, dtype=torch.bool),
             "moments": torch.tensor([[[1.0, 3.0]], [[2.0, 5.0]]]), "moment_frames": torch.tensor([[[1, 3]], [[2, 5]]]),
             "moment_mask": torch.ones(2, 1, dtype=torch.bool), "query_mask": torch.ones(2, dtype=torch.bool),
             "has_moments": torch.ones(2, dtype=torch.bool)}
    batch["relevance"][0, 1:3], batch["relevance"][1, 2:5] = 1.0, 1.0
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VideoMomentRetrievalModel.from_config(tiny_cfg(backbone, gradient_checkpointing=checkpointing,
                                                               dropout=0.0)).train()
        assert model.towers.vision.encoder.gradient_checkpointing is checkpointing
        out = model(frames, model.tokenize(QUERIES))
        moment_losses(out, batch, model.config)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert any(n.startswith("towers.vision.") for n in grads[-1]) and any(n.startswith("towers.text.") for n in grads[-1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)

    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(tiny_cfg(backbone, freeze_backbone=True)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = moment_losses(model(frames, model.tokenize(QUERIES)), batch, model.config)["loss"]
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.towers.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_siglip2_takes_the_patch_grid_it_is_given():
    """SigLIP 2 reads patches with their grid's shape: frames enter as the square grid of its patch
    budget, whatever their decoded size."""
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(tiny_cfg("siglip2")).eval()
    assert model.towers.image_size == 32 and model.tower_config.vision_config.num_patches == 16
    with torch.no_grad():
        small = model.towers.encode_frames(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert small.shape == (2, 17, 64) and torch.isfinite(small).all()


def test_a_checkpoint_of_another_kind_is_refused_in_one_line(tmp_path):
    saved_towers("siglip", tmp_path / "siglip")
    with pytest.raises(UserError, match=r"is a siglip checkpoint, but model.backbone is clip \(set model.backbone: siglip\)"):
        pretrained("clip", tmp_path / "siglip")
    with pytest.raises(UserError, match="is a siglip checkpoint, but model.backbone is siglip2"):
        pretrained("siglip2", tmp_path / "siglip")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", SIGLIPS)
def test_train_export_predict_and_eval(backbone, shard_dir, synth_dir, tmp_path, capsys):
    """``vmr train`` with the towers of ``backbone`` (from a checkpoint folder, as pretrained towers
    load), then ``vmr predict`` and ``vmr eval --checkpoint`` from the exported bundle, offline."""
    saved_towers(backbone, tmp_path / "towers")
    out = tmp_path / "run"
    assert main(["train", "--config", str(TINY), f"data.train_shards={shard_dir}/train-*.tar",
                 f"data.val_shards={shard_dir}/val-*.tar", "data.sampling.size=16", "data.num_workers=0",
                 f"model.backbone={backbone}", "model.init=pretrained", f"model.name={tmp_path / 'towers'}",
                 f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=2",
                 "train.warmup_steps=1", "train.save_every=0", "train.eval_every=0", "train.log_every=1"]) == 0
    bundle = read_bundle(out / "export")
    assert bundle.towers.kind == backbone and json.loads((out / "export" / "tower_config.json").read_text())["model_type"] == backbone
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out / "export"), "--video", str(video),
                 "--query", "a red circle grows", "--query", "a blue square"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == ["a red circle grows", "a blue square"]
    assert all(r["moments"] and len(r["frame_scores"]) == len(r["frame_times"]) for r in results)
    assert main(["eval", "--checkpoint", str(out / "export"), "--shards", f"{shard_dir}/val-*.tar",
                 "--json", str(tmp_path / "metrics.json")]) == 0
    assert 0 <= json.loads((tmp_path / "metrics.json").read_text())["brief"]["MR-full-R1@0.5"] <= 100
    index = tmp_path / "index"
    assert main(["index", "--checkpoint", str(out / "export"), "--videos", str(synth_dir / "videos"),
                 "--out", str(index)]) == 0
    assert json.loads((index / "manifest.json").read_text())["extractor"]["kind"] == backbone
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--query", "a red circle grows", "--top-k", "2"]) == 0
    found = json.loads(capsys.readouterr().out)["results"]
    assert 1 <= len(found) <= 2 and {"video", "start", "end", "score"} <= set(found[0])


@pytest.mark.slow
def test_a_cache_or_encoding_of_one_backbone_is_refused_by_another(shard_dir, synth_dir, tmp_path, capsys):
    """Features extracted with CLIP's tower, given to a SigLIP model, and an encoding saved by a
    SigLIP model, read by a CLIP one: one line each, naming both kinds."""
    from vmr.encode import encode_video, load_encoding

    cache = tmp_path / "clip-features"
    assert main(["features", "extract", "--config", str(TINY), "--shards", str(shard_dir), "--out", str(cache),
                 "data.sampling.size=16"]) == 0
    assert json.loads((cache / "manifest.json").read_text())["extractor"]["kind"] == "clip"
    capsys.readouterr()
    code = main(["train", "--config", str(TINY), f"data.train_shards={cache}/train-*.tar", "data.val_shards=[]",
                 "model.backbone=siglip", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"])
    one_line_error(capsys, code, "data.train_shards", "made by a clip tower", "the model's backbone is siglip")
    manifest = json.loads((cache / "manifest.json").read_text())  # a damaged extractor record: one line too
    (cache / "manifest.json").write_text(json.dumps({**manifest, "extractor": {**manifest["extractor"], "kind": 3}}))
    code = main(["train", "--config", str(TINY), f"data.train_shards={cache}/train-*.tar", "data.val_shards=[]",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"])
    one_line_error(capsys, code, "manifest.json: extractor: 'kind' must be str")

    torch.manual_seed(0)
    siglip = VideoMomentRetrievalModel.from_config(tiny_cfg("siglip"), sampling=load_config(TINY).data.sampling)
    video = sorted((synth_dir / "videos").glob("*.mp4"))[0]
    encoding = encode_video(siglip, video)
    assert encoding.tokens.shape[1:] == (17, 64) and np.isfinite(encoding.tokens.float().numpy()).all()
    encoding.save(tmp_path / "encoding")
    assert load_encoding(tmp_path / "encoding", siglip).tokens.shape == encoding.tokens.shape
    clip = VideoMomentRetrievalModel.from_config(tiny_cfg("clip"), sampling=load_config(TINY).data.sampling)
    with pytest.raises(UserError, match="made by a siglip tower .*the model's backbone is clip"):
        load_encoding(tmp_path / "encoding", clip)


def test_a_batch_of_the_loader_runs_through_siglip(shard_dir):
    """The loader pads text to data.max_text_len; SigLIP's towers take it as they take anything else."""
    from vmr.data.stream import make_loader

    torch.manual_seed(0)
    cfg = load_config(TINY, ["model.backbone=siglip", "data.sampling.size=16", "data.num_workers=0"])
    model = VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling).train()
    loader = make_loader(f"{shard_dir}/train-*.tar", cfg.data, model.tokenizer, 2, train=True, rank=0, world=1)
    batch = next(iter(loader))
    assert batch["text_ids"].shape[1] == cfg.data.max_text_len
    loss = moment_losses(batch_forward(model, batch), batch, model.config)["loss"]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("preset", ["qvhighlights_siglip", "charades_sta_siglip"])
def test_siglip_presets_build_their_checkpoints_sizes_offline(preset):
    """Offline (init=random) the presets' towers have the published base checkpoints' sizes, which
    are transformers' SiglipConfig defaults (google/siglip-base-patch16-224's config.json names
    only what differs from them; google/siglip2-base-patch16-224 has the same sizes)."""
    import transformers

    cfg = load_config(preset, ["model.init=random", "model.tokenizer=synthetic"]).model
    assert cfg.backbone == "siglip" and cfg.name.startswith(("google/siglip-base-patch16-224", "google/siglip2-base-patch16-224"))
    built, published = random_tower_config(cfg, load_tokenizer("synthetic")), transformers.SiglipConfig()
    sizes = {"vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "image_size", "patch_size"),
             "text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "max_position_embeddings")}
    for part, keys in sizes.items():
        for key in keys:
            assert getattr(getattr(built, part), key) == getattr(getattr(published, part), key), (part, key)
