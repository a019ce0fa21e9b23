"""Inference over shards or a single video file, and the ``vmr eval`` / ``vmr predict`` commands.

Predictions are written in the official QVHighlights submission schema (JSONL):
``{"qid", "query", "vid", "pred_relevant_windows": [[start, end, score], ...], "pred_saliency_scores": [...]}``
with one saliency score per 2-second clip of the video, so that the official highlight metrics apply.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from vmr.bundle import load_model, resolve_bundle
from vmr.config import MAX_WINDOW
from vmr.errors import UserError
from vmr.eval.metrics import PROTOCOLS, BadInput, evaluate, load_jsonl
from vmr.eval.report import evaluate_groups, leaderboard
from vmr.io import absent_when_not_finite, check_output, json_text, read_json, write_output
from vmr.spans import QVH_CLIP_SECONDS
from vmr.text import check_query

TOP_K = 10  # windows kept per query: mAP reads the top 10


def clip_saliency(times: list[float], scores: list[float], duration: float) -> list[float]:
    """Per-frame scores -> one score per 2-second clip: the mean of the frames inside it, or the
    nearest frame's when none falls inside (frames sampled sparser than one per clip)."""
    n_clips = max(1, math.ceil(duration / QVH_CLIP_SECONDS - 1e-9))
    out = []
    for c in range(n_clips):
        inside = [s for t, s in zip(times, scores, strict=True) if c * QVH_CLIP_SECONDS <= t < (c + 1) * QVH_CLIP_SECONDS]
        if not inside:
            centre = (c + 0.5) * QVH_CLIP_SECONDS
            inside = [min(zip(times, scores, strict=True), key=lambda ts: abs(ts[0] - centre))[1]]
        out.append(round(sum(inside) / len(inside), 4))
    return out


def prediction_row(qid, query: str, vid: str, frames: dict, duration: float, nms_iou: float,
                   top_k: int = TOP_K, sigmoid: bool = True) -> dict:
    """One query's whole-video frame outputs (``frame_outputs``, merged over its windows) -> its
    prediction row in the official schema. Saliency through a sigmoid (vmr's head), or as the
    head gives it (``sigmoid=False``: the published heads' files hold their raw scores)."""
    from vmr.model import rank_moments

    saliency = [1 / (1 + math.exp(-s)) for s in frames["saliency"]] if sigmoid else frames["saliency"]
    return {"qid": qid, "query": query, "vid": vid,
            "pred_relevant_windows": [[round(s, 4), round(e, 4), round(p, 4)]
                                      for s, e, p in rank_moments(frames, top_k, nms_iou)],
            "pred_saliency_scores": clip_saliency(frames["times"], saliency, duration)}


class WindowMerger:
    """Collects the windows of each video as batches arrive (a video's windows come in order from
    one loader worker, possibly over several batches) and gives its queries' prediction rows once
    its last window is in."""

    def __init__(self, config):
        from vmr.model import decoding_nms

        self.config, self.nms_iou, self.open = config, decoding_nms(config), {}

    def add(self, model, batch: dict, device) -> list[tuple[dict, dict]]:
        """Forward one batch; returns (prediction, ground truth) pairs of the videos it completes.
        ``model`` may be wrapped (DDP, DeepSpeed): only its forward is used."""
        import torch

        from vmr.data.prefetch import to_device
        from vmr.model import batch_forward, frame_outputs

        index = batch["video_index"]
        with torch.no_grad():
            outputs = batch_forward(model, to_device(batch, device))
        parts = frame_outputs(outputs, batch["own"][index], batch["offset"][index], batch["video_duration"][index],
                              self.config)
        done = []
        for j, part in enumerate(parts):
            v = int(index[j])
            key, (k, count) = batch["key"][v], batch["window"][v].tolist()
            entry = self.open.setdefault(key, {"windows": set(), "count": count, "queries": {}})
            query = entry["queries"].setdefault(batch["qid"][j], {
                "frames": {name: [] for name in part}, "truth": batch["ground_truth"][j],
                "row": (batch["qid"][j], batch["query"][j], batch["video_id"][v], float(batch["video_duration"][v]))})
            for name, values in part.items():
                query["frames"][name] += values
            entry["windows"].add(k)
        for key in batch["key"]:
            entry = self.open.get(key)
            if entry is not None and len(entry["windows"]) == entry["count"]:
                done += self._finish(self.open.pop(key))
        return done

    def flush(self) -> list[tuple[dict, dict]]:
        """Videos whose later windows never came (their decoding failed part-way): scored on the
        windows that did."""
        done = [pair for entry in self.open.values() for pair in self._finish(entry)]
        self.open = {}
        return done

    def _finish(self, entry: dict) -> list[tuple[dict, dict]]:
        return [(prediction_row(*q["row"][:3], q["frames"], q["row"][3], self.nms_iou,
                                sigmoid=self.config.head == "vmr"), q["truth"])
                for q in entry["queries"].values()]


def predict_shards(model, shards, cfg, tokenizer, batch_size: int = 8, device=None, rank: int | None = None,
                   world: int | None = None, lockstep=None,
                   progress: bool = True) -> tuple[list[dict], list[dict], int, str]:
    """Predictions and ground-truth rows for every query in ``shards`` (this rank's share when
    ``rank``/``world`` are given), the number of shards or videos that could not be read, and the
    last reason. Whole videos at ``cfg.data.sampling``'s rate: every window of each video is
    predicted, and the windows of a video are merged before its moments are ranked.

    ``lockstep`` (an Accelerator) keeps every rank calling forward the same number of times, as
    DeepSpeed ZeRO-3 needs (its forward gathers weights from all ranks): a rank out of batches
    repeats its last one and throws the result away."""
    import torch
    from tqdm import tqdm

    from vmr.data.stream import make_loader, skipped

    device = device or next(model.parameters()).device
    loader = make_loader(shards, cfg.data, tokenizer, batch_size=batch_size, train=False, rank=rank, world=world)
    merger, pairs, last = WindowMerger(cfg.model), [], None
    was_training = model.training
    model.eval()
    batches = iter(tqdm(loader, desc="predicting", unit="batch", disable=not progress, leave=False))
    while True:
        batch = next(batches, None)
        if lockstep is not None:
            active = lockstep.reduce(torch.tensor([0.0 if batch is None else 1.0], device=device), "sum")
            if active.item() == 0:
                break
            if batch is None:
                if last is not None:
                    WindowMerger(cfg.model).add(model, last, device)
                continue
        elif batch is None:
            break
        pairs += merger.add(model, batch, device)
        last = batch
    pairs += merger.flush()
    model.train(was_training)
    return [p for p, _ in pairs], [t for _, t in pairs], skipped(loader), loader.skip_counter.last_reason


def gathered(predictions: list, truth: list, bad: int, reason: str, processes: int) -> tuple[list, list, int, str]:
    """``predict_shards``' results of every rank, on every rank (collective under several processes)."""
    if processes <= 1:
        return predictions, truth, bad, reason
    from accelerate.utils import gather_object

    return (gather_object(predictions), gather_object(truth), sum(gather_object([bad])),
            next((r for r in gather_object([reason]) if r), ""))


def nothing_read(shards, bad: int, reason: str) -> UserError:
    where = shards if isinstance(shards, str) else " ".join(map(str, shards))
    return UserError(f"no video of {where} could be read ({bad} unreadable shard(s) or sample(s); last: "
                     f"{reason or 'the shards hold no samples'})")


def predict_video(model, cfg, path: str | Path, query: str | list[str], top_k: int = 5, nms_iou: float | None = None,
                  fps: float | None = None, window: int | None = None) -> dict | list[dict]:
    """The ``vmr predict`` JSON for one video and a query (also what the demo shows), or a list of them
    for a list of queries: the whole video at the model's sampling spec (``fps`` and ``window``
    override its rate and frames per window), one score per sampled frame. The video is decoded
    and encoded once (vmr/encode.py), whatever the number of queries. ``nms_iou`` defaults to the
    model's config."""
    from vmr.encode import encode_video

    queries = [query] if isinstance(query, str) else list(query)
    for text in queries:  # before the video is decoded: a bad query costs nothing
        check_query(model.tokenizer, text)
    video = encode_video(model, path, fps=fps)
    answers = video.ask(model, queries, top_k, nms_iou, window, video=str(path))
    return answers[0] if isinstance(query, str) else answers


# ----- commands -----------------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    files = p.add_argument_group("scoring a predictions file")
    files.add_argument("--predictions", help="predictions JSONL in the official QVHighlights schema (with --protocol "
                                             "tvr: TVR's prediction JSON)")
    files.add_argument("--ground-truth", help="ground truth in any annotation format vmr reads (TVR JSONL with --protocol tvr; QVHighlights or "
                                              "highlight JSONL, Charades-STA text, ActivityNet Captions or TACoS "
                                              "JSON); with --checkpoint, replaces the shards' own")
    model = p.add_argument_group("predicting with a trained model")
    model.add_argument("--checkpoint", help="an inference bundle, or a run directory (uses export_best/)")
    model.add_argument("--shards", nargs="+", help="shards to predict on (folder, glob, brace pattern or URLs)")
    model.add_argument("--predictions-out", help="write the predictions here (JSONL)")
    model.add_argument("--batch-size", type=int, default=8, help="videos per batch (default 8)")
    p.add_argument("--protocol", choices=(*PROTOCOLS, "tvr"), default="qvhighlights",
                   help="qvhighlights: R1/mAP at IoU 0.5-0.95 + highlights; charades, activitynet: R@1/R@5 at "
                        "IoU 0.3/0.5/0.7 + mIoU; tacos: also at 0.1; tvsum: top-5 mAP per domain and their mean; "
                        "youtube_highlights: mAP per domain and their mean; tvr: the corpus protocol, VCMR/SVMR/VR "
                        "R@1/5/10/100 of a TVR prediction file ('vmr search --queries' writes one) "
                        "(docs/evaluation.md)")
    p.add_argument("--allow-missing", action="store_true", help="score queries without a prediction as empty")
    p.add_argument("--group-by", metavar="FIELD[:EDGES]",
                   help="also score each group of queries sharing the value of this ground-truth field (a "
                        "dataset, a tag, vmr synth's told_apart_by); a number is bucketed at comma-separated "
                        "edges, e.g. duration:60,120; the JSON gets a 'groups' section")
    p.add_argument("--json", help="write the metrics JSON here")
    p.add_argument("--name", default=None, help="model name in the leaderboard (default: from the file names)")


def _read_ground_truth(path: str) -> list[dict]:
    """QVHighlights and highlight JSONL as they are; the other formats through the annotation readers."""
    from vmr.data.annotations import detect_format, read_annotations

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: file not found")
    if detect_format(file) in ("qvhighlights", "highlights"):
        return load_jsonl(file)
    records, skips = read_annotations(file)
    if skips:
        raise UserError(skips[0].reason)
    if any(r.unit != "seconds" for r in records):
        raise UserError(f"{file}: seed-format windows are frame numbers; score them with "
                        "'vmr eval --checkpoint ... --shards ...' (the shards hold them in seconds)")
    return [{"qid": r.qid, "query": r.query, "vid": r.video_id, "relevant_windows": [list(m) for m in r.moments]}
            for r in records]


def run_eval(args: argparse.Namespace) -> int:
    try:
        return _run_eval(args)
    except BadInput as error:  # the metrics module's one-line reasons
        raise UserError(str(error)) from None


# What an earlier run's outputs look like: only those are replaced (vmr/io.py: check_output).
METRICS = ("metrics JSON", lambda v: isinstance(v, dict) and ("brief" in v or "VCMR" in v))
PREDICTIONS = ("prediction file (JSONL)", lambda v: isinstance(v, dict) and "pred_relevant_windows" in v)


def _run_eval(args: argparse.Namespace) -> int:
    for path, kind in ((args.json, METRICS), (args.predictions_out, PREDICTIONS)):
        if path:  # before the work: a slip of the hand costs nothing
            check_output(Path(path), *kind)
    if args.protocol == "tvr":
        return _run_corpus_eval(args)
    if args.checkpoint:
        if args.predictions or not args.shards:
            raise UserError("with --checkpoint, give --shards (and not --predictions)")
        if not 1 <= args.batch_size <= 4096:
            raise UserError(f"--batch-size must be between 1 and 4096 videos, got {args.batch_size}")
        predictions, truth, name = _predict_for_eval(args)
        if predictions is None:  # not the main process
            return 0
        if args.ground_truth:
            truth = _read_ground_truth(args.ground_truth)
    else:
        if not (args.predictions and args.ground_truth):
            raise UserError("give --predictions and --ground-truth, or --checkpoint and --shards")
        predictions, truth = load_jsonl(args.predictions), _read_ground_truth(args.ground_truth)
        name = args.name or Path(args.predictions).stem
    metrics, missing = evaluate(predictions, truth, args.protocol, args.allow_missing)
    if missing:
        print(f"warning: {missing} queries had no prediction and were scored as empty", file=sys.stderr)
    print(leaderboard({args.name or name: metrics}))
    if args.group_by:
        groups = evaluate_groups(predictions, truth, args.group_by, args.protocol, args.allow_missing)
        print()
        print(leaderboard({f"{label} ({g['queries']} queries)": g for label, g in groups["groups"].items()},
                          first_column=args.group_by))
        metrics["groups"] = groups
    if args.json:
        metrics, absent = absent_when_not_finite(metrics)
        if absent:  # e.g. a length range or group without ground truth: no number, not NaN
            metrics["absent"] = absent
            print(f"note: {len(absent)} metric(s) have no value (no ground truth to score): written as null, "
                  f"listed under 'absent' (first: {absent[0]})", file=sys.stderr)
        write_output(Path(args.json), json_text(metrics, args.json, indent=2) + "\n", *METRICS)
        print(f"metrics written to {args.json}")
    return 0


def _run_corpus_eval(args: argparse.Namespace) -> int:
    """TVR's corpus protocol on a prediction file (vmr/eval/corpus.py)."""
    from vmr.eval.corpus import tvr_metrics, tvr_table

    if args.checkpoint or not (args.predictions and args.ground_truth):
        raise UserError("--protocol tvr scores a prediction file: give --predictions (from 'vmr search --queries') "
                        "and --ground-truth (TVR JSONL)")
    if not Path(args.ground_truth).is_file():
        raise UserError(f"{args.ground_truth}: file not found")
    metrics = tvr_metrics(read_json(args.predictions), load_jsonl(args.ground_truth, key="desc_id"),
                          (args.predictions, args.ground_truth))
    print(tvr_table(metrics))
    if args.json:
        metrics, absent = absent_when_not_finite(metrics)
        if absent:
            metrics["absent"] = absent
        write_output(Path(args.json), json_text(metrics, args.json, indent=2) + "\n", *METRICS)
        print(f"metrics written to {args.json}")
    return 0


def _predict_for_eval(args):
    """Batched inference on the best device; under ``accelerate launch`` every process predicts its
    share of the shards and the main process gathers them."""
    from vmr.cache import cache_of, check_shards
    from vmr.data.sources import count_samples, expand_shards
    from vmr.runtime import process_group_scope, process_state

    state = process_state()
    with process_group_scope():
        # Read from the manifests beside local shards only (pipe: URLs are refused by the loader
        # unless the bundle's data.allow_pipe says otherwise). bf16 weights on CUDA only for videos:
        # a cache's tower is checked against the fp32 weights.
        urls = expand_shards(args.shards, allow_pipe=True)
        cache = cache_of(urls)
        model, cfg = load_model(args.checkpoint, state.device if state.num_processes > 1 else None,
                                fast=cache is None)
        check_shards(model, cache)
        start = time.perf_counter()
        predictions, truth, bad, reason = predict_shards(model, args.shards, cfg, model.tokenizer, args.batch_size,
                                                         rank=state.process_index, world=state.num_processes,
                                                         progress=state.is_main_process)
        predictions, truth, bad, reason = gathered(predictions, truth, bad, reason, state.num_processes)
    if not predictions:  # every rank raises alike: no metrics of nothing
        raise nothing_read(args.shards, bad, reason)
    if not state.is_main_process:
        return None, None, None
    print(f"predicted {len(predictions)} queries in {time.perf_counter() - start:.1f} s"
          + (f"; {bad} unreadable shard(s) or video(s) were skipped (last: {reason})" if bad else ""),
          file=sys.stderr)
    promised = count_samples(urls, "queries")
    if promised is not None and len(predictions) < promised:  # never a silent partial evaluation
        print(f"warning: the shards' manifest lists {promised} queries, {len(predictions)} were read and scored",
              file=sys.stderr)
    if args.predictions_out:
        write_output(Path(args.predictions_out), "".join(json_text(row, args.predictions_out) + "\n"
                                                         for row in predictions), *PREDICTIONS)
        print(f"predictions written to {args.predictions_out}")
    return predictions, truth, resolve_bundle(args.checkpoint).parent.name


class Deprecated(argparse.Action):
    """An option renamed with its ``old`` spelling still accepted; the old one prints a note."""

    def __init__(self, option_strings, dest, old: str, **kwargs):
        self.old = old
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == self.old:
            print(f"note: {self.old} is now called {self.option_strings[0]}; the old name still works for now",
                  file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an inference bundle, or a run directory (uses export_best/)")
    p.add_argument("--video", required=True, help="any file FFmpeg reads: MP4, AVI, MOV, MKV, WebM, ...")
    p.add_argument("--query", required=True, action="append",
                   help="the sentence to find; repeat it to ask several (the video is decoded and encoded once, "
                        "and the output is a JSON list, one object per query)")
    p.add_argument("--top-k", type=int, default=5, help="moments to return (default 5)")
    p.add_argument("--fps", "--clip-fps", type=float, default=None, action=Deprecated, old="--clip-fps",
                   help="frames per second to score (default: the rate the model was trained at, from the bundle); "
                        "--clip-fps is its old name")
    p.add_argument("--window", type=int, default=None,
                   help="frames the model sees at once (default: the trained window, from the bundle)")


def run_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise UserError(f"--fps must be a positive number, got {args.fps}")
    if args.window is not None and not 1 <= args.window <= MAX_WINDOW:
        raise UserError(f"--window must be between 1 and {MAX_WINDOW} frames, got {args.window}")
    model, cfg = load_model(args.checkpoint)
    start = time.perf_counter()
    results = predict_video(model, cfg, args.video, args.query, args.top_k, fps=args.fps, window=args.window)
    s = results[0]["sampling"]
    print(f"scored {s['frames']} frames of {results[0]['duration']:.1f} s, one every {1 / s['fps']:.2f} s "
          f"({s['fps']:g} frames/s), in {s['windows']} window(s) of up to {s['window']} frames, for "
          f"{len(results)} quer{'y' if len(results) == 1 else 'ies'} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    print(json_text(results[0] if len(results) == 1 else results, "the predictions", indent=2))
    return 0
