"""Shared tiny data, made once per test session: real H.264 videos from `vmr synth`."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from vmr.synth import synthesize


def free_port() -> int:
    """A local TCP port nobody listens on right now (for servers and rendezvous the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def shard_dir(synth_dir, tmp_path_factory) -> Path:
    """Train and val shards of the sample data, re-encoded small (16 px, 2 fps, all keyframes),
    one video per shard so that ranks and workers can split them."""
    from vmr.data.shards import build_shards

    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        build_shards(synth_dir / "videos", [synth_dir / f"{split}.jsonl"], out, split=split, fps=2.0, size=16,
                     keyframe_interval=0, max_videos_per_shard=1, progress=False)
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """An untrained tiny model's inference bundle (configs/tiny.yaml at 16 px, frozen towers); a
    module that needs another defines its own ``bundle``."""
    from vmr.bundle import write_bundle
    from vmr.config import load_config
    from vmr.model import VideoMomentRetrievalModel

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml",
                      ["data.sampling.size=16", "model.freeze_clip=true"])
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_bundle(VideoMomentRetrievalModel.from_config(cfg.model, sampling=cfg.data.sampling), out, cfg)
    return out
