"""Search a collection for a moment: ``vmr index`` encodes every video once, ``vmr search`` finds a
sentence's best moments over all of them.

An index is a folder of feature shards (vmr/features.py: the vision tower's tokens of every frame of
every video, the layout of a cache or a saved encoding), ``index.json`` naming the model it was made
with, and that model's compact keys with their approximate-nearest-neighbour index (vmr/ann.py). A
search runs in two stages:

1. **Shortlist**: the sentence's key against the videos' segment keys (FAISS: exact up to a million,
   IVF-PQ beyond), then the videos found scored exactly by their best frame's key. The keys are
   trained for this (model.corpus): a video without the event scores low.
2. **Rerank**: the full model (every layer, every window) on the ``candidates`` best videos only,
   from their prepared rows on disk (the model's sentence-free half, done by the index:
   vmr/prepared.py); moments are ranked by their relevance times their video's presence, which
   model.corpus trained against other videos, so that they compare across videos.
3. **Contrast** (optional: ``contrast`` sentences, e.g. the training annotations'): the best
   ``CONTRAST_VIDEOS`` videos are asked again, in one forward each, with the ``CONTRAST_SENTENCES``
   sentences sharing the most words with the query ("a red square grows" for "a red circle grows").
   A moment's score is also multiplied by the query's share of a softmax over those sentences'
   relevance logits at the moment's frame: a video where a red *square* grows answers the square's
   sentence better than the query, and drops. (model.corpus.sentences trains exactly that
   comparison.) Each of those videos' best moment by that score leads; the rest follow as without.

Cost per query: the ANN search (sub-linear with IVF-PQ), then ``candidates`` videos' reads and
forward passes (with contrast, ``CONTRAST_VIDEOS`` more, of more sentences), constant in the
collection's size. Memory: the ANN index and a table per video.
``candidates=0`` reranks every video (exhaustive).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vmr.errors import UserError
from vmr.io import check_output, field, json_text, read_json, write_output, write_text_atomic
from vmr.text import check_query

INDEX = "index.json"
CANDIDATES = 20  # videos the full model reranks (0: all)
WINDOWS_AT_ONCE = 64  # windows of the rerank held at once: memory bounded whatever the shortlist
WINDOWS_PER_FORWARD = 8  # of those, per forward (by length): less padding, as fast per window on a CPU
MAX_PREDICTIONS = 100  # per query in a TVR prediction file
CONTRAST_SENTENCES = 8  # near-miss sentences each contrasted video is asked (measured: 4 and every one were worse)
CONTRAST_VIDEOS = 3  # the best videos by relevance x presence that are contrasted (as good as all 20 measured)
PREDICTION_FILE = ("TVR prediction file", lambda v: isinstance(v, dict) and "video2idx" in v)  # replaced only if so


class Index:
    """An opened index: ``Index.open(folder, model)``; ``search(query)``; ``len(index)`` videos,
    ``index.ids`` their ids, ``index.load(i)`` one video's encoding (read from disk)."""

    def __init__(self, model, collection, folder: Path | None = None):
        from vmr.ann import check_corpus_model

        check_corpus_model(model.config, str(folder or "the index"))
        if model.config.text_feature_dim:
            raise UserError("this model reads imported query features, not sentences: it cannot search with text")
        self.model, self.collection, self.folder = model.eval(), collection, folder
        self.ids, self.skipped = collection.ids, collection.skipped
        self.device = model.head.frame_in.weight.device
        self._last: tuple = (None, None, None)  # the last sentence asked, its text and key
        self.set_contrast([])

    def set_contrast(self, sentences) -> None:
        """The sentences a search contrasts its best videos with (its near misses among them)."""
        from vmr.model.corpus import SentencePool

        self.contrast = SentencePool(sentences)

    @classmethod
    def open(cls, folder: str | Path, model, progress: bool = False) -> Index:
        from vmr.ann import Collection

        return cls(model, Collection.open(Path(folder), model, progress), Path(folder))

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, video: int):
        return self.collection.load(video)

    def _sentence(self, query: str):
        """(the text as forward takes it, the sentence's key (r,) as numpy). The last sentence's are kept:
        a query file asks each sentence three ways in a row (VCMR, VR, SVMR)."""
        last = self._last  # read once: another thread (the demo's) may replace it meanwhile
        if last[0] != query:
            text, sentence = self.model.encode_queries([query])
            last = self._last = (query, text, self.model.head.query_keys(sentence)[0].cpu().numpy())
        return last[1:]

    def shortlist(self, query: str, count: int) -> list[tuple[int, float]]:
        """(video index, score) of the ``count`` best videos for ``query`` by their keys alone."""
        import torch

        check_query(self.model.tokenizer, query)
        with torch.no_grad():
            return self.collection.shortlist(self._sentence(query)[1], count)

    def search(self, query: str, top_k: int = 10, candidates: int = CANDIDATES, per_video: int = 5) -> dict:
        """The ``top_k`` best moments over the collection: ``{"query", "videos", "reranked", "results":
        [{"video", "start", "end", "score", "relevance", "presence", "shortlist"[, "contrast"]}, ...],
        "ranked_videos": [[video, score], ...]}`` (score: relevance x the video's presence; x its
        contrast share for each contrasted video's best moment by it, these leading), best first;
        ``candidates`` videos go to the full model (0: all of them); each gives at most ``per_video``
        moments. ``ranked_videos``: the reranked videos by their best moment."""
        import torch

        from vmr.model import rank_moments

        check_query(self.model.tokenizer, query)
        with torch.no_grad():
            text, key = self._sentence(query)
            picked = self.collection.shortlist(key, candidates or len(self.ids))
            scored = [per[0] for per in self._rerank([i for i, _ in picked], text)]
            # A moment's relevance ranks it within its video; times the video's presence (its best
            # frame's), it compares across videos.
            presence = [max(scores.get("presence") or [1.0]) for scores in scored]
            moments = [rank_moments(scores, per_video, self.model.config.nms_iou) for scores in scored]
            shares = self._contrast(query, [i for i, _ in picked], scored, moments, presence)
            # Sorted by (leads, score, shortlist): each contrasted video's best moment by relevance x presence
            # x share leads; every other moment follows by relevance x presence, as without contrast, so
            # that the lower ranks stay the plain search's.
            results, best = [], {}
            for n, (index, prior) in enumerate(picked):
                lead = max(range(len(moments[n])), key=lambda m: moments[n][m][2] * shares[n][m]) if n in shares else -1
                for m, (start, end, score) in enumerate(moments[n]):
                    share = shares[n][m] if n in shares else None
                    total = score * presence[n] * (share if m == lead else 1.0)
                    results.append(((m == lead, round(total, 4), round(prior, 4)), {
                        "video": self.ids[index], "start": round(start, 4), "end": round(end, 4),
                        "score": round(total, 4), "relevance": round(score, 4), "presence": round(presence[n], 4),
                        "shortlist": round(prior, 4), **({} if share is None else {"contrast": round(share, 4)})}))
                    best[index] = max(best.get(index, (False, -1.0)), (m == lead, total))
        results = [r for _, r in sorted(results, key=lambda kr: kr[0], reverse=True)]
        ranked = [(i, s) for i, (_, s) in sorted(best.items(), key=lambda kv: kv[1], reverse=True)]
        return {"query": query, "videos": len(self.ids), "reranked": len(picked), "results": results[:top_k],
                "ranked_videos": [[self.ids[i], round(s, 4)] for i, s in ranked]}

    def _contrast(self, query: str, indices: list[int], scored: list[dict], moments: list[list],
                  presence: list[float]) -> dict[int, list[float]]:
        """With contrast sentences: for the ``CONTRAST_VIDEOS`` best of the reranked videos (by their best
        moment's relevance x presence), each moment's share of the query among its near misses (a
        softmax of relevance logits at the frame that proposed the moment); {position in indices: [share
        per moment]}."""
        import math

        misses = self.contrast.nearest(query, CONTRAST_SENTENCES)  # ties alphabetical
        if not misses:
            return {}
        best = sorted(range(len(indices)), key=lambda n: -max((p for *_, p in moments[n]), default=-1.0) * presence[n])
        chosen = [n for n in best[:CONTRAST_VIDEOS] if moments[n]]
        text, _ = self.model.encode_queries(misses)
        answers = self._rerank([indices[n] for n in chosen], text)
        logit = lambda p: math.log(max(p, 1e-6)) - math.log(max(1 - p, 1e-6))  # noqa: E731
        shares = {}
        for n, asked in zip(chosen, answers, strict=True):
            frames = scored[n]
            proposals = {(s, e, p): f for f, (s, e, p) in
                         enumerate(zip(frames["starts"], frames["ends"], frames["scores"], strict=True))}
            shares[n] = []
            for moment in moments[n]:
                frame = proposals[moment]  # the frame that proposed it (rank_moments keeps its numbers)
                logits = [logit(moment[2])] + [logit(miss["relevance"][frame]) for miss in asked]
                top = max(logits)
                shares[n].append(math.exp(logits[0] - top) / sum(math.exp(x - top) for x in logits))
        return shares

    def in_video(self, query: str, video: int, top_k: int) -> list[tuple[float, float, float]]:
        """The ``top_k`` best moments of one video of the index (TVR's SVMR)."""
        import torch

        from vmr.model import rank_moments

        with torch.no_grad():
            text, _ = self._sentence(query)
            return rank_moments(self._rerank([video], text)[0][0], top_k, self.model.config.nms_iou)

    def _rerank(self, indices: list[int], text: dict) -> list[list[dict]]:
        """The full model on the windows of the videos ``indices``, from their prepared rows (its half
        that no sentence changes, stored by the index: vmr/prepared.py), read from disk one video at a
        time, up to WINDOWS_AT_ONCE windows held; WINDOWS_PER_FORWARD of like length per forward, padded
        to the longest, each window with every sentence of ``text``: per video, per sentence, its
        ``frame_outputs`` merged over its windows."""
        import torch

        from vmr.model import FRAME_KEYS, frame_outputs
        from vmr.prepared import unpack

        m = len(text["attention_mask"])
        merged = [[{key: [] for key in FRAME_KEYS} for _ in range(m)] for _ in indices]  # and presence (model.corpus)
        dtype = self.model.head.frame_in.weight.dtype
        pending: list = []

        def run(batch):
            t = max(len(w[0]) for _, _, w in batch)
            rows = torch.zeros(len(batch), t, *batch[0][2][0].shape[1:], dtype=dtype)
            times, frame_mask = torch.zeros(len(batch), t), torch.zeros(len(batch), t, dtype=torch.bool)
            for row, (_, _, (frames, at, start, _, _)) in enumerate(batch):
                rows[row, :len(frames)] = frames
                times[row, :len(frames)] = torch.as_tensor(at, dtype=torch.float) - start
                frame_mask[row, :len(frames)] = True
            b, device = len(batch), self.device
            # Row w * m + j: window w with sentence j.
            outputs = self.model(None, {k: v.repeat(b, *[1] * (v.dim() - 1)) for k, v in text.items()},
                                 frame_mask=frame_mask.to(device),
                                 video_index=torch.arange(b, device=device).repeat_interleave(m),
                                 frame_times=times.to(device),
                                 duration=torch.tensor([w[3] - w[2] for _, _, w in batch], device=device),
                                 prepared=unpack(rows.to(device)))
            per_row = frame_outputs(outputs, torch.tensor([w[4] for _, _, w in batch]).repeat_interleave(m, dim=0),
                                    torch.tensor([w[2] for _, _, w in batch], dtype=torch.float64).repeat_interleave(m),
                                    torch.tensor([d for _, d, _ in batch], dtype=torch.float64).repeat_interleave(m),
                                    self.model.config)
            return [per_row[w * m:(w + 1) * m] for w in range(b)]

        def run_all(windows):
            # Shortest first, a few at a time: each forward pads its windows to the longest, so
            # windows of like length go together (a padded frame costs what a real one does). Merged
            # back in the windows' own order: a video's frames stay in time order.
            parts = [None] * len(windows)
            order = sorted(range(len(windows)), key=lambda i: len(windows[i][2][0]))
            for first in range(0, len(order), WINDOWS_PER_FORWARD):
                chunk = order[first:first + WINDOWS_PER_FORWARD]
                for i, part in zip(chunk, run([windows[i] for i in chunk]), strict=True):
                    parts[i] = part
            for (n, _, _), part in zip(windows, parts, strict=True):
                for j, sentence in enumerate(part):
                    for key, values in sentence.items():
                        merged[n][j].setdefault(key, []).extend(values)

        for n, index in enumerate(indices):
            duration = float(self.collection.durations[index])
            pending += [(n, duration, window) for window in self.collection.prepared_windows(index)]
            if len(pending) >= WINDOWS_AT_ONCE:
                run_all(pending)
                pending = []
        run_all(pending)
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
    from vmr.ann import build_keys, check_corpus_model, merge_keys
    from vmr.bundle import resolve_bundle
    from vmr.config import load_config
    from vmr.data.annotations import VIDEO_EXTENSIONS
    from vmr.data.sources import expand_shards
    from vmr.data.video import video_files
    from vmr.features import check_video_shards, extract_command, shard_parts, video_parts
    from vmr.runtime import process_group_scope, process_state

    bundle = resolve_bundle(args.checkpoint).resolve()
    cfg = load_config(bundle / "config.yaml").model
    check_corpus_model(cfg, str(bundle))  # refused before any encoding: an index it could not search
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
    from vmr.bundle import load_model

    model, _ = load_model(bundle, fast=False)
    state = process_state()
    options = argparse.Namespace(checkpoint=str(bundle), config=None, out=args.out, pooled_only=False, views=1,
                                 overwrite=False)
    with process_group_scope():
        code = extract_command(options, state, parts, [])
        # The compact keys: every process its shards' parts, then one merge into the ANN index.
        made = build_keys(args.out, model.to(state.device), state.process_index, state.num_processes,
                          progress=state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            record = merge_keys(args.out, model)
            print(f"keys: {made} part(s) made here; {record['videos']} videos, {record['frames']} frame keys in a "
                  f"{record['kind']} index")
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
    asked = p.add_mutually_exclusive_group(required=True)
    asked.add_argument("--query", action="append",
                       help="the sentence to find; repeat it for several (the index is opened once; a JSON list)")
    asked.add_argument("--queries", type=Path,
                       help="a TVR JSONL query file (desc_id, desc; vid_name for the single-video task): every "
                            "query is searched and --out gets a TVR prediction file ('vmr eval --protocol tvr')")
    p.add_argument("--out", type=Path, help="with --queries: the prediction file to write (JSON)")
    p.add_argument("--top-k", type=int, default=10, help="moments to return, over all videos (default 10; with "
                                                         f"--queries, {MAX_PREDICTIONS})")
    p.add_argument("--candidates", type=int, default=CANDIDATES,
                   help=f"videos the full model reranks after the shortlist (default {CANDIDATES}; 0: every video, "
                        "exhaustive and slower)")
    p.add_argument("--checkpoint", help="the model to search with (default: the one the index was made with; another "
                                        "is accepted only if it has the same vision tower; its keys are made on "
                                        "first use)")
    p.add_argument("--contrast", type=Path, metavar="ANNOTATIONS",
                   help="an annotation file (any format 'vmr shards build' reads; e.g. the training set's) whose "
                        f"sentences the {CONTRAST_VIDEOS} best videos are also asked: the {CONTRAST_SENTENCES} sharing "
                        "the most words with the query. A video that answers one of them better than the query "
                        "drops (a red square growing, for 'a red circle grows'). Best with a model trained with "
                        "model.corpus.sentences; costs those videos' forwards again")


def run_search(args: argparse.Namespace) -> int:
    import psutil

    from vmr.bundle import load_model

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.candidates < 0:
        raise UserError(f"--candidates must be 0 (all videos) or more, got {args.candidates}")
    if args.queries is not None and args.out is None:
        raise UserError("--queries needs --out, the prediction file to write")
    if args.out is not None:  # before the work: --out on the query file (a slip) is refused, not overwritten
        check_output(args.out, *PREDICTION_FILE)
    record = read_index(args.index)
    model, _ = load_model(args.checkpoint or record["checkpoint"], fast=False)
    rows = read_queries(args.queries) if args.queries is not None else [{"desc": q} for q in args.query]
    for row in rows:  # before the index is read: a bad query costs nothing
        check_query(model.tokenizer, row["desc"])
    contrast = read_contrast(args.contrast, model.tokenizer) if args.contrast is not None else []
    start = time.perf_counter()
    index = Index.open(args.index, model, progress=True)
    index.set_contrast(contrast)
    opened = time.perf_counter()
    if args.queries is not None:
        write_output(args.out, json_text(predictions(index, rows, args.candidates), args.out) + "\n", *PREDICTION_FILE)
    else:
        results = [index.search(row["desc"], args.top_k, args.candidates) for row in rows]
    print(f"opened {len(index)} videos in {opened - start:.1f} s; {len(rows)} search(es) in "
          f"{time.perf_counter() - opened:.2f} s; {psutil.Process().memory_info().rss / 2**20:.0f} MB resident"
          + (f"; {len(index.skipped)} unreadable video(s) left out (first: {index.skipped[0]['reason']})"
             if index.skipped else ""), file=sys.stderr)
    if args.queries is not None:
        print(f"predictions written to {args.out}; score them with: vmr eval --protocol tvr --predictions {args.out} "
              f"--ground-truth {args.queries}")
    else:
        print(json_text(results[0] if len(results) == 1 else results, "the search results", indent=2))
    return 0


def read_queries(path: Path) -> list[dict]:
    """A TVR JSONL query file's rows, each with an integer ``desc_id`` and a ``desc``."""
    from vmr.eval.metrics import BadInput, load_jsonl

    try:
        rows = load_jsonl(path, key="desc_id")
    except BadInput as error:
        raise UserError(str(error)) from None
    seen: dict[int, int] = {}  # desc_id -> its row: a prediction file answers each query once
    for number, row in enumerate(rows, 1):
        if isinstance(row["desc_id"], str) or not isinstance(row.get("desc"), str):
            raise UserError(f"{path}:{number}: needs an integer 'desc_id' and the sentence in 'desc'")
        field(row, "vid_name", str, f"{path}:{number}", default=None)
        if seen.setdefault(row["desc_id"], number) != number:
            raise UserError(f"{path}:{number}: desc_id {row['desc_id']} appears twice (first on row {seen[row['desc_id']]})")
    return rows


def read_contrast(path: Path, tokenizer) -> list[str]:
    """The distinct sentences of an annotation file, each one the model's tokenizer can read; the
    annotation reader's one-line refusals (missing, a folder, an unknown format) name the option."""
    from vmr.data.annotations import read_annotations

    try:
        sentences = list(dict.fromkeys(record.query for record in read_annotations(path)[0]))
        for sentence in sentences:
            check_query(tokenizer, sentence)
    except UserError as error:
        raise UserError(f"--contrast: {error}") from None
    return sentences


def predictions(index: Index, rows: list[dict], candidates: int) -> dict:
    """TVR's prediction file for ``rows``: VCMR (the collection's best 100 moments), VR (the reranked
    videos by their best moment, then the rest of the shortlist by key score), and SVMR (the query's
    own video alone) where a row names a video of the index."""
    from tqdm import tqdm

    number = {video: n for n, video in enumerate(index.ids)}
    vcmr, vr, svmr = [], [], []
    per_video = max(5, -(-MAX_PREDICTIONS // max(1, candidates or len(index))))
    for row in tqdm(rows, desc="searching", unit="query"):
        found = index.search(row["desc"], MAX_PREDICTIONS, candidates, per_video)
        entry = {"desc_id": row["desc_id"], "desc": row["desc"]}
        vcmr.append({**entry, "predictions": [[number[r["video"]], r["start"], r["end"], r["score"]]
                                              for r in found["results"]]})
        videos = [[number[v], 0, 0, s] for v, s in found["ranked_videos"]]
        seen = {v for v, *_ in videos}
        videos += [[v, 0, 0, round(s - 2, 4)] for v, s in index.shortlist(row["desc"], MAX_PREDICTIONS) if v not in seen]
        vr.append({**entry, "predictions": videos[:MAX_PREDICTIONS]})
        if row.get("vid_name") in number:
            moments = index.in_video(row["desc"], number[row["vid_name"]], MAX_PREDICTIONS)
            svmr.append({**entry, "predictions": [[number[row["vid_name"]], round(s, 4), round(e, 4), round(p, 4)]
                                                  for s, e, p in moments]})
    result = {"video2idx": number, "VCMR": vcmr, "VR": vr}
    if len(svmr) == len(rows):  # the protocol scores a task only when it answers every query
        result["SVMR"] = svmr
    return result
