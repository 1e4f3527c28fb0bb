"""Frozen dataclass configs and named presets shared across the pipeline.

Each stage that has its own knobs keeps its config dataclass next to its code (the
image tokenizer's ``VQConfig`` lives in ``tokenize/image_vq.py``, the retriever's in
``retrieval/retriever.py``...). This module holds the decoder's :class:`ModelConfig`
(paper Table 3) and the helpers to read/write configs as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape (paper §2.3, Table 3).

    ``vocab_size`` must equal ``Vocab.size`` of the vocabulary the model is trained on.
    """

    vocab_size: int
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    d_ff: int | None = None  # default 4 * d_model
    max_seq_len: int = 4096
    activation: str = "relu"  # OPT uses ReLU; "gelu" also supported
    init_std: float = 0.006
    pos_init_std: float = 0.0002
    # NOT in the paper (off by default): a learned embedding of each image token's place in
    # its image (index 0..image_tokens-1 inside a run of image ids), added to the input like
    # DALL-E's row/column embeddings. With OPT's absolute positions alone, an image starts at
    # a different offset in every sequence and a small model trained for minutes never learns
    # "the token 8 back is the one above". image_vocab = number of image ids (the last ids).
    image_tokens: int = 0
    image_vocab: int = 0
    # With image_tokens: also add a learned row and a learned column embedding (DALL-E's
    # factorisation; the image is a square grid of sqrt(image_tokens) tokens a side). Each
    # row/column vector is trained by every token of that row/column, so "on the left" is
    # one thing to learn instead of one per place.
    image_axial: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        if (self.image_tokens > 0) != (self.image_vocab > 0) or self.image_tokens < 0 or self.image_vocab < 0:
            raise ValueError("image_tokens and image_vocab must both be 0 (off) or both positive, got "
                             f"{self.image_tokens} and {self.image_vocab}")
        if self.image_axial and (not self.image_tokens or math.isqrt(self.image_tokens) ** 2 != self.image_tokens):
            raise ValueError(f"image_axial needs image_tokens to be a square number (a square image grid), "
                             f"got image_tokens={self.image_tokens}")
        if self.image_vocab >= self.vocab_size:
            raise ValueError(f"image_vocab={self.image_vocab} must be smaller than vocab_size={self.vocab_size}")
        if self.vocab_size <= 0 or self.max_seq_len <= 0:
            raise ValueError("vocab_size and max_seq_len must be positive")

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The config of a JSON dict (a model's ``config.json``, a checkpoint's ``model_config``).

        Fields it does not name take their defaults. The keys ``image_rope_dims``,
        ``image_rope_pairs_only`` and ``image_copy_bias`` name options this decoder does not
        have: they are dropped when off (0 / false) and refused otherwise.
        """
        absent = {"image_rope_dims": 0, "image_rope_pairs_only": False, "image_copy_bias": False}
        on = {k: d[k] for k, off in absent.items() if d.get(k, off) != off}
        if on:
            raise ValueError(f"ModelConfig: {on} turn on options this decoder does not have (it reads "
                             "them only when 0 / false); the model was built by another version of cm3leon")
        return from_json_dict(cls, {k: v for k, v in d.items() if k not in absent})

    @classmethod
    def from_name(cls, name: str, *, vocab_size: int, **overrides: Any) -> ModelConfig:
        """A named preset (see :data:`MODEL_PRESETS`) with optional overrides."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        kw = dict(MODEL_PRESETS[name])
        kw.update(overrides)
        return cls(vocab_size=vocab_size, **kw)


# Paper Table 3 (350M / 760M / 7B at seq 4096) and small CPU presets.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=512),
    "shapes": dict(d_model=256, n_layers=6, n_heads=8, max_seq_len=512),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, max_seq_len=4096),
    "760m": dict(d_model=1536, n_layers=24, n_heads=24, max_seq_len=4096),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, max_seq_len=4096),
}


def to_json_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a plain JSON-ready dict."""
    return dataclasses.asdict(cfg)


def from_json_dict(cls: type[T], d: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a dict, refusing unknown fields with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown fields {sorted(unknown)} (known: {sorted(names)}); "
            "the config was written by a different version or for a different component"
        )
    return cls(**d)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a uniquely named temp file + rename (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_json(obj: Any, path: str | Path) -> None:
    """Write a dataclass or dict as pretty JSON, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_json_dict(obj) if dataclasses.is_dataclass(obj) else obj
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON file with an error that names the file when it is missing or broken."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or truncated") from e
