import pytest

from vmr.config import load_config, save_config
from vmr.errors import UserError


def test_yaml_and_overrides_are_typed(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  image_size: 64\n  train_shards: a/train-*.tar\nmodel:\n  max_frames: 8\n")
    cfg = load_config(preset, ["data.clip_fps=2", "data.scale_jitter=[0.5, 1.0]", "model.tokenizer=synthetic"])
    assert cfg.data.image_size == 64 and cfg.data.train_shards == ["a/train-*.tar"]
    assert cfg.data.clip_fps == 2.0 and isinstance(cfg.data.clip_fps, float)
    assert cfg.data.scale_jitter == (0.5, 1.0) and cfg.model.max_frames == 8
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(("override", "message"), [
    ("data.imagesize=3", "unknown config key 'data.imagesize'"),
    ("nope.x=1", "unknown config key 'nope'"),
    ("data.image_size=big", "data.image_size: expected int, got 'big'"),
    ("data.frame_sampling=dense", "data.frame_sampling: 'dense' is not one of uniform, random, keyframes"),
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
