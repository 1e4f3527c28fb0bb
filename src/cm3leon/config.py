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


class ConfigError(ValueError):
    """Invalid config values: one message per problem (field, value, what is allowed), all in one error."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.what, self.problems = what, list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


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
    # The decoder family: "cm3leon" (the paper's OPT-style block, model/transformer.py) or
    # "chameleon" (Chameleon's Llama-style block, model/chameleon.py: RMSNorm, rotary
    # positions, SwiGLU, per-head query/key LayerNorm). The fields below are read by the
    # Chameleon block only; d_ff is its intermediate size.
    family: str = "cm3leon"
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (default n_heads)
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    swin_norm: bool = False  # Chameleon-34B: normalize each sublayer's output instead of its input

    def __post_init__(self) -> None:
        problems = self.field_problems(dataclasses.asdict(self))
        if not problems:  # the relations between fields, once each field has a usable value
            if self.d_model % self.n_heads:
                problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            if (self.image_tokens > 0) != (self.image_vocab > 0):
                problems.append("image_tokens and image_vocab must both be 0 (off) or both positive, got "
                                f"{self.image_tokens} and {self.image_vocab}")
            if self.image_axial and (not self.image_tokens or math.isqrt(self.image_tokens) ** 2 != self.image_tokens):
                problems.append("image_axial needs image_tokens to be a square number (a square image grid), "
                                f"got image_tokens={self.image_tokens}")
            if self.family == "chameleon" and self.image_tokens:
                problems.append("the chameleon family has no image-place embedding; set image_tokens=0")
            if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
            if self.family == "cm3leon" and (self.n_kv_heads not in (None, self.n_heads) or self.swin_norm):
                problems.append("n_kv_heads and swin_norm belong to the chameleon family; set family='chameleon'")
            if self.image_vocab >= self.vocab_size:
                problems.append(f"image_vocab={self.image_vocab} must be smaller than vocab_size={self.vocab_size}")
        if problems:
            raise ConfigError("ModelConfig", problems)

    @staticmethod
    def field_problems(d: dict[str, Any]) -> list[str]:
        """One message per value of ``d`` (field name -> value) that has the wrong type or range;
        fields ``d`` does not name are not checked, relations between fields are not checked."""
        checks = {
            "vocab_size": lambda v: int_problem("vocab_size", v, low=1),
            "d_model": lambda v: int_problem("d_model", v, low=1),
            "n_layers": lambda v: int_problem("n_layers", v, low=1),
            "n_heads": lambda v: int_problem("n_heads", v, low=1),
            "d_ff": lambda v: int_problem("d_ff", v, low=1, optional=True),
            "max_seq_len": lambda v: int_problem("max_seq_len", v, low=1),
            "activation": lambda v: choice_problem("activation", v, ("relu", "gelu", "silu")),
            "init_std": lambda v: number_problem("init_std", v, low=0.0),
            "pos_init_std": lambda v: number_problem("pos_init_std", v, low=0.0),
            "image_tokens": lambda v: int_problem("image_tokens", v, low=0),
            "image_vocab": lambda v: int_problem("image_vocab", v, low=0),
            "image_axial": lambda v: bool_problem("image_axial", v),
            "family": lambda v: choice_problem("family", v, ("cm3leon", "chameleon")),
            "n_kv_heads": lambda v: int_problem("n_kv_heads", v, low=1, optional=True),
            "rms_eps": lambda v: number_problem("rms_eps", v, low=0.0, low_open=True),
            "rope_theta": lambda v: number_problem("rope_theta", v, low=0.0, low_open=True),
            "swin_norm": lambda v: bool_problem("swin_norm", v),
        }
        return [msg for k, v in d.items() if k in checks and (msg := checks[k](v))]

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (what the KV cache stores)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The config of a JSON dict (a model's ``config.json``, a checkpoint's ``model_config``).

        Fields it does not name take their defaults. The keys ``image_rope_dims``,
        ``image_rope_pairs_only`` and ``image_copy_bias`` name options this decoder does not
        have: they are dropped when off (0 / false) and refused otherwise.
        """
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig: a model config must be a JSON object, got {json_type(d)}")
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
        kw["vocab_size"] = vocab_size
        return from_json_dict(cls, kw)


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
    """Build dataclass ``cls`` from a dict, refusing unknown and missing fields with a clear message."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object with its fields, got {json_type(d)}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    unknown = set(d) - names
    if unknown:
        raise ValueError(
            f"{cls.__name__}: unknown fields {sorted(unknown, key=str)} (known: {sorted(names)}); "
            "the config was written by a different version or for a different component"
        )
    missing = [f.name for f in fields if f.init and f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__name__}: missing required fields {missing}")
    return cls(**d)


# ---- value checks: each returns one message naming the field, the value and what is allowed, or None

def json_type(v: Any) -> str:
    """The JSON name of ``v``'s type, for messages: object, array, string, number, boolean, null."""
    if v is None:
        return "null"
    for t, name in ((bool, "boolean"), (dict, "object"), ((list, tuple), "array"), (str, "string")):
        if isinstance(v, t):
            return name
    return "number" if isinstance(v, (int, float)) else type(v).__name__


def int_problem(name: str, v: Any, *, low: int | None = None, high: int | None = None,
                optional: bool = False) -> str | None:
    """``v`` must be an integer (not a bool, not 4.0) in ``[low, high]``; ``optional`` also allows None."""
    if v is None and optional:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low) and (high is None or v <= high):
        return None
    allowed = "a whole number"
    if low is not None and high is not None:
        allowed += f" in {low}..{high}"
    elif low is not None:
        allowed += f" >= {low}"
    elif high is not None:
        allowed += f" <= {high}"
    return f"{name} must be {allowed}{' or null' if optional else ''} (got {v!r})"


def number_problem(name: str, v: Any, *, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False, optional: bool = False) -> str | None:
    """``v`` must be a finite int or float (not a bool) within the bounds (``*_open``: bound excluded)."""
    if v is None and optional:
        return None
    ok = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if ok:
        return None
    if low is not None and high is not None:
        allowed = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        allowed = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        allowed = "a finite number"
    return f"{name} must be {allowed}{' or null' if optional else ''} (got {v!r})"


def choice_problem(name: str, v: Any, choices: tuple[Any, ...]) -> str | None:
    """``v`` must be one of ``choices``."""
    if isinstance(v, str) and v in choices:
        return None
    return f"{name} must be one of {list(choices)} (got {v!r})"


def bool_problem(name: str, v: Any) -> str | None:
    """``v`` must be true or false."""
    return None if isinstance(v, bool) else f"{name} must be true or false (got {v!r})"


def str_problem(name: str, v: Any, *, optional: bool = False) -> str | None:
    """``v`` must be a non-empty string (``optional``: or None)."""
    if (v is None and optional) or (isinstance(v, str) and v):
        return None
    return f"{name} must be a non-empty string{' or null' if optional else ''} (got {v!r})"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a uniquely named temp file + rename (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no temp file


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
