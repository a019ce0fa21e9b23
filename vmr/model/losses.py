"""Training losses on the model's per-frame outputs.

Legend: q queries, t frames, m moments per query. Boundaries are distances from a frame to the
start and end of its moment, divided by the video's duration, so that one L1 weight suits a
10-second clip and a 10-minute video alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from vmr.config import ModelConfig


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float = 0.25) -> torch.Tensor:
    """Element-wise sigmoid focal loss (Lin et al. 2017): easy frames count less."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return a_t * (1 - p_t) ** gamma * ce


def giou_1d(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of (..., 2) [start, end] spans; 1 when equal, towards -1 when far apart."""
    inter = (torch.minimum(pred[..., 1], target[..., 1]) - torch.maximum(pred[..., 0], target[..., 0])).clamp(min=0)
    union = (pred[..., 1] - pred[..., 0]) + (target[..., 1] - target[..., 0]) - inter
    hull = torch.maximum(pred[..., 1], target[..., 1]) - torch.minimum(pred[..., 0], target[..., 0])
    eps = 1e-6
    return inter / (union + eps) - (hull - union) / (hull + eps)


def boundary_targets(batch: dict, frame_times: torch.Tensor, duration: torch.Tensor):
    """Per frame: is it inside one of its query's moments, and its distances to that moment's
    start and end (over duration). ``moment_frames`` decides membership, so the nearest-centre frame
    of a moment too short to hold a frame counts too."""
    first, last = batch["moment_frames"].unbind(-1)  # (q, m) each
    index = torch.arange(frame_times.shape[1], device=frame_times.device)
    inside = (rearrange(first, "q m -> q m 1") <= index) & (index <= rearrange(last, "q m -> q m 1"))
    inside &= rearrange(batch["moment_mask"], "q m -> q m 1")  # (q, m, t)
    which = inside.float().argmax(dim=1)  # the first moment holding each frame, (q, t)
    moment = batch["moments"].to(frame_times.dtype).gather(1, repeat(which, "q t -> q t two", two=2))
    distances = torch.stack([frame_times - moment[..., 0], moment[..., 1] - frame_times], dim=-1)
    return inside.any(dim=1), distances / rearrange(duration, "q -> q 1 1")


def distances_to_window(centre: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """(..., ) frame times and (..., 2) distances to start and end -> (..., 2) [start, end]."""
    return torch.stack([centre - distances[..., 0], centre + distances[..., 1]], dim=-1)


def saliency_ranking(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, margin: float):
    """Hinge loss on every pair of frames of a query whose labels differ: the better frame must score
    at least ``margin`` above the worse one."""
    better = (rearrange(labels, "q t -> q t 1") > rearrange(labels, "q t -> q 1 t"))
    better &= rearrange(valid, "q t -> q t 1") & rearrange(valid, "q t -> q 1 t")
    gap = rearrange(scores, "q t -> q t 1") - rearrange(scores, "q t -> q 1 t")
    hinge = F.relu(margin - gap)
    return (hinge * better).sum() / better.sum().clamp(min=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (0 where it is nowhere True). ``torch.where``, not a
    product: a non-finite value at a masked-out position (e.g. a padded frame) cannot leak in."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def moment_losses(outputs: dict, batch: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weighted sum of the relevance, boundary (L1 + gIoU) and saliency losses, and each term.

    ``outputs`` come from the model's forward; ``batch`` holds the loader's targets."""
    mask = outputs["frame_mask"]
    if "query_mask" in batch:  # padding queries of a fixed-size batch weigh nothing
        mask = mask & rearrange(batch["query_mask"], "q -> q 1")
    logits = outputs["relevance_logits"].float()
    relevance = batch["relevance"].to(logits)
    if cfg.relevance_loss == "focal":
        per_frame = focal_loss(logits, relevance, cfg.focal_gamma)
    else:
        per_frame = F.binary_cross_entropy_with_logits(logits, relevance, reduction="none")
    # A query of highlight-detection data has no moments: nothing to say which frames are relevant,
    # so only its saliency trains. (A query whose moments lie outside the window is a negative.)
    supervised = mask & rearrange(batch["has_moments"].bool(), "q -> q 1") if "has_moments" in batch else mask
    loss_relevance = masked_mean(per_frame, supervised)

    # Boundaries: only frames inside a moment know where it starts and ends. Means over masks are
    # sums over counts, never boolean indexing: no shape depends on the data, nothing waits for the
    # device, and a batch without any positive frame gives 0 with the graph still connected.
    frame_times, duration = outputs["frame_times"].float(), outputs["duration"].float()
    positive, target = boundary_targets(batch, frame_times, duration)
    positive &= mask
    pred = outputs["boundaries"].float()
    centre = frame_times / rearrange(duration, "q -> q 1")
    loss_l1 = masked_mean((pred - target).abs().sum(-1), positive)
    giou = giou_1d(distances_to_window(centre, pred), distances_to_window(centre, target))
    loss_giou = masked_mean(1 - giou, positive)

    # Saliency: annotator scores where the data has them, else the frame's relevance.
    has = rearrange(batch["has_saliency"].bool(), "q -> q 1")
    labels = torch.where(has, batch["saliency"].to(logits), relevance)
    loss_saliency = saliency_ranking(outputs["saliency"].float(), labels, mask, cfg.saliency_margin)

    total = (cfg.loss_relevance * loss_relevance + cfg.loss_l1 * loss_l1 + cfg.loss_giou * loss_giou
             + cfg.loss_saliency * loss_saliency)
    return {"loss": total, "relevance": loss_relevance, "l1": loss_l1, "giou": loss_giou,
            "saliency": loss_saliency}
