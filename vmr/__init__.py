"""vmr: train, evaluate and serve video moment retrieval models at scale."""

__version__ = "0.1.0"
