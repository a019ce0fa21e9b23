"""Inference over shards or a single video file, and the ``vmr eval`` / ``vmr predict`` commands.

Predictions are written in the official QVHighlights submission schema (JSONL):
``{"qid", "query", "vid", "pred_relevant_windows": [[start, end, score], ...], "pred_saliency_scores": [...]}``
with one saliency score per 2-second clip of the video, so that the official highlight metrics apply.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from vmr.data.shards import write_text_atomic
from vmr.errors import UserError
from vmr.eval.metrics import BadInput, evaluate, evaluate_groups, leaderboard, load_jsonl
from vmr.spans import QVH_CLIP_SECONDS

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


def resolve_bundle(path: str | Path) -> Path:
    """An inference bundle, or a run directory (its best export, else its final one)."""
    path = Path(path)
    for candidate in (path, path / "export_best", path / "export"):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise UserError(f"{path}: no inference bundle here (expected model.safetensors, or a run directory "
                    "with export_best/ or export/)")


def load_model(path: str | Path, device=None):
    from vmr.config import load_config
    from vmr.model import VideoMomentRetrievalModel

    bundle = resolve_bundle(path)
    model = VideoMomentRetrievalModel.from_pretrained(bundle)
    return model.to(device or best_device()).eval(), load_config(bundle / "config.yaml")


def best_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def batch_predictions(model, batch: dict, device, nms_iou: float, top_k: int = TOP_K) -> list[dict]:
    """One loader batch -> prediction rows (official schema) for its queries. ``model`` may be
    wrapped (DDP, DeepSpeed): only its forward is used."""
    import torch

    from vmr.model import decode_moments

    with torch.no_grad():
        outputs = model(batch["videos"].to(device),
                        {"input_ids": batch["text_ids"].to(device), "attention_mask": batch["text_mask"].to(device)},
                        frame_mask=batch["frame_mask"].to(device), video_index=batch["video_index"].to(device),
                        frame_times=batch["frame_times"].to(device), duration=batch["duration"].to(device))
    rows = []
    for j, result in enumerate(decode_moments(outputs, top_k, nms_iou)):
        video = int(batch["video_index"][j])
        saliency = [1 / (1 + math.exp(-s)) for s in result["saliency"]]
        rows.append({
            "qid": batch["qid"][j], "query": batch["query"][j], "vid": batch["video_id"][video],
            "pred_relevant_windows": [[round(s, 4), round(e, 4), round(p, 4)] for s, e, p in result["moments"]],
            "pred_saliency_scores": clip_saliency(result["clip_times"], saliency, float(batch["duration"][video])),
        })
    return rows


def predict_shards(model, shards, cfg, tokenizer, batch_size: int = 8, device=None, rank: int | None = None,
                   world: int | None = None, lockstep=None,
                   progress: bool = True) -> tuple[list[dict], list[dict], int, str]:
    """Predictions and ground-truth rows for every query in ``shards`` (this rank's share when
    ``rank``/``world`` are given), the number of shards or videos that could not be read, and the
    last reason.

    ``lockstep`` (an Accelerator) keeps every rank calling forward the same number of times, as
    DeepSpeed ZeRO-3 needs (its forward gathers weights from all ranks): a rank out of batches
    repeats its last one and throws the result away."""
    import torch
    from tqdm import tqdm

    from vmr.data.stream import make_loader, skipped

    device = device or next(model.parameters()).device
    loader = make_loader(shards, cfg.data, tokenizer, batch_size=batch_size, max_frames=cfg.model.max_frames,
                         train=False, rank=rank, world=world)
    predictions, truth, last = [], [], None
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
                    batch_predictions(model, last, device, cfg.model.nms_iou)
                continue
        elif batch is None:
            break
        predictions += batch_predictions(model, batch, device, cfg.model.nms_iou)
        truth += batch["ground_truth"]
        last = batch
    model.train(was_training)
    return predictions, truth, skipped(loader), loader.skip_counter.last_reason


def nothing_read(shards, bad: int, reason: str) -> UserError:
    where = shards if isinstance(shards, str) else " ".join(map(str, shards))
    return UserError(f"no video of {where} could be read ({bad} unreadable shard(s) or sample(s); last: "
                     f"{reason or 'the shards hold no samples'})")


def read_video(path: str | Path, clip_fps: float, max_frames: int, size: int):
    """Frames of any file FFmpeg reads, sampled uniformly: (uint8 (t, 3, size, size), times, duration)."""
    from torchcodec.decoders import VideoDecoder

    from vmr.data.stream import fit_frames
    from vmr.data.video import decode_frames, probe, sample_times

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        info = probe(path)
        decoder = VideoDecoder(str(path), seek_mode="approximate")
        times = sample_times(info.duration, "uniform", clip_fps, max_frames)
        frames, pts = decode_frames(decoder, times, start=info.start)
    except (ValueError, RuntimeError) as error:
        raise UserError(f"{path}: cannot decode this video ({str(error).splitlines()[0][:200]})") from None
    return fit_frames(frames, size), [float(t) for t in pts], info.duration


def predict_video(model, cfg, path: str | Path, query: str, top_k: int = 5, max_frames: int | None = None,
                  nms_iou: float | None = None) -> dict:
    """The ``vmr predict`` JSON for one video and one query (also what the demo shows).
    ``max_frames`` (at most the model's) and ``nms_iou`` default to the model's config."""
    if not query.strip():
        raise UserError("the query is empty")
    frames, times, duration = read_video(path, cfg.data.clip_fps, max_frames or model.config.max_frames,
                                         cfg.data.image_size)
    moments, scores = model.retrieve_moments(frames, query, top_k=top_k, frame_times=times, duration=duration,
                                             nms_iou=nms_iou)
    return {"video": str(path), "duration": round(duration, 4), "query": query,
            "moments": [{k: round(v, 4) for k, v in m.items()} for m in moments],
            "clip_times": [round(t, 4) for t in times], "clip_scores": [round(s, 4) for s in scores]}


# ----- commands -----------------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    files = p.add_argument_group("scoring a predictions file")
    files.add_argument("--predictions", help="predictions JSONL in the official QVHighlights schema")
    files.add_argument("--ground-truth", help="ground truth: QVHighlights JSONL, or Charades-STA text")
    model = p.add_argument_group("predicting with a trained model")
    model.add_argument("--checkpoint", help="an inference bundle, or a run directory (uses export_best/)")
    model.add_argument("--shards", nargs="+", help="shards to predict on (folder, glob, brace pattern or URLs)")
    model.add_argument("--predictions-out", help="write the predictions here (JSONL)")
    model.add_argument("--batch-size", type=int, default=8, help="videos per batch (default 8)")
    p.add_argument("--protocol", choices=["qvhighlights", "charades"], default="qvhighlights",
                   help="qvhighlights: R1/mAP at IoU 0.5-0.95 + highlights; charades: R@1/R@5 at 0.3/0.5/0.7 + mIoU")
    p.add_argument("--allow-missing", action="store_true", help="score queries without a prediction as empty")
    p.add_argument("--group-by", metavar="FIELD[:EDGES]",
                   help="also score each group of queries sharing the value of this ground-truth field (a "
                        "dataset, a tag, vmr synth's told_apart_by); a number is bucketed at comma-separated "
                        "edges, e.g. duration:60,120; the JSON gets a 'groups' section")
    p.add_argument("--json", help="write the metrics JSON here")
    p.add_argument("--name", default=None, help="model name in the leaderboard (default: from the file names)")


def _read_ground_truth(path: str) -> list[dict]:
    """QVHighlights JSONL as is; Charades-STA text and seed JSON through the annotation readers."""
    from vmr.data.annotations import detect_format, read_annotations

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: file not found")
    if detect_format(file) == "qvhighlights":
        return load_jsonl(file)
    records, skips = read_annotations(file)
    if skips:
        raise UserError(skips[0].reason)
    if any(r.unit != "seconds" for r in records):
        raise UserError(f"{file}: seed-format windows are frame numbers; score them with "
                        "'vmr eval --checkpoint ... --shards ...' (the shards hold them in seconds)")
    return [{"qid": r.qid, "query": r.query, "vid": r.video_id, "relevant_windows": [list(w) for w in r.windows]}
            for r in records]


def run_eval(args: argparse.Namespace) -> int:
    try:
        return _run_eval(args)
    except BadInput as error:  # the metrics module's one-line reasons
        raise UserError(str(error)) from None


def _run_eval(args: argparse.Namespace) -> int:
    if args.checkpoint:
        if args.predictions or not args.shards:
            raise UserError("with --checkpoint, give --shards (and not --predictions)")
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
        write_text_atomic(Path(args.json), json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    return 0


def _predict_for_eval(args):
    """Batched inference on the best device; under ``accelerate launch`` every process predicts its
    share of the shards and the main process gathers them."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    # On CPU-only hosts the ranks must be told, or each believes it is alone and predicts everything.
    state = PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    model, cfg = load_model(args.checkpoint, state.device if state.num_processes > 1 else None)
    start = time.perf_counter()
    predictions, truth, bad, reason = predict_shards(model, args.shards, cfg, model.tokenizer, args.batch_size,
                                                     rank=state.process_index, world=state.num_processes,
                                                     progress=state.is_main_process)
    if state.num_processes > 1:
        predictions, truth = gather_object(predictions), gather_object(truth)
        bad = sum(gather_object([bad]))
        reason = next((r for r in gather_object([reason]) if r), "")
    if state.num_processes > 1:
        from vmr.train import release_process_group

        release_process_group()
    if not predictions:  # every rank raises alike: no metrics of nothing
        raise nothing_read(args.shards, bad, reason)
    if not state.is_main_process:
        return None, None, None
    print(f"predicted {len(predictions)} queries in {time.perf_counter() - start:.1f} s"
          + (f"; {bad} unreadable shard(s) or video(s) were skipped (last: {reason})" if bad else ""),
          file=sys.stderr)
    if args.predictions_out:
        write_text_atomic(Path(args.predictions_out), "".join(json.dumps(row) + "\n" for row in predictions))
        print(f"predictions written to {args.predictions_out}")
    return predictions, truth, resolve_bundle(args.checkpoint).parent.name


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an inference bundle, or a run directory (uses export_best/)")
    p.add_argument("--video", required=True, help="any file FFmpeg reads: MP4, AVI, MOV, MKV, WebM, ...")
    p.add_argument("--query", required=True, help="the sentence to find")
    p.add_argument("--top-k", type=int, default=5, help="moments to return (default 5)")


def run_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    model, cfg = load_model(args.checkpoint)
    print(json.dumps(predict_video(model, cfg, args.video, args.query, args.top_k), indent=2))
    return 0
