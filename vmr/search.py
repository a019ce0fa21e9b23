"""Search a collection for a moment: ``vmr index`` encodes every video once, ``vmr search`` finds a
sentence's best moments over all of them.

An index is a folder of feature shards (vmr/features.py: the vision tower's tokens of every frame
of every video, the same layout as a cache or a saved encoding) plus ``index.json`` naming the
model it was made with. A search runs in two stages:

1. **Shortlist** (cheap, one matrix product over the whole collection): the model's own first layer
   asks each frame whether it holds what the sentence names. The query-pooling layer (QueryPool)
   compares the sentence with every patch of a frame and with a learned "nothing here" slot; a
   frame's score is how much more the sentence matches its best patches than that slot (the log of
   the summed attention odds, averaged over heads), and a video's score is its best frame's. The
   patches' keys are computed once, when the index is opened.
2. **Rerank**: the full model (every layer, every window) on the ``candidates`` best videos only,
   whose moments are ranked by their score, as ``vmr predict`` ranks them within a video.

Cost per query: the shortlist is linear in the number of frames in the collection with a small
constant (one dot product per patch); the rerank is constant in the collection's size (``candidates``
videos). ``candidates=0`` reranks every video (exhaustive, linear with the full model's cost).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from vmr.encode import EncodedVideo, open_encodings
from vmr.errors import UserError
from vmr.io import field, json_text, read_json, write_text_atomic
from vmr.text import check_query

INDEX = "index.json"
CANDIDATES = 20  # videos the full model reranks (0: all)
WINDOWS_AT_ONCE = 64  # windows of the rerank in one forward: memory bounded whatever the shortlist


def check_searchable(model) -> None:
    """The collection search's shortlist scores a video by vmr's head's query pooling over its
    stored patch keys; a published head has no such first stage."""
    if model.config.head != "vmr":
        raise UserError(f"a model with model.head {model.config.head} cannot search a collection: the shortlist "
                        "reads vmr's head (its query pooling over patches); use vmr predict or vmr eval per video")


class Index:
    """An opened index: its videos' encodings, and the shortlist's keys of every frame's patches.
    ``Index.open(folder, model)``; ``search(query)``."""

    def __init__(self, model, videos: list[EncodedVideo], skipped: list | None = None, folder: Path | None = None):
        import torch

        from vmr.model import patch_grid

        if not videos:
            raise UserError(f"{folder or 'the index'}: holds no video")
        check_searchable(model)
        if model.config.text_feature_dim:
            raise UserError("this model reads imported query features, not sentences: it cannot search with text")
        self.model, self.videos, self.skipped, self.folder = model.eval(), videos, skipped or [], folder
        # The encodings stay on the host (their windows go to the device as the rerank takes them);
        # the shortlist's keys live where the model is, in float16 (half the memory), scored in float32.
        self.device, dtype = model.head.patch_in.weight.device, model.head.patch_in.weight.dtype
        pool = model.head.pool
        self.heads = pool.heads
        with torch.no_grad():
            # (frames, slots, d) keys of each frame's patches (the pooled vector when there is no grid)
            keys = [pool.to_k(pool.norm(model.head.patch_in(patch_grid(v.tokens).to(self.device, dtype)))).to(torch.float16)
                    for v in videos]
            self.null_key = pool.to_k(pool.null)[0].float()  # (d,)
        self.keys = torch.cat(keys)
        self.frame_video = torch.repeat_interleave(torch.arange(len(videos)),
                                                   torch.tensor([len(k) for k in keys])).to(self.device)

    @classmethod
    def open(cls, folder: str | Path, model) -> Index:
        skipped: list = []
        return cls(model, list(open_encodings(folder, model, skipped)), skipped, Path(folder))

    @property
    def nbytes(self) -> int:
        tokens = sum(v.nbytes for v in self.videos)
        return tokens + self.keys.numel() * self.keys.element_size()

    def _sentence(self, query: str):
        """(the text as forward takes it, the pooling layer's query (d,))."""
        text, sentence = self.model.encode_queries([query])
        return text, self.model.head.pool.to_q(self.model.head.sentence_in(sentence))[0].float()

    def shortlist(self, query: str, count: int) -> list[tuple[int, float]]:
        """(video index, score) of the ``count`` best videos for ``query`` by the first stage alone."""
        import torch

        check_query(self.model.tokenizer, query)
        with torch.no_grad():
            return self._shortlist(self._sentence(query)[1], count)

    def _shortlist(self, query_vector, count: int) -> list[tuple[int, float]]:
        """(video, score) of the ``count`` best videos by the shortlist's score (module docstring)."""
        import torch

        h = self.heads
        e = query_vector.numel() // h
        q = query_vector.view(h, e) / math.sqrt(e)
        null = (self.null_key.view(h, e) * q).sum(-1)  # (h,)
        slots = self.keys.shape[1]
        frame_scores = []
        for chunk in self.keys.split(1 << 14):  # (f, p, d) in float16 -> float32, a chunk at a time
            logits = torch.einsum("fphe,he->fhp", chunk.float().view(len(chunk), slots, h, e), q)
            frame_scores.append((torch.logsumexp(logits, dim=-1) - null).mean(dim=-1))
        scores = torch.full((len(self.videos),), -math.inf, device=self.device).scatter_reduce(
            0, self.frame_video, torch.cat(frame_scores), reduce="amax")
        best = scores.topk(min(count, len(self.videos)))
        return list(zip(best.indices.tolist(), best.values.tolist(), strict=True))

    def search(self, query: str, top_k: int = 10, candidates: int = CANDIDATES, per_video: int = 5) -> dict:
        """The ``top_k`` best moments over the collection: ``{"query", "videos", "reranked", "results":
        [{"video", "start", "end", "score", "shortlist"}, ...]}``, best first; ``candidates`` videos go to
        the full model (0: all of them); each gives at most ``per_video`` moments."""
        import torch

        from vmr.model import rank_moments

        check_query(self.model.tokenizer, query)
        with torch.no_grad():
            text, pooled = self._sentence(query)
            picked = self._shortlist(pooled, candidates or len(self.videos))
            results = []
            for (index, prior), scores in zip(picked, self._rerank([i for i, _ in picked], text), strict=True):
                for start, end, score in rank_moments(scores, per_video, self.model.config.nms_iou):
                    results.append({"video": self.videos[index].video_id, "start": round(start, 4),
                                    "end": round(end, 4), "score": round(score, 4), "shortlist": round(prior, 4)})
        results.sort(key=lambda r: (-r["score"], -r["shortlist"]))
        return {"query": query, "videos": len(self.videos), "reranked": len(picked), "results": results[:top_k]}

    def _rerank(self, indices: list[int], text: dict) -> list[dict]:
        """The full model on the windows of the videos ``indices`` (WINDOWS_AT_ONCE windows per
        forward, padded to the longest): per video, its ``frame_outputs`` merged over its windows."""
        import torch

        from vmr.model import FRAME_KEYS, frame_outputs

        windows = [(n, window) for n, i in enumerate(indices) for window in self.videos[i].windows()]
        merged = [{key: [] for key in FRAME_KEYS} for _ in indices]
        dtype = self.model.head.frame_in.weight.dtype
        for first in range(0, len(windows), WINDOWS_AT_ONCE):
            batch = windows[first:first + WINDOWS_AT_ONCE]
            t = max(len(w[0]) for _, w in batch)
            tokens = torch.zeros(len(batch), t, *batch[0][1][0].shape[1:], dtype=dtype)
            times, frame_mask = torch.zeros(len(batch), t), torch.zeros(len(batch), t, dtype=torch.bool)
            for row, (_, (frames, at, start, _, _)) in enumerate(batch):
                tokens[row, :len(frames)] = frames
                times[row, :len(frames)] = torch.as_tensor(at, dtype=torch.float) - start
                frame_mask[row, :len(frames)] = True
            b, device = len(batch), self.device
            outputs = self.model(tokens.to(device), {k: v.expand(b, *v.shape[1:]) for k, v in text.items()},
                                 frame_mask=frame_mask.to(device), video_index=torch.arange(b, device=device),
                                 frame_times=times.to(device),
                                 duration=torch.tensor([w[3] - w[2] for _, w in batch], device=device))
            video_length = torch.tensor([self.videos[indices[n]].duration for n, _ in batch], dtype=torch.float64)
            parts = frame_outputs(outputs, torch.tensor([w[4] for _, w in batch]),
                                  torch.tensor([w[2] for _, w in batch], dtype=torch.float64), video_length,
                                  self.model.config)
            for (n, _), part in zip(batch, parts, strict=True):
                for key in FRAME_KEYS:
                    merged[n][key] += part[key]
        return merged


# ----- commands -----------------------------------------------------------------------------------


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an inference bundle, or a run directory (uses export_best/)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", type=Path, help="a folder of video files (any FFmpeg reads); a video's id is "
                                                    "its file name without the extension")
    source.add_argument("--shards", nargs="+", help="video shards (folder, glob, brace pattern)")
    p.add_argument("--out", type=Path, required=True, help="the index folder (feature shards, manifest.json, index.json)")
    p.add_argument("--follow-links", action="store_true",
                   help="with --videos: also read video files that are symlinks leading outside it")
    p.add_argument("--videos-per-part", type=int, default=50,
                   help="with --videos: videos per feature shard, the unit of resuming and of sharing the work "
                        "among processes (default 50)")


def run_index(args: argparse.Namespace) -> int:
    from vmr.bundle import resolve_bundle
    from vmr.config import load_config
    from vmr.data.annotations import VIDEO_EXTENSIONS
    from vmr.data.sources import expand_shards
    from vmr.data.video import video_files
    from vmr.features import check_video_shards, extract_command, shard_parts, video_parts
    from vmr.runtime import process_group_scope, process_state

    bundle = resolve_bundle(args.checkpoint).resolve()
    head = load_config(bundle / "config.yaml").model.head
    if head != "vmr":  # refused before any encoding: its index could never be searched
        raise UserError(f"{bundle}: a model with model.head {head} cannot search a collection: the shortlist reads "
                        "vmr's head (its query pooling over patches); use vmr predict or vmr eval per video")
    if not 1 <= args.videos_per_part <= 100_000:
        raise UserError(f"--videos-per-part must be between 1 and 100000, got {args.videos_per_part}")
    if args.videos is not None:
        if not args.videos.is_dir():
            raise UserError(f"--videos: {args.videos} is not a folder")
        files = video_files(args.videos, args.follow_links)
        if not files:
            raise UserError(f"--videos: {args.videos} holds no video file ({', '.join(VIDEO_EXTENSIONS)})")
        if args.out.resolve() == args.videos.resolve():
            raise UserError("--out: write the index to another folder than the videos'")
        parts, source = video_parts(files, args.videos_per_part), {"videos": str(args.videos.resolve()),
                                                                     "follow_links": args.follow_links}
    else:
        urls = expand_shards(args.shards)
        check_video_shards(urls, args.shards[0], args.out)
        parts, source = shard_parts(urls), {"shards": [str(Path(u).resolve()) if Path(u).is_file() else u for u in urls]}
    if (args.out / INDEX).is_file():
        read_index(args.out)  # a damaged or foreign index.json is refused before any work
    state = process_state()
    options = argparse.Namespace(checkpoint=str(bundle), config=None, out=args.out, pooled_only=False, views=1,
                                 overwrite=False)
    with process_group_scope():
        code = extract_command(options, state, parts, [])
    if state.is_main_process:
        write_text_atomic(args.out / INDEX, json_text({"checkpoint": str(bundle), **source}, args.out / INDEX, indent=1) + "\n")
        print(f"index written to {args.out}; search it with: vmr search --index {args.out} --query '...'")
    return code


def read_index(folder: Path) -> dict:
    """``index.json``: which model made the index, and from what."""
    if not (folder / INDEX).is_file():
        raise UserError(f"{folder}: not an index ({INDEX} is missing; build one with 'vmr index')")
    record = read_json(folder / INDEX)
    field(record, "checkpoint", str, str(folder / INDEX))
    field(record, "videos", str, str(folder / INDEX), default=None)
    field(record, "follow_links", bool, str(folder / INDEX), default=False)
    return record


def index_videos(record: dict) -> dict[str, Path]:
    """The video files of an index's ``videos`` folder by video id, listed exactly as ``vmr index
    --videos`` lists them (video files only, no symlink leading outside unless the index was built
    with --follow-links): a folder named by a file gets no more trust than one named by a user."""
    from vmr.data.tars import sanitise_key
    from vmr.data.video import video_files

    folder = Path(record["videos"]) if record.get("videos") else None
    if folder is None or not folder.is_dir():
        return {}
    return {sanitise_key(p.stem): p for p in video_files(folder, record.get("follow_links", False))}


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="an index folder made by 'vmr index'")
    p.add_argument("--query", required=True, action="append",
                   help="the sentence to find; repeat it for several (the index is opened once; a JSON list)")
    p.add_argument("--top-k", type=int, default=10, help="moments to return, over all videos (default 10)")
    p.add_argument("--candidates", type=int, default=CANDIDATES,
                   help=f"videos the full model reranks after the shortlist (default {CANDIDATES}; 0: every video, "
                        "exhaustive and slower)")
    p.add_argument("--checkpoint", help="the model to search with (default: the one the index was made with; another "
                                        "is accepted only if it has the same vision tower)")


def run_search(args: argparse.Namespace) -> int:
    from vmr.bundle import load_model

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.candidates < 0:
        raise UserError(f"--candidates must be 0 (all videos) or more, got {args.candidates}")
    record = read_index(args.index)
    model, _ = load_model(args.checkpoint or record["checkpoint"], fast=False)
    for query in args.query:  # before the index is read: a bad query costs nothing
        check_query(model.tokenizer, query)
    start = time.perf_counter()
    index = Index.open(args.index, model)
    opened = time.perf_counter()
    results = [index.search(query, args.top_k, args.candidates) for query in args.query]
    print(f"opened {len(index.videos)} videos in {opened - start:.1f} s "
          f"({index.nbytes / 2**20:.0f} MB in memory); {len(results)} search(es) in {time.perf_counter() - opened:.2f} s"
          + (f"; {len(index.skipped)} unreadable video(s) left out (first: {index.skipped[0]['reason']})"
             if index.skipped else ""), file=sys.stderr)
    print(json_text(results[0] if len(results) == 1 else results, "the search results", indent=2))
    return 0
