"""Atomic training checkpoints and strict loading.

A checkpoint is a directory ``<out>/checkpoints/step-NNNNNNNN/`` holding

- ``model.safetensors``     full (unsharded) model weights
- ``optimizer.safetensors`` AdamW moments and step counts, keyed ``<param name>/<key>``
- ``rng.safetensors``       torch CPU/CUDA generator states
- ``state.json``            step, data position, optimizer param groups, python/numpy RNG
                            states, model/train configs and the vocabulary

It is written into a hidden temporary directory and renamed into place, so a crash
never leaves a half checkpoint under a ``step-*`` name; older ones beyond ``keep_last``
are deleted only after the new one exists. A failed write (disk full) removes its
temporary directory and raises :class:`~cm3leon.model.io.WriteError` naming the directory,
the space needed and the space free; the checkpoints already there are untouched. No
pickles: tensors are safetensors, the rest is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from cm3leon.config import ModelConfig, to_json_dict
from cm3leon.model.io import check_state_dict
from cm3leon.safetensors_io import read_safetensors, reporting_write_errors, tensor_bytes

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
FORMAT = "cm3leon-train-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8})$")
_LEFTOVER_RE = re.compile(r"^\.(tmp|old)-(step-\d{8})-\d+$")  # save_checkpoint's temporaries


@dataclass
class Checkpoint:
    """A loaded checkpoint: full model weights, optimizer state dict, RNG tensors and JSON state."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


# ---- RNG -------------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python/numpy generator states as JSON, torch CPU/CUDA states as tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return js, tensors


def restore_rng(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---- optimizer state <-> flat tensors + JSON --------------------------------------------

def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split a name-keyed optimizer state dict into safetensors-ready tensors and JSON param groups."""
    tensors: dict[str, torch.Tensor] = {}
    for pname, st in osd["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"{pname}/{key}"] = t.detach().contiguous().cpu()
    groups = []
    for g in osd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pname, _, sub = key.rpartition("/")
        state.setdefault(pname, {})[sub] = t
    param_groups = []
    for g in groups:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        param_groups.append(g)
    return {"state": state, "param_groups": param_groups}


# ---- save / load -----------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clear_leftovers(root: Path) -> None:
    """Remove the temporaries of saves that died mid-write (one process writes a run's checkpoints).

    A ``.old-step-N-*`` whose ``step-N`` is gone is the only copy of that checkpoint: it is put back."""
    for p in root.iterdir():
        m = _LEFTOVER_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        if m.group(1) == "old" and not (root / m.group(2)).exists():
            p.rename(root / m.group(2))
        else:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write a checkpoint for ``step`` atomically and prune all but the ``keep_last`` newest.

    ``state`` is JSON-ready run state (step, data position, configs...); RNG states are
    captured here. Returns the checkpoint directory. An I/O failure raises
    :class:`~cm3leon.model.io.WriteError` and leaves no temporary directory behind.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    model_tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    opt_tensors, groups = flatten_optimizer(optimizer_state)
    rng_js, rng_tensors = capture_rng()
    needed = tensor_bytes(model_tensors.values(), opt_tensors.values(), rng_tensors.values())
    meta = {"format": FORMAT, "version": str(VERSION)}
    full_state = {"format": FORMAT, "version": VERSION, **state, "step": step,
                  "optimizer_param_groups": groups, "rng": rng_js}
    try:
        with reporting_write_errors(f"checkpoint {final.name}", root, needed):
            tmp.mkdir()
            save_file(model_tensors, str(tmp / "model.safetensors"), metadata=meta)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
            save_file(rng_tensors, str(tmp / "rng.safetensors"), metadata=meta)
            (tmp / "state.json").write_text(json.dumps(full_state, indent=1, sort_keys=True) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. exit right after a periodic save)
                old = root / f".old-{final.name}-{os.getpid()}"
                final.rename(old)
                try:
                    tmp.rename(final)
                except OSError:
                    old.rename(final)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def _corrupt(path: Path, why: str, root: Path) -> ValueError:
    older = [p for p in list_checkpoints(root) if p != path.parent]
    hint = f"delete {path.parent} to resume from {older[-1].name}" if older else "start a new run without --resume"
    return ValueError(f"checkpoint file {path} {why}; {hint}")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory; missing, truncated or corrupt files raise a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} not found")
    state_file = path / "state.json"
    if not state_file.exists():
        raise _corrupt(state_file, "is missing (incomplete checkpoint)", path.parent)
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise _corrupt(state_file, f"is not valid JSON ({e})", path.parent) from e
    if state.get("format") != FORMAT:
        raise ValueError(f"{state_file} is not a cm3leon training checkpoint (format={state.get('format')!r})")
    if state.get("version") != VERSION:
        raise ValueError(f"{state_file} has checkpoint version {state.get('version')}, this code reads {VERSION}")
    tensors = {}
    for name in ("model", "optimizer", "rng"):
        f = path / f"{name}.safetensors"
        if not f.exists():
            raise _corrupt(f, "is missing (incomplete checkpoint)", path.parent)
        try:
            tensors[name] = read_safetensors(f)
        except ValueError as e:
            raise _corrupt(f, "is truncated or corrupt", path.parent) from e
    optimizer = unflatten_optimizer(tensors["optimizer"], state["optimizer_param_groups"])
    return Checkpoint(path, tensors["model"], optimizer, tensors["rng"], state)


def check_model_compat(ckpt: Checkpoint, model_config: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint written for another model: name the differing config fields, then keys/shapes."""
    # A field the checkpoint does not name counts as its default (ModelConfig.from_dict).
    saved = to_json_dict(ModelConfig.from_dict(ckpt.state.get("model_config", {})))
    diff = {k: (saved.get(k), v) for k, v in model_config.items() if saved.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"checkpoint {ckpt.path} was written for a different model ({desc}); "
            "resume with the same preset/overrides, or start a new --out directory"
        )
    check_state_dict(expected, ckpt.model, source=str(ckpt.path / "model.safetensors"))
