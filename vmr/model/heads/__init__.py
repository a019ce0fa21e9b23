"""Heads: what sits on the shared towers (vmr/model/model.py), chosen by ``model.head``.

A head is a module with three parts:
  ``forward(tokens (b, t, k, c), words (q, l, c), sentence (q, c), frame_mask (b, t), word_mask (q, l),
  video_index (q,))`` -> its outputs (a dict of tensors, q first);
  ``losses(outputs, batch)`` -> ``{"loss": weighted sum, term: value, ...}`` on a loader batch;
  ``frame_outputs(outputs, own, offset, video_duration)`` -> per query, plain lists in seconds of
  the whole video: per valid frame ``times``, ``relevance``, ``saliency``; and its moment proposals
  ``starts``, ``ends``, ``scores`` (ranked by ``rank_moments``, merged over windows).

- ``vmr``: vmr's own (vmr_head.py): the query pools each frame's patches, temporal and cross-attention
  blocks, per-frame relevance, boundaries and saliency; every frame proposes a moment.
- ``moment_detr`` and ``qd_detr``: the published heads (moment_detr.py, qd_detr.py), identical to
  their reference code; ``num_queries`` slots each propose a moment.
"""

from __future__ import annotations

import torch

from vmr.config import ModelConfig
from vmr.model.heads.detr import proposals as detr_proposals
from vmr.model.heads.moment_detr import MomentDETRHead
from vmr.model.heads.qd_detr import QDDETRHead
from vmr.model.heads.vmr_head import VmrHead
from vmr.model.heads.vmr_head import frame_outputs as vmr_frame_outputs
from vmr.spans import nms

HEADS = {"vmr": VmrHead, "moment_detr": MomentDETRHead, "qd_detr": QDDETRHead}


def head_losses(outputs: dict, batch: dict, cfg) -> dict:
    """The configured head's losses on a loader batch (``cfg``: the model's ModelConfig). Losses
    read no weights, only outputs, targets and settings: one function for every caller."""
    from vmr.model.corpus import moment_level_loss, split_negatives, video_level_loss
    from vmr.model.heads.detr import batch_losses
    from vmr.model.losses import moment_losses

    if cfg.head == "vmr":
        if "query_hash" not in batch:  # not a training batch of model.corpus (corpus_batch)
            return moment_losses(outputs, batch, cfg)
        own, negative = split_negatives(outputs, len(batch["video_index"]))
        losses = moment_losses(own, batch, cfg)
        losses["video"] = video_level_loss(own, batch, cfg.corpus)
        # Even with no negative pair (one video in a process's batch): every layer then still gets its
        # (zero) gradient, as DDP expects of every process.
        losses["negative"], losses["presence"] = moment_level_loss(own, negative, batch, cfg.relevance_loss,
                                                                   cfg.focal_gamma)
        c = cfg.corpus
        losses["loss"] = losses["loss"] + c.loss_video * losses["video"] + c.loss_negative * losses["negative"] \
            + c.loss_presence * losses["presence"]
        return losses
    return batch_losses(outputs, batch, cfg.detr, HEADS[cfg.head].saliency_loss_of)


# ----- decoding: outputs -> per-frame scores and proposals in seconds -> ranked moments -------------

def decoding_nms(config: ModelConfig) -> float:
    """The decoding's NMS threshold: model.nms_iou, or a published head's own setting
    (model.detr.nms_thd; below 0, its reference's default: no NMS, i.e. 1.0)."""
    if config.head == "vmr":
        return config.nms_iou
    return config.detr.nms_thd if config.detr.nms_thd >= 0 else 1.0


FRAME_KEYS = ("times", "relevance", "saliency", "starts", "ends", "scores")


def frame_outputs(outputs: dict, own: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                  video_duration: torch.Tensor | None = None, config: ModelConfig | None = None) -> list[dict]:
    """Per query, plain lists in seconds of the whole video: per reported frame ``times``,
    ``relevance``, ``saliency``; and its moment proposals ``starts``, ``ends``, ``scores`` (the
    head's ``frame_outputs``; a published head's need ``config``, the model's ModelConfig)."""
    if "pred_logits" in outputs:
        if config is None:
            raise ValueError("the outputs of a published head need its config to be decoded")
        return detr_proposals(outputs, own, offset, video_duration, config.detr)
    return vmr_frame_outputs(outputs, own, offset, video_duration)


def rank_moments(frames: dict, top_k: int, nms_iou: float) -> list[tuple[float, float, float]]:
    """Every proposal (``starts``, ``ends``, ``scores``) of a whole video, merged over its windows:
    overlapping proposals are suppressed (NMS; 1.0 keeps them all) and the ``top_k`` best kept."""
    scores = frames["scores"] if "scores" in frames else frames["relevance"]  # vmr's head: a frame's relevance
    candidates = [(s, e, p) for s, e, p in zip(frames["starts"], frames["ends"], scores, strict=True) if e > s]
    return nms(candidates, nms_iou, top_k)


def decode_moments(outputs: dict, top_k: int, nms_iou: float, config: ModelConfig | None = None) -> list[dict]:
    """Per query of one forward (a single window per video): ranked ``moments``, and the per-frame
    ``frame_scores`` (relevance), ``saliency`` and ``frame_times`` of the valid frames."""
    return [{"moments": rank_moments(f, top_k, nms_iou), "frame_scores": f["relevance"], "saliency": f["saliency"],
             "frame_times": f["times"]} for f in frame_outputs(outputs, config=config)]


__all__ = ["FRAME_KEYS", "HEADS", "MomentDETRHead", "QDDETRHead", "VmrHead", "decode_moments", "decoding_nms",
           "frame_outputs", "head_losses", "rank_moments"]
