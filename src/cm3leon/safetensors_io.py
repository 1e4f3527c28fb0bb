"""safetensors files written whole or not at all, and read with errors that name the file.

Every writer of weights (model directories, training checkpoints, the image tokenizer, the
retrieval encoder) goes through :func:`write_safetensors` or :func:`reporting_write_errors`,
which turn a failed write (disk full, read-only, no permission) into a :class:`WriteError`
whose one-line message names the directory, the space the write needs and the space free.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class WriteError(OSError):
    """Writing weights or a checkpoint failed; ``str()`` is one line naming the directory, the
    space needed and the space free. ``errno`` is the OS error number when one is known."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err  # type: ignore[misc]


def tensor_bytes(*groups: Iterable[torch.Tensor]) -> int:
    """Bytes of tensor data in ``groups`` (a safetensors file is this plus a small JSON header)."""
    return sum(t.numel() * t.element_size() for g in groups for t in g)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


_OS_ERROR = re.compile(r"os error (\d+)|code: (\d+)")


def _io_errno(e: BaseException) -> int | None:
    """The OS error number of a failed write, 0 for an I/O failure without one, None if ``e`` is no I/O error."""
    if isinstance(e, OSError):
        return e.errno or 0
    if isinstance(e, SafetensorError):  # its write errors are only text: "I/O error: ... (os error 28)"
        m = _OS_ERROR.search(str(e))
        if m:
            return int(m.group(1) or m.group(2))
        return 0 if "I/O error" in str(e) or "IoError" in str(e) else None
    return None


def write_error(what: str, directory: str | Path, needed: int, e: BaseException) -> WriteError:
    """A :class:`WriteError` for a failed write of ``what`` (``needed`` bytes) into ``directory``."""
    code = _io_errno(e)
    if code:
        reason = os.strerror(code)
    elif isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = " ".join(str(e).split())
    try:
        free = f"{_human(shutil.disk_usage(directory).free)} free"
    except OSError:
        free = "free space unknown"
    return WriteError(f"could not write {what} to {directory}: {reason} (needs about {_human(needed)}, {free})",
                      code or None)


@contextlib.contextmanager
def reporting_write_errors(what: str, directory: str | Path, needed: int) -> Iterator[None]:
    """Turn an I/O error raised inside the block (``OSError``, or safetensors' I/O error) into a
    :class:`WriteError` for ``what`` (about ``needed`` bytes) in ``directory``; others pass through."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as e:
        if _io_errno(e) is None:
            raise
        raise write_error(what, directory, needed, e) from e


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, *, what: str,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` through a temp file + rename: the file is whole or absent, the
    temp file is removed whatever happens, and an I/O failure raises :class:`WriteError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with reporting_write_errors(what, path.parent, tensor_bytes(tensors.values())):
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
