"""Retrieval-augmented CM3 training rows (paper §2.1-2.2, Fig. 9).

One *example* is ``[retrieved_1, ..., retrieved_k, query]``: up to ``n_retrieved``
(paper: 3) documents drawn at random (seeded) from the query's precomputed neighbours,
then the query document last. Each document is CM3-transformed independently
(:mod:`cm3leon.sequence.cm3`) and the documents are concatenated (each starts with its own
``<eos>``). The loss is plain next-token prediction over every real token: the query is
not up-weighted (§2.2).

A *row* is ``{"ids": Long[seq_len], "labels": Long[seq_len]}`` with ``labels`` = ``ids``
except ``-100`` on ``<pad>`` (the HF convention the trainer uses: the loss shifts,
predicting ``labels[t+1]`` from position ``t``); rows are right-padded with ``<pad>``.

Fitting (never cut an image in half):

- if the example is longer than ``seq_len``, retrieved documents are dropped (first ones
  first) until it fits;
- a query that does not fit on its own is cut after its last whole segment that fits
  (a leading text segment may be cut anywhere; an image never); such rows are counted
  in :attr:`PretrainDataset.n_truncated_queries`.

Packing: after the row's own example, further examples (for queries drawn at random,
seeded by the row) are appended while they fit whole (their retrieved documents are
dropped first if needed), giving up after ``max_fill_tries`` misses; the rest is padding.
As in standard LM packing, attention crosses example boundaries; every document starts
with ``<eos>``, which the model learns as "a new document begins" (the paper packs
retrieved documents into the same context the same way).

Row ``i`` is a deterministic function of ``(seed, i)``, so a trainer resumes exactly by
index; with ``shuffle=True`` row ``i`` holds query ``permutation(seed)[i]``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cm3leon.data.shards import Shards
from cm3leon.sequence.cm3 import CM3Config, cm3_transform, image_places, segment_ranges
from cm3leon.vocab import Kind, Vocab

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# An example maker: (document index, rng, budget, is_first_of_row) -> ids or None.
ExampleMaker = Callable[[int, random.Random, int, bool], "list[int] | None"]


def row_rng(seed: int, index: int) -> random.Random:
    """The random stream of row ``index``: independent of every other row and of order."""
    return random.Random(f"cm3leon-row:{seed}:{index}")


def truncate_document(ids: Sequence[int], max_len: int, vocab: Vocab) -> list[int] | None:
    """The longest prefix of whole segments of one document within ``max_len`` ids.

    If not even the first segment fits, a text segment is cut to ``max_len`` ids; an
    image segment is never cut (returns None). A trailing ``<break>`` is dropped.
    """
    if len(ids) <= max_len:
        return list(ids)
    segs = segment_ranges(ids, vocab)
    fitting = [e for _, _, e in segs if e <= max_len]
    if fitting:
        return list(ids[: max(fitting)])
    if segs and segs[0][0] is Kind.TEXT and max_len >= 2:
        return list(ids[:max_len])
    return None


def fit_example(docs: Sequence[Sequence[int]], budget: int) -> list[list[int]] | None:
    """Drop retrieved documents (all but the last, first ones first) until the total fits.

    Returns None if the last (query) document alone exceeds ``budget``.
    """
    if not docs or len(docs[-1]) > budget:
        return None
    docs = [list(d) for d in docs]
    while sum(map(len, docs)) > budget:
        docs.pop(0)
    return docs


def to_row(window: Sequence[int], seq_len: int, vocab: Vocab) -> dict[str, torch.Tensor]:
    """``{"ids", "labels", "image_idx"}`` Long[seq_len] from at most ``seq_len`` real ids.

    Labels are -100 on padding; ``image_idx`` is each image token's place in its
    un-transformed image (:func:`~cm3leon.sequence.cm3.image_places`), -1 elsewhere.
    """
    if len(window) > seq_len:
        raise ValueError(f"window of {len(window)} ids exceeds seq_len = {seq_len}")
    ids = torch.full((seq_len,), vocab.pad_id, dtype=torch.long)
    ids[: len(window)] = torch.as_tensor(list(window), dtype=torch.long)
    labels = ids.clone()
    labels[len(window) :] = IGNORE_INDEX
    image_idx = torch.full((seq_len,), -1, dtype=torch.long)
    image_idx[: len(window)] = torch.as_tensor(image_places(window, vocab), dtype=torch.long)
    return {"ids": ids, "labels": labels, "image_idx": image_idx}


def pack_row(
    first: int,
    make: ExampleMaker,
    draw: Callable[[random.Random], int],
    rng: random.Random,
    capacity: int,
    *,
    pack: bool = True,
    max_fill_tries: int = 4,
) -> list[int]:
    """Window for one row: example ``first``, then drawn examples while they fit whole."""
    window = list(make(first, rng, capacity, True) or [])
    misses = 0
    while pack and len(window) < capacity and misses < max_fill_tries:
        ex = make(draw(rng), rng, capacity - len(window), False)
        if ex is None:
            misses += 1
            continue
        window.extend(ex)
    return window


def collate(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of rows into ``{"ids": Long[B,T], "labels": Long[B,T]}``."""
    if not batch:
        raise ValueError("collate got an empty batch")
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def open_shards(shards: Shards | str | os.PathLike[str]) -> Shards:
    """``shards`` itself, or the :class:`Shards` at that path."""
    return shards if isinstance(shards, Shards) else Shards(Path(shards))


class PretrainDataset(torch.utils.data.Dataset):
    """Map-style retrieval-augmented CM3 rows over tokenized shards.

    ``len`` is the number of query documents (one row per query per epoch; packing adds
    randomly drawn extra examples). ``retrieval_dropout`` is the probability that an
    example uses no retrieved documents (0 = always retrieve when neighbours exist).
    """

    def __init__(
        self,
        shards: Shards | str | os.PathLike[str],
        *,
        seq_len: int,
        seed: int = 0,
        n_retrieved: int = 3,
        retrieval_dropout: float = 0.0,
        cm3: CM3Config | dict[str, Any] | None = None,
        pack: bool = True,
        shuffle: bool = True,
        max_fill_tries: int = 4,
    ) -> None:
        self.shards = open_shards(shards)
        self.vocab = self.shards.vocab
        self.cm3 = CM3Config(**cm3) if isinstance(cm3, dict) else (cm3 or CM3Config())
        if len(self.shards) == 0:
            raise ValueError(f"{self.shards.path} holds no documents")
        if seq_len < self.vocab.image_seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} cannot hold one image ({self.vocab.image_seq_len} tokens + <eos>); "
                "raise seq_len or use a coarser image tokenizer"
            )
        if n_retrieved < 0:
            raise ValueError(f"n_retrieved must be >= 0, got {n_retrieved}")
        if not 0.0 <= retrieval_dropout <= 1.0:
            raise ValueError(f"retrieval_dropout must be in [0, 1], got {retrieval_dropout}")
        if n_retrieved and self.shards.neighbors is None:
            log.warning(
                "%s has no neighbors.npy: training without retrieval (build an index and attach "
                "neighbours with `cm3leon data tokenize --index` to enable it)",
                self.shards.path,
            )
        self.seq_len = seq_len
        self.seed = seed
        self.n_retrieved = n_retrieved if self.shards.neighbors is not None else 0
        self.retrieval_dropout = retrieval_dropout
        self.pack = pack
        self.max_fill_tries = max_fill_tries
        n = len(self.shards)
        self.order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        self.n_truncated_queries = int(np.sum(self.shards.lengths > seq_len))
        if self.n_truncated_queries:
            log.warning(
                "%d of %d documents are longer than seq_len = %d and will be cut at a segment boundary",
                self.n_truncated_queries, n, seq_len,
            )

    def __len__(self) -> int:
        return len(self.order)

    def retrieved_for(self, q: int, rng: random.Random) -> list[int]:
        """A seeded random subset of query ``q``'s neighbours (no self, no repeats)."""
        if not self.n_retrieved or rng.random() < self.retrieval_dropout:
            return []
        row = self.shards.neighbors[q]  # type: ignore[index]
        cands = list(dict.fromkeys(int(x) for x in row if x >= 0 and x != q))
        return rng.sample(cands, min(self.n_retrieved, len(cands)))

    def _transform(self, ids: Sequence[int], rng: random.Random, max_spans: int | None = None) -> list[int]:
        c = self.cm3
        cap = c.max_spans if c.max_spans is not None else self.vocab.n_masks
        if max_spans is not None:
            cap = min(cap, max_spans)
        return cm3_transform(
            ids, self.vocab, rng, poisson_lambda=c.poisson_lambda, max_spans=cap,
            whole_segment_prob=c.whole_segment_prob, mask_images=c.mask_images, segment_choice=c.segment_choice,
        )

    def example(self, q: int, rng: random.Random, budget: int, first: bool) -> list[int] | None:
        """Ids of query ``q``'s example within ``budget`` (None if it cannot fit whole)."""
        if not first and int(self.shards.lengths[q]) > budget:
            return None  # a filler that cannot fit: skip the retrieval and CM3 work
        retrieved = self.retrieved_for(q, rng)
        docs = [self._transform(self.shards[r], rng) for r in retrieved]
        query = self.shards[q]
        docs.append(self._transform(query, rng))
        fitted = fit_example(docs, budget)
        if fitted is not None:
            return [i for d in fitted for i in d]
        if not first:
            return None
        cut = truncate_document(query, budget, self.vocab)
        if cut is None:
            return None
        # each span adds exactly 2 ids, so this many spans still fit
        return self._transform(cut, rng, max_spans=(budget - len(cut)) // 2)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        rng = row_rng(self.seed, i)
        window = pack_row(
            int(self.order[i]), self.example, lambda r: r.randrange(len(self.shards)), rng,
            self.seq_len, pack=self.pack, max_fill_tries=self.max_fill_tries,
        )
        return to_row(window, self.seq_len, self.vocab)
