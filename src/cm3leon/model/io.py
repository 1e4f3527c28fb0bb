"""The decoder's native on-disk format: ``config.json`` (a :class:`ModelConfig`) plus
``model.safetensors``. Loading is strict: every key must be present with its exact shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cm3leon.config import ConfigError, ModelConfig, load_json, save_json
from cm3leon.model.transformer import Transformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model(model: Transformer, out_dir: str | Path) -> Path:
    """Write ``model`` to ``out_dir`` as config.json + model.safetensors (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "cm3leon"})
    os.replace(tmp, out / WEIGHTS_NAME)
    save_json(model.cfg, out / CONFIG_NAME)
    return out


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read the :class:`ModelConfig` of a saved model directory."""
    path = Path(model_dir) / CONFIG_NAME
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    d = load_json(path)
    if "model_type" in d:
        raise ValueError(
            f"{path} is a Hugging Face {d['model_type']!r} config, not a cm3leon model; "
            "convert it first with `cm3leon import-hf --hf DIR --out DIR`"
        )
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"model config {path}", e.problems) from e


def read_safetensors(path: str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file with errors that name the file (missing, truncated, corrupt)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; the model directory is incomplete")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise ValueError(
            f"{path} could not be read ({e}); the file is truncated or corrupt - re-save or re-download it"
        ) from e


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise ValueError naming missing/unexpected keys and every shape mismatch."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k in sorted(set(expected) & set(got)):
        if tuple(expected[k].shape) != tuple(got[k].shape):
            problems.append(
                f"{k}: checkpoint has shape {tuple(got[k].shape)}, model expects {tuple(expected[k].shape)}"
            )
    if problems:
        raise ValueError(
            f"{source} does not match the model config: " + "; ".join(problems)
            + " (was it saved from a different preset or vocabulary?)"
        )


def load_model(
    model_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Load a model saved by :func:`save_model`, strictly; returned in eval mode.

    ``dtype`` casts floating weights (default: as stored).
    """
    cfg = load_config(model_dir)
    state = read_safetensors(Path(model_dir) / WEIGHTS_NAME)
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state_dict(model.state_dict(), state, source=str(Path(model_dir) / WEIGHTS_NAME))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
