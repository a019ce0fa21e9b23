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

from vmr.model.heads.moment_detr import MomentDETRHead
from vmr.model.heads.qd_detr import QDDETRHead
from vmr.model.heads.vmr_head import VmrHead

HEADS = {"vmr": VmrHead, "moment_detr": MomentDETRHead, "qd_detr": QDDETRHead}


def head_losses(outputs: dict, batch: dict, cfg) -> dict:
    """The configured head's losses on a loader batch (``cfg``: the model's ModelConfig). Losses
    read no weights, only outputs, targets and settings: one function for every caller."""
    from vmr.model.heads.detr import batch_losses
    from vmr.model.losses import moment_losses

    if cfg.head == "vmr":
        return moment_losses(outputs, batch, cfg)
    return batch_losses(outputs, batch, cfg.detr, HEADS[cfg.head].saliency_loss_of)


__all__ = ["HEADS", "MomentDETRHead", "QDDETRHead", "VmrHead", "head_losses"]
