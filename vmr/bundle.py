"""Inference bundles as their readers see them: find one (a bundle, or a run directory's best or
final export), load its model on the best device, in eval mode. The writer is vmr/checkpoint.py
(``export_bundle``); the files inside are the model's (``save_pretrained`` / ``from_pretrained``).
``vmr predict``, ``vmr eval --checkpoint``, ``vmr features extract --checkpoint`` and the demo all
load through here, never through the training code."""

from __future__ import annotations

from pathlib import Path

from vmr.checkpoint import EXPORT, EXPORT_BEST
from vmr.errors import UserError


def resolve_bundle(path: str | Path) -> Path:
    """An inference bundle, or a run directory (its best export, else its final one)."""
    path = Path(path)
    for candidate in (path, path / EXPORT_BEST, path / EXPORT):
        if (candidate / "model.safetensors").is_file():
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
    from vmr.model import VideoMomentRetrievalModel

    bundle = resolve_bundle(path)
    model = VideoMomentRetrievalModel.from_pretrained(bundle).to(device or best_device()).eval()
    if fast and model.features is None and next(model.head.parameters()).device.type == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)  # bf16 weights: faster than fp32 weights under autocast
    return model, load_config(bundle / "config.yaml")
