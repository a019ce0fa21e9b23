"""The stream's collation stage: items (vmr/data/decode.py) -> one padded batch, the one batch
contract between the loader, the model and the losses.

Each of the b "videos" of a batch is one window of a video: the part the temporal layers see at
once, at the sampling spec's rate. A batch (b windows, q queries, t frames, l text tokens, m
moments per query):
  videos        uint8 (b, t, 3, s, s)  CLIP normalisation happens on the device, not here; channels-last
                                       in memory (torchcodec's layout), a view as (b, t, 3, s, s);
                                       or a cache's fp16 tokens (b, t, k, c)
  frame_mask    bool  (b, t)           False on padding
  frame_times   float (b, t)           seconds from the start of the window
  duration      float (b,)             the window's length in seconds
  offset        float64 (b,)           where the window starts in its video (seconds)
  own           long  (b, 2)           the frames [own[0], own[1]) this window reports in evaluation
  window        long  (b, 2)           (index of the window in its video, number of windows)
  video_duration float64 (b,); key     the whole video's length; the sample's key (one per video)
  text_ids, text_mask        (q, l)    (text_features (q, l, c) instead when the cache holds them)
  moments       float (q, m, 2)        seconds, relative to the window (a moment outside it: none;
                                       the query is then a negative); moment_mask bool (q, m)
  moment_frames long  (q, m, 2)        first and last frame index of each moment inside the window
  relevance     float (q, t)           1 where the frame's time is inside a moment
  saliency      float (q, t)           annotator score / 4 of the frame's 2-second clip; has_saliency (q,)
                                       (a highlight label's scores scaled to [0, 1]: decode.frame_saliency)
  has_moments   bool  (q,)             the query has moments somewhere in its video: False for highlight
                                       detection data, which trains the saliency head alone
  video_index   long  (q,)             which video of the batch a query belongs to
  frames        int                    the number of valid frames (a plain number: no device read)
  query_mask    bool  (q,)             False on padding queries (training batches have fixed
                                       sizes, ``BatchShape``: frames, queries and words padded)
  qid, query, video_id               lists, for predictions and logging (real queries only:
                                     padding queries come after them)
  sentences                          per video, every sentence it holds (what model.corpus may
                                     not take as a negative for it)
  ground_truth  list of QVHighlights-style rows, one per real query, whole-video times (for scoring)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vmr.spans import QVH_CLIP_SECONDS, frame_targets


@dataclass(frozen=True)
class BatchShape:
    """Fixed sizes a training batch is padded to, so that every step has the same tensor shapes:
    no new allocations or kernel plans per step, and compiled code (``train.compile``) or CUDA
    graphs are reused instead of rebuilt. ``frames`` per window, ``queries`` per batch; words per
    query are padded to the collator's ``max_text_len``, and moments per query to a power of two of
    at least 4. A batch
    that needs more (never in training: windows hold at most ``frames`` frames, each video at most
    ``data.queries_per_video`` queries) grows to fit."""

    frames: int
    queries: int


def _bucket(n: int) -> int:
    return 1 << max(2, (n - 1).bit_length())


class Collator:
    """Items -> one padded batch (see the module docstring). Tokenises the queries. With ``shape``
    (training) the batch is padded to those fixed sizes; padded queries come last, with
    ``query_mask`` False, an empty sentence, no moment and no weight in the losses."""

    def __init__(self, tokenizer, max_text_len: int, shape: BatchShape | None = None):
        self.tokenizer, self.max_text_len, self.shape = tokenizer, max_text_len, shape

    def __call__(self, items: list[dict]) -> dict:
        shape = self.shape
        b, t = len(items), max(len(item["times"]) for item in items)
        queries = [(i, q) for i, item in enumerate(items) for q in item["queries"]]
        n_moments = max([len(q["moments"]) for _, q in queries] + [1])
        n_queries = len(queries)
        if shape is not None:
            t, n_queries, n_moments = max(t, shape.frames), max(n_queries, shape.queries), _bucket(n_moments)
        # In a loader worker the batch is built in shared memory (_empty): sending it to the main
        # process then costs no copy (what DataLoader's own collation does). Only padding is zeroed.
        first = items[0]["frames"]
        if first.dim() == 4:
            # uint8 frames (n, 3, s, s), which torchcodec decodes channels-last: the batch keeps that
            # memory layout (a view as (b, t, 3, s, s)), so filling it is a plain copy rather than
            # a transpose (3x faster on 224-px frames).
            _, c, h, w = first.shape
            videos = _empty((b, t, h, w, c), first.dtype).permute(0, 1, 4, 2, 3)
        else:  # a cache's fp16 tokens (n, k, c)
            videos = _empty((b, t, *first.shape[1:]), first.dtype)
        # Targets are built as Python lists and become tensors once: many small tensor writes
        # cost more than the numbers they hold.
        frame_mask, frame_times = [[False] * t for _ in items], [[0.0] * t for _ in items]
        moments = [[[0.0, 0.0]] * n_moments for _ in range(n_queries)]
        moment_frames = [[[0, 0]] * n_moments for _ in range(n_queries)]
        moment_mask = [[False] * n_moments for _ in range(n_queries)]
        relevance, saliency = [[0.0] * t for _ in range(n_queries)], [[0.0] * t for _ in range(n_queries)]
        has_saliency, has_moments = [False] * n_queries, [False] * n_queries
        for i, item in enumerate(items):
            n = len(item["times"])
            videos[i, :n] = item["frames"]
            videos[i, n:] = 0
            frame_mask[i][:n], frame_times[i][:n] = [True] * n, item["times"]
        for j, (i, q) in enumerate(queries):
            rel, spans = frame_targets(q["moments"], items[i]["times"])
            relevance[j][: len(rel)] = rel
            has_moments[j] = bool(q["video_moments"])
            for k, (moment, span) in enumerate(zip(q["moments"], spans, strict=True)):
                moments[j][k], moment_frames[j][k], moment_mask[j][k] = list(moment), list(span), True
            if q["saliency"] is not None:
                scores = list(q["saliency"][:t])
                saliency[j][: len(scores)] = scores
                has_saliency[j] = True
        frame_mask, frame_times = torch.tensor(frame_mask, dtype=torch.bool), torch.tensor(frame_times)
        moments, moment_frames = torch.tensor(moments), torch.tensor(moment_frames, dtype=torch.long)
        moment_mask = torch.tensor(moment_mask, dtype=torch.bool)
        relevance, saliency = torch.tensor(relevance), torch.tensor(saliency)
        has_saliency = torch.tensor(has_saliency, dtype=torch.bool)
        has_moments = torch.tensor(has_moments, dtype=torch.bool)
        query_mask = torch.arange(n_queries) < len(queries)
        sentences = [q["query"] for _, q in queries] + [""] * (n_queries - len(queries))
        text = self.tokenizer(sentences, padding="max_length" if shape is not None else True, truncation=True,
                              max_length=min(self.max_text_len, self.tokenizer.model_max_length), return_tensors="pt")
        extra = {}
        if "text_features" in queries[0][1]:  # imported query features replace the text tower
            feats = [torch.as_tensor(q["text_features"], dtype=torch.float32).reshape(-1, q["text_features"].shape[-1])
                     for _, q in queries]
            feats += [feats[0][:1] * 0] * (n_queries - len(queries))
            extra["text_features"] = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
            text["attention_mask"] = torch.nn.utils.rnn.pad_sequence([torch.ones(len(f)) for f in feats],
                                                                     batch_first=True)
        return {**extra,
            "videos": videos, "frame_mask": frame_mask, "frame_times": frame_times,
            "duration": torch.tensor([item["duration"] for item in items]),
            "offset": torch.tensor([item["offset"] for item in items], dtype=torch.float64),
            "own": torch.tensor([item["own"] for item in items], dtype=torch.long),
            "window": torch.tensor([item["window"] for item in items], dtype=torch.long),
            "video_duration": torch.tensor([item["video_duration"] for item in items], dtype=torch.float64),
            "key": [item["key"] for item in items],
            "text_ids": text["input_ids"], "text_mask": text["attention_mask"].bool(),
            "moments": moments, "moment_mask": moment_mask, "moment_frames": moment_frames,
            "relevance": relevance, "saliency": saliency, "has_saliency": has_saliency,
            "has_moments": has_moments,
            "video_index": torch.tensor([i for i, _ in queries] + [0] * (n_queries - len(queries)), dtype=torch.long),
            "query_mask": query_mask,
            "frames": sum(len(item["times"]) for item in items),  # valid frames, counted on the host
            "qid": [q["qid"] for _, q in queries], "query": [q["query"] for _, q in queries],
            "video_id": [item["video_id"] for item in items],
            "sentences": [item.get("sentences", []) for item in items],
            "ground_truth": [ground_truth_row(items[i], q) for i, q in queries],
        }


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def ground_truth_row(item: dict, query: dict) -> dict:
    """A query's ground truth in the QVHighlights JSONL layout, for scoring predictions on shards."""
    row = {**query.get("tags", {}), "qid": query["qid"], "query": query["query"], "vid": item["video_id"],
           "duration": item["video_duration"], "relevant_windows": [list(m) for m in query["video_moments"]]}
    saliency = query.get("clip_saliency")
    if saliency and "label" in saliency:  # highlight detection: the label as its protocols read it
        row["label"] = [list(r) for r in saliency["label"]]
    elif saliency and saliency.get("clip_seconds", QVH_CLIP_SECONDS) == QVH_CLIP_SECONDS:
        row["relevant_clip_ids"], row["saliency_scores"] = list(saliency["clip_ids"]), list(saliency["scores"])
    return row
