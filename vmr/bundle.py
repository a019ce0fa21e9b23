"""Inference bundles: a folder of a trained model, written whole or not at all, read without training
code, pickles or the network.

  model.safetensors    the weights (the towers under ``towers.``, the head under ``head.``)
  config.yaml          the resolved config (model, sampling) the model was built from
  tower_config.json    the towers' transformers config (they are rebuilt from it, not downloaded)
  tokenizer and image-processor files (transformers' own)
  features.json        only for a model trained on a feature cache: the cache's extractor

``write_bundle`` writes one, ``read_bundle`` reads one (transformers' save_pretrained / from_pretrained);
a run exports its bundles with ``export_bundle`` (every rank calls it); ``vmr predict``, ``vmr eval
--checkpoint``, ``vmr features extract --checkpoint``, ``vmr index`` and the demo load them through
``load_model``, never through the training code."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from vmr.checkpoint import EXPORT, EXPORT_BEST, agree
from vmr.errors import UserError, out_of_space
from vmr.io import first_line, json_text, read_json

WEIGHTS, CONFIG, TOWER_CONFIG, CACHE_RECORD = "model.safetensors", "config.yaml", "tower_config.json", "features.json"
OLD_TOWER_CONFIG = "clip_config.json"  # bundles written before other backbones: CLIP's config, same contents


def resolve_bundle(path: str | Path) -> Path:
    """An inference bundle, or a run directory (its best export, else its final one)."""
    path = Path(path)
    for candidate in (path, path / EXPORT_BEST, path / EXPORT):
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise UserError(f"{path}: no inference bundle here (expected model.safetensors, or a run directory "
                    "with export_best/ or export/)")


def best_device():
    """CUDA, else MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(path: str | Path, device=None, fast: bool = True):
    """The bundle's model on ``device`` (default: the best one) in eval mode, and its config. On
    CUDA, with ``fast``, its weights in bf16 (inference speed), except for a model trained on a
    feature cache: its reads of videos are checked against the cache's fp32 tower weights."""
    import torch

    from vmr.config import load_config

    bundle = resolve_bundle(path)
    model = read_bundle(bundle).to(device or best_device()).eval()
    if fast and model.features is None and next(model.head.parameters()).device.type == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)  # bf16 weights: faster than fp32 weights under autocast
    return model, load_config(bundle / CONFIG)


def write_bundle(model, directory: str | Path, config=None, state_dict: dict | None = None) -> Path:
    """Write ``model``'s inference bundle: safetensors weights, the resolved config, the towers' config,
    tokenizer and image-processor files. Written to a temporary folder, then renamed.
    ``state_dict`` replaces this module's own (e.g. weights gathered from ZeRO-3 shards)."""
    import torch
    from safetensors.torch import save_file

    from vmr.config import Config, save_config

    directory = Path(directory)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # a diverged model must never look like a usable one
        raise UserError(f"{directory}: not written: {len(broken)} of {len(state)} weight tensors hold "
                        f"NaN or infinite values (first: {broken[0]}); the run diverged (lower train.lr)")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        full = config or Config()
        full = dataclasses.replace(full, model=model.config, data=dataclasses.replace(full.data, sampling=model.sampling))
        save_config(full, tmp / CONFIG)
        (tmp / TOWER_CONFIG).write_text(model.tower_config.to_json_string())
        model.tokenizer.save_pretrained(tmp)
        model.processor.save_pretrained(tmp)
        if model.features is not None:  # what the model was trained on: a cache's extractor
            (tmp / CACHE_RECORD).write_text(json_text(model.features, directory / CACHE_RECORD, indent=1))
    except BaseException:  # a full disk, an interrupt: no half bundle left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def export_bundle(accelerator, model, cfg, directory: Path) -> None:
    """The inference bundle of the current weights (gathered from all ranks under ZeRO-3). Refused
    on every rank alike when the weights are not finite or the disk is full."""
    # A compiled model (train.compile) names its weights "_orig_mod.<name>": bundles use the plain names.
    state = accelerator.get_state_dict(model)  # None on the other ranks under ZeRO-3
    if state is not None:
        state = {key.removeprefix("_orig_mod."): value for key, value in state.items()}
    error = None
    if accelerator.is_main_process:
        try:
            write_bundle(accelerator.unwrap_model(model), directory, cfg, state_dict=state)
        except UserError as failure:
            error = str(failure)
        except Exception as failure:
            full = out_of_space(failure, directory)
            if full is None:
                raise
            error = f"inference bundle {directory} not written: {full}"
    agree(accelerator, error)
    accelerator.wait_for_everyone()


def read_bundle(directory: str | Path, map_location="cpu", cls=None):
    """The model of a bundle written by ``write_bundle``, in eval mode on ``map_location`` (``cls``:
    the model class, default VideoMomentRetrievalModel). Every way a bundle can be unusable is one
    UserError naming its file."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from vmr.config import load_config
    from vmr.model.backbone import tower_config

    if cls is None:
        from vmr.model import VideoMomentRetrievalModel as cls

    directory = Path(directory)
    towers_file = directory / TOWER_CONFIG
    if not towers_file.is_file() and (directory / OLD_TOWER_CONFIG).is_file():
        towers_file = directory / OLD_TOWER_CONFIG
    for path in (directory / WEIGHTS, directory / CONFIG, towers_file):
        if not path.is_file():
            raise UserError(f"{directory}: not an inference bundle ({path.name} is missing)")
    full = load_config(directory / CONFIG)
    cfg = full.model
    values = read_json(towers_file)
    if values.get("model_type") != cfg.backbone:
        raise UserError(f"{towers_file}: towers of kind {values.get('model_type')!r}, but its config.yaml says "
                        f"model.backbone: {cfg.backbone}")
    try:
        towers = tower_config(cfg.backbone, values, str(towers_file))
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = cls(config=cfg, tokenizer=tokenizer, tower_config=towers, processor_source=str(directory),
                    sampling=full.data.sampling)
    except UserError:
        raise
    except Exception as error:  # a config, tokenizer or processor file transformers cannot use
        raise UserError(f"{directory}: not a usable inference bundle ({first_line(error, 160)})") from None
    try:
        weights = load_file(directory / WEIGHTS, device=str(map_location))
    except Exception as error:  # a truncated or foreign file: safetensors' own error types
        raise UserError(f"{directory / WEIGHTS}: not readable as safetensors weights "
                        f"({first_line(error, 160)})") from None
    weights = legacy_names(weights)
    missing, unexpected = model.state_dict().keys() - weights.keys(), weights.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise UserError(f"{directory}: its weights do not fit its config.yaml ({len(missing)} missing, e.g. "
                        f"{sorted(missing)[:1]}; {len(unexpected)} unexpected, e.g. {sorted(unexpected)[:1]})")
    state = model.state_dict()
    wrong = [k for k in sorted(weights) if weights[k].shape != state[k].shape]
    if wrong:
        raise UserError(f"{directory}: its weights do not fit its config.yaml ({wrong[0]} is "
                        f"{tuple(weights[wrong[0]].shape)} in {WEIGHTS}, {tuple(state[wrong[0]].shape)} by the config)")
    model.load_state_dict(weights)
    if (directory / CACHE_RECORD).is_file():
        from vmr.data.manifest import check_extractor

        model.features = read_json(directory / CACHE_RECORD)
        check_extractor(model.features, str(directory / CACHE_RECORD))  # the fields every reader of it uses
    return model.to(map_location).eval()


def legacy_names(weights: dict) -> dict:
    """Bundles written before heads were a choice name vmr's head layers at the top level
    (``frame_in.weight``); today they live under ``head.``."""
    if any(k.startswith("head.") for k in weights):
        return weights
    return {k if k.startswith("towers.") else f"head.{k}": v for k, v in weights.items()}
