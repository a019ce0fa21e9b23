"""Shared tiny data, made once per test session: real H.264 videos from `vmr synth`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmr.synth import synthesize

TINY = dict(videos=4, queries_per_video=3, min_duration=6.0, max_duration=9.0, fps=5.0, size=32, seed=7)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Read-only sample data set; copy it (`synth_copy`) before changing anything."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, **TINY, progress=False)
    return out


@pytest.fixture
def synth_copy(synth_dir, tmp_path) -> Path:
    out = tmp_path / "synth"
    shutil.copytree(synth_dir, out)
    return out
