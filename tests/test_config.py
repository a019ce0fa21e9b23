from pathlib import Path

import pytest

from vmr.config import load_config, save_config
from vmr.errors import UserError


def test_yaml_and_overrides_are_typed(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  sampling:\n    size: 64\n  train_shards: a/train-*.tar\n")
    cfg = load_config(preset, ["data.sampling.fps=2", "data.scale_jitter=[0.5, 1.0]", "model.tokenizer=synthetic"])
    assert cfg.data.sampling.size == 64 and cfg.data.train_shards == ["a/train-*.tar"]
    assert cfg.data.sampling.fps == 2.0 and isinstance(cfg.data.sampling.fps, float)
    assert cfg.data.scale_jitter == (0.5, 1.0)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_keys_of_earlier_versions_are_read_into_the_sampling_spec(tmp_path):
    preset = tmp_path / "old.yaml"  # a bundle's config.yaml from before the sampling spec
    preset.write_text("data:\n  image_size: 64\n  clip_fps: 0.5\nmodel:\n  max_frames: 8\n")
    spec = load_config(preset, ["data.frame_sampling=uniform"]).data.sampling
    assert (spec.size, spec.fps, spec.window, spec.frames) == (64, 0.5, 8, "uniform")
    # Both spellings in one file: the new one wins.
    preset.write_text("data:\n  clip_fps: 0.5\n  sampling:\n    fps: 3\n")
    assert load_config(preset).data.sampling.fps == 3.0


@pytest.mark.parametrize(("override", "message"), [
    ("data.imagesize=3", "unknown config key 'data.imagesize'"),
    ("nope.x=1", "unknown config key 'nope'"),
    ("data.sampling.size=big", "data.sampling.size: expected int, got 'big'"),
    ("data.sampling.frames=dense", "data.sampling.frames: 'dense' is not one of uniform, random, keyframes"),
    ("data.sampling.window=0", "data.sampling.window must be at least 1"),
    ("data.sampling.overlap=1", "data.sampling.overlap is a share in"),
    ("data.sampling.fpss=1", "unknown config key 'data.sampling.fpss'"),
    ("data.temporal_crop=2", "data.temporal_crop is a probability"),
    ("data.hflip=3", "data.hflip: expected bool"),
    ("novalue", "not of the form section.key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_the_config_names_every_protocol_the_metrics_score():
    from typing import get_args, get_type_hints

    from vmr.config import TrainConfig
    from vmr.eval.metrics import PROTOCOLS

    # config.py sits below the metrics (tests/test_structure.py), so it spells the names out itself.
    assert get_args(get_type_hints(TrainConfig)["eval_protocol"]) == PROTOCOLS


@pytest.mark.parametrize("preset", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset):
    from vmr.eval.metrics import brief_keys

    cfg = load_config(preset)
    assert cfg.train.best_metric in brief_keys(cfg.train.eval_protocol), "training would refuse this preset"
    if preset.stem == "qvhighlights":  # the official setting: 2-s clips, a 150-s video in one window
        assert 1 / cfg.data.sampling.fps == 2.0 and cfg.data.sampling.window / cfg.data.sampling.fps == 150.0
