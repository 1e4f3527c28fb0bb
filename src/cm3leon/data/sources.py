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

Bad rows never stop a run. Every field is type-checked; a row that cannot be used is skipped
and counted under a named reason in ``source.stats.skipped``, and the first few places of each
reason (file, line, key, row) are kept in ``source.stats.where``; a bad line or an unreadable
file is counted and the rest is read. The reasons:

==========================  ===============================================================
``corrupt_image``           image bytes that do not decode (``truncated_image``: cut short;
                            ``too_large``: above ``max_pixels``)
``missing_image``           no image for the row (an empty column, a file that is not there)
``unreadable_file``         an image or caption file that exists but cannot be read
``missing_caption``         no non-empty caption while ``require_text`` is set
``bad_caption_type``        a caption that is not a string (a number, a struct, a list of non-strings)
``bad_caption_encoding``    a caption file or bytes value that is not UTF-8 (sidecar ``.txt``,
                            a shard's ``.txt``, a binary text column), or a caption with a lone
                            surrogate (a JSON ``"\\ud800"`` escape): skipped, never guessed
``bad_caption_line``        a ``captions.jsonl`` line that is not UTF-8 JSON ``{"file": str, "text": ...}``
``bad_annotation``          a COCO image or annotation entry of the wrong shape or field types
``orphan_caption``          a COCO caption whose ``image_id`` names no image
``path_outside_root``       a file name (COCO ``file_name``, an HF ``path``, a ``captions.jsonl``
                            ``file``) that is absolute or climbs out with ``..``: refused, never opened
``bad_image_type``          a parquet image value that is neither bytes nor an HF ``{bytes, path}`` struct
``missing_columns``         a parquet file without the image/text/id columns: each of its rows
``corrupt_file``            a parquet file (or dataset part) that cannot be read: each row not read
                            where the count is known, else 1
``corrupt_shard``           a tar shard that is truncated or corrupt (the samples before it are kept)
``bad_meta``                a dataset row whose ``meta`` is not a JSON object
==========================  ===============================================================

When iteration ends, :meth:`SourceStats.summary` (counts by reason, with the first places of
each) is logged, at WARNING level if anything was skipped. A source that yields no usable row
raises :class:`NoGoodRowsError` (a ``ValueError``) at the end, in one line naming the most
common reason and its fix. Non-RGB images are converted (transparent ones composited on
white) and the conversions are counted too. Symbolic links inside the data root are
followed: only the names written in the data are confined to it.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import ntpath
import os
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cm3leon.data.dataset import MAX_PIXELS, BadImageError, BadRowError, Dataset, decode_image, is_dataset_dir
from cm3leon.data.records import DocRecord

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCE_KINDS = ("dataset", "folder", "coco", "webdataset", "parquet")
_IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "png", "image_bytes", "jpeg", "webp")
_TEXT_COLUMN_GUESSES = ("text", "caption", "captions", "sentence", "TEXT", "prompt", "txt")
# Errors pyarrow raises for unreadable or corrupt parquet files.
_PARQUET_ERRORS = (OSError, ValueError, pa.ArrowException)
# How many places of each skip reason the summary names.
MAX_WHERE = 3

# What to do about each reason, for the message of a source with no usable row.
FIXES: dict[str, str] = {
    "corrupt_image": "re-download or re-encode the images named",
    "truncated_image": "re-download the images named (they are cut short)",
    "too_large": "downscale the images or raise max_pixels=",
    "missing_image": "check that the image files exist under the data root (COCO: --images; "
                     "parquet: --image-column)",
    "unreadable_file": "check the permissions of the files named",
    "missing_caption": "give every image a caption (captions.jsonl, a sidecar .txt, a .txt/.json in the "
                       "shard, --text-column) or read with require_text=False",
    "bad_caption_type": "captions must be strings: fix the rows named (parquet: or choose another --text-column)",
    "bad_caption_encoding": "save the caption files as UTF-8",
    "bad_caption_line": 'make each line of captions.jsonl a UTF-8 JSON object {"file": "<path>", "text": "<caption>"}',
    "bad_annotation": 'COCO needs "images": [{"id", "file_name": "<relative path>"}] and '
                      '"annotations": [{"image_id", "caption": "<text>"}]',
    "orphan_caption": "every annotation's image_id must be the id of an entry of images",
    "path_outside_root": "file names must be relative paths inside the data root (no leading / and no ..)",
    "bad_image_type": "the image column must hold encoded image bytes or an HF {bytes, path} struct "
                      "(choose it with --image-column)",
    "missing_columns": "every parquet file needs the image and text columns (--image-column, --text-column)",
    "corrupt_file": "re-export or re-download the files named",
    "corrupt_shard": "re-download the shards named",
    "bad_meta": "regenerate the dataset",
}


class Skip(NamedTuple):
    """One bad row (or ``count`` rows): its reason and where it is, as ``file`` plus a ``unit``
    and ``key`` inside it (``("captions.jsonl", "line", "4")``); ``detail`` says what was wrong
    and is logged at debug level."""

    reason: str
    file: str = ""
    unit: str = ""
    key: str = ""
    detail: str = ""
    count: int = 1


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class SourceStats:
    """Counts of one pass over a source: rows yielded, rows skipped by reason (with the first
    :data:`MAX_WHERE` places of each in ``where``), images converted to RGB by original mode."""

    ok: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    converted: Counter[str] = field(default_factory=Counter)
    where: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    unlisted: Counter[str] = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, skip: Skip) -> None:
        """Count ``skip`` and remember its place if it is among the first of its reason."""
        if skip.count <= 0:
            return
        self.skipped[skip.reason] += skip.count
        place = (_clip(skip.file), skip.unit, _clip(skip.key, 40))
        seen = self.where.get(skip.reason, [])
        if place in seen:
            return
        if any(place) and len(seen) < MAX_WHERE:
            self.where[skip.reason] = [*seen, place]
        else:
            self.unlisted[skip.reason] += 1

    def places(self, reason: str) -> str:
        """The first places of ``reason``: ``"captions.jsonl lines 4, 9; a.png; ..."``."""
        groups: dict[tuple[str, str], list[str]] = {}
        for file, unit, key in self.where.get(reason, []):
            groups.setdefault((file, unit), []).append(key)
        parts = []
        for (file, unit), keys in groups.items():
            keys = [k for k in keys if k]
            label = unit + ("s" if len(keys) > 1 else "") if unit and keys else ""
            parts.append(" ".join(x for x in (file, label, ", ".join(keys)) if x))
        if parts and self.unlisted[reason]:
            parts.append("...")
        return "; ".join(parts)

    def by_count(self) -> list[tuple[str, int]]:
        """``(reason, count)``, most common first."""
        return sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))

    def summary(self) -> str:
        """One line: ``"1000 ok, 3 skipped (corrupt_image: 2 [a.jpg; b.jpg], missing_caption: 1
        [captions.jsonl line 7]), converted to RGB: RGBA 5"``."""
        text = f"{self.ok} ok, {self.n_skipped} skipped"
        if self.skipped:
            items = []
            for reason, n in self.by_count():
                places = self.places(reason)
                items.append(f"{reason}: {n}" + (f" [{places}]" if places else ""))
            text += " (" + ", ".join(items) + ")"
        if self.converted:
            text += ", converted to RGB: " + ", ".join(f"{k} {v}" for k, v in sorted(self.converted.items()))
        return text


class NoGoodRowsError(ValueError):
    """A source that yielded no usable row; the message names the most common reason and its fix."""


def no_good_rows_message(path: str | os.PathLike[str], stats: SourceStats) -> str:
    """One line saying that ``path`` gave no usable row, why (the most common reason) and what to do."""
    if not stats.skipped:
        return f"{path}: no rows to read: it holds no records (check the path, or force a layout with kind=/--kind)"
    reason, n = stats.by_count()[0]
    places = stats.places(reason)
    others = ", ".join(f"{r}: {k}" for r, k in stats.by_count()[1:])
    return (
        f"{path}: no usable rows: all {stats.n_skipped} skipped, most often {reason} "
        f"({n}{' at ' + places if places else ''}{'; also ' + others if others else ''}); "
        f"fix: {FIXES.get(reason, 'see the reasons in cm3leon.data.sources')}"
    )


def _relative_inside(name: str) -> str | None:
    """``name`` normalized, if it is a relative path that stays inside its root; None if it is
    absolute (``/x``, ``C:\\x``, ``\\\\host\\x``) or climbs out with ``..`` (``/`` or ``\\`` separated)."""
    if posixpath.isabs(name) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        return None
    for probe in (name, name.replace("\\", "/")):
        norm = posixpath.normpath(probe)
        if norm == ".." or norm.startswith("../"):
            return None
    return posixpath.normpath(name)


def _json_kind(value: Any) -> str:
    """The JSON name of ``value``'s type, for messages: null, boolean, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _encodable(text: str) -> bool:
    """Whether ``text`` can be stored as UTF-8 (JSON's ``"\\ud800"`` escapes decode to lone surrogates that cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _record_where(rec: DocRecord) -> Skip:
    """The place of a record, from the keys sources put in its meta."""
    meta = rec.meta if isinstance(rec.meta, Mapping) else {}
    if "shard" in meta:
        return Skip("", str(meta["shard"]), "key", str(rec.id))
    if "file" in meta and "row" in meta:
        return Skip("", str(meta["file"]), "row", str(meta["row"]))
    return Skip("", str(meta.get("file", rec.id)))


class Source:
    """A stream of DocRecords from some on-disk layout; iterate it, then read ``stats``.

    Each iteration starts fresh statistics. ``limit`` stops after that many good records.
    An iteration that ends with no good record raises :class:`NoGoodRowsError`.
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

    def _records(self) -> Iterator[DocRecord | Skip | str]:
        """Yield records, or a :class:`Skip` (or a bare reason string) for each bad row."""
        raise NotImplementedError

    def _skip(self, skip: Skip) -> None:
        self.stats.add(skip)
        if log.isEnabledFor(logging.DEBUG):
            place = " ".join(x for x in (skip.file, skip.unit, skip.key) if x) or str(self.path)
            log.debug("skipping %s (%s)%s", place, skip.reason, f": {skip.detail}" if skip.detail else "")

    def _check(self, rec: DocRecord) -> Skip | None:
        """The reason to skip a record a reader produced, if any."""
        if rec.text is not None and not isinstance(rec.text, str):
            return _record_where(rec)._replace(reason="bad_caption_type", detail=f"text is {_json_kind(rec.text)}")
        if self.require_text and not (rec.text and rec.text.strip()):
            return _record_where(rec)._replace(reason="missing_caption")
        if rec.text is not None and not _encodable(rec.text):
            return _record_where(rec)._replace(reason="bad_caption_encoding", detail="lone surrogate in the text")
        if self.require_image and rec.image is None:
            return _record_where(rec)._replace(reason="missing_image")
        return None

    def _empty_is_an_error(self) -> bool:
        """Whether an iteration with no row at all (nothing read, nothing skipped) is an error."""
        return True

    def __iter__(self) -> Iterator[DocRecord]:
        self.stats = SourceStats()
        finished = False
        try:
            for item in self._records():
                if isinstance(item, str):
                    item = Skip(item)
                if isinstance(item, Skip):
                    self._skip(item)
                    continue
                bad = self._check(item)
                if bad is not None:
                    self._skip(bad)
                    continue
                self.stats.ok += 1
                yield item
                if self.limit is not None and self.stats.ok >= self.limit:
                    break
            else:
                finished = True
        finally:
            level = logging.WARNING if self.stats.n_skipped else logging.INFO
            log.log(level, "%s %s: %s", self.kind, self.path, self.stats.summary())
        if finished and self.stats.ok == 0 and (self.stats.n_skipped or self._empty_is_an_error()):
            raise NoGoodRowsError(no_good_rows_message(self.path, self.stats))

    def _decode(self, data: bytes | None, where: Skip) -> Image.Image | Skip:
        """Decoded RGB image, or the bad-row :class:`Skip` (at the place ``where``)."""
        if data is None:
            return where._replace(reason="missing_image")
        try:
            image, converted = decode_image(data, max_pixels=self.max_pixels)
        except BadImageError as e:
            return where._replace(reason=e.reason, detail=str(e))
        if converted:
            self.stats.converted[converted] += 1
        return image

    def _decode_file(self, path: Path, where: Skip) -> Image.Image | Skip:
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            return where._replace(reason="missing_image", detail=str(e))
        except (OSError, ValueError) as e:  # ValueError: a name with a NUL byte
            return where._replace(reason="unreadable_file", detail=str(e))
        return self._decode(data, where)

    def _label(self, path: Path) -> str:
        """``path`` relative to the source's root when inside it, else its name."""
        root = self.path if self.path.is_dir() else self.path.parent
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return path.name

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

    def _empty_is_an_error(self) -> bool:
        return False  # a dataset of 0 rows is a valid dataset

    def _records(self) -> Iterator[DocRecord | Skip]:
        for item in self.dataset.iter_checked():
            if isinstance(item, BadRowError):
                row = "" if item.row is None else str(item.row)
                yield Skip(item.reason, item.file, "row" if row else "", row, detail=str(item))
            else:
                yield item


class FolderSource(Source):
    """Images under a folder (recursively, sorted) with ``captions.jsonl`` or sidecar ``.txt`` captions.

    ``captions.jsonl`` is read line by line: a line that is not UTF-8 JSON ``{"file": str,
    "text": ...}`` is a ``bad_caption_line``, a ``file`` outside the folder a ``path_outside_root``,
    a non-string ``text`` makes its image a ``bad_caption_type``, and a line naming no image
    under the folder a ``missing_image``. Sidecar ``.txt`` files must be UTF-8 (a BOM is
    allowed); others are skipped as ``bad_caption_encoding``.
    """

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

    def _read_captions(self, caps: dict[str, tuple[str | Skip | None, int]]) -> Iterator[Skip]:
        """Fill ``caps`` (image path -> (caption or its Skip, line)); yield the bad lines."""
        assert self.captions_file is not None
        label = self._label(self.captions_file)
        try:
            fh = self.captions_file.open("rb")
        except OSError as e:
            log.warning("cannot read captions file %s (%s)", self.captions_file, e)
            yield Skip("unreadable_file", label, detail=str(e))
            return
        with fh:
            for lineno, raw in enumerate(fh, 1):
                where = Skip("bad_caption_line", label, "line", str(lineno))
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield where._replace(detail=f"not UTF-8: {e}")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:
                    yield where._replace(detail=f"not JSON: {e}")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("file"), str) or "text" not in obj:
                    yield where._replace(detail='not a JSON object {"file": "<path>", "text": "<caption>"}')
                    continue
                rel = _relative_inside(obj["file"])
                if rel is None:
                    outside = f"file {obj['file']!r} is outside the folder"
                    yield where._replace(reason="path_outside_root", detail=outside)
                    continue
                text = obj["text"]
                if text is not None and not isinstance(text, str):
                    text = where._replace(reason="bad_caption_type", detail=f"text is {_json_kind(text)}")
                caps[rel] = (text, lineno)

    def _records(self) -> Iterator[DocRecord | Skip]:
        caps: dict[str, tuple[str | Skip | None, int]] = {}
        if self.captions_file is not None:
            yield from self._read_captions(caps)
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        seen: set[str] = set()
        for p in files:
            rel = p.relative_to(self.path).as_posix()
            seen.add(rel)
            where = Skip("", rel)
            text: str | Skip | None = None
            if rel in caps:
                text = caps[rel][0]
            else:
                side = p.with_suffix(".txt")
                if side.is_file():
                    text = self._read_sidecar(side)
            if isinstance(text, Skip):
                yield text
                continue
            if text is None and self.require_text:
                yield where._replace(reason="missing_caption")
                continue
            image = self._decode_file(p, where)
            if isinstance(image, Skip):
                yield image
                continue
            yield DocRecord(id=rel, text=text, image=image, meta={"file": rel})
        if self.captions_file is not None:
            label = self._label(self.captions_file)
            for rel, (_, lineno) in caps.items():
                if rel not in seen:
                    yield Skip("missing_image", label, "line", str(lineno), detail=f"no image {rel} under {self.path}")

    def _read_sidecar(self, side: Path) -> str | Skip:
        where = Skip("", self._label(side))
        try:
            return side.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            return where._replace(reason="bad_caption_encoding", detail=f"not UTF-8: {e}")
        except OSError as e:
            return where._replace(reason="unreadable_file", detail=str(e))


def _is_id(value: Any) -> bool:
    """A usable COCO id: an integer or a string (not a boolean, a list or null)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _first_file_name(images: Any) -> str | None:
    """The first usable ``file_name`` of a COCO ``images`` list."""
    for im in images if isinstance(images, list) else []:
        name = im.get("file_name") if isinstance(im, dict) else None
        if isinstance(name, str) and _relative_inside(name) is not None:
            return name
    return None


def _guess_coco_images(ann: Path, data: dict[str, Any]) -> Path:
    """The image folder for a COCO annotation file: ``../<split>``, ``../images/<split>``, or next to it."""
    m = re.search(r"(train|val|test)(\d{4})", ann.stem)
    candidates = []
    if m:
        split = m.group(0)
        candidates += [ann.parent.parent / split, ann.parent.parent / "images" / split, ann.parent / split,
                       ann.parent / "images" / split]
    candidates += [ann.parent / "images", ann.parent]
    first = _first_file_name(data.get("images"))
    for c in candidates:
        if c.is_dir() and (first is None or (c / first).is_file()):
            return c
    raise FileNotFoundError(
        f"cannot find the image folder for {ann}; looked in {[str(c) for c in candidates]}. "
        "Pass images=<folder> (--images on the CLI)"
    )


class CocoSource(Source):
    """COCO captions: one record per image, its first caption as text, all in ``meta["captions"]``.

    ``images`` and ``annotations`` must be lists (else the file is refused with a ValueError).
    An image entry needs an integer or string ``id`` (or none) and a string ``file_name``
    relative to the image folder; an annotation an integer or string ``image_id`` and a string
    ``caption``. Entries that break this are skipped and counted (``bad_annotation``,
    ``bad_caption_type``, ``path_outside_root``), as are captions of no listed image
    (``orphan_caption``); empty captions are dropped.
    """

    kind = "coco"

    def __init__(self, path: str | os.PathLike[str], *, images: str | os.PathLike[str] | None = None,
                 **opts: Any) -> None:
        super().__init__(path, **opts)
        if not self.path.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.path} does not exist")
        try:
            self._data = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{self.path} is not valid JSON: {e}") from e
        if not isinstance(self._data, dict) or "images" not in self._data or "annotations" not in self._data:
            raise ValueError(f"{self.path} is not a COCO captions file: it needs 'images' and 'annotations' lists")
        for key in ("images", "annotations"):
            if not isinstance(self._data[key], list):
                raise ValueError(
                    f"{self.path} is not a COCO captions file: {key!r} must be a list, "
                    f"got {_json_kind(self._data[key])}"
                )
        self.images = Path(images) if images is not None else _guess_coco_images(self.path, self._data)
        if not self.images.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.images} does not exist")

    def _records(self) -> Iterator[DocRecord | Skip]:
        name = self.path.name
        caps: dict[int | str, list[tuple[int, str]]] = {}
        for i, a in enumerate(self._data["annotations"]):
            where = Skip("bad_annotation", name, "annotation", f"#{i}")
            if not isinstance(a, dict) or not _is_id(a.get("image_id")):
                got = _json_kind(a.get("image_id")) if isinstance(a, dict) else _json_kind(a)
                yield where._replace(detail=f"an annotation needs an integer or string image_id, got {got}")
                continue
            caption = a.get("caption")
            if not isinstance(caption, str):
                reason = "bad_annotation" if caption is None else "bad_caption_type"
                yield where._replace(reason=reason, detail=f"caption is {_json_kind(caption)}")
                continue
            caps.setdefault(a["image_id"], []).append((i, caption.strip()))
        ids: set[int | str] = set()
        for j, im in enumerate(self._data["images"]):
            iid = im.get("id") if isinstance(im, dict) else None
            where = Skip("bad_annotation", name, "image", str(iid) if _is_id(iid) else f"#{j}")
            if not isinstance(im, dict):
                yield where._replace(detail=f"an image entry must be an object, got {_json_kind(im)}")
                continue
            if iid is not None and not _is_id(iid):
                yield where._replace(detail=f"id must be an integer or a string, got {_json_kind(iid)}")
                continue
            if iid is not None:
                ids.add(iid)
            file_name = im.get("file_name")
            if not isinstance(file_name, str):
                yield where._replace(detail=f"file_name must be a string, got {_json_kind(file_name)}")
                continue
            rel = _relative_inside(file_name)
            if rel is None:
                yield where._replace(reason="path_outside_root", detail=f"file_name {file_name!r}")
                continue
            all_caps = [c for _, c in caps.get(iid, [])] if iid is not None else []
            all_caps = [c for c in all_caps if c]
            if not all_caps and self.require_text:
                yield where._replace(reason="missing_caption")
                continue
            image = self._decode_file(self.images / rel, where)
            if isinstance(image, Skip):
                yield image
                continue
            yield DocRecord(
                id=str(iid if iid is not None else file_name), text=all_caps[0] if all_caps else None,
                image=image, meta={"file": file_name, "captions": all_caps, "coco_id": iid},
            )
        for iid, entries in caps.items():
            if iid not in ids:
                for i, _ in entries:
                    yield Skip("orphan_caption", name, "annotation", f"#{i}", detail=f"image_id {iid!r} names no image")


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


def _pick_caption(values: Sequence[Any]) -> tuple[str | None, str | None]:
    """The first non-empty string of ``values`` (None entries ignored) as ``(text, None)``; else
    ``(None, "bad_caption_type")`` if one is not a string, or the first string (maybe empty) or None."""
    present = [v for v in values if v is not None]
    for v in present:
        if isinstance(v, str) and v.strip():
            return v, None
    if any(not isinstance(v, str) for v in present):
        return None, "bad_caption_type"
    return (present[0] if present else None), None


class WebDatasetSource(Source):
    """WebDataset tar shards (img2dataset layout): a ``.tar`` file, a folder of them, a glob, or
    brace notation ``shard-{00000..00009}.tar``. Text comes from ``.txt`` (UTF-8, else the sample
    is a ``bad_caption_encoding``) or the first string of the ``caption``/``text`` keys of ``.json``
    (a non-string one is a ``bad_caption_type``); the ``.json`` is kept in ``meta["json"]`` (None
    when it is not valid JSON)."""

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

    def _samples(self, shard: str) -> Iterator[dict[str, Any] | Skip]:
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
            yield Skip("corrupt_shard", Path(shard).name, detail=str(e))
        if current:
            yield current

    def _records(self) -> Iterator[DocRecord | Skip]:
        for shard in self.shards:
            for s in self._samples(shard):
                if isinstance(s, Skip):
                    yield s
                    continue
                where = Skip("", Path(shard).name, "key", s["__key__"])
                ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif") if e in s), None)
                meta: dict[str, Any] = {"shard": Path(shard).name, "key": s["__key__"]}
                text: str | None = None
                if "txt" in s:
                    try:
                        text = s["txt"].decode("utf-8-sig").strip()
                    except UnicodeDecodeError as e:
                        yield where._replace(reason="bad_caption_encoding", detail=f".txt is not UTF-8: {e}")
                        continue
                if "json" in s:
                    try:
                        meta["json"] = json.loads(s["json"])
                    except (ValueError, RecursionError):
                        meta["json"] = None
                    if text is None and isinstance(meta["json"], dict):
                        j = meta["json"]
                        text, bad = _pick_caption([j.get("caption"), j.get("text")])
                        if bad is not None:
                            yield where._replace(reason=bad, detail=f"caption is {_json_kind(j.get('caption'))}")
                            continue
                if text is None and self.require_text:
                    yield where._replace(reason="missing_caption")
                    continue
                if ext is None:
                    yield where._replace(reason="missing_image")
                    continue
                image = self._decode(s[ext], where)
                if isinstance(image, Skip):
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


def _parquet_text(value: Any) -> tuple[str | None, str | None]:
    """A parquet caption value as ``(text, None)`` or ``(None, reason)``: strings as they are,
    UTF-8 bytes decoded, a list gives its first non-empty string; anything else is a
    ``bad_caption_type``."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return None, "bad_caption_encoding"
    if isinstance(value, list):  # several captions per row: keep the first
        return _pick_caption(value)
    return _pick_caption([value])


class ParquetSource(Source):
    """Parquet files (a file, a folder of ``*.parquet``, or a glob) with an image column holding
    encoded bytes or an HF ``{bytes, path}`` struct, and a text column; names are guessed
    (image/img/jpg..., text/caption...) unless given, from the first file that can be read
    and has them.

    A file that cannot be read is a ``corrupt_file`` (named in a warning, the other files are
    read), a file without the columns counts each of its rows as ``missing_columns``; an image
    value that is not bytes or a struct is a ``bad_image_type``, an HF ``path`` that is absolute
    or climbs out of the file's folder a ``path_outside_root``.
    """

    kind = "parquet"

    def __init__(self, path: str | os.PathLike[str], *, image_column: str | None = None,
                 text_column: str | None = None, id_column: str | None = None, **opts: Any) -> None:
        super().__init__(path, **opts)
        p = Path(path)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else sorted(Path(f) for f in glob.glob(str(path)))
        if not files:
            raise FileNotFoundError(f"no parquet files at {path}")
        self.files = files
        self.id_column = id_column
        unreadable: list[str] = []
        column_error: ValueError | None = None
        for f in files:
            try:
                names = pq.ParquetFile(f).schema_arrow.names
            except _PARQUET_ERRORS as e:
                unreadable.append(f"{f.name}: {e}")
                continue
            try:
                self.image_column = _pick_column(names, image_column, _IMAGE_COLUMN_GUESSES, "image", f)
                self.text_column = _pick_column(names, text_column, _TEXT_COLUMN_GUESSES, "text", f)
                if id_column is not None and id_column not in names:
                    raise ValueError(f"{f} has no id column {id_column!r}; its columns are {list(names)}")
            except ValueError as e:
                column_error = column_error or e
                continue
            break
        else:
            if column_error is not None:
                raise column_error
            raise ValueError(f"none of the {len(files)} parquet files at {path} can be read ({unreadable[0]})")

    def _image_bytes(self, value: Any, base: Path, where: Skip) -> bytes | Skip | None:
        """The encoded image of a cell, None if there is none, or the Skip of a bad one."""
        if value is None or isinstance(value, bytes):
            return value
        if not isinstance(value, dict):
            return where._replace(reason="bad_image_type", detail=f"image is {_json_kind(value)}")
        data, path = value.get("bytes"), value.get("path")  # HF datasets Image feature
        if data is not None and not isinstance(data, bytes):
            return where._replace(reason="bad_image_type", detail=f"image bytes are {_json_kind(data)}")
        if data:
            return data
        if path is None:
            return None
        if not isinstance(path, str):
            return where._replace(reason="bad_image_type", detail=f"image path is {_json_kind(path)}")
        rel = _relative_inside(path)
        if rel is None:
            return where._replace(reason="path_outside_root", detail=f"image path {path!r}")
        file = base / rel
        if not file.is_file():
            return None
        try:
            return file.read_bytes()
        except OSError as e:
            return where._replace(reason="unreadable_file", detail=str(e))

    def _records(self) -> Iterator[DocRecord | Skip]:
        cols = [self.image_column, self.text_column] + ([self.id_column] if self.id_column else [])
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                names, n_rows = pf.schema_arrow.names, pf.metadata.num_rows
            except _PARQUET_ERRORS as e:
                log.warning("cannot read parquet file %s (%s); skipping it", f, e)
                yield Skip("corrupt_file", f.name, detail=str(e))
                continue
            missing = [c for c in cols if c not in names]
            if missing:
                log.warning("parquet file %s has no column %s (its columns: %s); skipping its %d rows",
                            f, ", ".join(map(repr, missing)), names, n_rows)
                yield Skip("missing_columns", f.name, detail=f"no column {missing}", count=n_rows)
                continue
            row = 0
            batches = pf.iter_batches(columns=cols, batch_size=256)
            while True:
                try:
                    rows = next(batches).to_pylist()
                except StopIteration:
                    break
                except _PARQUET_ERRORS as e:
                    left = max(n_rows - row, 1)
                    log.warning("cannot read parquet file %s past row %d (%s); skipping its last %d rows",
                                f, row, e, left)
                    yield Skip("corrupt_file", f.name, "row", str(row), detail=str(e), count=left)
                    break
                for rec in rows:
                    where = Skip("", f.name, "row", str(row))
                    rid = rec[self.id_column] if self.id_column else None
                    rid = str(rid) if rid is not None else f"{f.stem}-{row}"
                    row += 1
                    text, bad = _parquet_text(rec[self.text_column])
                    if bad is not None:
                        yield where._replace(reason=bad, detail=f"text is {_json_kind(rec[self.text_column])}")
                        continue
                    if text is None and self.require_text:
                        yield where._replace(reason="missing_caption")
                        continue
                    data = self._image_bytes(rec[self.image_column], f.parent, where)
                    image = data if isinstance(data, Skip) else self._decode(data, where)
                    if isinstance(image, Skip):
                        yield image
                        continue
                    yield DocRecord(id=rid, text=text, image=image, meta={"file": f.name, "row": row - 1})


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
