"""CM3Leon: retrieval-augmented decoder-only multimodal transformer."""

__version__ = "0.1.0"

