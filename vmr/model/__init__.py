"""The moment retrieval model: CLIP or SigLIP towers (backbone.py), the heads (heads/: vmr's own with
its einops blocks (blocks.py) and losses (losses.py), Moment-DETR, QD-DETR), and
VideoMomentRetrievalModel (model.py) with its
inference bundles (vmr/bundle.py). Never imports vmr.data."""

from vmr.model.heads import FRAME_KEYS, decode_moments, decoding_nms, frame_outputs, rank_moments
from vmr.model.heads import head_losses as moment_losses
from vmr.model.heads.vmr_head import patch_grid
from vmr.model.model import VideoMomentRetrievalModel, batch_forward

__all__ = ["FRAME_KEYS", "VideoMomentRetrievalModel", "batch_forward", "decode_moments", "decoding_nms", "frame_outputs",
           "moment_losses", "patch_grid", "rank_moments"]
