"""Real CLIP as the retrieval encoder, through Hugging Face ``transformers`` (paper §2.1).

The paper uses the frozen ViT-B-32 CLIP text and image towers. Weights are read from a
local directory or the Hugging Face cache with ``local_files_only=True``: nothing is
ever downloaded at run time. Any ``transformers`` model with ``get_text_features`` /
``get_image_features`` and a tokenizer + image processor saved beside it works (CLIP
and its variants).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cm3leon.retrieval.encoder_base import ENCODER_FILE, Encoder, l2_normalize, write_encoder_json

log = logging.getLogger(__name__)

PAPER_CLIP = "openai/clip-vit-base-patch32"


def _features(out: Any) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"the model's get_*_features returned {type(out).__name__} without pooler_output")
    return pooled


class CLIPEncoder(Encoder):
    """Frozen CLIP text/image towers; batched; unit-vector outputs."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        *,
        source: str,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        for fn in ("get_text_features", "get_image_features"):
            if not hasattr(model, fn):
                raise ValueError(f"{type(model).__name__} has no {fn}(); load a CLIP-style dual encoder")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.device = device
        self.batch_size = batch_size
        self.name = f"clip:{Path(source).name or source}"
        text_cfg = getattr(model.config, "text_config", None)
        self.max_text_len = int(getattr(text_cfg, "max_position_embeddings", 77))
        self._dim = int(getattr(model.config, "projection_dim", 0)) or self._probe_dim()

    def _probe_dim(self) -> int:
        return int(self.embed_text(["probe"]).shape[1])

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str = "cpu", batch_size: int = 64) -> CLIPEncoder:
        """Load a CLIP model, tokenizer and image processor from a directory or the HF cache.

        ``name_or_path`` is a local directory or a hub name already in the cache (e.g.
        ``openai/clip-vit-base-patch32``); it is never downloaded.
        """
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        src = str(name_or_path)
        try:
            model = AutoModel.from_pretrained(src, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(
                f"CLIP model {src!r} is not available locally ({str(e).splitlines()[0]}); nothing is downloaded "
                f"at run time: fetch it once elsewhere (e.g. `hf download {PAPER_CLIP} --local-dir DIR`) and pass "
                "DIR, or use the in-house encoder (`cm3leon retrieval train-encoder`)"
            ) from e
        return cls(model, tokenizer, processor, source=src, device=device, batch_size=batch_size)

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> CLIPEncoder:
        """Load an encoder directory written by :meth:`save`."""
        d = Path(directory)
        spec = json.loads((d / ENCODER_FILE).read_text())
        model = spec.get("model", ".")
        path = d if model == "." else Path(model)
        src = str(path) if path.exists() else model
        return cls.from_pretrained(src, device=device, batch_size=int(spec.get("batch_size", 64)))

    def save(self, directory: str | Path, *, copy_weights: bool = True) -> Path:
        """Write ``encoder.json``; with ``copy_weights`` also the model (safetensors) and processors.

        Without ``copy_weights`` the directory only points at :attr:`source`.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if copy_weights:
            self.model.save_pretrained(d, safe_serialization=True)
            self.tokenizer.save_pretrained(d)
            self.image_processor.save_pretrained(d)
        write_encoder_json(
            d,
            {
                "type": "clip",
                "model": "." if copy_weights else self.source,
                "name": self.name,
                "dim": self.dim,
                "batch_size": self.batch_size,
            },
        )
        return d

    @property
    def dim(self) -> int:
        return self._dim

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = []
        for s in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_text_len,
                return_tensors="pt",
            )
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            out.append(_features(self.model.get_text_features(**batch)).float().cpu().numpy())
        return l2_normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_image(self, images: Sequence[Image.Image]) -> np.ndarray:
        images = [im.convert("RGB") for im in images]
        out = []
        for s in range(0, len(images), self.batch_size):
            px = self.image_processor(images=images[s : s + self.batch_size], return_tensors="pt")["pixel_values"]
            px = px.to(self.device, dtype=next(self.model.parameters()).dtype)
            out.append(_features(self.model.get_image_features(pixel_values=px)).float().cpu().numpy())
        return l2_normalize(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)
