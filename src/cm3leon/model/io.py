"""The decoder's native on-disk format: ``config.json`` (a :class:`ModelConfig`) plus
``model.safetensors``, or several shards listed by ``model.safetensors.index.json``
(``{"weight_map": {key: file}}``, as a converted 7B model is written, one shard at a
time). Loading is strict: every key must be present with its exact shape.

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
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a model directory: ``model.safetensors``, or the shards its index lists."""
    d = Path(model_dir)
    if (d / WEIGHTS_NAME).exists() or not (d / WEIGHTS_INDEX_NAME).exists():
        return [d / WEIGHTS_NAME]
    index = load_json(d / WEIGHTS_INDEX_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{d / WEIGHTS_INDEX_NAME} has no weight_map; the file is corrupt, re-convert the model")
    return [d / name for name in sorted(set(weight_map.values()))]


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's weight file(s), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        state.update(read_safetensors(path))
    return state


def write_index(out_dir: str | Path, weight_map: dict[str, str]) -> None:
    """Write ``model.safetensors.index.json`` naming the shard of every key."""
    out = Path(out_dir)
    with reporting_write_errors(f"the weights index ({WEIGHTS_INDEX_NAME})", out, 1 << 20):
        save_json({"weight_map": dict(sorted(weight_map.items()))}, out / WEIGHTS_INDEX_NAME)


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
    state = read_weights(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state_dict(model.state_dict(), state, source=", ".join(str(p) for p in weight_files(model_dir)))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
