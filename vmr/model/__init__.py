"""The moment retrieval model: CLIP or SigLIP towers (backbone.py), the heads (heads/: vmr's own with
its einops blocks (blocks.py) and losses (losses.py), Moment-DETR, QD-DETR), and
VideoMomentRetrievalModel with decoding and inference bundles (model.py). Never imports vmr.data."""

from vmr.model.heads import head_losses as moment_losses
from vmr.model.model import (
           FRAME_KEYS,
           VideoMomentRetrievalModel,
           batch_forward,
           decode_moments,
           decoding_nms,
           frame_outputs,
           patch_grid,
           rank_moments,
)

__all__ = ["FRAME_KEYS", "VideoMomentRetrievalModel", "batch_forward", "decode_moments", "decoding_nms", "frame_outputs",
           "moment_losses", "patch_grid", "rank_moments"]
