"""The retrieval encoder interface (paper §2.1): a document -> one unit vector.

:class:`Encoder` is what every backend implements (``embed_text``, ``embed_image``,
``embed_documents``, ``dim``, ``name``, ``save(dir)``) and what the index, the retriever
and re-ranking use; the backends live in :mod:`.encoder` (the in-house dual encoder, and
:func:`~.encoder.load_encoder`, which reads any saved encoder directory back) and
:mod:`.clip_hf` (real CLIP through ``transformers``).

A document vector is the mean of the L2-normalized text and image embeddings,
re-normalized; a text-only or image-only document uses the one embedding it has.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cm3leon.config import atomic_write_text
from cm3leon.data.records import DocRecord

ENCODER_FILE = "encoder.json"


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)).astype(np.float32)


def combine_embeddings(
    text: np.ndarray | None, image: np.ndarray | None, *, has_text: np.ndarray, has_image: np.ndarray
) -> np.ndarray:
    """Document vectors from per-modality unit vectors (paper §2.1).

    Row i is ``normalize(t_i + v_i)`` when the document has both, else the one it has.
    ``text`` / ``image`` hold rows for every document (ignored where absent).
    """
    has_text = np.asarray(has_text, dtype=bool)
    has_image = np.asarray(has_image, dtype=bool)
    if not (has_text | has_image).all():
        bad = int(np.flatnonzero(~(has_text | has_image))[0])
        raise ValueError(f"document {bad} has neither text nor image; drop empty records before embedding")
    parts = []
    if text is not None:
        parts.append(l2_normalize(text) * has_text[:, None])
    if image is not None:
        parts.append(l2_normalize(image) * has_image[:, None])
    return l2_normalize(sum(parts))


class Encoder(ABC):
    """Text and image towers that map into one ``dim``-d space of unit vectors."""

    #: a short human-readable identifier recorded in index metadata
    name: str

    @property
    @abstractmethod
    def dim(self) -> int:
        """Embedding dimension D."""

    @abstractmethod
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors float32 [N, D] of ``texts``."""

    @abstractmethod
    def embed_image(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit vectors float32 [N, D] of PIL ``images``."""

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the encoder so that :func:`load_encoder` can read it back."""

    def embed_documents(self, records: Sequence[DocRecord]) -> np.ndarray:
        """Document vectors float32 [N, D]: mean of normalized text and image embeddings."""
        records = list(records)
        n = len(records)
        has_text = np.array([r.text is not None for r in records], dtype=bool)
        has_image = np.array([r.image is not None for r in records], dtype=bool)
        text = np.zeros((n, self.dim), np.float32)
        image = np.zeros((n, self.dim), np.float32)
        if has_text.any():
            text[has_text] = self.embed_text([r.text for r in records if r.text is not None])
        if has_image.any():
            image[has_image] = self.embed_image([r.image for r in records if r.image is not None])
        return combine_embeddings(text, image, has_text=has_text, has_image=has_image)

    def describe(self) -> dict[str, Any]:
        """What index metadata records about this encoder."""
        return {"name": self.name, "dim": self.dim}


def write_encoder_json(directory: Path, data: dict[str, Any]) -> None:
    """Atomically write ``encoder.json`` (``data`` must hold ``type``)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / ENCODER_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")
