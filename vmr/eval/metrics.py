"""Evaluation protocols on plain Python data (lists of dicts read from JSONL files).

Imports nothing from the model or data code, so it can score any predictions file.

- QVHighlights (Lei et al. 2021, the official ``standalone_eval``): moment retrieval R1 at IoU
  0.50, 0.55, ... 0.95 using each query's first window (matched to the ground-truth window it
  overlaps most), mAP at the same thresholds over the top 10 windows (each ground-truth window
  matched at most once, VOC-interpolated precision), both for all windows ("full") and by window
  length: short (0, 10], middle (10, 30], long (30, 150] seconds. Highlight detection: HIT@1 and
  mAP of ``pred_saliency_scores`` against the 2-second clip scores binarised at Fair (2), Good (3)
  and VeryGood (4), the best of 3 annotators for HIT@1 and the mean for mAP. Percent, 2 decimals,
  and the official key names and layout.
- Charades-STA, ActivityNet Captions, TACoS (the grounding protocols): R@1 and R@5 at IoU 0.3, 0.5,
  0.7 (TACoS also 0.1) and the mean IoU of the first window, in percent.
- TVSum and YouTube Highlights: vmr/eval/highlights.py.
- (vmr/eval/report.py: the same metrics by group of queries, and the leaderboard table.)
- ``compute_comprehensive_metrics``: clip-level ranking metrics (Recall@K, mAP, temporal
  consistency, temporal IoU) on per-clip scores.

Predictions (JSONL, the official submission schema):
``{"qid", "query", "vid", "pred_relevant_windows": [[start, end, score], ...], "pred_saliency_scores": [...]}``
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from vmr.eval.highlights import HIGHLIGHT_PROTOCOLS, domain_aps
from vmr.spans import QVH_CLIP_SECONDS, clip_relevance, iou

# The official code builds these with np.linspace and rounds to 2 decimals; keys are str(float).
IOU_THRESHOLDS = [float(f"{x:.2f}") for x in np.linspace(0.5, 0.95, 10)]
LENGTH_RANGES = {"short": (0, 10), "middle": (10, 30), "long": (30, 150), "full": (0, 150)}
HL_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}
MAX_PRED_WINDOWS = 10  # mAP uses the top 10 predicted windows of each query
CHARADES_IOUS = (0.3, 0.5, 0.7)
GROUNDING_IOUS = {"charades": CHARADES_IOUS, "activitynet": CHARADES_IOUS, "tacos": (0.1, *CHARADES_IOUS)}
PROTOCOLS = ("qvhighlights", *GROUNDING_IOUS, *HIGHLIGHT_PROTOCOLS)
# What the "brief" section of a QVHighlights metrics JSON can hold (e.g. train.best_metric).
BRIEF_KEYS = ("MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "MR-full-mAP@0.5", "MR-full-mAP@0.75",
              "MR-short-mAP", "MR-middle-mAP", "MR-long-mAP",
              *(f"HL-min-{level}-{m}" for level in ("Fair", "Good", "VeryGood") for m in ("mAP", "Hit1")))


def brief_keys(protocol: str) -> tuple[str, ...]:
    """What the "brief" section of a protocol's metrics holds (``train.best_metric`` is one of them)."""
    if protocol in GROUNDING_IOUS:
        return (*(f"R{k}@{t}" for k in (1, 5) for t in GROUNDING_IOUS[protocol]), "mIoU")
    if protocol in HIGHLIGHT_PROTOCOLS:
        return ("HL-mAP",)
    return BRIEF_KEYS


class BadInput(ValueError):
    """A predictions or ground-truth file that cannot be scored; the message names the line or qid."""


def percent(x: float) -> float:
    return float(f"{100 * x:.2f}")


# ----- reading and checking files -----------------------------------------------------------------


def load_jsonl(path: str | Path, key: str = "qid") -> list[dict]:
    """Rows of a JSONL file; a file that is missing, a folder, binary or not JSON lines, and a row
    without a usable ``key`` (its query's id: TVR's is ``desc_id``), are a BadInput naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: {'a folder, not a file' if path.is_dir() else 'file not found'}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None
    except OSError as error:
        raise BadInput(f"{path}: cannot read it ({error.strerror or error})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise BadInput(f"{path}:{number}: not a JSON line (is this a JSONL file?)") from None
        if not isinstance(row, dict) or key not in row:
            raise BadInput(f"{path}:{number}: expected an object with a '{key}'")
        if isinstance(row[key], bool) or not isinstance(row[key], (int, str)):
            raise BadInput(f"{path}:{number}: '{key}' must be an integer or a string, got {row[key]!r:.60}")
        rows.append(row)
    if not rows:
        raise BadInput(f"{path}: no lines to read")
    return rows


def _finite_numbers(values, qid, key: str) -> list[float]:
    """``values`` as a list of finite floats, else a BadInput naming the qid and key."""
    if not isinstance(values, (list, tuple)):
        raise BadInput(f"qid {qid}: {key} must be a list, got {values!r:.60}")
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise BadInput(f"qid {qid}: {key} holds a non-number") from None
    if any(isinstance(v, bool) for v in values) or not all(math.isfinite(v) for v in numbers):
        raise BadInput(f"qid {qid}: {key} holds a value that is not a finite number")
    return numbers


def _check_truth_row(row: dict) -> dict:
    """Every ground-truth field that enters a metric, checked: duration a positive number, clip ids
    non-negative integers, one row of 0-4 annotator scores per clip id."""
    qid, row = row["qid"], dict(row)
    if "duration" in row:
        duration = row["duration"]
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not (
                math.isfinite(duration) and duration > 0):
            raise BadInput(f"qid {qid}: duration must be a positive number of seconds, got {duration!r:.60}")
    ids = row.get("relevant_clip_ids")
    if ids is not None:
        if not isinstance(ids, list) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in ids):
            raise BadInput(f"qid {qid}: relevant_clip_ids must be a list of non-negative integers")
        if "duration" in row and ids and max(ids) * QVH_CLIP_SECONDS >= row["duration"] + QVH_CLIP_SECONDS:
            raise BadInput(f"qid {qid}: relevant_clip_ids reach clip {max(ids)}, past the {row['duration']:g}-s video")
    scores = row.get("saliency_scores")
    if scores is not None:
        if ids is None or not isinstance(scores, list) or len(scores) != len(ids):
            raise BadInput(f"qid {qid}: saliency_scores must have one row per relevant_clip_ids entry "
                           f"({len(ids or [])}), got {len(scores) if isinstance(scores, list) else repr(scores)[:40]}")
        rows = [_finite_numbers(r, qid, "saliency_scores") for r in scores]
        if any(len(r) != len(rows[0]) or not r for r in rows) or any(not 0 <= v <= 4 for r in rows for v in r):
            raise BadInput(f"qid {qid}: saliency_scores must be rows of equal length (one score per rater; "
                           "QVHighlights has 3) with scores from 0 to 4")
    return row


def _check_window(window, qid, key: str, with_score: bool) -> list[float]:
    size = 3 if with_score else 2
    if not isinstance(window, (list, tuple)) or len(window) < size:
        raise BadInput(f"qid {qid}: {key} entry {window!r} is not [start, end{', score' if with_score else ''}]")
    try:
        values = [float(v) for v in window[:size]]
    except (TypeError, ValueError):
        raise BadInput(f"qid {qid}: {key} entry {window!r} holds a non-number") from None
    if not all(math.isfinite(v) for v in values):
        raise BadInput(f"qid {qid}: {key} entry {window!r} is not finite")
    if values[0] < 0 or values[1] < 0:
        raise BadInput(f"qid {qid}: {key} entry {window!r} is negative")
    if values[1] < values[0]:
        raise BadInput(f"qid {qid}: {key} entry {window!r} ends before it starts")
    return values


def _check_label(row: dict) -> list[list[float]]:
    """A highlight-detection ground truth's ``label``: one score, or one per annotator, per clip."""
    qid, label = row["qid"], row.get("label")
    if not isinstance(label, list) or not label:
        hint = " (is this highlight-detection ground truth?)" if "relevant_windows" in row else ""
        raise BadInput(f"qid {qid}: the ground truth has no 'label' with one entry per clip{hint}")
    rows = [_finite_numbers(entry if isinstance(entry, list) else [entry], qid, "label") for entry in label]
    if not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise BadInput(f"qid {qid}: label must give every clip the same number of annotator scores")
    return rows


def match_predictions(predictions: list[dict], ground_truth: list[dict], allow_missing: bool = False,
                      protocol: str = "qvhighlights"):
    """Validated copies keyed by qid, in ground-truth order, and the number of missing predictions.

    Duplicate or unknown qids and malformed windows are errors naming the qid; so is ground truth
    without what the protocol scores (windows, or a highlight ``label``). A ground-truth qid without
    a prediction is an error, or with ``allow_missing`` an empty prediction (it scores 0)."""
    highlights = protocol in HIGHLIGHT_PROTOCOLS
    gt: dict = OrderedDict()
    for row in [*ground_truth, *predictions]:
        if not isinstance(row, dict) or isinstance(row.get("qid"), bool) or not isinstance(row.get("qid"), (int, str)):
            raise BadInput(f"a row's 'qid' must be an integer or a string: {str(row)[:80]}")
    for row in ground_truth:
        qid = row["qid"]
        if qid in gt:
            raise BadInput(f"qid {qid}: appears twice in the ground truth")
        windows = [_check_window(w, qid, "relevant_windows", False) for w in row.get("relevant_windows") or []]
        if highlights:
            gt[qid] = {**_check_truth_row(row), "relevant_windows": windows, "label": _check_label(row)}
            continue
        if not windows:
            hint = f" (highlight detection: --protocol {' or '.join(HIGHLIGHT_PROTOCOLS)})" if "label" in row else ""
            raise BadInput(f"qid {qid}: the ground truth has no relevant_windows{hint}")
        gt[qid] = {**_check_truth_row(row), "relevant_windows": windows}
    preds: dict = {}
    for row in predictions:
        qid = row["qid"]
        if qid in preds:
            raise BadInput(f"qid {qid}: appears twice in the predictions")
        if qid not in gt:
            raise BadInput(f"qid {qid}: in the predictions but not in the ground truth")
        windows = [_check_window(w, qid, "pred_relevant_windows", True)
                   for w in row.get("pred_relevant_windows") or []]
        saliency = row.get("pred_saliency_scores")
        if saliency is not None:
            saliency = _finite_numbers(saliency, qid, "pred_saliency_scores")
        elif highlights:
            raise BadInput(f"qid {qid}: no pred_saliency_scores, the clip scores {protocol} ranks")
        preds[qid] = {**row, "pred_relevant_windows": windows, "pred_saliency_scores": saliency}
    missing = [qid for qid in gt if qid not in preds]
    if missing and not allow_missing:
        raise BadInput(f"{len(missing)} ground-truth qids have no prediction (first: {missing[0]}); "
                       "pass --allow-missing to score them as empty")
    for qid in missing:
        preds[qid] = {"qid": qid, "pred_relevant_windows": [], "pred_saliency_scores": None}
    return gt, {qid: preds[qid] for qid in gt}, len(missing)


# ----- QVHighlights moment retrieval -----------------------------------------------------------------


def _voc_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision-recall curve with precision made monotone (VOC 2011)."""
    p = np.concatenate([[0.0], precision, [0.0]])
    r = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(p) - 2, -1, -1):
        p[i] = max(p[i], p[i + 1])
    changed = np.where(r[1:] != r[:-1])[0] + 1
    return float(np.sum((r[changed] - r[changed - 1]) * p[changed]))


def detection_ap(gt_windows: list, pred_windows: list, thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """Average precision of one query's scored windows at each IoU threshold. Predictions are taken
    best score first; each one matches the unmatched ground-truth window it overlaps most."""
    ap = np.zeros(len(thresholds))
    if not pred_windows:
        return ap
    order = sorted(range(len(pred_windows)), key=lambda i: -pred_windows[i][2])  # stable, as the official
    tp = np.zeros((len(thresholds), len(order)))
    taken = np.zeros((len(thresholds), len(gt_windows)), dtype=bool)
    for rank, i in enumerate(order):
        ious = np.array([iou(pred_windows[i][:2], g) for g in gt_windows])
        by_overlap = ious.argsort()[::-1]
        for t, threshold in enumerate(thresholds):
            for j in by_overlap:
                if ious[j] < threshold:
                    break
                if not taken[t, j]:
                    tp[t, rank], taken[t, j] = 1, True
                    break
    hits = np.cumsum(tp, axis=1)
    recall = hits / len(gt_windows)
    precision = hits / np.arange(1, len(order) + 1)
    for t in range(len(thresholds)):
        ap[t] = _voc_ap(precision[t], recall[t])
    return ap


def _in_range(gt: dict, low: float, high: float) -> dict:
    """Ground truth restricted to windows of length in (low, high]; queries left without any are
    dropped. The full range keeps everything, windows longer than 150 s included (as the official)."""
    if (low, high) == LENGTH_RANGES["full"]:
        return gt
    kept = {}
    for qid, row in gt.items():
        windows = [w for w in row["relevant_windows"] if low < w[1] - w[0] <= high]
        if windows:
            kept[qid] = {**row, "relevant_windows": windows}
    return kept


def moment_retrieval(gt: dict, preds: dict) -> dict:
    """``{"MR-mAP": {"0.5": .., ..., "average": ..}, "MR-R1": {"0.5": .., ...}}`` for these queries."""
    aps, r1_ious = [], []
    for qid, row in gt.items():
        windows = preds[qid]["pred_relevant_windows"]
        aps.append(detection_ap(row["relevant_windows"], windows[:MAX_PRED_WINDOWS]))
        first = windows[0][:2] if windows else None
        r1_ious.append(0.0 if first is None else max(iou(first, g) for g in row["relevant_windows"]))
    ap_by_threshold = np.array(aps).mean(axis=0) if aps else np.full(len(IOU_THRESHOLDS), np.nan)
    mean_ap = {str(t): percent(v) for t, v in zip(IOU_THRESHOLDS, ap_by_threshold, strict=True)}
    mean_ap["average"] = percent(np.mean(ap_by_threshold))
    r1 = np.array(r1_ious)
    recall = {str(t): percent(np.mean(r1 >= t)) if len(r1) else percent(np.nan) for t in IOU_THRESHOLDS}
    return {"MR-mAP": mean_ap, "MR-R1": recall}


# ----- QVHighlights highlight detection --------------------------------------------------------------


def _clip_scores(row: dict) -> np.ndarray:
    """(clips, raters) scores 0-4 over the whole video, 0 outside relevant_clip_ids (none: all 0). The
    official code has int(duration / 2) clips and 3 raters; a last partial clip with scores (official:
    an IndexError) is kept, and other numbers of raters are scored alike (each rater's AP, averaged)."""
    ids, raters = [int(c) for c in row["relevant_clip_ids"]], len((row["saliency_scores"] or [[0] * 3])[0])
    scores = np.zeros((max([int(row["duration"] / QVH_CLIP_SECONDS), *(c + 1 for c in ids), 1]), raters))
    scores[np.array(ids, dtype=int)] = np.array(row["saliency_scores"], dtype=float).reshape(len(ids), raters)
    return scores


def ranking_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of binary ``labels`` ranked by ``scores``, ties grouped, interpolated
    precision averaged over the points where recall changes (the video2gif / official HL-mAP).
    All-negative labels give 0, all-positive 1."""
    if len(set(labels.tolist())) == 1:
        return float(labels[0] != 0)
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores, sorted_labels = scores[order], labels[order]
    cut = np.r_[np.where(np.diff(sorted_scores))[0], len(scores) - 1]  # last index of each score level
    tps = np.cumsum(sorted_labels)[cut]
    fps = 1 + cut - tps
    precision = np.r_[(tps / (tps + fps))[::-1], 1.0]
    recall = np.r_[(tps / tps[-1])[::-1], 0.0].astype(np.float32)
    precision = np.maximum.accumulate(precision)
    return float(np.mean(precision[np.where(np.diff(recall))]))


def highlight_detection(gt: dict, preds: dict) -> dict:
    results = {}
    full = {qid: _clip_scores(row) for qid, row in gt.items()}
    for name, minimum in HL_LEVELS.items():
        hits, aps = [], []
        for qid, scores in full.items():
            binary = (scores >= minimum).astype(float)
            predicted = np.array(preds[qid]["pred_saliency_scores"] or [0.0], dtype=float)
            best = int(np.argmax(predicted))
            hits.append(binary[best].max() if best < len(binary) else 0.0)
            fitted = np.zeros(len(binary))
            fitted[: min(len(binary), len(predicted))] = predicted[: len(binary)]
            aps.append(np.mean([ranking_ap(binary[:, a], fitted) for a in range(binary.shape[1])]))
        results[f"HL-min-{name}"] = {"HL-mAP": percent(np.mean(aps)), "HL-Hit1": percent(np.mean(hits))}
    return results


def qvhighlights(gt: dict, preds: dict) -> OrderedDict:
    """The official metrics JSON: ``brief``, then the highlight and length-range sections sorted by name."""
    sections = {name: moment_retrieval(_in_range(gt, *bounds), preds) for name, bounds in LENGTH_RANGES.items()}
    brief = {
        "MR-full-mAP": sections["full"]["MR-mAP"]["average"],
        "MR-full-mAP@0.5": sections["full"]["MR-mAP"]["0.5"],
        "MR-full-mAP@0.75": sections["full"]["MR-mAP"]["0.75"],
        "MR-short-mAP": sections["short"]["MR-mAP"]["average"],
        "MR-middle-mAP": sections["middle"]["MR-mAP"]["average"],
        "MR-long-mAP": sections["long"]["MR-mAP"]["average"],
        "MR-full-R1@0.5": sections["full"]["MR-R1"]["0.5"],
        "MR-full-R1@0.7": sections["full"]["MR-R1"]["0.7"],
    }
    brief = OrderedDict(sorted(brief.items()))
    has_saliency = all(p["pred_saliency_scores"] is not None for p in preds.values()) and all(
        "saliency_scores" in row and "relevant_clip_ids" in row and "duration" in row for row in gt.values())
    if has_saliency:
        highlights = highlight_detection(gt, preds)
        sections.update(highlights)
        for name, values in highlights.items():
            brief[f"{name}-mAP"], brief[f"{name}-Hit1"] = values["HL-mAP"], values["HL-Hit1"]
    out = OrderedDict(brief=brief)
    out.update(sorted(sections.items()))
    return out


# ----- Charades-STA, ActivityNet Captions, TACoS ------------------------------------------------------


def grounding(gt: dict, preds: dict, thresholds=CHARADES_IOUS) -> OrderedDict:
    """``R1@t`` and ``R5@t`` for each IoU threshold and ``mIoU``, in percent; a hit is any of the
    first K windows with IoU >= the threshold against any ground-truth window."""
    best_at = {1: [], 5: []}
    for qid, row in gt.items():
        windows = [w[:2] for w in preds[qid]["pred_relevant_windows"]]
        overlaps = [max(iou(w, g) for g in row["relevant_windows"]) for w in windows] or [0.0]
        for k in best_at:
            best_at[k].append(max(overlaps[:k]))
    out = OrderedDict()
    for k, values in best_at.items():
        for threshold in thresholds:
            out[f"R{k}@{threshold}"] = percent(np.mean(np.array(values) >= threshold))
    out["mIoU"] = percent(np.mean(best_at[1]))
    return out


def highlight_protocol(gt: dict, preds: dict, protocol: str) -> OrderedDict:
    """``brief`` ``HL-mAP``: the mean over domains of each domain's mean video AP
    (``highlights.video_ap``); ``domains``: each domain's mAP and number of videos."""
    by_domain = domain_aps(gt, preds, protocol)
    domains = OrderedDict((d, {"HL-mAP": percent(np.mean(v)), "videos": len(v)}) for d, v in sorted(by_domain.items()))
    brief = OrderedDict([("HL-mAP", percent(np.mean([np.mean(v) for v in by_domain.values()])))])
    return OrderedDict(brief=brief, domains=domains)


# ----- the original project's clip-level metrics -----------------------------------------------------


def compute_comprehensive_metrics(predictions, labels, gt_starts, gt_ends, ks=(1, 5, 10)) -> dict:
    """Clip-level metrics on per-clip scores.

    predictions: (n, t) scores per clip; labels: (n, t) 1 on relevant clips; gt_starts / gt_ends:
    (n,) first and last relevant clip index (inclusive). Returns fractions in [0, 1]:
    ``r@K`` a relevant clip among the K best scored; ``mAP`` mean ranking average precision;
    ``temporal_consistency`` 1 minus the mean absolute change of the (0-1) scores between
    neighbouring clips; ``temporal_iou`` IoU of the predicted span (the run of clips scoring at
    least half the maximum around the best clip) with [gt_start, gt_end].
    """
    rows = [np.asarray(p, dtype=float) for p in predictions]
    marks = [np.asarray(y, dtype=float) for y in labels]
    out = {}
    for k in ks:
        out[f"r@{k}"] = float(np.mean([y[np.argsort(-p, kind="stable")[:k]].max() > 0 for p, y in zip(rows, marks,
                                                                                                       strict=True)]))
    out["mAP"] = float(np.mean([ranking_ap(y, p) for p, y in zip(rows, marks, strict=True)]))
    out["temporal_consistency"] = float(np.mean([1 - np.abs(np.diff(p)).mean() if len(p) > 1 else 1.0 for p in rows]))
    ious = []
    for p, start, end in zip(rows, gt_starts, gt_ends, strict=True):
        best = int(np.argmax(p))
        low, high = best, best
        while low > 0 and p[low - 1] >= p[best] / 2:
            low -= 1
        while high < len(p) - 1 and p[high + 1] >= p[best] / 2:
            high += 1
        ious.append(iou((low, high + 1), (float(start), float(end) + 1)))
    out["temporal_iou"] = float(np.mean(ious))
    return out


def clip_level(gt: dict, preds: dict) -> dict | None:
    """``compute_comprehensive_metrics`` on the predictions' per-clip (2 s) saliency scores, labels
    from the ground-truth windows; None without saliency scores or durations."""
    if any(p["pred_saliency_scores"] is None for p in preds.values()) or any("duration" not in r for r in gt.values()):
        return None
    scores, labels, starts, ends = [], [], [], []
    for qid, row in gt.items():
        label = np.array(clip_relevance([tuple(w) for w in row["relevant_windows"]], float(row["duration"]))) > 0
        predicted = np.zeros(len(label))
        given = preds[qid]["pred_saliency_scores"][: len(label)]
        predicted[: len(given)] = given
        span = np.flatnonzero(label)
        scores.append(predicted)
        labels.append(label.astype(float))
        starts.append(span[0] if len(span) else 0)
        ends.append(span[-1] if len(span) else 0)
    return compute_comprehensive_metrics(scores, labels, starts, ends)


# ----- one entry point ---------------------------------------------------------------------------


def evaluate(predictions: list[dict], ground_truth: list[dict], protocol: str = "qvhighlights",
             allow_missing: bool = False) -> tuple[OrderedDict, int]:
    """The protocol's metrics JSON (plus ``clip_level`` when per-clip scores exist) and the number of
    ground-truth queries without a prediction (non-zero only with ``allow_missing``)."""
    if protocol not in PROTOCOLS:
        raise BadInput(f"unknown protocol {protocol!r} ({', '.join(PROTOCOLS)})")
    gt, preds, missing = match_predictions(predictions, ground_truth, allow_missing, protocol)
    if protocol in HIGHLIGHT_PROTOCOLS:
        return highlight_protocol(gt, preds, protocol), missing
    if protocol == "qvhighlights":
        metrics = qvhighlights(gt, preds)
    else:
        metrics = OrderedDict(brief=grounding(gt, preds, GROUNDING_IOUS[protocol]))
    clips = clip_level(gt, preds)
    if clips is not None:
        metrics["clip_level"] = {k: percent(v) for k, v in clips.items()}
    return metrics, missing
