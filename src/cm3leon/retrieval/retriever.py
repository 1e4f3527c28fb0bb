"""The paper's retrieval policy (§2.1): relevant, diverse, multi-modal documents.

Given a query document, retrieve ``k_text`` documents with its text embedding and
``k_image`` with its image embedding from the memory bank, then, in relevance order:

- drop the query itself (by id) and every candidate with relevance > ``max_relevance``
  (0.9 in the paper: near-copies of the query score too high);
- exact duplicate captions (``duplicates``): under ``"score"`` (the paper) the cap applies to
  every candidate, so on data whose captions repeat ("a handwritten digit 3" x 180) every
  document with the query's caption is skipped and only wrong ones remain. Under
  ``"content"`` a candidate with the query's exact caption is a copy only when it is the same
  content (same image bytes, from the bank's hashes); otherwise the cap and the near-duplicate
  test, which then measure the shared caption and not copying, do not apply to it;
- drop near-duplicates: a candidate whose document embedding has cosine >
  ``dedup_threshold`` with the query document or with a document already picked;
- prefer multi-modal documents: multi-modal candidates first, uni-modal ones only to
  fill what is left (``allow_unimodal``);
- in training, form the text query with query dropout: ``query_dropout`` (20%) of the
  query's words are removed (the paper drops 20% of query tokens; words are the unit
  every encoder's tokenizer agrees on), seeded by ``(seed, query id)`` so that the result does not
  depend on batch composition.

Candidates are over-fetched (``overfetch`` x k) and re-fetched with a larger k for rows
the filters left short, so a row is filled whenever the bank allows it (up to
``max_fetch`` candidates). With ``exact_rescore`` the candidates' scores are recomputed
exactly from the stored document vectors, so with an approximate index (IVF-PQ, HNSW)
the thresholds still apply to true cosines (an exact "Flat" index needs no rescoring).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cm3leon.data.records import DocRecord
from cm3leon.retrieval.encoder_base import Encoder, combine_embeddings
from cm3leon.retrieval.index import MemoryBank, Modality, record_hashes

log = logging.getLogger(__name__)


DUPLICATE_RULES = ("score", "content")


@dataclass(frozen=True)
class RetrieverConfig:
    """Every threshold of the retrieval policy (defaults: paper §2.1)."""

    k_text: int = 2
    k_image: int = 2
    max_relevance: float = 0.9
    dedup_threshold: float = 0.95
    prefer_multimodal: bool = True
    allow_unimodal: bool = True
    exclude_self: bool = True
    query_dropout: float = 0.2
    overfetch: int = 4
    max_fetch: int = 1024
    seed: int = 0
    batch_size: int = 256
    exact_rescore: bool = True
    duplicates: str = "score"  # "score" (paper) | "content" (see the module docstring)

    def __post_init__(self) -> None:
        if self.duplicates not in DUPLICATE_RULES:
            raise ValueError(f"duplicates must be one of {DUPLICATE_RULES}, got {self.duplicates!r}")
        if self.k_text < 0 or self.k_image < 0 or self.k_text + self.k_image == 0:
            raise ValueError(f"k_text={self.k_text}, k_image={self.k_image}: need non-negative counts, not both 0")
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f"query_dropout must be in [0, 1), got {self.query_dropout}")
        if self.overfetch < 1 or self.max_fetch < 1 or self.batch_size < 1:
            raise ValueError("overfetch, max_fetch and batch_size must be >= 1")

    @property
    def k(self) -> int:
        """Neighbours per query (columns of the result)."""
        return self.k_text + self.k_image


@dataclass
class PolicyStats:
    """Counts of what the filters did, for reports and ``neighbors.json``."""

    queries: int = 0
    picked: int = 0
    slots: int = 0
    dropped_self: int = 0
    dropped_relevance: int = 0
    dropped_duplicate: int = 0
    dropped_copy: int = 0  # "content": same content as the query or a pick
    capped_same_caption: int = 0  # "score": dropped by the cap while sharing the query's exact caption
    unimodal_picked: int = 0
    relevance_sum: float = 0.0

    def merge(self, other: PolicyStats) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def as_dict(self) -> dict[str, float]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "relevance_sum"}
        d["fill_rate"] = self.picked / self.slots if self.slots else 0.0
        d["mean_relevance"] = self.relevance_sum / self.picked if self.picked else float("nan")
        return d


@dataclass
class Retrieved:
    """Result of a batched retrieval: ids/scores int64/float32 [N, k], -1 / nan padded.

    In each row the picks from the text query come first, then those from the image query.
    """

    ids: np.ndarray
    scores: np.ndarray
    stats: PolicyStats = field(default_factory=PolicyStats)


# ---------------------------------------------------------------------- pure policy


def drop_query_words(text: str, *, rate: float, seed: int, query_id: int) -> str:
    """``text`` with a ``rate`` fraction of its words removed (order kept).

    ``rate * n_words`` is rounded stochastically (floor, plus one with probability equal
    to the fractional part), so the expected fraction dropped is exactly ``rate`` for any
    length; at least one word is always kept. The choice depends only on
    ``(seed, query_id)``, never on the batch a query sits in.
    """
    words = text.split()
    if rate <= 0 or len(words) < 2:
        return text
    rng = np.random.default_rng([int(seed), int(query_id) & 0x7FFFFFFFFFFFFFFF])
    n_drop = min(int(np.floor(rate * len(words) + rng.random())), len(words) - 1)
    if n_drop == 0:
        return text
    drop = set(rng.choice(len(words), size=n_drop, replace=False).tolist())
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def select_candidates(
    cand_ids: np.ndarray,
    cand_scores: np.ndarray,
    cand_emb: np.ndarray,
    cand_multimodal: np.ndarray,
    *,
    k: int,
    cfg: RetrieverConfig,
    query_id: int = -1,
    avoid_emb: np.ndarray | None = None,
    picked_ids: set[int] | None = None,
    stats: PolicyStats | None = None,
    cand_hashes: np.ndarray | None = None,
    query_hashes: np.ndarray | None = None,
    avoid_hashes: np.ndarray | None = None,
) -> list[int]:
    """Positions (into the candidate arrays) of up to ``k`` documents the policy keeps.

    ``cand_*`` are one query's candidates sorted by decreasing relevance (``cand_ids``
    -1 = no candidate); ``cand_emb`` are their document embeddings; ``avoid_emb`` [P, D]
    holds the query document and documents already picked (near-duplicates of any of
    them are skipped); ``picked_ids`` are ids already picked (never picked again).
    ``cand_hashes`` [C, 2], ``query_hashes`` [2] and ``avoid_hashes`` [P, 2] (rows aligned with
    ``avoid_emb``) are (caption, image) content hashes, 0 = absent; ``cfg.duplicates="content"``
    needs them.
    """
    stats = stats if stats is not None else PolicyStats()
    valid = cand_ids >= 0
    if cfg.exclude_self and query_id >= 0:
        is_self = valid & (cand_ids == query_id)
        stats.dropped_self += int(is_self.sum())
        valid &= ~is_self
    hashed = cand_hashes is not None and query_hashes is not None
    content = cfg.duplicates == "content"
    if content and not hashed:
        raise ValueError('duplicates="content" needs content hashes of the candidates and the query')
    same_caption = np.zeros(len(cand_ids), bool)
    if hashed:
        cand_hashes = np.asarray(cand_hashes, np.uint64)
        qh = np.asarray(query_hashes, np.uint64)
        same_caption = valid & (qh[0] != 0) & (cand_hashes[:, 0] == qh[0])
        if content:
            copy = valid & is_copy(cand_hashes, qh)
            stats.dropped_copy += int(copy.sum())
            valid &= ~copy
            same_caption &= valid
    too_close = valid & (cand_scores > cfg.max_relevance)
    if content:
        too_close &= ~same_caption
    else:
        stats.capped_same_caption += int((too_close & same_caption).sum())
    stats.dropped_relevance += int(too_close.sum())
    valid &= ~too_close
    order = np.flatnonzero(valid)
    if cfg.prefer_multimodal:
        multi = order[cand_multimodal[order]]
        rest = order[~cand_multimodal[order]] if cfg.allow_unimodal else order[:0]
        order = np.concatenate([multi, rest])
    # Greedy in relevance order, vectorised: ``near`` tracks each candidate's highest cosine
    # with the query document and the picks so far, updated once per pick.
    emb = np.asarray(cand_emb, np.float32)[order]
    ids = cand_ids[order]
    hs = np.asarray(cand_hashes, np.uint64)[order] if content else None
    near = np.full(len(order), -np.inf, np.float32)
    dup = np.isin(ids, np.fromiter(picked_ids, np.int64)) if picked_ids else np.zeros(len(order), bool)
    if avoid_emb is not None and len(avoid_emb):
        sims = emb @ np.asarray(avoid_emb, np.float32).reshape(-1, emb.shape[1]).T  # [C, P]
        if hs is not None and avoid_hashes is not None:
            ah = np.asarray(avoid_hashes, np.uint64).reshape(-1, 2)
            shared = (hs[:, None, 0] == ah[None, :, 0]) & (ah[None, :, 0] != 0)
            sims = np.where(shared, -np.inf, sims)
            for a in ah:
                dup |= is_copy(hs, a)
        near = sims.max(axis=1) if sims.shape[1] else near
    picked: list[int] = []
    start = 0
    while len(picked) < k and start < len(order):
        ok = ~dup[start:] & (near[start:] <= cfg.dedup_threshold)
        if not ok.any():
            stats.dropped_duplicate += len(order) - start
            break
        j = start + int(np.argmax(ok))
        stats.dropped_duplicate += j - start  # examined and skipped before this pick
        picked.append(int(order[j]))
        sim = emb @ emb[j]
        if hs is not None:
            # between documents that share a caption, only the same content is a duplicate
            sim = np.where((hs[:, 0] == hs[j, 0]) & (hs[j, 0] != 0), -np.inf, sim)
            dup |= is_copy(hs, hs[j])
        near = np.maximum(near, sim)
        dup |= ids == ids[j]
        start = j + 1
    return picked


def is_copy(hashes: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Which rows of ``hashes`` [C, 2] hold the same content as ``ref`` [2]: the same image
    bytes, or (both without an image) the same caption."""
    hashes = np.asarray(hashes, np.uint64)
    t, i = np.uint64(ref[0]), np.uint64(ref[1])
    if i != 0:
        return hashes[:, 1] == i
    if t != 0:
        return (hashes[:, 1] == 0) & (hashes[:, 0] == t)
    return np.zeros(len(hashes), bool)


# ---------------------------------------------------------------------- retriever


class Retriever:
    """Applies the policy over a :class:`MemoryBank`, batched; embeds queries with ``encoder``."""

    def __init__(self, bank: MemoryBank, encoder: Encoder | None = None, cfg: RetrieverConfig | None = None) -> None:
        self.bank = bank
        self.encoder = encoder
        self.cfg = cfg or RetrieverConfig()
        if encoder is not None and encoder.dim != bank.dim:
            raise ValueError(
                f"encoder {encoder.name} makes {encoder.dim}-d vectors but the index holds {bank.dim}-d ones "
                f"(built with {bank.index.encoder_name}); use the encoder the index was built with"
            )
        if self.cfg.duplicates == "content" and bank.hashes is None:
            raise ValueError("the index has no content hashes (hashes.npy), which duplicates='content' needs; "
                             "rebuild it with `cm3leon index build`, or use duplicates='score'")

    # ---- from records ---------------------------------------------------------------
    def retrieve(
        self,
        records: Sequence[DocRecord],
        *,
        query_ids: Sequence[int] | None = None,
        training: bool = False,
    ) -> Retrieved:
        """Neighbours of query documents (text and/or image each).

        ``query_ids`` are the queries' ids in the bank (dataset rows), used for
        self-exclusion and seeding query dropout; ``training`` turns query dropout on.
        """
        if self.encoder is None:
            raise ValueError("this Retriever has no encoder; pass one to embed query records")
        records = list(records)
        n = len(records)
        qids = np.full(n, -1, np.int64) if query_ids is None else np.asarray(query_ids, np.int64)
        if qids.shape != (n,):
            raise ValueError(f"got {len(qids)} query ids for {n} records")
        has_text = np.array([r.text is not None for r in records], bool)
        has_image = np.array([r.image is not None for r in records], bool)
        dim = self.bank.dim
        text_q = np.zeros((n, dim), np.float32)
        image_q = np.zeros((n, dim), np.float32)
        if has_text.any():
            texts = [r.text or "" for r in records]
            if training and self.cfg.query_dropout > 0:
                texts = [
                    drop_query_words(t, rate=self.cfg.query_dropout, seed=self.cfg.seed, query_id=_seed_id(q, t))
                    for t, q in zip(texts, qids)
                ]
            text_q[has_text] = self.encoder.embed_text([t for t, h in zip(texts, has_text) if h])
        if has_image.any():
            image_q[has_image] = self.encoder.embed_image([r.image for r in records if r.image is not None])
        hashes = np.array([record_hashes(r) for r in records], np.uint64).reshape(n, 2)
        return self.retrieve_vectors(text_q, image_q, has_text=has_text, has_image=has_image, query_ids=qids,
                                     query_hashes=hashes)

    # ---- from vectors ---------------------------------------------------------------
    def retrieve_vectors(
        self,
        text_q: np.ndarray,
        image_q: np.ndarray,
        *,
        has_text: np.ndarray | None = None,
        has_image: np.ndarray | None = None,
        query_ids: np.ndarray | None = None,
        query_docs: np.ndarray | None = None,
        query_hashes: np.ndarray | None = None,
    ) -> Retrieved:
        """The policy over precomputed unit query vectors [N, D].

        ``query_docs`` [N, D] are the query documents' vectors for the near-copy check;
        by default they are looked up in the bank by ``query_ids`` (or built from the two
        query vectors when the id is not in the bank). ``query_hashes`` [N, 2] are the queries'
        (caption, image) hashes (:func:`~cm3leon.retrieval.index.record_hashes`); by default
        they are looked up in the bank by ``query_ids`` (0, unknown, for other queries).
        """
        n = len(text_q)
        has_text = np.ones(n, bool) if has_text is None else np.asarray(has_text, bool)
        has_image = np.ones(n, bool) if has_image is None else np.asarray(has_image, bool)
        qids = np.full(n, -1, np.int64) if query_ids is None else np.asarray(query_ids, np.int64)
        for name, a in (("text_q", text_q), ("image_q", image_q)):
            if a.shape != (n, self.bank.dim):
                raise ValueError(f"{name} has shape {a.shape}; expected ({n}, {self.bank.dim}) to match the index")
        if query_docs is None:
            query_docs = self._query_docs(text_q, image_q, has_text, has_image, qids)
        if query_hashes is None:
            query_hashes = np.zeros((n, 2), np.uint64)
            rows = self.bank.index.rows_of(qids)
            if self.bank.hashes is not None and (rows >= 0).any():
                query_hashes[rows >= 0] = self.bank.hashes[rows[rows >= 0]]
        query_hashes = np.asarray(query_hashes, np.uint64)
        if query_hashes.shape != (n, 2):
            raise ValueError(f"query_hashes has shape {query_hashes.shape}; expected ({n}, 2)")
        ids = np.full((n, self.cfg.k), -1, np.int64)
        scores = np.full((n, self.cfg.k), np.nan, np.float32)
        stats = PolicyStats()
        for s in range(0, n, self.cfg.batch_size):
            sl = slice(s, min(n, s + self.cfg.batch_size))
            self._batch(text_q[sl], image_q[sl], has_text[sl], has_image[sl], qids[sl], query_docs[sl],
                        query_hashes[sl], ids[sl], scores[sl], stats)
        return Retrieved(ids=ids, scores=scores, stats=stats)

    def _query_docs(self, text_q, image_q, has_text, has_image, qids) -> np.ndarray:
        docs = np.zeros_like(text_q)
        none = ~(has_text | has_image)
        if (~none).any():
            docs[~none] = combine_embeddings(text_q[~none], image_q[~none], has_text=has_text[~none],
                                             has_image=has_image[~none])
        rows = self.bank.index.rows_of(qids)
        in_bank = rows >= 0
        if in_bank.any():
            docs[in_bank] = self.bank.embeddings[rows[in_bank]]
        return docs

    def _quotas(self, has_text: bool, has_image: bool) -> tuple[int, int]:
        """(text, image) picks for one query; a missing modality hands its quota over."""
        kt, ki = self.cfg.k_text, self.cfg.k_image
        if not has_text:
            return 0, (kt + ki if has_image else 0)
        if not has_image:
            return kt + ki, 0
        return kt, ki

    def _batch(self, text_q, image_q, has_text, has_image, qids, qdocs, qhashes, out_ids, out_scores, stats) -> None:
        cfg = self.cfg
        b = len(qids)
        quotas = [self._quotas(bool(t), bool(i)) for t, i in zip(has_text, has_image)]
        stats.queries += b
        stats.slots += sum(a + c for a, c in quotas)
        pending = np.arange(b)
        fetch = min(cfg.overfetch * cfg.k + 1, cfg.max_fetch)
        while len(pending):
            cand = {}
            for name, q, has in (("text", text_q, has_text), ("image", image_q, has_image)):
                rows = pending[has[pending]]
                if len(rows):
                    sc, ii = self.bank.index.search(q[rows], min(fetch, len(self.bank)))
                    cand[name] = dict(zip(rows.tolist(), zip(sc, ii)))
            table, multi_table, hash_table, pos = self._lookup(cand)
            if cfg.exact_rescore and not self.bank.index.exact:
                self._rescore(cand, {"text": text_q, "image": image_q}, table, pos)
            short = []
            for r in pending.tolist():
                row_stats = PolicyStats()
                avoid = [qdocs[r]] if np.any(qdocs[r]) else []
                avoid_h = [qhashes[r]] if avoid else []
                col, exhausted, taken = 0, True, set()
                for name, quota in zip(("text", "image"), quotas[r]):
                    if quota == 0:
                        continue
                    sc, ii = cand[name][r]
                    at = pos(ii)
                    emb, multi = table[at], multi_table[at]
                    hashes = None if hash_table is None else hash_table[at]
                    picks = select_candidates(
                        ii, sc, emb, multi, k=quota, cfg=cfg, query_id=int(qids[r]),
                        avoid_emb=np.array(avoid) if avoid else None, picked_ids=taken, stats=row_stats,
                        cand_hashes=hashes, query_hashes=None if hashes is None else qhashes[r],
                        avoid_hashes=np.array(avoid_h, np.uint64) if avoid_h else None,
                    )
                    for j in picks:
                        taken.add(int(ii[j]))
                        out_ids[r, col], out_scores[r, col] = ii[j], sc[j]
                        avoid.append(emb[j])
                        if hashes is not None:
                            avoid_h.append(hashes[j])
                        col += 1
                        row_stats.picked += 1
                        row_stats.relevance_sum += float(sc[j])
                        row_stats.unimodal_picked += int(not multi[j])
                    if len(picks) < quota and ii[-1] >= 0 and len(ii) < len(self.bank):
                        exhausted = False
                if exhausted or fetch >= min(cfg.max_fetch, len(self.bank)):
                    stats.merge(row_stats)
                else:  # filters left the row short and more candidates exist: fetch more
                    out_ids[r], out_scores[r] = -1, np.nan
                    short.append(r)
            pending = np.array(short, np.int64)
            fetch = min(fetch * 4, cfg.max_fetch)

    @staticmethod
    def _rescore(cand: dict, queries: dict[str, np.ndarray], table: np.ndarray, pos) -> None:
        """Replace approximate index scores (IVF-PQ, HNSW) by exact inner products with the
        stored document vectors and re-sort, so relevance thresholds mean the same thing
        whatever the index type."""
        for name, rows in cand.items():
            for r, (_, ii) in rows.items():
                exact = np.where(ii >= 0, table[pos(ii)] @ queries[name][r], -np.inf).astype(np.float32)
                order = np.argsort(-exact, kind="stable")
                rows[r] = (exact[order], ii[order])

    def _lookup(self, cand: dict):
        """Tables of the embeddings, multi-modality and content hashes (None without them) of
        every candidate id of a batch, and the map from ids to their rows (-1 ids map to a
        zero / False sentinel row)."""
        all_ids = np.concatenate([ii for d in cand.values() for _, ii in d.values()] or [np.zeros(0, np.int64)])
        uniq = np.unique(all_ids[all_ids >= 0])
        rows = self.bank.index.rows_of(uniq)
        table = np.zeros((len(uniq) + 1, self.bank.dim), np.float32)
        table[:-1] = self.bank.embeddings[rows] if len(rows) else table[:-1]
        mm = np.zeros(len(uniq) + 1, bool)
        mm[:-1] = (self.bank.modality[rows] & Modality.MULTI) == Modality.MULTI if len(rows) else mm[:-1]
        hashes = None
        if self.bank.hashes is not None:
            hashes = np.zeros((len(uniq) + 1, 2), np.uint64)
            hashes[:-1] = self.bank.hashes[rows] if len(rows) else hashes[:-1]

        def pos(ids: np.ndarray) -> np.ndarray:
            p = np.searchsorted(uniq, ids)
            return np.where(ids >= 0, p, len(uniq))  # -1 ids map to the zero/False sentinel row

        return table, mm, hashes, pos


def _seed_id(query_id: int, text: str) -> int:
    """Query-dropout seed key: the bank id, or a stable hash of the text for outside queries."""
    if query_id >= 0:
        return int(query_id)
    import zlib

    return zlib.crc32(text.encode("utf-8"))
