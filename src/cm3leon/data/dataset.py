"""The project's one dataset format: ``manifest.json`` + parquet parts of DocRecords.

A dataset is a directory::

    manifest.json        {"format": "cm3leon-dataset", "version": 1, "n": N, "columns": [...],
                          "image_columns": [...], "tasks": [...], "task_counts": {...},
                          "source": ..., "seed": ..., "parts": [{"file": ..., "n": ...}, ...]}
    part-00000.parquet   columns id (string), image (PNG bytes, nullable), text (string,
    part-00001.parquet   nullable), meta (JSON string), plus one binary column per extra
    ...                  image (Shapes: seg, edge, depth, edit_image, write_image)

Reading gives :class:`DocRecord`s: ``record.image`` is the decoded ``image`` column (PIL
RGB) and the extra image columns are exposed, decoded on first access, as
``record.meta["images"][name]`` (a :class:`LazyImages` mapping). See docs/data-format.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from cm3leon.config import atomic_write_text
from cm3leon.data.records import DocRecord
from cm3leon.workspace import check_replaceable

log = logging.getLogger(__name__)

FORMAT = "cm3leon-dataset"
VERSION = 1
MANIFEST = "manifest.json"
ROWS_PER_PART = 5000
ROW_GROUP_SIZE = 500
BASE_COLUMNS = ("id", "image", "text", "meta")
# Images above this many pixels are refused as bad rows (a guard against decompression
# bombs and accidental gigapixel scans); sources accept a ``max_pixels`` override.
MAX_PIXELS = 64_000_000


# --------------------------------------------------------------------------- images


class BadRowError(ValueError):
    """A row that cannot be used; ``reason`` is a short key for bad-row statistics, ``file``
    and ``row`` (the row's index in that file) say where it is when known."""

    def __init__(self, reason: str, message: str, *, file: str = "", row: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.file = file
        self.row = row


class BadImageError(BadRowError):
    """An image that cannot be used; ``reason`` is a short key for bad-row statistics."""


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of a PIL image (RGB images stay RGB)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """``image`` as RGB and the name of the mode it was converted from (None if already RGB).

    Transparent images (RGBA, LA, PA, P/L with a transparency key) are composited on
    white; 16/32-bit and float grayscale are rescaled to 8 bits; CMYK/YCbCr/L/1 convert.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("P", "L", "1", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB"), mode
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            hi = 65535.0
        elif image.mode == "F":
            hi = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
        else:  # 32-bit integer: 16-bit data (PNG) is the common case
            hi = 65535.0 if arr.size and float(arr.max()) > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB"), mode
    return image.convert("RGB"), mode


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Decode encoded image bytes to an RGB PIL image, returning ``(image, converted_from)``.

    Raises :class:`BadImageError` with reason ``too_large`` (above ``max_pixels`` or a PIL
    decompression bomb), ``truncated_image`` or ``corrupt_image``. EXIF orientation is applied.
    """
    if not data:
        raise BadImageError("corrupt_image", "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImageError(
                    "too_large", f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
                )
            im.load()
            if getattr(im, "getexif", None) is not None and im.getexif().get(0x0112, 1) != 1:
                im = ImageOps.exif_transpose(im)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as e:
        reason = "truncated_image" if "truncat" in str(e).lower() else "corrupt_image"
        raise BadImageError(reason, f"cannot decode image: {e}") from e
    return to_rgb(im)


class LazyImages(Mapping[str, Image.Image]):
    """Named extra images of a record, kept as PNG bytes and decoded (RGB) on first access."""

    def __init__(self, encoded: Mapping[str, bytes]) -> None:
        self._encoded = dict(encoded)
        self._decoded: dict[str, Image.Image] = {}

    def __getitem__(self, name: str) -> Image.Image:
        if name not in self._decoded:
            self._decoded[name] = decode_image(self._encoded[name])[0]
        return self._decoded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._encoded)

    def __len__(self) -> int:
        return len(self._encoded)

    def png_bytes(self, name: str) -> bytes:
        """The stored encoded bytes of image ``name`` (no decoding)."""
        return self._encoded[name]

    def __repr__(self) -> str:
        return f"LazyImages({sorted(self._encoded)})"


# --------------------------------------------------------------------------- rows


def default_tasks(record: DocRecord) -> list[str]:
    """The tasks a plain record supports: ``caption`` (image+text), ``text`` or ``image``."""
    if record.image is not None and record.text is not None:
        return ["caption"]
    if record.text is not None:
        return ["text"]
    if record.image is not None:
        return ["image"]
    return []


def record_to_row(record: DocRecord) -> dict[str, Any]:
    """One on-disk row of ``record``: PNG bytes for images, JSON for meta.

    ``record.meta["images"]`` (a mapping name -> PIL image or PNG bytes) becomes one binary
    column per name; the rest of ``meta`` is stored as JSON (it must be JSON-serializable).
    ``meta["tasks"]`` defaults to :func:`default_tasks`.
    """
    if not isinstance(record.id, str) or not record.id:
        raise ValueError(f"record id must be a non-empty string, got {record.id!r}")
    meta = dict(record.meta)
    images = meta.pop("images", None) or {}
    meta.setdefault("tasks", default_tasks(record))
    row: dict[str, Any] = {
        "id": record.id,
        "image": None if record.image is None else encode_png(record.image),
        "text": record.text,
        "meta": json.dumps(meta, separators=(",", ":")),
    }
    for name in images:
        if name in BASE_COLUMNS:
            raise ValueError(f"extra image name {name!r} clashes with a base column {BASE_COLUMNS}")
        value = images.png_bytes(name) if isinstance(images, LazyImages) else images[name]
        row[name] = value if isinstance(value, bytes) or value is None else encode_png(value)
    return row


# --------------------------------------------------------------------------- writing


def dataset_files(path: Path) -> set[str] | None:
    """The files a :class:`DatasetWriter` wrote in directory ``path`` (its manifest and the
    parts it lists), None if ``path`` holds no dataset manifest: the owner that
    :func:`cm3leon.workspace.check_replaceable` is given before a dataset is replaced."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return {MANIFEST, *(str(p.get("file")) for p in manifest.get("parts", []) if isinstance(p, dict))}



class DatasetWriter:
    """Writes a dataset directory; the directory appears only when :meth:`close` succeeds.

    Rows are buffered and flushed as ``part-NNNNN.parquet`` every ``rows_per_part`` rows into
    a hidden temporary directory next to ``out``, which is renamed to ``out`` at the end.
    Use as a context manager; on an exception the temporary directory is removed.
    ``overwrite`` replaces an existing dataset, never a directory holding anything else
    (:class:`cm3leon.workspace.NotOwnedError`, checked here and again before the swap).
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        source: Any = None,
        seed: int | None = None,
        rows_per_part: int = ROWS_PER_PART,
        overwrite: bool = False,
        extra_manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if rows_per_part <= 0:
            raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
        self.out = Path(out)
        if self.out.exists() and not overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ValueError(
                f"{self.out} already exists; choose another output path or pass overwrite=True (--overwrite)"
            )
        if overwrite:
            check_replaceable(self.out, dataset_files)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        self.source, self.seed, self.rows_per_part = source, seed, rows_per_part
        self.overwrite = overwrite
        self.extra_manifest = dict(extra_manifest or {})
        self._buf: list[dict[str, Any]] = []
        self._parts: list[dict[str, Any]] = []
        self._image_columns: list[str] = ["image"]
        self._task_counts: Counter[str] = Counter()
        self._n = 0
        self._closed = False

    def add(self, record: DocRecord) -> None:
        """Append one record."""
        self.add_row(record_to_row(record))

    def add_row(self, row: Mapping[str, Any]) -> None:
        """Append one already-encoded row (see :func:`record_to_row`)."""
        if self._closed:
            raise ValueError("DatasetWriter is closed")
        missing = [c for c in BASE_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row is missing columns {missing}; build rows with record_to_row()")
        for name in row:
            if name not in BASE_COLUMNS and name not in self._image_columns:
                self._image_columns.append(name)
        self._task_counts.update(json.loads(row["meta"]).get("tasks", []))
        self._buf.append(dict(row))
        self._n += 1
        if len(self._buf) >= self.rows_per_part:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = f"part-{len(self._parts):05d}.parquet"
        cols: dict[str, pa.Array] = {
            "id": pa.array([r["id"] for r in self._buf], pa.string()),
            "image": pa.array([r["image"] for r in self._buf], pa.binary()),
            "text": pa.array([r["text"] for r in self._buf], pa.string()),
            "meta": pa.array([r["meta"] for r in self._buf], pa.string()),
        }
        for c in self._image_columns[1:]:
            cols[c] = pa.array([r.get(c) for r in self._buf], pa.binary())
        table = pa.table(cols)
        tmp = self._tmp / f".{name}.tmp"
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")
        os.replace(tmp, self._tmp / name)
        self._parts.append({"file": name, "n": len(self._buf)})
        self._buf = []

    def close(self) -> Path:
        """Flush, write the manifest and move the dataset into place; returns its path."""
        if self._closed:
            return self.out
        self._flush()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "n": self._n,
            "columns": list(BASE_COLUMNS) + self._image_columns[1:],
            "image_columns": list(self._image_columns),
            "tasks": sorted(self._task_counts),
            "task_counts": dict(sorted(self._task_counts.items())),
            "source": self.source,
            "seed": self.seed,
            "parts": self._parts,
            **self.extra_manifest,
        }
        atomic_write_text(self._tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        try:
            check_replaceable(self.out, dataset_files)  # files may have arrived while writing
        except BaseException:
            self.abort()
            raise
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self._tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._closed = True
        log.info("wrote %d records in %d parts to %s", self._n, len(self._parts), self.out)
        return self.out

    def abort(self) -> None:
        """Discard everything written so far."""
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_dataset(
    out: str | os.PathLike[str],
    records: Iterable[DocRecord],
    *,
    source: Any = None,
    seed: int | None = None,
    rows_per_part: int = ROWS_PER_PART,
    overwrite: bool = False,
) -> Path:
    """Write ``records`` as a dataset directory at ``out`` (atomically) and return its path."""
    with DatasetWriter(out, source=source, seed=seed, rows_per_part=rows_per_part, overwrite=overwrite) as w:
        for rec in records:
            w.add(rec)
        skipped = getattr(getattr(records, "stats", None), "skipped", None)
        if skipped is not None:  # a Source: its bad-row counts by reason go into the manifest
            w.extra_manifest["skipped"] = dict(sorted(skipped.items()))
    return w.out


# --------------------------------------------------------------------------- reading


def is_dataset_dir(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a directory holding a cm3leon dataset manifest."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        return False
    try:
        return json.loads((p / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of the dataset at ``path``."""
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir():
        raise FileNotFoundError(f"dataset directory {p} does not exist")
    if not mf.is_file():
        raise FileNotFoundError(
            f"{p} has no {MANIFEST}: not a cm3leon dataset (create one with `cm3leon data shapes` "
            "or read raw data with cm3leon.data.sources.open_source)"
        )
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        raise ValueError(f"{mf} is not valid JSON ({e}); regenerate the dataset") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mf} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{mf} has version {manifest.get('version')!r}; this cm3leon reads version {VERSION}"
        )
    for part in manifest.get("parts", []):
        if not (p / part["file"]).is_file():
            raise FileNotFoundError(f"dataset part {p / part['file']} listed in the manifest is missing")
    return manifest


class Dataset(Sequence[DocRecord]):
    """Random access (``ds[i]``, ``len(ds)``) and streaming (``iter(ds)``) over a dataset dir.

    ``columns`` restricts which columns are read (``id`` always is); e.g.
    ``Dataset(d, columns=["text"])`` skips image decoding entirely. Rows are read a parquet
    row group at a time and the last group is cached, so sequential indexing is cheap.
    """

    def __init__(self, path: str | os.PathLike[str], *, columns: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        all_cols = list(self.manifest["columns"])
        if columns is None:
            cols = all_cols
        else:
            unknown = [c for c in columns if c not in all_cols]
            if unknown:
                raise ValueError(f"unknown columns {unknown}; this dataset has {all_cols}")
            cols = ["id"] + [c for c in columns if c != "id"]
        self.columns = cols
        self.image_columns = [c for c in self.manifest.get("image_columns", ["image"]) if c != "image"]
        self._parts = [self.path / p["file"] for p in self.manifest["parts"]]
        self._offsets = np.cumsum([0] + [p["n"] for p in self.manifest["parts"]])
        self._files: dict[int, pq.ParquetFile] = {}
        self._pid = os.getpid()
        self._cache_key: tuple[int, int] | None = None
        self._cache: dict[str, list[Any]] | None = None
        self._group_starts: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.manifest["n"])

    @property
    def tasks(self) -> dict[str, int]:
        """Per-task record counts from the manifest."""
        return dict(self.manifest.get("task_counts", {}))

    def _file(self, k: int) -> pq.ParquetFile:
        if os.getpid() != self._pid:  # forked into a worker: do not share file handles
            self._files, self._pid, self._cache_key, self._cache = {}, os.getpid(), None, None
        if k not in self._files:
            self._files[k] = pq.ParquetFile(self._parts[k])
        return self._files[k]

    def _part_columns(self, f: pq.ParquetFile) -> list[str]:
        names = set(f.schema_arrow.names)
        return [c for c in self.columns if c in names]

    def _group(self, k: int, g: int) -> dict[str, list[Any]]:
        if self._cache_key != (k, g) or self._cache is None:
            f = self._file(k)
            self._cache = f.read_row_group(g, columns=self._part_columns(f)).to_pydict()
            self._cache_key = (k, g)
        return self._cache

    def _locate(self, i: int) -> tuple[int, int, int]:
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        if k not in self._group_starts:
            md = self._file(k).metadata
            self._group_starts[k] = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        starts = self._group_starts[k]
        local = i - int(self._offsets[k])
        g = int(np.searchsorted(starts, local, side="right") - 1)
        return k, g, local - int(starts[g])

    def __getitem__(self, i: int) -> DocRecord:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"Dataset indices must be integers, got {type(i).__name__}")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        k, g, r = self._locate(int(i))
        return self._row_to_record(self._group(k, g), r)

    def _row_to_record(self, cols: Mapping[str, list[Any]], r: int) -> DocRecord:
        rid = cols["id"][r]
        try:
            meta: dict[str, Any] = json.loads(cols["meta"][r]) if "meta" in cols and cols["meta"][r] else {}
        except (ValueError, RecursionError) as e:
            raise BadRowError("bad_meta", f"row {rid!r} of {self.path}: meta is not JSON ({e})") from e
        if not isinstance(meta, dict):
            raise BadRowError("bad_meta", f"row {rid!r} of {self.path}: meta is not a JSON object")
        image = None
        if cols.get("image") is not None and cols["image"][r] is not None:
            try:
                image = decode_image(cols["image"][r])[0]
            except BadImageError as e:
                raise BadImageError(e.reason, f"row {rid!r} of {self.path}: {e}") from e
        extras = {c: cols[c][r] for c in self.image_columns if c in cols and cols[c][r] is not None}
        if extras:
            meta["images"] = LazyImages(extras)
        return DocRecord(id=rid, text=cols["text"][r] if "text" in cols else None, image=image, meta=meta)

    def _groups(self) -> Iterator[dict[str, list[Any]]]:
        for k in range(len(self._parts)):
            f = self._file(k)
            for g in range(f.metadata.num_row_groups):
                yield f.read_row_group(g, columns=self._part_columns(f)).to_pydict()

    def __iter__(self) -> Iterator[DocRecord]:
        for cols in self._groups():
            for r in range(len(cols["id"])):
                yield self._row_to_record(cols, r)

    def iter_checked(self) -> Iterator[DocRecord | BadRowError]:
        """Like ``iter(ds)``, but never raises for bad data: a row whose image or meta cannot be
        decoded yields its :class:`BadRowError` (``reason`` says why, ``file``/``row`` where), and a
        part that cannot be read yields one ``corrupt_file`` error per row of it not read (its
        count from the manifest), so every row of the manifest gives exactly one item."""
        for k, part in enumerate(self._parts):
            expected, done = int(self.manifest["parts"][k]["n"]), 0
            error: Exception | None = None
            try:
                f = self._file(k)
                n_groups = f.metadata.num_row_groups
            except (OSError, ValueError, pa.ArrowException) as e:
                error, n_groups = e, 0
            for g in range(n_groups):
                try:
                    cols = f.read_row_group(g, columns=self._part_columns(f)).to_pydict()
                except (OSError, ValueError, pa.ArrowException) as e:
                    error = e
                    break
                for r in range(len(cols["id"])):
                    item: DocRecord | BadRowError
                    try:
                        item = self._row_to_record(cols, r)
                    except BadRowError as e:
                        e.file, e.row = part.name, done
                        item = e
                    done += 1
                    yield item
            if error is not None:
                left = max(expected - done, 1)
                log.warning("cannot read dataset part %s (%s); counting its %d unread rows as corrupt_file",
                            part, error, left)
                for r in range(done, done + left):
                    yield BadRowError("corrupt_file", f"{part}: {error}", file=part.name, row=r)

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """Raw rows (bytes and JSON strings, nothing decoded) of the selected columns."""
        for k in range(len(self._parts)):
            f = self._file(k)
            for batch in f.iter_batches(columns=self._part_columns(f)):
                yield from batch.to_pylist()

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, n={len(self)}, columns={self.columns})"


def read_dataset(path: str | os.PathLike[str], *, columns: Sequence[str] | None = None) -> Iterator[DocRecord]:
    """Stream the records of the dataset at ``path`` in row order."""
    return iter(Dataset(path, columns=columns))
