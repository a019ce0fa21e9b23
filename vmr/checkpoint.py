"""Checkpoints and inference bundles of a run directory:

  <output_dir>/config.yaml                 the resolved config
  <output_dir>/checkpoints/step_0000100/   resumable state (accelerate save_state: model, optimizer,
                                           scheduler, RNG states, loop counters), written atomically
  <output_dir>/export/, export_best/       inference bundles (vmr/bundle.py: write_bundle, export_bundle)
  <output_dir>/tensorboard/                TensorBoard event files

Every function here is collective: all processes call it (DeepSpeed writes one shard per rank and
ZeRO-3 gathers weights from all of them); only the main process renames and deletes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from vmr.errors import UserError, out_of_space

STEP_DIR = re.compile(r"^step_(\d+)$")
# The run directory's layout (the one place that names it).
EXPORT, EXPORT_BEST = "export", "export_best"  # inference bundles: the final weights, the best on validation


def check_run_directory(output_dir: Path) -> None:
    """train.output_dir may be new, empty, or an earlier run's (its resolved config.yaml): a run never
    writes into a folder of other files (a data folder named by a slip). Every process checks, before
    the main one writes anything (the accelerator's prepare, a collective, comes in between)."""
    import contextlib

    import yaml

    from vmr.io import read_text

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir: {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    config = None
    with contextlib.suppress(UserError, yaml.YAMLError):  # unreadable: not a run's
        config = yaml.safe_load(read_text(out / "config.yaml"))
    if not (isinstance(config, dict) and {"model", "train"} <= config.keys()):
        raise UserError(f"train.output_dir: {out} holds {min(p.name for p in out.iterdir())} and is not a run "
                        "directory (no run's config.yaml); train into a new or empty folder, or an earlier run's")


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob("step_*") if p.is_dir() and STEP_DIR.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """``latest`` (the newest complete checkpoint of the run) or a checkpoint folder."""
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume latest: no checkpoint in {Path(output_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume: {path} is not a checkpoint folder")
    return path


def agree(accelerator, error: str | None) -> None:
    """Collective: every rank learns whether any rank failed, and all raise the same one-line
    error, so no rank is left waiting for the others."""
    from accelerate.utils import gather_object

    errors = [e for e in (gather_object([error]) if accelerator.num_processes > 1 else [error]) if e]
    if errors:
        raise UserError(errors[0])


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, cfg=None) -> Path:
    """save_state into a temporary folder, then rename: a run killed mid-save leaves the previous
    checkpoint intact. The resolved config goes beside the state. Keeps the newest ``keep``.
    A full disk stops the run with one line naming the disk and the checkpoint still intact."""
    final = Path(output_dir) / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process and cfg is not None:
            from vmr.config import save_config

            save_config(cfg, tmp / "config.yaml")
    except Exception as failure:  # OSError, torch's C++ writer, safetensors: out_of_space tells
        full = out_of_space(failure, tmp)
        if full is None:
            raise
        previous = checkpoints(output_dir)
        error = (f"checkpoint of step {step} not written: {full}; "
                 + (f"the last complete checkpoint {previous[-1]} is intact (--resume latest continues from it)"
                    if previous else "no earlier checkpoint exists"))
    if error is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
    agree(accelerator, error)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
