"""Small pictures of predictions, drawn with Pillow (no plotting library needed): per-clip scores
against the ground-truth windows, one row per query. Used by TensorBoard logging."""

from __future__ import annotations

import numpy as np

from vmr.spans import QVH_CLIP_SECONDS

WIDTH, ROW, MARGIN = 640, 90, 8
GT, SCORE, TOP1, TEXT = (120, 200, 120), (40, 90, 200), (220, 60, 60), (30, 30, 30)


def scores_figure(predictions: list[dict], truth: list[dict]) -> np.ndarray:
    """uint8 (h, w, 3): for each query, green ground-truth windows, blue per-clip scores (2-s clips,
    0 at the bottom, 1 at the top), the first predicted window as a red bar, and the query text."""
    from PIL import Image, ImageDraw

    by_qid = {row["qid"]: row for row in truth}
    image = Image.new("RGB", (WIDTH, ROW * max(1, len(predictions))), "white")
    draw = ImageDraw.Draw(image)
    for i, pred in enumerate(predictions):
        gt = by_qid.get(pred["qid"], {})
        top = i * ROW
        plot_top, plot_bottom = top + 16, top + ROW - 12
        scores = pred.get("pred_saliency_scores") or []
        duration = float(gt.get("duration") or QVH_CLIP_SECONDS * max(1, len(scores)))

        def x(seconds: float, duration=duration) -> float:
            return MARGIN + (WIDTH - 2 * MARGIN) * min(max(seconds / duration, 0.0), 1.0)

        for start, end in gt.get("relevant_windows", []):
            draw.rectangle([x(start), plot_top, x(end), plot_bottom], fill=GT)
        points = [(x(QVH_CLIP_SECONDS * (c + 0.5)), plot_bottom - (plot_bottom - plot_top) * float(s)) for c, s in enumerate(scores)]
        if len(points) > 1:
            draw.line(points, fill=SCORE, width=2)
        if pred.get("pred_relevant_windows"):
            start, end = pred["pred_relevant_windows"][0][:2]
            draw.rectangle([x(start), plot_bottom + 3, x(end), plot_bottom + 8], fill=TOP1)
        draw.text((MARGIN, top + 2), f"{pred['qid']}: {pred.get('query', '')}"[:100], fill=TEXT)
        draw.line([(MARGIN, plot_bottom), (WIDTH - MARGIN, plot_bottom)], fill=TEXT)
    return np.asarray(image)
