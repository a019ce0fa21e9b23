"""The half of a search's rerank that no sentence changes, done once per video when it is indexed.

A search runs the full head on its candidate videos, and most of that work does not depend on the
sentence: each frame's projection, and each patch's key and value for the query's pooling (its
changes over neighbouring frames included). At 100,000 videos on 2 cores it was about two thirds of a
search (vmr bench search's report). So ``vmr index`` runs that half (``head.prepare``) on every window a
search reads (``windows_over`` over the video's stored frame times: the same frames and the same edges
as the rerank from tokens) and stores it as float16 rows beside the keys; a search reads only its
candidates' rows and runs the sentence's half.

  ``NNNNNN.prepared.npy``  one part per feature shard, beside its keys (same videos, same order);
  ``prepared.npy``         the merged rows, (rows, 1 + 2p, d) float16: per frame of a window its
                           projection, then its p patches' keys, then their values; the windows of a
                           video one after another, memory-mapped when searched;
  ``prepared_rows.npy``    (videos, 2) int64: each video's first row and its count.

Bytes per window frame: 2 (1 + 2p) d. The tiny preset (p 16, d 96): 6.3 kB, 3x its float16 tokens; CLIP
ViT-B/32 with the default head (p 49, d 256): 50 kB, two thirds of its tokens (width 768).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vmr.errors import UserError
from vmr.io import read_npy
from vmr.spans import windows_over


def prepare_video(model, video) -> np.ndarray:
    """Every window of an EncodedVideo, prepared and packed: (rows, 1 + 2p, d) float16."""
    import torch

    device, rows = model.head.frame_in.weight.device, []
    for tokens, *_ in video.windows():
        mask = torch.ones(1, len(tokens), dtype=torch.bool, device=device)
        rows.append(pack(model.head.prepare(tokens[None].to(device), mask))[0].cpu().numpy().astype(np.float16))
    return np.concatenate(rows)


def pack(prepared: dict):
    """head.prepare's dict -> (b, t, 1 + 2p, d): the frame, its patches' keys, their values."""
    import torch

    return torch.cat([prepared["frames"][:, :, None], prepared["keys"], prepared["values"]], dim=2)


def unpack(rows) -> dict:
    """(b, t, 1 + 2p, d) -> head.prepare's dict (views, no copy)."""
    p = (rows.shape[2] - 1) // 2
    return {"frames": rows[:, :, 0], "keys": rows[:, :, 1:1 + p], "values": rows[:, :, 1 + p:]}


def windows(rows: np.ndarray, times: list[float], duration: float, spec, where: str):
    """A video's stored rows as the rerank's windows: (rows (t, 1 + 2p, d), times, start, stop, own)."""
    import torch

    plan = windows_over(times, duration, spec.window, spec.overlap)
    if sum(end - first for first, end, *_ in plan) != len(rows):
        raise UserError(f"{where}: holds {len(rows)} prepared rows, not the frames of the video's windows; "
                        "rebuild the index")
    at = 0
    for first, end, own, start, stop in plan:
        window = np.asarray(rows[at:at + end - first], dtype=np.float32)
        if not np.isfinite(window).all():
            raise UserError(f"{where}: holds values no index writes; rebuild the index")
        yield torch.from_numpy(window), times[first:end], start, stop, own
        at += end - first


def merge_parts(parts: list[Path], out: Path, shape: tuple[int, int]) -> int:
    """The parts' rows, in order, into ``out`` through a memory map (one part in memory at a time);
    written under another name and renamed: whole or absent. Returns the rows."""
    arrays = [read_rows(path, shape) for path in parts]
    total = sum(len(a) for a in arrays)
    partial = out.with_name(out.name + ".partial")
    merged = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(total, *shape))
    at = 0
    for array in arrays:
        merged[at:at + len(array)] = array
        at += len(array)
    merged.flush()
    del merged
    os.replace(partial, out)
    return total


def read_rows(path: Path, shape: tuple[int, int], mmap: bool = True) -> np.ndarray:
    """A prepared-rows file of this model's (1 + 2p, d), memory-mapped, or a one-line UserError."""
    return read_npy(path, "f", (None, *shape), mmap=mmap)


def row_shape(model, extractor: dict) -> tuple[int, int]:
    """(1 + 2p, d): a row's shape for this model on tokens of ``extractor`` (k tokens a frame: the
    pooled one, then p = k - 1 patches; pooled only, k = 1, is the query's one slot)."""
    tokens = int(extractor["tokens"])
    return 1 + 2 * (tokens - 1 if tokens > 1 else 1), model.config.hidden_dim
