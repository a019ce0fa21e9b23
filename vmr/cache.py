"""The feature-cache contract, in one place: what a cache is (the ``extractor`` record in the
manifest of feature shards), whether it fits a model, and whether a model may read videos.

Feature shards are made by ``vmr features extract`` (the vision tower's output for every frame) and
``vmr features import`` (the field's released features); their layout is in vmr/features.py (the members of a sample) and vmr/data/manifest.py (the manifest).
A cache fits a model when its width, token count and frame rate are the model's; features made by
a tower (``kind`` clip, siglip or siglip2: the backbone) are valid only for a tower of that kind
with the very weights that made them (their sha256). Training, ``vmr
eval --checkpoint``, ``vmr predict`` and the demo all ask here. Takes model objects, imports no
model code.
"""

from __future__ import annotations

import dataclasses
import hashlib

from vmr.config import Config, DataConfig, SamplingConfig
from vmr.data.manifest import by_tower, extractor_of
from vmr.data.sources import expand_shards
from vmr.errors import UserError


def vision_fingerprint(model) -> str:
    """sha256 of the vision tower's weights: a cache is only valid for the tower that made it.
    Remembered while the weights stay the same tensors, unmodified (their version counters), so
    that asking an encoding a question does not hash the tower again each time."""
    state = sorted(model.towers.vision.state_dict().items())
    key = tuple((name, t.data_ptr(), t.dtype, t._version) for name, t in state)
    known = getattr(model, "_vision_fingerprint", None)
    if known is not None and known[0] == key:
        return known[1]
    digest = hashlib.sha256()
    for name, tensor in state:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    model._vision_fingerprint = (key, digest.hexdigest())
    return digest.hexdigest()


def tower_extractor(model, spec: SamplingConfig, pooled_only: bool, source: str, views: int = 1,
                   data: DataConfig | None = None) -> dict:
    """The ``extractor`` record of features made by this model's tower at ``spec``: what a cache,
    an index or a saved encoding holds, and what a model reading it is checked against."""
    towers = model.towers
    extractor = {"kind": towers.kind, "model": source, "vision_sha256": vision_fingerprint(model),
                 "sampling": dataclasses.asdict(spec), "dtype": "float16", "tokens": 1 if pooled_only else 1 + towers.grid,
                 "width": towers.vision_width, "text": False}
    if views > 1:  # how many, and how they were drawn: part of what a resumed extraction must match
        data = data or DataConfig()
        extractor["views"] = views
        extractor["augmentation"] = {"temporal_jitter": data.temporal_jitter, "scale_jitter": list(data.scale_jitter)}
    return extractor


def cache_of(urls: list[str]) -> dict | None:
    """The extractor of feature shards, or None for video shards (or shards without a manifest)."""
    return extractor_of(urls)


def check_cache(extractor: dict, model, spec: SamplingConfig, where: str) -> None:
    """A one-line UserError when the cache cannot feed this model: another backbone, width, token
    count or frame rate. (The vision tower's weights are checked where they matter: a model trained
    on a cache reads videos only through the tower that made the cache, ``check_reads_videos``.)"""
    width = model.config.feature_dim or model.towers.vision_width
    grid = model.towers.grid
    if by_tower(extractor) and not model.config.feature_dim and extractor["kind"] != model.towers.kind:
        raise UserError(f"{where}: this feature cache was made by a {extractor['kind']} tower "
                        f"({extractor.get('model')}), the model's backbone is {model.towers.kind}; extract it "
                        "with this model (vmr features extract --checkpoint ...)")
    problems = []
    if extractor["width"] != width:
        problems.append(f"its features are {extractor['width']}-d, the model reads {width}-d"
                        + ("" if by_tower(extractor) else " (set model.feature_dim)"))
    if by_tower(extractor) and extractor["tokens"] not in (1, 1 + grid):
        problems.append(f"it has {extractor['tokens']} tokens per frame, the model's tower makes {1 + grid}")
    fps = extractor["sampling"]["fps"]
    if abs(fps - spec.fps) > 1e-9:
        problems.append(f"it holds {fps:g} frames/s, the model samples {spec.fps:g} (data.sampling.fps)")
    if extractor.get("text") and not model.config.text_feature_dim:
        problems.append("it holds query features, the model has no model.text_feature_dim")
    if extractor.get("text") and model.config.text_feature_dim and extractor.get("text_width") != model.config.text_feature_dim:
        problems.append(f"its query features are {extractor.get('text_width')}-d, model.text_feature_dim is "
                        f"{model.config.text_feature_dim}")
    if problems:
        raise UserError(f"{where}: this feature cache does not fit the model: {'; '.join(problems)}")


def use_cache(model, extractor: dict) -> None:
    """Train the layers above a cache: its towers get no input (frozen, so that every rank agrees on
    which parameters have gradients), and the bundle records the cache."""
    for part in model.towers.vision_parts() + (model.towers.text_parts() if extractor.get("text") else []):
        part.requires_grad_(False)
    model.features = extractor


def check_training_shards(model, cfg: Config) -> dict | None:
    """The feature cache that data.train_shards are (None for video shards), checked against the
    model; validation shards must be of the same kind. One-line UserErrors otherwise."""
    cache = cache_of(expand_shards(cfg.data.train_shards, cfg.data.allow_pipe))
    for key, urls in (("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards)):
        if not urls:
            continue
        found = cache_of(expand_shards(urls, cfg.data.allow_pipe))
        if found is not None:
            check_cache(found, model, cfg.data.sampling, key)
        elif cfg.model.feature_dim or cfg.model.text_feature_dim:
            raise UserError(f"{key}: video shards, but model.feature_dim / text_feature_dim say the model reads "
                            "imported features; give feature shards (vmr features import)")
        if found is not None and cache is not None and found.get("vision_sha256") != cache.get("vision_sha256"):
            raise UserError(f"{key}: these features were made by another vision tower than data.train_shards' "
                            f"({found.get('model')} vs {cache.get('model')}); extract both with the same one")
        if (found is None) != (cache is None):
            raise UserError(f"{key}: {'feature' if found else 'video'} shards, but data.train_shards are "
                            f"{'feature' if cache else 'video'} shards; give both of one kind")
    return cache


def check_shards(model, cache: dict | None) -> None:
    """Feature shards (``cache``: their extractor, ``cache_of``) must fit the model
    (``check_cache``, ``check_tower``); video shards (None) need a model that reads videos."""
    if cache is not None:
        check_cache(cache, model, model.sampling, "--shards")
        check_tower(cache, model, "--shards")
    else:
        check_reads_videos(model)


def check_tower(cache: dict, model, where: str) -> None:
    """Features of a tower are only valid for the model whose layers learned on that tower: the
    tower that made the model's training cache, else the model's own (its weights as trained)."""
    if not by_tower(cache):
        return
    trained_on = model.features if by_tower(model.features) else None
    expected = trained_on["vision_sha256"] if trained_on else vision_fingerprint(model)
    if cache.get("vision_sha256") != expected:
        raise UserError(f"{where}: these features were made by another vision tower ({cache.get('model')}) than the "
                        f"one this model {'was trained on' if trained_on else 'has'}; extract them with this model "
                        "(vmr features extract --checkpoint ...)")


def check_reads_videos(model) -> None:
    """A model of imported features cannot read videos; one trained on a cache of its tower's features
    reads them only through the very tower that made the cache."""
    if model.config.feature_dim or model.config.text_feature_dim:
        raise UserError(f"this model reads imported {model.config.feature_dim or ''}-d features, not videos "
                        "(give feature shards made by 'vmr features import')")
    cache = model.features or {}
    if by_tower(cache) and vision_fingerprint(model) != cache.get("vision_sha256"):
        raise UserError(f"this model was trained on features of another vision tower ({cache.get('model')}) "
                        "than its own: it reads only those feature shards, not videos")


