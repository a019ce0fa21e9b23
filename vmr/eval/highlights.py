"""The highlight-detection protocols, on plain Python data (vmr/eval/metrics.py reads and checks the
files and reports in percent):

- TVSum (the protocol of UMT and the highlight papers since): per video and annotator, clips scoring
  above that annotator's median are positive; the 5 best-predicted clips are ranked and their
  average precision taken with trapezoidal interpolation (0 when none of the 5 is positive); the
  mean over annotators, then over the videos of each domain, then over domains ("top-5 mAP").
- YouTube Highlights: per video, clips labelled above 0 are positive; average precision of the whole
  ranking, trapezoidal as above (0 without positives); the mean over each domain's videos, then
  over domains.

A ground-truth row's ``label`` holds one row of annotator scores per 2-second clip; a prediction's
``pred_saliency_scores`` one score per clip. Ties in the prediction are broken by clip order, and a
clip without a prediction ranks last.
"""

from __future__ import annotations

import numpy as np

HIGHLIGHT_PROTOCOLS = ("tvsum", "youtube_highlights")
TVSUM_TOP = 5  # TVSum ranks only the 5 best-predicted clips of a video


def trapezoid_ap(ranked: list[float]) -> float:
    """Average precision of 0/1 labels in ranked order, each step of recall weighted by the mean of
    the precision before and after it (UMT's definition); 0 when nothing is positive."""
    positives = sum(ranked)
    if positives == 0:
        return 0.0
    hits = ap = recall = 0.0
    precision = 1.0
    for rank, label in enumerate(ranked, start=1):
        hits += label
        new_recall, new_precision = hits / positives, hits / rank
        ap += (new_recall - recall) * (precision + new_precision) / 2
        recall, precision = new_recall, new_precision
    return ap


def _ranked_clips(label: list[list[float]], scores) -> np.ndarray:
    """Clip indices best-predicted first (ties by clip order); clips without a prediction come last."""
    predicted = np.full(len(label), -np.inf)
    given = np.asarray(scores or [], dtype=float)[: len(label)]
    predicted[: len(given)] = given
    return np.argsort(-predicted, kind="stable")


def video_ap(label: list[list[float]], scores, protocol: str) -> float:
    """One video's AP: TVSum's top-5 mean over annotators, or YouTube Highlights' whole ranking of
    the clips labelled above 0 (the mean of a clip's annotators, when there are several). A video
    without predicted scores scores 0."""
    if not scores:  # no prediction (--allow-missing): scored as empty, i.e. nothing found
        return 0.0
    order, table = _ranked_clips(label, scores), np.asarray(label, dtype=float)  # (clips, annotators)
    if protocol == "tvsum":
        aps = []
        for column in table.T:
            positive = (column > np.median(column)).astype(float)
            aps.append(trapezoid_ap(positive[order][:TVSUM_TOP].tolist()))
        return float(np.mean(aps))
    return trapezoid_ap((table.mean(axis=1) > 0).astype(float)[order].tolist())


def domain_aps(gt: dict, preds: dict, protocol: str) -> dict[str, list[float]]:
    """Each domain's video APs (``video_ap``); rows without a ``domain`` form one, ``(none)``."""
    by_domain: dict[str, list[float]] = {}
    for qid, row in gt.items():
        domain = str(row.get("domain", "(none)"))
        by_domain.setdefault(domain, []).append(video_ap(row["label"], preds[qid]["pred_saliency_scores"], protocol))
    return by_domain
