"""The corpus protocol of TVR (video corpus moment retrieval): ``vmr eval --protocol tvr``.

Ground truth is TVR's JSONL, one query per line: ``desc_id`` (its number), ``desc`` (the sentence),
``vid_name`` (its video), ``duration`` and ``ts`` ([start, end] in seconds; DiDeMo-style files give a
list of at least 4 annotators' [start, end], of which 2 must be matched), and optionally ``type``
(TVR's v / t / vt: what the query is about), which adds per-type figures.

Predictions are TVR's submission JSON: ``video2idx`` ({video name: number}) and, for each task it
answers, a list of ``{"desc_id", "desc", "predictions": [[video number, start, end, score], ...]}``,
best first, at most 100 per query:
  VCMR  moments over the whole corpus (videos may repeat);
  SVMR  moments of the query's own video (those of other videos are passed over);
  VR    videos (start and end unused).
Each task scores R@1, 5, 10 and 100 (VR: whether the right video is among the first k; VCMR and
SVMR: whether a moment of the right video overlaps the truth at IoU >= 0.5 and 0.7), in percent to 2
decimals, under TVR's key names ("0.5-r1" ..., VR "r1" ...; by type "v-0.5-r1" ..., and
"desc_type_ratio"). The arithmetic is float32 as in TVR's ``standalone_eval/eval.py``, so the numbers
are the same (tests/fixtures/tvr/ holds the official script's output on a file made over TVR's val
annotations). Unlike that script, a file it would score wrongly or crash on is refused in one line:
an unknown video number, more than 100 predictions, a non-finite number, a query without
predictions in the file or without ground truth, ``ts`` outside its video.
"""

from __future__ import annotations

import math

import numpy as np

from vmr.eval.metrics import BadInput

TASKS = ("VCMR", "SVMR", "VR")
IOUS = (0.5, 0.7)
RECALLS = (1, 5, 10, 100)
MAX_PREDICTIONS = 100
TYPES = ("v", "t", "vt")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{where}: expected a finite number, got {value!r:.40}")
    return float(value)


def check_ground_truth(rows: list[dict], where: str) -> dict[int, dict]:
    """TVR ground-truth rows by ``desc_id``, each checked (one-line BadInput naming the line)."""
    truth: dict[int, dict] = {}
    for number, row in enumerate(rows, 1):
        at = f"{where}:{number}"
        if not isinstance(row, dict):
            raise BadInput(f"{at}: expected a JSON object")
        for key in ("desc_id", "vid_name", "ts", "duration"):
            if key not in row:
                raise BadInput(f"{at}: '{key}' is missing (TVR ground truth: desc_id, desc, vid_name, ts, duration)")
        desc_id, video = row["desc_id"], row["vid_name"]
        if isinstance(desc_id, bool) or not isinstance(desc_id, int):
            raise BadInput(f"{at}: 'desc_id' must be an integer, got {desc_id!r:.40}")
        if not isinstance(video, str) or not video:
            raise BadInput(f"{at}: 'vid_name' must be a video name, got {video!r:.40}")
        if desc_id in truth:
            raise BadInput(f"{at}: desc_id {desc_id} appears twice")
        duration = _number(row["duration"], f"{at}: 'duration'")
        ts = row["ts"]
        spans = [ts] if isinstance(ts, list) and len(ts) == 2 and not isinstance(ts[0], list) else ts
        if not isinstance(spans, list) or not (len(spans) == 1 or len(spans) >= 4):
            raise BadInput(f"{at}: 'ts' must be [start, end] or a list of at least 4 [start, end], got {ts!r:.60}")
        for span in spans:
            if not isinstance(span, list) or len(span) != 2:
                raise BadInput(f"{at}: 'ts' holds {span!r:.40}, not [start, end]")
            start, end = (_number(v, f"{at}: 'ts'") for v in span)
            if not 0 <= start <= end <= duration:
                raise BadInput(f"{at}: 'ts' [{start:g}, {end:g}] is not inside the video's duration {duration:g}")
        kind = row.get("type")
        if kind is not None and kind not in TYPES:
            raise BadInput(f"{at}: 'type' must be one of {', '.join(TYPES)}, got {kind!r:.20}")
        truth[desc_id] = {"video": video, "spans": np.asarray(spans, dtype=np.float32), "type": kind}
    if not truth:
        raise BadInput(f"{where}: holds no query")
    return truth


def check_submission(submission: dict, truth: dict[int, dict], where: str) -> tuple[dict, dict]:
    """(video2idx, {task: {desc_id: (n, 3) float32 [video, start, end]}}) of a TVR submission."""
    video2idx = submission.get("video2idx")
    if not isinstance(video2idx, dict) or not video2idx:
        raise BadInput(f"{where}: 'video2idx' must be an object of video name -> number")
    for name, index in video2idx.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise BadInput(f"{where}: video2idx[{name!r:.60}] must be a number >= 0, got {index!r:.20}")
    known = set(video2idx.values())
    for desc_id, row in truth.items():
        if row["video"] not in video2idx:
            raise BadInput(f"{where}: video2idx lacks {row['video']!r:.60}, the video of desc_id {desc_id}")
    tasks = [task for task in TASKS if task in submission]
    if not tasks:
        raise BadInput(f"{where}: answers none of the tasks {', '.join(TASKS)}")
    answers = {}
    for task in tasks:
        entries = submission[task]
        if not isinstance(entries, list):
            raise BadInput(f"{where}: '{task}' must be a list of queries")
        by_id = {}
        for number, entry in enumerate(entries):
            at = f"{where}: {task}[{number}]"
            if not isinstance(entry, dict) or "desc_id" not in entry or not isinstance(entry.get("predictions"), list):
                raise BadInput(f"{at}: expected an object with 'desc_id' and 'predictions'")
            desc_id, predictions = entry["desc_id"], entry["predictions"]
            if desc_id not in truth:
                raise BadInput(f"{at}: desc_id {desc_id!r:.30} is not in the ground truth")
            if desc_id in by_id:
                raise BadInput(f"{at}: desc_id {desc_id} is answered twice")
            if len(predictions) > MAX_PREDICTIONS:
                raise BadInput(f"{at}: {len(predictions)} predictions for desc_id {desc_id}; the protocol "
                               f"scores at most {MAX_PREDICTIONS}")
            rows = []
            for p, prediction in enumerate(predictions):
                if not isinstance(prediction, list) or len(prediction) < 3:
                    raise BadInput(f"{at}.predictions[{p}]: expected [video number, start, end, score]")
                video = prediction[0]
                if isinstance(video, bool) or not isinstance(video, int) or video not in known:
                    raise BadInput(f"{at}.predictions[{p}]: video number {video!r:.20} is not in video2idx")
                start, end = (_number(v, f"{at}.predictions[{p}]") for v in prediction[1:3])
                for extra in prediction[3:]:
                    _number(extra, f"{at}.predictions[{p}] (score)")
                rows.append((video, start, end))
            by_id[desc_id] = np.asarray(rows, dtype=np.float32).reshape(-1, 3)
        missing = [d for d in truth if d not in by_id]
        if missing:
            raise BadInput(f"{where}: '{task}' has no predictions for {len(missing)} queries of the ground "
                           f"truth (first: desc_id {missing[0]})")
        answers[task] = by_id
    return video2idx, answers


def _iou(predictions: np.ndarray, span: np.ndarray) -> np.ndarray:
    """(n,) temporal IoU of (n, 2) [start, end] with one [start, end], in float32 (0 where the hull is
    empty), the protocol's arithmetic."""
    inter = np.maximum(np.float32(0), np.minimum(predictions[:, 1], span[1]) - np.maximum(predictions[:, 0], span[0]))
    hull = np.maximum(predictions[:, 1], span[1]) - np.minimum(predictions[:, 0], span[0])
    return np.divide(inter, hull, out=np.zeros_like(inter), where=hull != 0)


def _correct(predictions: np.ndarray, truth: dict, video: int) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Per prediction: of the right video, and right at each IoU (with 4 or more annotators, right
    for at least 2 of them)."""
    right_video = predictions[:, 0] == video
    per_iou = {}
    for threshold in IOUS:
        hits = [(_iou(predictions[:, 1:3], span) * right_video) >= np.float32(threshold) for span in truth["spans"]]
        per_iou[threshold] = hits[0] if len(hits) == 1 else np.sum(hits, axis=0) >= 2
    return right_video, per_iou


def _percent(hits: list[bool]) -> float | None:
    """A share in percent to 2 decimals, rounded by numpy's float64 rounding as the protocol rounds
    (Python's own round() differs in the last decimal now and then); None for no query."""
    return float(round(np.mean(hits, dtype=np.float64) * 100, 2)) if hits else None


def tvr_metrics(submission: dict, rows: list[dict], where: tuple[str, str] = ("predictions", "ground truth")) -> dict:
    """TVR's metrics of every task the submission answers: ``{task: {...}, task + "_by_type": {...}}``
    (per type only when every ground-truth row has a ``type``)."""
    truth = check_ground_truth(rows, where[1])
    video2idx, answers = check_submission(submission, truth, where[0])
    typed = all(t["type"] is not None for t in truth.values())
    results, by_type = {}, {}
    for task, by_id in answers.items():
        hits: dict[str, list[bool]] = {}  # metric key -> per query, in ground-truth order
        for desc_id, row in truth.items():
            predictions = by_id[desc_id][:MAX_PREDICTIONS]
            right_video, per_iou = _correct(predictions, row, video2idx[row["video"]])
            for threshold in IOUS if task != "VR" else ():
                correct = per_iou[threshold][right_video] if task == "SVMR" else per_iou[threshold]
                for k in RECALLS:
                    hits.setdefault(f"{threshold}-r{k}", []).append(bool(correct[:k].any()))
            for k in RECALLS if task == "VR" else ():
                hits.setdefault(f"r{k}", []).append(bool(right_video[:k].any()))
        results[task] = {key: _percent(values) for key, values in hits.items()}
        if typed:
            kinds = [row["type"] for row in truth.values()]
            by_type[task + "_by_type"] = {
                f"{kind}-{key}": _percent([h for h, k in zip(values, kinds, strict=True) if k == kind])
                for kind in TYPES for key, values in hits.items()}
            by_type[task + "_by_type"]["desc_type_ratio"] = "v {} t {} vt {}".format(
                *[_percent([k == kind for k in kinds]) for kind in TYPES])
    return {**results, **by_type}


def tvr_table(metrics: dict) -> str:
    """A markdown table of the tasks' R@k (rows: task and IoU)."""
    lines = ["| task | IoU | R@1 | R@5 | R@10 | R@100 |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for task in TASKS:
        if task not in metrics:
            continue
        for threshold in IOUS if task != "VR" else (None,):
            prefix = f"{threshold}-" if threshold is not None else ""
            cells = [metrics[task].get(f"{prefix}r{k}") for k in RECALLS]
            lines.append(f"| {task} | {threshold or '-'} | " + " | ".join(
                "-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)
