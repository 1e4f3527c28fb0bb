"""Pixel values <-> model inputs: uint8 ``v`` <-> float ``v / 127.5 - 1`` in [-1, 1].

Every image model here (the VQ image tokenizer, its training, the in-house retrieval
encoder) reads images through :func:`pixels_to_unit` and writes them back through
:func:`unit_to_pixels`, so the two directions are written once.
"""

from __future__ import annotations

import torch


def pixels_to_unit(u8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]: ``v / 127.5 - 1``."""
    return u8.float() / 127.5 - 1.0


def unit_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (any shape) -> uint8 pixels: clamped, then rounded to nearest.

    The exact inverse of :func:`pixels_to_unit` on its outputs.
    """
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
