"""What the parts of ``vmr bench`` share: the machine's description, sample shards, medians and
percentiles, device syncs, the options and the config measured."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Options:
    """What ``vmr bench`` was asked beyond the suite: ``--config`` and its overrides (train, infer,
    features), and the training variants to measure beside the base run."""

    config: Path | None = None
    overrides: tuple[str, ...] = ()
    batch_size: tuple[int, ...] = ()
    compile: bool = False
    gradient_checkpointing: bool = False
    deepspeed_stage: tuple[int, ...] = ()

    def label(self, default: str) -> str:
        return " ".join([str(self.config), *self.overrides]) if self.config is not None else default


def machine_info() -> dict:
    import torch
    import torchcodec
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ffmpeg = None
    try:
        ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split()[2]
    except (OSError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torchcodec": torchcodec.__version__, "ffmpeg": ffmpeg, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def figure(values: list[float], unit: str) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "unit": unit,
            "repetitions": len(values)}


def make_shards(workdir: Path, quick: bool) -> Path:
    from vmr.data.shards import build_shards
    from vmr.synth import synthesize

    synth = workdir / "synth"
    synthesize(synth, videos=6 if quick else 20, min_duration=10 if quick else 20,
               max_duration=20 if quick else 60, val_fraction=0.0, progress=False)
    out = workdir / "shards"
    # The README's recommended settings; one video per shard so workers can split them.
    build_shards(synth / "videos", [synth / "train.jsonl"], out, fps=2.0, size=224, keyframe_interval=0,
                 max_videos_per_shard=1, workers=2, progress=False)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(device: str, shards: str, options: Options):
    """tiny on a CPU; on a GPU the default architecture with random weights (same cost, no download);
    or ``--config`` with its overrides."""
    from vmr.config import load_config, preset

    if options.config is not None:
        return load_config(options.config, [f"data.train_shards={shards}", "data.val_shards=[]", *options.overrides])
    if device == "cuda":
        return load_config(preset("default"), [f"data.train_shards={shards}", "model.init=random",
                                                   "model.tokenizer=synthetic", "data.num_workers=4"])
    return load_config(preset("tiny"), [f"data.train_shards={shards}", "data.val_shards=[]",
                                            "data.sampling.size=224", "data.num_workers=1"])


def default_sampling():
    """The default config's sampling spec (the README's recommended shard settings match it)."""
    from vmr.config import load_config, preset

    return load_config(preset("default")).data.sampling


def deepspeed_file(stage: int) -> Path:
    """``launch/ds_zero<stage>.json``, from the working directory or the source checkout vmr runs
    from (launch files live outside the package: an installed vmr needs the repository's)."""
    name = Path("launch") / f"ds_zero{stage}.json"
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / name).is_file():
            return root / name
    from vmr.errors import UserError

    raise UserError(f"--deepspeed-stage {stage}: no {name} here; run vmr bench from the vmr repository")
