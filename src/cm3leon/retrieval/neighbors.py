"""Neighbours of a whole training set, precomputed once (paper §2.1, DESIGN.md habit 5).

Pretraining never runs the retrieval encoder: the policy of :mod:`.retriever` is applied
to every document of a dataset in one batched pass and the result is stored as

    neighbors.npy    int64 [N, k_text + k_image]; row i = dataset row i; -1 = none;
                     picks from the text query first, then from the image query
    neighbors.json   retriever config, encoder, index, data, whether query dropout was
                     on, and stats (fill rate, mean relevance, what each filter dropped)

Training neighbours use query dropout; inference-time retrieval does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.config import atomic_write_text
from cm3leon.data.records import DocRecord
from cm3leon.retrieval.encoder_base import Encoder
from cm3leon.retrieval.index import MemoryBank
from cm3leon.retrieval.retriever import PolicyStats, Retriever, RetrieverConfig

log = logging.getLogger(__name__)

NEIGHBORS_FILE = "neighbors.npy"
FORMAT = "cm3leon.neighbors"
VERSION = 1


def neighbors_json_path(npy_path: str | Path) -> Path:
    """``neighbors.json`` beside a ``neighbors.npy`` (same stem)."""
    p = Path(npy_path)
    return p.with_suffix(".json")


def compute_neighbors(
    dataset: Sequence[DocRecord],
    bank: MemoryBank,
    encoder: Encoder,
    out: str | Path,
    *,
    cfg: RetrieverConfig | None = None,
    training: bool = True,
    same_bank: bool = True,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Retrieve neighbours for every record of ``dataset`` and write them to ``out`` (.npy).

    ``same_bank``: the dataset *is* the memory bank (row i == id i), so each query's own
    id is excluded; for another dataset (e.g. validation) ids do not correspond and only
    the relevance / near-copy rules apply. Returns the JSON description written beside.
    """
    cfg = cfg or RetrieverConfig()
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; nothing to retrieve neighbours for")
    if same_bank and n != len(bank):
        raise ValueError(
            f"the dataset has {n} rows but the index holds {len(bank)} documents, so rows and ids cannot "
            "correspond; pass the dataset the index was built from, or same_bank=False (--other-data)"
        )
    retriever = Retriever(bank, encoder, cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n, cfg.k))
    stats = PolicyStats()
    relevance = np.full((n, cfg.k), np.nan, np.float32)
    starts = range(0, n, cfg.batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="neighbours", unit="doc")
    t0 = time.time()
    try:
        for s in starts:
            rows = np.arange(s, min(n, s + cfg.batch_size))
            records = [dataset[int(i)] for i in rows]
            got = retriever.retrieve(records, query_ids=rows if same_bank else None, training=training)
            arr[rows] = got.ids
            relevance[rows] = got.scores
            stats.merge(got.stats)
            if bar is not None:
                bar.update(len(rows))
        arr.flush()
    except BaseException:
        del arr
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    del arr
    os.replace(tmp, out)
    desc = {
        "format": FORMAT,
        "version": VERSION,
        "n": n,
        "k": cfg.k,
        "columns": "picks from the text query first, then from the image query; -1 = none",
        "training": training,
        "query_dropout": cfg.query_dropout if training else 0.0,
        "same_bank": same_bank,
        "config": dataclasses.asdict(cfg),
        "encoder": encoder.describe(),
        "index": {
            "dir": None if bank.directory is None else str(bank.directory),
            "factory": bank.index.factory,
            "n": len(bank),
            "encoder": bank.index.encoder_name,
        },
        "stats": {
            **stats.as_dict(),
            "relevance_quantiles": _quantiles(relevance),
            "rows_full": int((np.isfinite(relevance).sum(1) == cfg.k).sum()),
            "seconds": round(time.time() - t0, 2),
        },
        **(info or {}),
    }
    jpath = neighbors_json_path(out)
    atomic_write_text(jpath, json.dumps(desc, indent=2, sort_keys=True, default=float) + "\n")
    log.info("neighbours of %d documents -> %s (fill rate %.3f)", n, out, desc["stats"]["fill_rate"])
    return desc


def load_neighbors(path: str | Path) -> np.ndarray:
    """A ``neighbors.npy`` as a read-only int64 [N, k] memmap (clear error if missing)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found; compute it with `cm3leon index neighbors`")
    arr = np.load(p, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 2 or arr.dtype != np.int64:
        raise ValueError(f"{p} must hold int64 [N, k] neighbour ids, got {arr.dtype} {arr.shape}")
    return arr


def _quantiles(x: np.ndarray) -> dict[str, float]:
    v = x[np.isfinite(x)]
    if not len(v):
        return {}
    return {f"p{q}": float(np.percentile(v, q)) for q in (5, 50, 95)}
