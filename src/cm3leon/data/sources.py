"""Readers for users' data, all streaming :class:`DocRecord`s.

Supported layouts (auto-detected by :func:`open_source`):

* ``dataset``    - a cm3leon dataset directory (``manifest.json`` + parquet parts)
* ``folder``     - a folder of images with captions in ``captions.jsonl`` (``{"file", "text"}``
                   per line, ``file`` relative to the folder) or a sidecar ``<stem>.txt`` per image
* ``coco``       - a COCO captions annotation JSON plus its image folder; one record per image
                   with its first caption as text and all captions in ``meta["captions"]``
* ``webdataset`` - tar shards in the img2dataset layout (``key.jpg`` + ``key.txt``/``key.json``)
* ``parquet``    - parquet files with an image-bytes column (binary, or an HF ``{bytes, path}``
                   struct) and a text column; column names can be given

Bad rows (corrupt/truncated images, missing captions, images above ``max_pixels``) are
skipped and counted by reason in ``source.stats``; one bad row never stops a run, and a
summary is logged when iteration ends. Non-RGB images are converted (transparent ones
composited on white) and the conversions are counted too.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from cm3leon.data.dataset import MAX_PIXELS, BadImageError, Dataset, decode_image, is_dataset_dir
from cm3leon.data.records import DocRecord

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCE_KINDS = ("dataset", "folder", "coco", "webdataset", "parquet")
_IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "png", "image_bytes", "jpeg", "webp")
_TEXT_COLUMN_GUESSES = ("text", "caption", "captions", "sentence", "TEXT", "prompt", "txt")


@dataclass
class SourceStats:
    """Counts of one pass over a source: rows yielded, rows skipped by reason, images converted
    to RGB by original mode."""

    ok: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    converted: Counter[str] = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: ``"1000 ok, 3 skipped (corrupt_image: 2, missing_caption: 1), converted: RGBA 5"``."""
        text = f"{self.ok} ok, {self.n_skipped} skipped"
        if self.skipped:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.converted:
            text += ", converted to RGB: " + ", ".join(f"{k} {v}" for k, v in sorted(self.converted.items()))
        return text


class Source:
    """A stream of DocRecords from some on-disk layout; iterate it, then read ``stats``.

    Each iteration starts fresh statistics. ``limit`` stops after that many good records.
    """

    kind = "source"

    def __init__(self, path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS,
                 require_text: bool = True, require_image: bool = True, limit: int | None = None) -> None:
        self.path = Path(path)
        self.max_pixels = max_pixels
        self.require_text = require_text
        self.require_image = require_image
        self.limit = limit
        self.stats = SourceStats()

    def _records(self) -> Iterator[DocRecord | str]:
        """Yield records, or a reason string for each bad row."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[DocRecord]:
        self.stats = SourceStats()
        try:
            for item in self._records():
                if isinstance(item, str):
                    self.stats.skipped[item] += 1
                    continue
                if self.require_text and not (item.text and item.text.strip()):
                    self.stats.skipped["missing_caption"] += 1
                    continue
                if self.require_image and item.image is None:
                    self.stats.skipped["missing_image"] += 1
                    continue
                self.stats.ok += 1
                yield item
                if self.limit is not None and self.stats.ok >= self.limit:
                    break
        finally:
            log.info("%s %s: %s", self.kind, self.path, self.stats.summary())

    def _decode(self, data: bytes | None, where: str) -> Image.Image | str:
        """Decoded RGB image, or the bad-row reason (logged at debug level)."""
        if data is None:
            return "missing_image"
        try:
            image, converted = decode_image(data, max_pixels=self.max_pixels)
        except BadImageError as e:
            log.debug("skipping %s: %s", where, e)
            return e.reason
        if converted:
            self.stats.converted[converted] += 1
        return image

    def _decode_file(self, path: Path) -> Image.Image | str:
        try:
            data = path.read_bytes()
        except OSError as e:
            log.debug("skipping %s: %s", path, e)
            return "unreadable_file"
        return self._decode(data, str(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class DatasetSource(Source):
    """A cm3leon dataset directory (see :mod:`cm3leon.data.dataset`)."""

    kind = "dataset"

    def __init__(self, path: str | os.PathLike[str], **opts: Any) -> None:
        opts.setdefault("require_text", False)
        opts.setdefault("require_image", False)
        super().__init__(path, **opts)
        self.dataset = Dataset(self.path)

    def _records(self) -> Iterator[DocRecord | str]:
        for item in self.dataset.iter_checked():
            if isinstance(item, BadImageError):
                log.debug("skipping %s", item)
                yield item.reason
            else:
                yield item


def _read_captions_jsonl(path: Path) -> tuple[dict[str, str], int]:
    caps: dict[str, str] = {}
    bad = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                caps[str(obj["file"])] = obj["text"]
            except (ValueError, KeyError, TypeError):
                bad += 1
    return caps, bad


class FolderSource(Source):
    """Images under a folder (recursively, sorted) with ``captions.jsonl`` or sidecar ``.txt`` captions."""

    kind = "folder"

    def __init__(self, path: str | os.PathLike[str], *, captions: str | os.PathLike[str] | None = None,
                 **opts: Any) -> None:
        super().__init__(path, **opts)
        if not self.path.is_dir():
            raise FileNotFoundError(f"image folder {self.path} does not exist")
        cap = Path(captions) if captions is not None else self.path / "captions.jsonl"
        if captions is not None and not cap.is_file():
            raise FileNotFoundError(f"captions file {cap} does not exist")
        self.captions_file = cap if cap.is_file() else None

    def _records(self) -> Iterator[DocRecord | str]:
        caps: dict[str, str] = {}
        if self.captions_file is not None:
            caps, bad = _read_captions_jsonl(self.captions_file)
            for _ in range(bad):
                yield "bad_caption_line"
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for p in files:
            rel = p.relative_to(self.path).as_posix()
            text = caps.get(rel)
            if text is None:
                side = p.with_suffix(".txt")
                if side.is_file():
                    text = side.read_text(encoding="utf-8", errors="replace").strip()
            if text is None and self.require_text:
                yield "missing_caption"
                continue
            image = self._decode_file(p)
            if isinstance(image, str):
                yield image
                continue
            yield DocRecord(id=rel, text=text, image=image, meta={"file": rel})


def _guess_coco_images(ann: Path, data: dict[str, Any]) -> Path:
    """The image folder for a COCO annotation file: ``../<split>``, ``../images/<split>``, or next to it."""
    m = re.search(r"(train|val|test)(\d{4})", ann.stem)
    candidates = []
    if m:
        split = m.group(0)
        candidates += [ann.parent.parent / split, ann.parent.parent / "images" / split, ann.parent / split,
                       ann.parent / "images" / split]
    candidates += [ann.parent / "images", ann.parent]
    first = next((im.get("file_name") for im in data.get("images", [])), None)
    for c in candidates:
        if c.is_dir() and (first is None or (c / first).is_file()):
            return c
    raise FileNotFoundError(
        f"cannot find the image folder for {ann}; looked in {[str(c) for c in candidates]}. "
        "Pass images=<folder> (--images on the CLI)"
    )


class CocoSource(Source):
    """COCO captions: one record per image, its first caption as text, all in ``meta["captions"]``."""

    kind = "coco"

    def __init__(self, path: str | os.PathLike[str], *, images: str | os.PathLike[str] | None = None,
                 **opts: Any) -> None:
        super().__init__(path, **opts)
        if not self.path.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.path} does not exist")
        try:
            self._data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{self.path} is not valid JSON: {e}") from e
        if not isinstance(self._data, dict) or "images" not in self._data or "annotations" not in self._data:
            raise ValueError(f"{self.path} is not a COCO captions file: it needs 'images' and 'annotations' lists")
        self.images = Path(images) if images is not None else _guess_coco_images(self.path, self._data)
        if not self.images.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.images} does not exist")

    def _records(self) -> Iterator[DocRecord | str]:
        caps: dict[Any, list[str]] = {}
        for a in self._data["annotations"]:
            if isinstance(a, dict) and "image_id" in a and isinstance(a.get("caption"), str):
                caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        for im in self._data["images"]:
            if not isinstance(im, dict) or "file_name" not in im:
                yield "bad_annotation"
                continue
            all_caps = caps.get(im.get("id"), [])
            if not all_caps and self.require_text:
                yield "missing_caption"
                continue
            image = self._decode_file(self.images / im["file_name"])
            if isinstance(image, str):
                yield "missing_image" if image == "unreadable_file" else image
                continue
            yield DocRecord(
                id=str(im.get("id", im["file_name"])), text=all_caps[0] if all_caps else None, image=image,
                meta={"file": im["file_name"], "captions": all_caps, "coco_id": im.get("id")},
            )


def _expand_braces(pattern: str) -> list[str]:
    """``shard-{000..003}.tar`` -> four names (the WebDataset brace notation)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out += _expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset key and extension: ``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); the key ends
    at the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower() if dot else ""


class WebDatasetSource(Source):
    """WebDataset tar shards (img2dataset layout): a ``.tar`` file, a folder of them, a glob, or
    brace notation ``shard-{00000..00009}.tar``. Text comes from ``.txt`` or the ``caption``/``text``
    key of ``.json``; the ``.json`` is kept in ``meta["json"]``."""

    kind = "webdataset"

    def __init__(self, path: str | os.PathLike[str], **opts: Any) -> None:
        super().__init__(path, **opts)
        spec = str(path)
        if Path(spec).is_dir():
            shards = sorted(str(p) for p in Path(spec).glob("*.tar"))
        else:
            shards = sorted(s for pat in _expand_braces(spec) for s in (glob.glob(pat) or [pat]))
        missing = [s for s in shards if not Path(s).is_file()]
        if missing or not shards:
            raise FileNotFoundError(f"WebDataset shards not found: {missing[:3] or spec}")
        self.shards = shards

    def _samples(self, shard: str) -> Iterator[dict[str, Any] | str]:
        current: dict[str, Any] = {}
        key = None
        try:
            with tarfile.open(shard, mode="r|*") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    k, ext = _split_key(member.name)
                    if k != key and current:
                        yield current
                        current = {}
                    key = k
                    fh = tf.extractfile(member)
                    current["__key__"] = k
                    current[ext] = fh.read() if fh is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("shard %s is truncated or corrupt (%s); keeping the samples read before it", shard, e)
            current = {}  # the sample in progress may be partial
            yield "corrupt_shard"
        if current:
            yield current

    def _records(self) -> Iterator[DocRecord | str]:
        for shard in self.shards:
            for s in self._samples(shard):
                if isinstance(s, str):
                    yield s
                    continue
                ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif") if e in s), None)
                meta: dict[str, Any] = {"shard": Path(shard).name, "key": s["__key__"]}
                text = s["txt"].decode("utf-8", errors="replace").strip() if "txt" in s else None
                if "json" in s:
                    try:
                        meta["json"] = json.loads(s["json"])
                    except ValueError:
                        meta["json"] = None
                    if text is None and isinstance(meta["json"], dict):
                        text = meta["json"].get("caption") or meta["json"].get("text")
                if text is None and self.require_text:
                    yield "missing_caption"
                    continue
                if ext is None:
                    yield "missing_image"
                    continue
                image = self._decode(s[ext], f"{shard}:{s['__key__']}")
                if isinstance(image, str):
                    yield image
                    continue
                yield DocRecord(id=s["__key__"], text=text, image=image, meta=meta)


def _pick_column(names: Sequence[str], wanted: str | None, guesses: Sequence[str], what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{path} has no column {wanted!r} for the {what}; its columns are {list(names)}")
        return wanted
    for g in guesses:
        if g in names:
            return g
    raise ValueError(
        f"cannot tell which column of {path} holds the {what} (columns: {list(names)}); "
        f"name it with {what}_column=... (--{what}-column on the CLI)"
    )


class ParquetSource(Source):
    """Parquet files (a file, a folder of ``*.parquet``, or a glob) with an image column holding
    encoded bytes or an HF ``{bytes, path}`` struct, and a text column; names are guessed
    (image/img/jpg..., text/caption...) unless given."""

    kind = "parquet"

    def __init__(self, path: str | os.PathLike[str], *, image_column: str | None = None,
                 text_column: str | None = None, id_column: str | None = None, **opts: Any) -> None:
        super().__init__(path, **opts)
        p = Path(path)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else sorted(Path(f) for f in glob.glob(str(path)))
        if not files:
            raise FileNotFoundError(f"no parquet files at {path}")
        self.files = files
        names = pq.ParquetFile(files[0]).schema_arrow.names
        self.image_column = _pick_column(names, image_column, _IMAGE_COLUMN_GUESSES, "image", files[0])
        self.text_column = _pick_column(names, text_column, _TEXT_COLUMN_GUESSES, "text", files[0])
        self.id_column = id_column
        if id_column is not None and id_column not in names:
            raise ValueError(f"{files[0]} has no id column {id_column!r}; its columns are {list(names)}")

    def _image_bytes(self, value: Any, base: Path) -> bytes | None:
        if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                p = Path(value["path"])
                p = p if p.is_absolute() else base / p
                return p.read_bytes() if p.is_file() else None
            return None
        return value

    def _records(self) -> Iterator[DocRecord | str]:
        cols = [self.image_column, self.text_column] + ([self.id_column] if self.id_column else [])
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                batches = pf.iter_batches(columns=cols, batch_size=256)
                row = 0
                for batch in batches:
                    for rec in batch.to_pylist():
                        rid = str(rec[self.id_column]) if self.id_column else f"{f.stem}-{row}"
                        row += 1
                        text = rec[self.text_column]
                        if isinstance(text, list):  # several captions per row: keep the first
                            text = text[0] if text else None
                        if text is None and self.require_text:
                            yield "missing_caption"
                            continue
                        image = self._decode(self._image_bytes(rec[self.image_column], f.parent), rid)
                        if isinstance(image, str):
                            yield image
                            continue
                        yield DocRecord(id=rid, text=text, image=image, meta={"file": f.name, "row": row - 1})
            except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
                log.warning("cannot read parquet file %s (%s); skipping the rest of it", f, e)
                yield "corrupt_file"


_KINDS: dict[str, type[Source]] = {
    "dataset": DatasetSource,
    "folder": FolderSource,
    "coco": CocoSource,
    "webdataset": WebDatasetSource,
    "parquet": ParquetSource,
}


def detect_kind(path: str | os.PathLike[str]) -> str:
    """Which of :data:`SOURCE_KINDS` ``path`` is, judged from names and a peek at the files."""
    spec = str(path)
    p = Path(spec)
    if p.is_dir():
        if is_dataset_dir(p):
            return "dataset"
        if (p / "manifest.json").is_file():
            raise ValueError(f"{p}/manifest.json is not a cm3leon dataset manifest")
        names = [c.name.lower() for c in p.iterdir()]
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith(IMAGE_EXTENSIONS) for n in names) or any(c.is_dir() for c in p.iterdir()):
            return "folder"
        raise ValueError(f"{p} holds no images, .tar shards, .parquet files or manifest.json; nothing to read")
    low = spec.lower()
    if low.endswith(".json"):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
        return "coco"
    if low.endswith(".tar") or "{" in spec:
        return "webdataset"
    if low.endswith(".parquet"):
        return "parquet"
    if not p.exists() and not glob.glob(spec):
        raise FileNotFoundError(f"{spec} does not exist")
    raise ValueError(
        f"cannot tell what kind of data {spec} is; pass kind= one of {SOURCE_KINDS} "
        "(a dataset/image/tar/parquet folder, a COCO .json, a .tar shard or a .parquet file)"
    )


def open_source(path: str | os.PathLike[str], *, kind: str | None = None, **opts: Any) -> Source:
    """Open any supported layout as a :class:`Source` (``kind`` forces one of :data:`SOURCE_KINDS`).

    Options: ``max_pixels``, ``require_text``, ``require_image``, ``limit`` for every kind;
    ``captions`` (folder), ``images`` (coco), ``image_column``/``text_column``/``id_column`` (parquet).
    """
    kind = kind or detect_kind(path)
    if kind not in _KINDS:
        raise ValueError(f"unknown source kind {kind!r}; choose one of {SOURCE_KINDS}")
    cls = _KINDS[kind]
    return cls(path, **opts)


def image_to_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encoded bytes of ``image`` (used to build fixtures and exports)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()
