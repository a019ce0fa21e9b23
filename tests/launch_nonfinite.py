"""Run under `accelerate launch --num_processes 2` by test_train.py: the real training loop, with
the loss of rank 1 made NaN at its third optimizer step. Writes OUT/rank<r>.json: the run's
non-finite step count and a digest of the final weights, so the test can check that both ranks
skipped that step and stayed in agreement.

    launch_nonfinite.py CONFIG OUT [section.key=value ...]
"""

import json
import sys
from pathlib import Path

import torch

import vmr.bundle
import vmr.model
from vmr.config import load_config
from vmr.train import train

BAD_STEP = 3


def main(config: str, out: str, *overrides: str) -> None:
    import os

    rank = int(os.environ["RANK"])  # not PartialState(): made before train()'s, it would make each rank alone
    calls = {"n": 0}
    real = vmr.model.moment_losses

    def losses_with_one_nan(outputs, batch, cfg):  # a fault injected into one rank's loss, once
        losses = real(outputs, batch, cfg)
        calls["n"] += 1
        if calls["n"] == BAD_STEP and rank == 1:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    vmr.model.moment_losses = losses_with_one_nan  # train() imports it from vmr.model when it starts
    cfg = load_config(config, list(overrides))
    seen = {}
    real_export = vmr.bundle.export_bundle

    def export(accelerator, model, cfg, directory):  # the final weights as this rank holds them
        state = accelerator.unwrap_model(model).state_dict()
        seen["digest"] = [float(v.double().sum()) for v in state.values() if v.is_floating_point()]
        return real_export(accelerator, model, cfg, directory)

    vmr.bundle.export_bundle = export  # train() imports it from vmr.bundle when it starts
    train(cfg)
    events = sorted((Path(cfg.train.output_dir) / "tensorboard").rglob("events.out.tfevents.*"))
    report = {"rank": rank, "calls": calls["n"], "digest": seen["digest"], "events": len(events)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
