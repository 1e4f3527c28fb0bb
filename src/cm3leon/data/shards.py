"""Tokenized shards: the ONE tokenized format (tokenize once, offline; train from memmaps).

A shard directory holds every document's unified ids (``Document.to_ids``)::

    manifest.json    {"format": "cm3leon-shards", "version": 1, "vocab": {...}, "n_docs": N,
                      "n_tokens": T, "dtype": "uint32", "source": ..., "text_tokenizer": ...,
                      "image_tokenizer": ..., "stats": {...}, "has_tasks": bool, ...}
    tokens.bin       uint32[T]   all documents' ids, back to back
    offsets.npy      int64[N+1]  document i is tokens[offsets[i]:offsets[i+1]]
    source_rows.npy  int64[N]    (optional) dataset row each document came from
    tasks.json       (optional)  {"names": [...]}: task names; task_ids.npy int32[N] indexes them
    targets.npy      (optional)  int64[N,2]: SFT target span [start, end) in the doc's ids, -1 if none
    neighbors.npy    (optional)  int64[N,k]: retrieved documents (shard rows), -1 = none

``neighbors.npy`` comes from the retrieval stage, which works on dataset rows; use
:func:`attach_neighbors` to map dataset-row neighbours onto shard rows (rows that were
skipped while tokenizing become -1).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cm3leon.config import atomic_write_text
from cm3leon.vocab import Kind, Vocab
from cm3leon.workspace import WorkspaceLock, check_replaceable

log = logging.getLogger(__name__)

FORMAT = "cm3leon-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
OFFSETS = "offsets.npy"
SOURCE_ROWS = "source_rows.npy"
TASKS = "tasks.json"
TASK_IDS = "task_ids.npy"
TARGETS = "targets.npy"
NEIGHBORS = "neighbors.npy"
DTYPE = np.uint32


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


SHARD_FILES = (MANIFEST, TOKENS, OFFSETS, SOURCE_ROWS, TASKS, TASK_IDS, TARGETS, NEIGHBORS)


class _ShardFiles:
    """The shard files and the temporaries of their atomic writes (``.<name>.tmp-*``)."""

    def __contains__(self, rel: object) -> bool:
        return isinstance(rel, str) and (rel in SHARD_FILES or any(
            rel.startswith(f".{name}.tmp-") for name in SHARD_FILES))


def shard_files(path: Path) -> _ShardFiles | None:
    """The files cm3leon writes in a shard directory, None if ``path`` holds no shard
    manifest: the owner that :func:`cm3leon.workspace.check_replaceable` is given before
    shards are replaced."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return _ShardFiles() if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


class ShardWriter:
    """Append documents' unified ids; :meth:`finalize` publishes the directory atomically.

    Everything is written into a hidden sibling directory and renamed onto ``out_dir`` at
    the end, so a crash never leaves a half-written shard directory behind. ``meta`` is
    merged into the manifest (e.g. source path, tokenizer dirs, stats).

    An existing ``out_dir`` is replaced only with ``overwrite`` and only if it holds shards
    and nothing else (:class:`cm3leon.workspace.NotOwnedError`); an empty directory is
    used as is. From here to :meth:`finalize` / :meth:`abort` the writer holds the lock
    ``.<name>.cm3leon.lock`` beside ``out_dir``, so a second writer to the same directory is
    refused at once (:class:`cm3leon.workspace.WorkspaceBusyError`).
    """

    def __init__(self, out_dir: str | os.PathLike[str], vocab: Vocab, *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self._lock = WorkspaceLock(self.out_dir, sibling=True)
        self._check_out(overwrite)
        self._lock.acquire()
        try:
            self._check_out(overwrite)  # again: another writer may have published it meanwhile
        except BaseException:
            self._lock.release()
            raise
        self.vocab = vocab
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._tmp.mkdir()
        self._tokens = open(self._tmp / TOKENS, "wb")
        self._offsets = [0]
        self._rows: list[int] = []
        self._tasks: list[str | None] = []
        self._targets: list[tuple[int, int]] = []
        self._closed = False

    def _check_out(self, overwrite: bool) -> None:
        out = self.out_dir
        if not out.exists():
            return
        if not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) or pick a new --out")
        check_replaceable(out, shard_files)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def add(
        self,
        ids: Sequence[int] | np.ndarray,
        *,
        source_row: int | None = None,
        task: str | None = None,
        target: tuple[int, int] | None = None,
    ) -> int:
        """Append one document's unified ids; returns its shard row."""
        if self._closed:
            raise RuntimeError("ShardWriter is already finalized")
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0 or arr[0] != self.vocab.eos_id:
            raise ValueError("a document's ids must be a non-empty 1-D sequence starting with <eos>")
        if arr.min() < 0 or arr.max() >= self.vocab.size:
            raise ValueError(f"ids outside the vocabulary [0, {self.vocab.size}); wrong vocab for these tokens?")
        if target is not None and not (0 < target[0] < target[1] <= arr.size):
            raise ValueError(f"target span {target} is not inside the document (length {arr.size})")
        self._tokens.write(arr.astype(DTYPE).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)
        self._rows.append(-1 if source_row is None else int(source_row))
        self._tasks.append(task)
        self._targets.append((-1, -1) if target is None else (int(target[0]), int(target[1])))
        return len(self) - 1

    def finalize(self, meta: dict[str, Any] | None = None) -> Path:
        """Write the index files and manifest, then rename into place; returns ``out_dir``."""
        if self._closed:
            raise RuntimeError("ShardWriter is already finalized")
        self._tokens.close()
        self._closed = True
        n = len(self)
        _atomic_save_npy(self._tmp / OFFSETS, np.asarray(self._offsets, dtype=np.int64))
        if any(r >= 0 for r in self._rows):
            _atomic_save_npy(self._tmp / SOURCE_ROWS, np.asarray(self._rows, dtype=np.int64))
        has_tasks = any(t is not None for t in self._tasks)
        if has_tasks:
            names = sorted({t for t in self._tasks if t is not None})
            index = {t: k for k, t in enumerate(names)}
            task_ids = np.asarray([-1 if t is None else index[t] for t in self._tasks], dtype=np.int32)
            atomic_write_text(self._tmp / TASKS, json.dumps({"names": names}, indent=2) + "\n")
            _atomic_save_npy(self._tmp / TASK_IDS, task_ids)
        if any(t[0] >= 0 for t in self._targets):
            _atomic_save_npy(self._tmp / TARGETS, np.asarray(self._targets, dtype=np.int64).reshape(n, 2))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "vocab": self.vocab.to_dict(),
            "n_docs": n,
            "n_tokens": int(self._offsets[-1]),
            "dtype": np.dtype(DTYPE).name,
            "has_tasks": has_tasks,
        }
        manifest.update(meta or {})
        atomic_write_text(self._tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            check_replaceable(self.out_dir, shard_files)  # files may have arrived while writing
            if self.out_dir.exists():
                old = self.out_dir.with_name(f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(self.out_dir, old)
                os.replace(self._tmp, self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self._tmp, self.out_dir)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        finally:
            self._lock.release()
        log.info("wrote %d documents (%d tokens) to %s", n, manifest["n_tokens"], self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far."""
        if not self._tokens.closed:
            self._tokens.close()
        self._closed = True
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._lock.release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


class Shards:
    """Read-only, memory-mapped view of a shard directory.

    ``shards[i]`` is document i's unified ids as a list; :meth:`array` gives the numpy
    view. ``vocab`` is checked against the manifest when given.
    """

    def __init__(self, path: str | os.PathLike[str], *, vocab: Vocab | None = None) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(
                f"{mpath} not found; {self.path} is not a tokenized shard directory "
                "(create one with `cm3leon data tokenize`)"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath} is not valid JSON ({e}); the shard directory is corrupt") from e
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: format is {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if self.manifest.get("version") != VERSION:
            raise ValueError(
                f"{mpath}: version {self.manifest.get('version')} but this code reads version {VERSION}; re-tokenize"
            )
        self.vocab = Vocab.from_dict(self.manifest["vocab"])
        if vocab is not None and vocab != self.vocab:
            raise ValueError(
                f"{self.path} was tokenized with {self.vocab} but {vocab} was expected; "
                "re-tokenize with the model's tokenizers or use the matching model"
            )
        n, t = int(self.manifest["n_docs"]), int(self.manifest["n_tokens"])
        tok_path = self.path / TOKENS
        if not tok_path.exists():
            raise FileNotFoundError(f"{tok_path} not found; the shard directory is incomplete, re-tokenize")
        itemsize = np.dtype(self.manifest.get("dtype", "uint32")).itemsize
        size = tok_path.stat().st_size
        if size != t * itemsize:
            raise ValueError(
                f"{tok_path} has {size} bytes but the manifest says {t} tokens ({t * itemsize} bytes); "
                "the file is truncated or from another run, re-tokenize"
            )
        self.tokens = (np.memmap(tok_path, dtype=self.manifest.get("dtype", "uint32"), mode="r") if t
                       else np.zeros(0, DTYPE))
        self.offsets = self._load(OFFSETS, required=True)
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0 or self.offsets[-1] != t:
            raise ValueError(
                f"{self.path / OFFSETS} has shape {self.offsets.shape} and ends at "
                f"{int(self.offsets[-1]) if self.offsets.size else None}, but the manifest says {n} documents "
                f"and {t} tokens; the shard directory is inconsistent, re-tokenize"
            )
        if n and np.any(np.diff(self.offsets) <= 0):
            raise ValueError(f"{self.path / OFFSETS} is not strictly increasing; the shard directory is corrupt")
        self.source_rows = self._load(SOURCE_ROWS, shape=(n,))
        self.task_ids = self._load(TASK_IDS, shape=(n,))
        self.task_names: list[str] = []
        if self.task_ids is not None:
            self.task_names = list(json.loads((self.path / TASKS).read_text())["names"])
        self.targets = self._load(TARGETS, shape=(n, 2))
        self.neighbors = self._load(NEIGHBORS)
        if self.neighbors is not None:
            check_neighbors(self.neighbors, n, where=str(self.path / NEIGHBORS))

    def _load(self, name: str, *, required: bool = False, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        p = self.path / name
        if not p.exists():
            if required:
                raise FileNotFoundError(f"{p} not found; the shard directory is incomplete, re-tokenize")
            return None
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{p} could not be read ({e}); the file is corrupt or truncated") from e
        if shape is not None and arr.shape != shape:
            raise ValueError(f"{p} has shape {arr.shape}, expected {shape}; the shard directory is inconsistent")
        return arr

    def __len__(self) -> int:
        return int(self.manifest["n_docs"])

    def _check_index(self, i: int) -> int:
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        return j

    def array(self, i: int) -> np.ndarray:
        """Document i's ids as a read-only numpy view."""
        j = self._check_index(i)
        return self.tokens[self.offsets[j] : self.offsets[j + 1]]

    def __getitem__(self, i: int) -> list[int]:
        return self.array(i).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            yield self[i]

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """int64[N]: number of ids of each document."""
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    def task(self, i: int) -> str | None:
        """Task tag of document i (None if untagged)."""
        if self.task_ids is None:
            return None
        k = int(self.task_ids[self._check_index(i)])
        return None if k < 0 else self.task_names[k]

    def target(self, i: int) -> tuple[int, int] | None:
        """SFT target span ``[start, end)`` of document i within its ids (None if none)."""
        if self.targets is None:
            return None
        s, e = (int(x) for x in self.targets[self._check_index(i)])
        return None if s < 0 else (s, e)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with "spawn" pickle the dataset: reopen the memmaps
        # by path instead of copying every token into the pickle.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Shards({str(self.path)!r}, n_docs={len(self)}, n_tokens={self.n_tokens})"


def check_neighbors(nb: np.ndarray, n: int, *, where: str = "neighbors") -> None:
    """Raise if ``nb`` is not an int ``[n, k]`` array of rows in ``[-1, n)``."""
    if nb.ndim != 2 or nb.shape[0] != n or not np.issubdtype(nb.dtype, np.integer):
        raise ValueError(
            f"{where} has shape {nb.shape} and dtype {nb.dtype}; expected an integer [{n}, k] array "
            "(row i = neighbours of document i); was it computed for another dataset?"
        )
    if nb.size and (nb.min() < -1 or nb.max() >= n):
        raise ValueError(f"{where} holds rows outside [-1, {n}); was it computed for another dataset?")


def attach_neighbors(
    shards_dir: str | os.PathLike[str], neighbors: np.ndarray, *, rows: str = "dataset"
) -> Path:
    """Write ``neighbors.npy`` beside the shards (atomically) and return its path.

    ``rows="dataset"``: ``neighbors`` is indexed by dataset rows (what the retrieval stage
    produces, row i = dataset row i); it is mapped through ``source_rows.npy`` onto shard
    rows, neighbours that were not tokenized becoming -1. ``rows="shard"``: already
    indexed by shard rows.
    """
    sh = Shards(shards_dir)
    nb = np.asarray(neighbors)
    if rows == "shard":
        check_neighbors(nb, len(sh), where="neighbors")
        out = nb.astype(np.int64)
    elif rows == "dataset":
        if sh.source_rows is None:
            raise ValueError(f"{shards_dir} has no {SOURCE_ROWS}; pass rows='shard' with shard-indexed neighbours")
        n_data = nb.shape[0] if nb.ndim == 2 else -1
        check_neighbors(nb, n_data, where="neighbors")
        if len(sh) and int(np.max(sh.source_rows)) >= n_data:
            raise ValueError(
                f"the shards come from dataset rows up to {int(np.max(sh.source_rows))} but the neighbours "
                f"cover only {n_data} rows; they were computed for another dataset"
            )
        to_shard = np.full(n_data + 1, -1, dtype=np.int64)  # last slot maps -1 -> -1
        to_shard[np.asarray(sh.source_rows)] = np.arange(len(sh))
        out = to_shard[nb[np.asarray(sh.source_rows)]]
    else:
        raise ValueError(f"rows must be 'dataset' or 'shard', got {rows!r}")
    path = Path(shards_dir) / NEIGHBORS
    _atomic_save_npy(path, out)
    return path


# ---------------------------------------------------------------------------- tokenizing


class TextEncoder(Protocol):
    """What tokenizing needs from a text tokenizer (``TextTokenizer`` satisfies it)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


class ImageEncoder(Protocol):
    """What tokenizing needs from an image tokenizer (``ImageTokenizer`` satisfies it)."""

    tokens_per_image: int
    codebook_size: int

    def preprocess(self, images: list[Any]) -> Any: ...

    def encode(self, x: Any) -> Any: ...


def vocab_for(text_tok: TextEncoder, image_tok: ImageEncoder, *, n_masks: int = 8) -> Vocab:
    """The unified vocabulary of a text + image tokenizer pair."""
    return Vocab(
        text_size=int(text_tok.vocab_size),
        image_size=int(image_tok.codebook_size),
        image_seq_len=int(image_tok.tokens_per_image),
        n_masks=n_masks,
    )


def check_vocab_fits(vocab: Vocab, text_tok: TextEncoder, image_tok: ImageEncoder) -> Vocab:
    """``vocab`` (a model's ``vocab.json``) if the tokenizers' ids fit it; one error naming the mismatch."""
    got = (int(image_tok.codebook_size), int(image_tok.tokens_per_image))
    if got != (vocab.image_size, vocab.image_seq_len):
        raise ValueError(f"the image tokenizer has {got[0]} codes and {got[1]} tokens per image but the model's "
                         f"vocabulary {vocab.image_size} and {vocab.image_seq_len}; use the model's image tokenizer")
    limit = vocab.size if vocab.ids is not None else vocab.text_size
    if int(text_tok.vocab_size) > limit:
        raise ValueError(f"the text tokenizer has {int(text_tok.vocab_size)} ids but the model's vocabulary has room "
                         f"for {limit}; use the model's own text tokenizer")
    return vocab


def encode_images(image_tok: ImageEncoder, images: list[Any]) -> list[list[int]]:
    """VQ codes of a batch of PIL images (one batched ``encode`` call, no grad)."""
    import torch

    if not images:
        return []
    with torch.no_grad():
        codes = image_tok.encode(image_tok.preprocess(images))
    return [list(map(int, row)) for row in codes.tolist()]


FIELDS = ("text", "image")


def tokenize_dataset(
    data_dir: str | os.PathLike[str],
    text_tok: TextEncoder,
    image_tok: ImageEncoder,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    fields: Sequence[str] = FIELDS,
    n_masks: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    limit: int | None = None,
    vocab: Vocab | None = None,
) -> Shards:
    """Tokenize every record of a dataset into shards; returns the opened :class:`Shards`.

    Each record becomes one document whose segments are the record's ``fields`` in order
    (default ``("text", "image")``: ``<eos> caption <break> IMAGE``; ``("image", "text")``
    puts the image first). Missing or empty fields are left out; records with none of
    them are skipped and counted in ``manifest["stats"]``. ``limit`` stops after that many
    good records. Shard row -> dataset row is kept
    in ``source_rows.npy`` (dataset row = position in the source, bad rows included, so
    it matches the retrieval stage's row numbering of a dataset directory). ``overwrite``
    replaces existing shards, never a directory holding other files; the writer holds
    ``out_dir``'s lock while it works (see :class:`ShardWriter`). ``vocab`` is a model's own
    vocabulary (a converted model's id table); default: the tokenizers' contiguous layout.
    """
    from cm3leon.data.sources import open_source

    bad = [f for f in fields if f not in FIELDS] or ([] if fields else ["(none)"])
    if bad or len(set(fields)) != len(fields):
        raise ValueError(f"fields must be a non-empty ordered subset of {FIELDS} without repeats, got {list(fields)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    vocab = vocab_for(text_tok, image_tok, n_masks=n_masks) if vocab is None else check_vocab_fits(
        vocab, text_tok, image_tok)
    source = open_source(data_dir, limit=limit)
    stats: Counter[str] = Counter()
    writer = ShardWriter(out_dir, vocab, overwrite=overwrite)
    try:
        batch: list[tuple[int, Any]] = []
        for rec in _progress(source, progress, _len(source)):
            # dataset row = records yielded + bad rows skipped so far (a source visits each row once)
            st = getattr(source, "stats", None)
            row = st.ok - 1 + st.n_skipped if st is not None else stats["rows"]
            stats["rows"] += 1
            batch.append((row, rec))
            if len(batch) == batch_size:
                _write_batch(batch, writer, vocab, text_tok, image_tok, fields, stats)
                batch = []
        _write_batch(batch, writer, vocab, text_tok, image_tok, fields, stats)
        st = getattr(source, "stats", None)
        bad_rows = dict(st.skipped) if st is not None else {}
        full_meta = {
            "source": str(data_dir),
            "fields": list(fields),
            "stats": {**dict(stats), "source_bad_rows": bad_rows},
        }
        full_meta.update(meta or {})
        writer.finalize(full_meta)
    except BaseException:
        writer.abort()
        raise
    if stats["skipped_empty"]:
        log.warning("skipped %d records with none of the fields %s", stats["skipped_empty"], list(fields))
    return Shards(out_dir)


def _len(source: Any) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


def _progress(it: Iterable[Any], enabled: bool, total: int | None) -> Iterable[Any]:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc="tokenize", unit="doc")


def _write_batch(
    batch: list[tuple[int, Any]],
    writer: ShardWriter,
    vocab: Vocab,
    text_tok: TextEncoder,
    image_tok: ImageEncoder,
    fields: Sequence[str],
    stats: Counter[str],
) -> None:
    if not batch:
        return
    want_img = "image" in fields
    imgs = [rec.image for _, rec in batch if want_img and rec.image is not None]
    codes = iter(encode_images(image_tok, imgs))
    for row, rec in batch:
        parts: dict[str, list[int]] = {}
        if "text" in fields and rec.text:
            t = text_tok.encode(rec.text)
            if t:
                parts["text"] = vocab.text_to_ids(t)
        if want_img and rec.image is not None:
            parts["image"] = vocab.codes_to_ids(next(codes))
        if not parts:
            stats["skipped_empty"] += 1
            continue
        ids = [vocab.eos_id]
        for k, f in enumerate(x for x in fields if x in parts):
            kind = Kind.IMAGE if f == "image" else Kind.TEXT
            ids.extend(vocab.segment_prefix(kind, first=k == 0))  # <break> between segments, or the id table's
            ids.extend(parts[f])
            ids.extend(vocab.segment_suffix(kind))
        writer.add(ids, source_row=row)
        stats["docs"] += 1
        stats["multimodal" if len(parts) == 2 else f"only_{next(iter(parts))}"] += 1


def write_documents(
    out_dir: str | os.PathLike[str],
    vocab: Vocab,
    docs: Iterable[Sequence[int]],
    *,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
    tag: Callable[[int], str | None] | None = None,
) -> Shards:
    """Write already-tokenized documents (unified ids) as shards; handy for tests and tools."""
    with ShardWriter(out_dir, vocab, overwrite=overwrite) as w:
        for i, d in enumerate(docs):
            w.add(d, source_row=i, task=tag(i) if tag else None)
        w.finalize(meta)
    return Shards(out_dir)
