"""FAISS maximum-inner-product search over the memory bank (paper §2.1).

One class, :class:`MemoryIndex`, whatever the FAISS index type: the type is an
``index_factory`` string ("Flat" = exact, "IVF1024,PQ64", "IVF256,Flat", "HNSW32", ...)
always built with ``METRIC_INNER_PRODUCT`` (document vectors are unit vectors, so inner
product = cosine). FAISS stores rows 0..n-1; an id array maps rows to the caller's int64
ids (for the memory bank, id == dataset row number).

On disk an index is a directory::

    meta.json        format, dim, factory, metric, n, encoder name, free-form info
    index.faiss      faiss.write_index output
    ids.npy          int64 [n]: FAISS row -> id

The retrieval stage keeps the document embeddings (``embeddings.npy``, float32 [n, D],
row = FAISS row), the modality array and the content hashes (``hashes.npy``, uint64
[n, 2]: caption, image; 0 = absent) beside these files; :func:`write_embeddings` and
:func:`load_embeddings` handle that file (written in batches, memory-mapped on read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from cm3leon.config import atomic_write_text

if TYPE_CHECKING:
    from cm3leon.data.records import DocRecord
    from cm3leon.retrieval.encoder_base import Encoder

log = logging.getLogger(__name__)

META_FILE = "meta.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
EMBEDDINGS_FILE = "embeddings.npy"
MODALITY_FILE = "modality.npy"
HASHES_FILE = "hashes.npy"
FORMAT = "cm3leon.index"
VERSION = 1


def _check_matrix(x: np.ndarray, *, what: str, dim: int | None = None) -> np.ndarray:
    """A float32 C-contiguous [N, D] view of ``x`` with shape checks."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{what} has dimension {x.shape[1]} but the index holds {dim}-d vectors; "
            "embed queries with the same encoder the index was built with"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


class MemoryIndex:
    """A FAISS inner-product index plus its row -> id map.

    Build with :meth:`build`, query with :meth:`search`, persist with :meth:`save` /
    :meth:`load`. ``nprobe`` (IVF) and ``efSearch`` (HNSW) are settable attributes.
    """

    def __init__(
        self,
        index: faiss.Index,
        ids: np.ndarray,
        *,
        factory: str,
        encoder_name: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) != index.ntotal:
            raise ValueError(f"id map has {len(ids)} entries but the FAISS index holds {index.ntotal} vectors")
        self.index = index
        self.ids = ids
        self.factory = factory
        self.encoder_name = encoder_name
        self.info: dict[str, Any] = dict(info or {})
        self._rebuild_lookup()

    @property
    def exact(self) -> bool:
        """True for an exhaustive index ("Flat"), whose search scores are exact inner products."""
        return self.factory.replace(" ", "") == "Flat"

    # ---- construction --------------------------------------------------------------
    @classmethod
    def empty(cls, dim: int, *, factory: str = "Flat", encoder_name: str | None = None) -> MemoryIndex:
        """An untrained, empty index of the given type."""
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        try:
            index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(
                f"FAISS cannot build index type {factory!r} for {dim}-d vectors ({_faiss_reason(e)}); "
                "use an index_factory string such as 'Flat', 'IVF256,Flat', 'IVF1024,PQ64' (PQ m must divide "
                "the dimension) or 'HNSW32'"
            ) from e
        return cls(index, np.zeros(0, dtype=np.int64), factory=factory, encoder_name=encoder_name)

    @classmethod
    def build(
        cls,
        emb: np.ndarray,
        *,
        factory: str = "Flat",
        ids: np.ndarray | None = None,
        train_size: int = 100_000,
        batch_size: int = 65_536,
        seed: int = 0,
        encoder_name: str | None = None,
        info: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> MemoryIndex:
        """Build an index over ``emb`` [N, D] (an array or a read-only memmap).

        Indexes that need training (IVF, PQ) are trained on ``train_size`` rows drawn at
        random (seeded); vectors are then added in ``batch_size`` chunks so a memmapped
        file is never loaded whole. ``ids`` defaults to ``0..N-1``.
        """
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D array [N, D], got shape {emb.shape}")
        n, dim = emb.shape
        if n == 0:
            raise ValueError("the memory bank is empty (0 embeddings); build the index from a non-empty dataset")
        out = cls.empty(dim, factory=factory, encoder_name=encoder_name)
        out.info.update(info or {})
        out.train(emb, train_size=train_size, seed=seed)
        out.add(emb, ids=ids, batch_size=batch_size, progress=progress)
        return out

    def train(self, emb: np.ndarray, *, train_size: int = 100_000, seed: int = 0) -> None:
        """Train the index (no-op for Flat/HNSW) on a random sample of ``emb``'s rows."""
        if self.index.is_trained:
            return
        n = len(emb)
        nlist = _ivf_lists(self.factory)
        if nlist is not None and min(n, train_size) < nlist:
            raise ValueError(
                f"index {self.factory!r} has {nlist} IVF lists but only {min(n, train_size)} training vectors; "
                f"use fewer lists (about sqrt(N) = {max(1, int(n**0.5))}) or 'Flat' for a bank this small"
            )
        if n > train_size:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=train_size, replace=False))
            sample = emb[rows]
        else:
            sample = emb[:]
        sample = _check_matrix(sample, what="training sample", dim=self.dim)
        _skip_polysemous_training(self.index)
        log.info("training %s on %d vectors", self.factory, len(sample))
        try:
            self.index.train(sample)
        except RuntimeError as e:
            raise ValueError(f"FAISS could not train {self.factory!r}: {_faiss_reason(e)}") from e

    def add(
        self,
        emb: np.ndarray,
        *,
        ids: np.ndarray | None = None,
        batch_size: int = 65_536,
        progress: bool = False,
    ) -> None:
        """Append vectors with their ids (default: continue after the largest id so far)."""
        n = len(emb)
        if ids is None:
            start = int(self.ids.max()) + 1 if len(self.ids) else 0
            ids = np.arange(start, start + n, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (n,):
            raise ValueError(f"got {len(ids)} ids for {n} embeddings")
        if (ids < 0).any():
            raise ValueError("ids must be non-negative (-1 marks 'no neighbour' in search results)")
        if not self.index.is_trained:
            raise ValueError(f"index {self.factory!r} must be trained before adding vectors; call train() first")
        all_ids = np.concatenate([self.ids, ids])
        if len(np.unique(all_ids)) != len(all_ids):
            raise ValueError("ids must be unique across the index")
        chunks = range(0, n, batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="index add", unit="batch")
        for s in chunks:
            self.index.add(_check_matrix(emb[s : s + batch_size], what="embeddings", dim=self.dim))
        self.ids = all_ids
        self._rebuild_lookup()

    # ---- queries -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores float32 [N,k], ids int64 [N,k])``.

        Rows with fewer than ``k`` hits are padded with id -1 and score -inf.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if self.ntotal == 0:
            raise ValueError("the index is empty; add documents (cm3leon index build) before searching")
        q = _check_matrix(q, what="query", dim=self.dim)
        scores, rows = self.index.search(q, int(k))
        missing = rows < 0
        out_ids = np.where(missing, -1, self.ids[np.where(missing, 0, rows)])
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return scores, out_ids.astype(np.int64)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """FAISS rows (= embedding-file rows) of ``ids``; -1 for ids not in the index."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._identity:
            return np.where((ids >= 0) & (ids < self.ntotal), ids, -1)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.clip(pos, 0, max(len(self._sorted_ids) - 1, 0))
        found = (len(self._sorted_ids) > 0) & (self._sorted_ids[pos] == ids)
        return np.where(found, self._order[pos], -1)

    def _rebuild_lookup(self) -> None:
        self._identity = bool(np.array_equal(self.ids, np.arange(len(self.ids))))
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[self._order]

    # ---- search-time knobs ---------------------------------------------------------
    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (None for non-IVF indexes)."""
        try:
            return int(faiss.extract_index_ivf(self.index).nprobe)
        except RuntimeError:
            return None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._set_param("nprobe", value)

    @property
    def efSearch(self) -> int | None:  # noqa: N802 - FAISS's parameter name
        """HNSW search beam width (None for non-HNSW indexes)."""
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None)
        return None if hnsw is None else int(hnsw.efSearch)

    @efSearch.setter
    def efSearch(self, value: int) -> None:  # noqa: N802
        self._set_param("efSearch", value)

    def _set_param(self, name: str, value: int) -> None:
        try:
            faiss.ParameterSpace().set_index_parameter(self.index, name, int(value))
        except RuntimeError as e:
            raise ValueError(f"index {self.factory!r} has no parameter {name!r} ({_faiss_reason(e)})") from e

    # ---- persistence ---------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The JSON description written to ``meta.json``."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "dim": self.dim,
            "factory": self.factory,
            "metric": "inner_product",
            "n": self.ntotal,
            "encoder": self.encoder_name,
            "nprobe": self.nprobe,
            "efSearch": self.efSearch,
            "info": self.info,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss``, ``ids.npy`` and ``meta.json`` (each atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (INDEX_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, d / INDEX_FILE)
        _save_npy(d / IDS_FILE, self.ids)
        atomic_write_text(d / META_FILE, json.dumps(self.meta(), indent=2, sort_keys=True) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> MemoryIndex:
        """Load an index directory written by :meth:`save`.

        ``mmap=True`` maps the FAISS file instead of reading it (large IVF-PQ banks).
        """
        d = Path(directory)
        meta = read_meta(d)
        for name in (INDEX_FILE, IDS_FILE):
            if not (d / name).exists():
                raise FileNotFoundError(
                    f"{d / name} is missing: the index directory is incomplete; rebuild it with `cm3leon index build`"
                )
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(d / INDEX_FILE), flags)
        ids = np.load(d / IDS_FILE, allow_pickle=False)
        if index.d != meta["dim"] or index.ntotal != meta["n"]:
            raise ValueError(
                f"{d}: meta.json says {meta['n']} x {meta['dim']} but index.faiss holds {index.ntotal} x {index.d}; "
                "the directory mixes files from different builds - rebuild it"
            )
        out = cls(index, ids, factory=meta["factory"], encoder_name=meta.get("encoder"), info=meta.get("info"))
        if meta.get("nprobe"):
            out.nprobe = meta["nprobe"]
        if meta.get("efSearch"):
            out.efSearch = meta["efSearch"]
        return out


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``meta.json`` of an index directory, with clear errors when absent or foreign."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"index directory {d} does not exist; build one with `cm3leon index build`")
    p = d / META_FILE
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: {d} is not an index directory (build one with `cm3leon index build`)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); rebuild the index") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p} is not a cm3leon index description (format={meta.get('format')!r})")
    return meta


def write_embeddings(path: str | Path, batches: Iterable[np.ndarray], *, n: int, dim: int) -> Path:
    """Stream ``batches`` of [b, dim] vectors into a float32 ``.npy`` of exactly ``n`` rows.

    The file is written through a memmap (never whole in RAM) under a temporary name and
    renamed when complete, so an interrupted build leaves no half file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    i = 0
    try:
        for b in batches:
            b = _check_matrix(b, what="embedding batch", dim=dim)
            if i + len(b) > n:
                raise ValueError(f"got more than the announced {n} embeddings")
            out[i : i + len(b)] = b
            i += len(b)
        if i != n:
            raise ValueError(f"got {i} embeddings but {n} were announced")
        out.flush()
    except BaseException:
        del out
        tmp.unlink(missing_ok=True)
        raise
    del out
    os.replace(tmp, path)
    return path


def load_embeddings(path: str | Path) -> np.ndarray:
    """Memory-map a float32 [n, D] embedding file (read-only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild the index with `cm3leon index build`")
    emb = np.load(path, mmap_mode="r", allow_pickle=False)
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise ValueError(f"{path} must hold float32 [n, D] vectors, got {emb.dtype} {emb.shape}")
    return emb


class Modality(IntFlag):
    """What a memory-bank document holds (one uint8 per row in ``modality.npy``)."""

    TEXT = 1
    IMAGE = 2
    MULTI = 3


def record_modality(record: DocRecord) -> Modality:
    """The :class:`Modality` of a record (error if it has neither text nor image)."""
    m = Modality(0)
    if record.text is not None:
        m |= Modality.TEXT
    if record.image is not None:
        m |= Modality.IMAGE
    if not m:
        raise ValueError(f"record {record.id!r} has neither text nor image; it cannot be put in the memory bank")
    return m


def _hash64(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest(), "little") or 1  # 0 means "absent"


def record_hashes(record: DocRecord) -> tuple[int, int]:
    """(caption hash, image hash) of a record: 64-bit hashes of the exact caption string and of
    the image's pixels (mode, size, bytes); 0 where the record has no text / no image."""
    text = 0 if record.text is None else _hash64(record.text.encode("utf-8"))
    im = record.image
    image = 0 if im is None else _hash64(im.mode.encode(), f"{im.size[0]}x{im.size[1]}".encode(), im.tobytes())
    return text, image


@dataclass
class MemoryBank:
    """The memory bank as retrieval sees it: the index, document vectors and modalities.

    ``embeddings`` [n, D], ``modality`` [n] and ``hashes`` [n, 2] (:func:`record_hashes`;
    None for a bank built without them) are indexed by FAISS row (use ``index.rows_of(ids)``);
    they are memory-mapped when loaded from disk. ``directory`` also holds ``meta.json``'s
    ``info`` (data and encoder directories of the build).
    """

    index: MemoryIndex
    embeddings: np.ndarray
    modality: np.ndarray
    directory: Path | None = None
    hashes: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.index.ntotal
        if self.embeddings.shape != (n, self.index.dim):
            raise ValueError(
                f"embeddings have shape {self.embeddings.shape} but the index holds {n} x {self.index.dim}; "
                "the bank's files come from different builds - rebuild it"
            )
        if self.modality.shape != (n,):
            raise ValueError(f"modality array has shape {self.modality.shape}, expected ({n},)")
        if self.hashes is not None and (self.hashes.shape != (n, 2) or self.hashes.dtype != np.uint64):
            raise ValueError(f"hashes array is {self.hashes.dtype} {self.hashes.shape}, expected uint64 ({n}, 2); "
                             "the bank's files come from different builds - rebuild it")

    @property
    def dim(self) -> int:
        return self.index.dim

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def from_arrays(
        cls,
        embeddings: np.ndarray,
        modality: np.ndarray | None = None,
        *,
        factory: str = "Flat",
        ids: np.ndarray | None = None,
        encoder_name: str | None = None,
        hashes: np.ndarray | None = None,
        **build_kw: Any,
    ) -> MemoryBank:
        """An in-memory bank over ``embeddings`` (modality defaults to all multi-modal; ``hashes``
        [n, 2] as :func:`record_hashes` gives, or None)."""
        emb = _check_matrix(embeddings, what="embeddings")
        mod = np.full(len(emb), int(Modality.MULTI), np.uint8) if modality is None else np.asarray(modality, np.uint8)
        index = MemoryIndex.build(emb, factory=factory, ids=ids, encoder_name=encoder_name, **build_kw)
        return cls(index, emb, mod, hashes=None if hashes is None else np.asarray(hashes, np.uint64))

    def save(self, directory: str | Path) -> Path:
        """Write the index files plus ``embeddings.npy``, ``modality.npy`` and ``hashes.npy``."""
        d = Path(directory)
        self.index.save(d)
        if self.directory is None or Path(self.directory).resolve() != d.resolve():
            write_embeddings(d / EMBEDDINGS_FILE, _chunks(self.embeddings), n=len(self), dim=self.dim)
            _save_npy(d / MODALITY_FILE, np.asarray(self.modality, np.uint8))
            if self.hashes is not None:
                _save_npy(d / HASHES_FILE, np.asarray(self.hashes, np.uint64))
        self.directory = d
        return d

    @classmethod
    def load(cls, directory: str | Path, *, mmap_index: bool = False) -> MemoryBank:
        """Open a bank directory (written by :func:`build_bank` or :meth:`save`)."""
        d = Path(directory)
        index = MemoryIndex.load(d, mmap=mmap_index)
        emb = load_embeddings(d / EMBEDDINGS_FILE)
        if not (d / MODALITY_FILE).exists():
            raise FileNotFoundError(f"{d / MODALITY_FILE} is missing; rebuild the index with `cm3leon index build`")
        modality = np.load(d / MODALITY_FILE, mmap_mode="r", allow_pickle=False)
        hashes = np.load(d / HASHES_FILE, mmap_mode="r", allow_pickle=False) if (d / HASHES_FILE).exists() else None
        return cls(index, emb, modality, directory=d, hashes=hashes)


def build_bank(
    records: Iterable[DocRecord],
    *,
    n: int,
    encoder: Encoder,
    out: str | Path,
    factory: str = "Flat",
    batch_size: int = 256,
    train_size: int = 100_000,
    info: dict[str, Any] | None = None,
    progress: bool = False,
) -> MemoryBank:
    """Embed ``n`` documents in order (id = position) and write a bank directory at ``out``.

    Embeddings stream to ``embeddings.npy`` batch by batch; the FAISS index is then built
    from that memory-mapped file, so neither is ever whole in RAM during the build.
    """
    if n <= 0:
        raise ValueError("the memory bank is empty (0 documents); build the index from a non-empty dataset")
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    modality = np.zeros(n, np.uint8)
    hashes = np.zeros((n, 2), np.uint64)
    count = [0]

    def batches() -> Iterator[np.ndarray]:
        it: Iterable[DocRecord] = records
        if progress:
            from tqdm import tqdm

            it = tqdm(records, total=n, desc="embed documents", unit="doc")
        buf: list[DocRecord] = []
        for rec in it:
            if count[0] + len(buf) >= n:
                raise ValueError(f"got more than the announced {n} documents")
            modality[count[0] + len(buf)] = record_modality(rec)
            hashes[count[0] + len(buf)] = record_hashes(rec)
            buf.append(rec)
            if len(buf) == batch_size:
                yield encoder.embed_documents(buf)
                count[0] += len(buf)
                buf = []
        if buf:
            yield encoder.embed_documents(buf)
            count[0] += len(buf)

    write_embeddings(d / EMBEDDINGS_FILE, batches(), n=n, dim=encoder.dim)
    _save_npy(d / MODALITY_FILE, modality)
    _save_npy(d / HASHES_FILE, hashes)
    emb = load_embeddings(d / EMBEDDINGS_FILE)
    index = MemoryIndex.build(
        emb, factory=factory, train_size=train_size, encoder_name=encoder.name, info=info, progress=progress
    )
    index.save(d)
    log.info("memory bank of %d documents (%s, %d-d) written to %s", n, factory, encoder.dim, d)
    return MemoryBank(index, emb, np.load(d / MODALITY_FILE, mmap_mode="r"), directory=d,
                      hashes=np.load(d / HASHES_FILE, mmap_mode="r"))


def _chunks(x: np.ndarray, size: int = 65_536) -> Iterator[np.ndarray]:
    for s in range(0, len(x), size):
        yield np.asarray(x[s : s + size])


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _skip_polysemous_training(index: faiss.Index) -> None:
    """PQ indexes train polysemous codes by default: ~50x the training time for a search
    mode (Hamming pre-filtering) this module never uses."""
    try:
        inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        inner = faiss.downcast_index(index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def _ivf_lists(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def _faiss_reason(e: RuntimeError) -> str:
    """The human part of a FAISS C++ exception message."""
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    if "failed:" in msg:
        msg = msg.split("failed:", 1)[1].strip()
    elif ": " in msg and msg.startswith("Error in"):
        msg = msg.rsplit(": ", 1)[-1]
    return msg
