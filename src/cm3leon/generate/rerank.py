"""CLIP re-ranking of candidate images (paper §3.1, Table 1: 8 samples per prompt, best by CLIP).

Takes any encoder with the retrieval encoder's two towers (``embed_text(list[str]) ->
np[N, D]``, ``embed_image(list[PIL]) -> np[N, D]``, unit vectors), e.g.
:func:`cm3leon.retrieval.encoder.load_encoder`. The score of an image is the cosine
between its embedding and the prompt's text embedding (rows are re-normalized, so
encoders that return unnormalized vectors also work). Ties keep input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


class TextImageEncoder(Protocol):
    """The two towers re-ranking needs (the retrieval encoder's interface)."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_image(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass(frozen=True)
class Ranking:
    """Candidates of one prompt: ``order`` (indices, best first) and ``scores`` (cosine, input order)."""

    order: list[int]
    scores: np.ndarray

    @property
    def best(self) -> int:
        """Index of the best candidate."""
        return self.order[0]


def _unit(x: np.ndarray, what: str, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"encoder returned {what} embeddings of shape {x.shape}, expected [{n}, D]")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clip_scores(encoder: TextImageEncoder, prompt: str, images: Sequence[Image.Image]) -> np.ndarray:
    """Cosine similarity float32[N] between ``prompt`` and each image."""
    if not images:
        raise ValueError("no candidate images to score; generate at least one")
    t = _unit(encoder.embed_text([prompt]), "text", 1)
    v = _unit(encoder.embed_image(list(images)), "image", len(images))
    if t.shape[1] != v.shape[1]:
        raise ValueError(f"text ({t.shape[1]}-d) and image ({v.shape[1]}-d) embeddings live in different spaces")
    return (v @ t[0]).astype(np.float32)


def rerank(encoder: TextImageEncoder, prompt: str, images: Sequence[Image.Image]) -> Ranking:
    """Order ``images`` by CLIP score against ``prompt``, best first."""
    scores = clip_scores(encoder, prompt, images)
    order = np.argsort(-scores, kind="stable").tolist()
    return Ranking(order=order, scores=scores)


def rerank_groups(
    encoder: TextImageEncoder, prompts: Sequence[str], images: Sequence[Image.Image], *, n_per_prompt: int
) -> list[Ranking]:
    """Re-rank decoder output laid out prompt-major (image ``p * n + j`` belongs to prompt p)."""
    if n_per_prompt <= 0:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    if len(images) != len(prompts) * n_per_prompt:
        raise ValueError(
            f"{len(images)} images for {len(prompts)} prompts x {n_per_prompt} samples; "
            f"expected {len(prompts) * n_per_prompt}"
        )
    t = _unit(encoder.embed_text(list(prompts)), "text", len(prompts))
    v = _unit(encoder.embed_image(list(images)), "image", len(images))
    if t.shape[1] != v.shape[1]:
        raise ValueError(f"text ({t.shape[1]}-d) and image ({v.shape[1]}-d) embeddings live in different spaces")
    out = []
    for p in range(len(prompts)):
        s = (v[p * n_per_prompt : (p + 1) * n_per_prompt] @ t[p]).astype(np.float32)
        out.append(Ranking(order=np.argsort(-s, kind="stable").tolist(), scores=s))
    return out
