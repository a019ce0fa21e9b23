"""The stream's last stage, in the training process: batches onto the device, each copied while
the step before it computes (a CUDA side stream), or a plain copy elsewhere."""

from __future__ import annotations

import torch


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """A batch's tensors on ``device``; its lists and numbers as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def device_batches(batches, device):
    """``batches`` on ``device``, each copied there while the step before it computes. On CUDA the
    copy of the next batch is queued on a side stream before the current one is handed out, so it
    overlaps the current step's kernels; the compute stream waits for a batch's copy before using
    it, and the batch's memory is marked as used by that stream (so the allocator does not recycle
    it while a kernel still reads it). Elsewhere a plain copy: the same batches either way."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def issue(batch: dict) -> tuple[dict, torch.cuda.Event]:
        with torch.cuda.stream(side):
            moved = to_device(batch, device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        return moved, copied

    upcoming = None
    for batch in batches:
        ready, upcoming = upcoming, issue(batch)
        if ready is not None:
            yield _arrived(*ready, compute)
    if upcoming is not None:
        yield _arrived(*upcoming, compute)


def _arrived(batch: dict, copied, compute) -> dict:
    compute.wait_event(copied)  # this batch's copy only, not the one queued after it
    for value in batch.values():
        if torch.is_tensor(value):
            value.record_stream(compute)
    return batch
