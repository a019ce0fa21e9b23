"""The moment retrieval model: CLIP or SigLIP towers (backbone.py), einops attention blocks (blocks.py),
losses (losses.py) and VideoMomentRetrievalModel with decoding and inference bundles (model.py).
Never imports vmr.data."""

from vmr.model.losses import moment_losses
from vmr.model.model import (
           FRAME_KEYS,
           VideoMomentRetrievalModel,
           batch_forward,
           decode_moments,
           frame_outputs,
           patch_grid,
           rank_moments,
)

__all__ = ["FRAME_KEYS", "VideoMomentRetrievalModel", "batch_forward", "decode_moments", "frame_outputs", "moment_losses",
           "patch_grid", "rank_moments"]
