"""Run under `accelerate launch --num_processes 2` by test_train.py: DDP gradients of two ranks on
halves of a batch against one process's gradient on the whole batch. Writes OUT/grad.json on rank 0.

The batch is built so that both halves have the same number of frames, queries, positive frames
and saliency pairs: then the mean of the halves' mean losses is the whole batch's mean loss, and
the averaged gradients must match."""

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from vmr.config import load_config
from vmr.model import VideoMomentRetrievalModel, moment_losses

QUERIES = ["a red circle moves left", "a blue square grows", "a green triangle blinks", "a yellow circle shrinks",
           "a red square moves up", "a blue triangle moves down", "a green circle grows", "a yellow square blinks"]


def make_batch(model, videos: int = 4, frames: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    q = 2 * videos
    text = model.tokenize(QUERIES[:q])
    relevance = torch.zeros(q, frames)
    relevance[:, 1:3] = 1
    return {
        "videos": torch.randint(0, 256, (videos, frames, 3, 32, 32), generator=g, dtype=torch.uint8),
        "frame_mask": torch.ones(videos, frames, dtype=torch.bool),
        "frame_times": torch.arange(frames, dtype=torch.float).expand(videos, frames).contiguous(),
        "duration": torch.full((videos,), float(frames)),
        "text_ids": text["input_ids"], "text_mask": text["attention_mask"].bool(),
        "video_index": torch.arange(videos).repeat_interleave(2),
        "relevance": relevance, "moments": torch.tensor([[[1.0, 3.0]]] * q),
        "moment_mask": torch.ones(q, 1, dtype=torch.bool), "moment_frames": torch.tensor([[[1, 2]]] * q),
        "saliency": relevance * 0.5, "has_saliency": torch.ones(q, dtype=torch.bool),
    }


def half(batch: dict, rank: int, videos: int = 4) -> dict:
    v = slice(rank * videos // 2, (rank + 1) * videos // 2)
    qs = slice(rank * videos, (rank + 1) * videos)  # 2 queries per video
    out = {k: batch[k][v] for k in ("videos", "frame_mask", "frame_times", "duration")}
    out.update({k: batch[k][qs] for k in batch if k not in out})
    out["video_index"] = out["video_index"] - rank * videos // 2
    return out


def loss_of(model, batch, cfg):
    outputs = model(batch["videos"], {"input_ids": batch["text_ids"], "attention_mask": batch["text_mask"]},
                    frame_mask=batch["frame_mask"], video_index=batch["video_index"],
                    frame_times=batch["frame_times"], duration=batch["duration"])
    return moment_losses(outputs, batch, cfg)["loss"]


def main(config: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    # model.corpus off: its in-batch negatives make each half's loss depend on the other half's videos,
    # by design; what is compared here is DDP's averaging of independent losses.
    cfg = load_config(config, ["model.corpus.enabled=false"]).model
    torch.manual_seed(0)
    model = VideoMomentRetrievalModel.from_config(cfg)
    reference = copy.deepcopy(model)
    batch = make_batch(model)
    ddp = accelerator.prepare(model)
    accelerator.backward(loss_of(ddp, half(batch, accelerator.process_index), cfg))
    if accelerator.is_main_process:
        loss_of(reference, batch, cfg).backward()
        worst, worst_zero, checked = 0.0, 0.0, 0
        for p, q in zip(accelerator.unwrap_model(ddp).parameters(), reference.parameters(), strict=True):
            if p.grad is None:
                continue
            difference = (p.grad - q.grad).abs().max().item()
            if q.grad.abs().max().item() < 1e-7:
                # 0 in exact arithmetic (attention is blind to a key bias), float noise of ~1e-9
                # here: a relative error means nothing, the absolute one must stay at noise level.
                worst_zero = max(worst_zero, difference)
            else:
                worst = max(worst, difference / q.grad.abs().max().item())
            checked += 1
        Path(out, "grad.json").write_text(json.dumps({"world": accelerator.num_processes, "checked": checked,
                                                      "worst_relative": worst, "worst_absolute_of_zero": worst_zero}))


if __name__ == "__main__":
    main(*sys.argv[1:])
