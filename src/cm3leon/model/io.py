"""The decoder's native on-disk format: ``config.json`` (a :class:`ModelConfig`) plus
``model.safetensors``. Loading is strict: every key must be present with its exact shape.

Its weights are written with :func:`cm3leon.safetensors_io.write_safetensors`: whole or
absent, and a failed write is one line naming the space it needs and the space free.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cm3leon.config import ConfigError, ModelConfig, load_json, save_json
from cm3leon.model.transformer import Transformer
from cm3leon.safetensors_io import read_safetensors, reporting_write_errors, write_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model(model: Transformer, out_dir: str | Path) -> Path:
    """Write ``model`` to ``out_dir`` as config.json + model.safetensors (each written atomically).

    A failed write (disk full...) raises :class:`WriteError` and leaves no temp file behind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_safetensors(state, out / WEIGHTS_NAME, what=f"the model weights ({WEIGHTS_NAME})",
                      metadata={"format": "pt", "producer": "cm3leon"})
    with reporting_write_errors(f"the model config ({CONFIG_NAME})", out, 4096):
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
