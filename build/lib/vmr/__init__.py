"""vmr: train, evaluate and serve video moment retrieval models at scale."""

from vmr.config import load_config

__version__ = "0.1.0"
__all__ = ["VideoMomentRetrievalModel", "load_config"]


def __getattr__(name: str):
    # The model pulls in torch and transformers: import it only when asked for.
    if name == "VideoMomentRetrievalModel":
        from vmr.model import VideoMomentRetrievalModel

        return VideoMomentRetrievalModel
    raise AttributeError(f"module 'vmr' has no attribute {name!r}")
