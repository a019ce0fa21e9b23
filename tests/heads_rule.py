"""The deterministic weights of the DETR-head parity fixtures: every parameter is drawn from its own
generator, seeded by its name, so the reference run (tests/fixtures/heads/make_fixtures.py) and the
tests build the same weights without storing them (a 256-wide head is megabytes of numbers)."""

from __future__ import annotations

import zlib

import torch


def fixture_weight(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Matrices ~ N(0, 1/fan_in); norms' weights around 1; other vectors (biases, PReLU slopes,
    the global token) ~ N(0, 0.1)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) >= 2:
        return values / shape[-1] ** 0.5
    is_norm = "norm" in name.lower() and name.endswith("weight")
    return values * 0.1 + (1.0 if is_norm else 0.0)


def fill(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Overwrites every parameter of ``module`` by the rule; returns the state dict."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(fixture_weight(name, tuple(p.shape)))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
