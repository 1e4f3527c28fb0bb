"""The paper's retrieval policy (§2.1) on hand-built unit vectors."""

from __future__ import annotations

import numpy as np
import pytest

from cm3leon.retrieval.index import MemoryBank, Modality
from cm3leon.retrieval.retriever import Retriever, RetrieverConfig, drop_query_words

D = 16
M, T, I = int(Modality.MULTI), int(Modality.TEXT), int(Modality.IMAGE)


def e(i: int) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[i] = 1.0
    return v


def at(score: float, axis: int) -> np.ndarray:
    """A unit vector with inner product ``score`` with e(0), orthogonal otherwise along ``axis``."""
    return (score * e(0) + np.sqrt(1 - score**2) * e(axis)).astype(np.float32)


def bank_of(vectors, modality=None) -> MemoryBank:
    return MemoryBank.from_arrays(np.stack(vectors), None if modality is None else np.array(modality, np.uint8))


def text_only(cfg: RetrieverConfig, bank: MemoryBank, q: np.ndarray, qid: int = -1, qdoc=None):
    """Retrieve with a text query only (no image)."""
    n = 1
    return Retriever(bank, cfg=cfg).retrieve_vectors(
        q[None], np.zeros((n, D), np.float32), has_text=np.ones(n, bool), has_image=np.zeros(n, bool),
        query_ids=np.array([qid]), query_docs=None if qdoc is None else qdoc[None],
    )


def test_relevance_threshold_skips_095_keeps_085():
    bank = bank_of([at(0.95, 1), at(0.85, 2), at(0.5, 3)])
    out = text_only(RetrieverConfig(k_text=1, k_image=0), bank, e(0))
    assert out.ids[0].tolist() == [1]
    assert out.scores[0, 0] == pytest.approx(0.85, abs=1e-5)
    assert out.stats.dropped_relevance == 1
    # the threshold is config: raise it and the 0.95 candidate comes back
    out = text_only(RetrieverConfig(k_text=1, k_image=0, max_relevance=0.99), bank, e(0))
    assert out.ids[0].tolist() == [0]


def test_near_duplicates_collapse_to_one():
    b = at(0.8, 1)
    b_copy = (b + 0.01 * e(5)) / np.linalg.norm(b + 0.01 * e(5))  # cosine ~0.99995 with b
    bank = bank_of([b, b_copy, b.copy(), at(0.7, 2), at(0.6, 3)])
    out = text_only(RetrieverConfig(k_text=3, k_image=0), bank, e(0))
    ids = out.ids[0].tolist()
    assert ids[0] in (0, 1, 2) and ids[1:] == [3, 4]
    assert out.stats.dropped_duplicate == 2


def test_dedup_across_text_and_image_queries():
    # both queries find doc 0 first; it must appear once, the image query then takes doc 2
    docs = [at(0.8, 1), at(0.7, 2), (0.6 * e(3) + 0.8 * e(4)).astype(np.float32)]
    img_q = 0.6 * docs[0] + 0.5 * docs[2]
    img_q /= np.linalg.norm(img_q)
    bank = bank_of(docs)
    _, by_image = bank.index.search(img_q[None], 3)
    assert by_image[0].tolist() == [0, 2, 1]  # text query ranks 0, 1, 2
    out = Retriever(bank, cfg=RetrieverConfig(k_text=1, k_image=1)).retrieve_vectors(e(0)[None], img_q[None])
    assert out.ids[0].tolist() == [0, 2]


def test_query_own_id_never_returns_even_when_embeddings_differ():
    # the query document (id 2) is stored with an embedding that scores only 0.8 with its
    # text query, so the relevance rule alone would keep it
    bank = bank_of([at(0.6, 1), at(0.5, 2), at(0.8, 3)])
    cfg = RetrieverConfig(k_text=2, k_image=0)
    assert 2 in text_only(cfg, bank, e(0)).ids[0].tolist()  # without an id, it would come back
    out = text_only(cfg, bank, e(0), qid=2)
    assert out.ids[0].tolist() == [0, 1]
    assert out.stats.dropped_self == 1


def test_self_exclusion_over_random_banks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tq = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    iq = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    tq /= np.linalg.norm(tq, axis=1, keepdims=True)
    iq /= np.linalg.norm(iq, axis=1, keepdims=True)
    bank = MemoryBank.from_arrays(x)
    cfg = RetrieverConfig(max_relevance=1.01, dedup_threshold=1.01)  # only the id rule can exclude
    out = Retriever(bank, cfg=cfg).retrieve_vectors(tq, iq, query_ids=np.arange(300), query_docs=np.zeros_like(x))
    assert not (out.ids == np.arange(300)[:, None]).any()
    assert (out.ids >= 0).all()
    for row in out.ids:
        assert len(set(row.tolist())) == 4  # never the same document twice


def test_near_copy_of_query_document_is_skipped():
    # doc 1 is a copy of the query document (id 0) under another id: its text-query score
    # (0.8) passes the relevance rule, but the document-level near-copy check drops it
    qdoc = at(0.8, 1)
    bank = bank_of([qdoc, qdoc.copy(), at(0.7, 2)])
    out = text_only(RetrieverConfig(k_text=1, k_image=0), bank, e(0), qid=0)
    assert out.ids[0].tolist() == [2]


def test_multimodal_documents_preferred():
    bank = bank_of([at(0.85, 1), at(0.8, 2), at(0.6, 3)], modality=[T, I, M])
    out = text_only(RetrieverConfig(k_text=1, k_image=0), bank, e(0))
    assert out.ids[0].tolist() == [2]
    out = text_only(RetrieverConfig(k_text=3, k_image=0), bank, e(0))
    assert out.ids[0].tolist() == [2, 0, 1]  # multi-modal first, then the rest by relevance
    assert out.stats.unimodal_picked == 2
    out = text_only(RetrieverConfig(k_text=1, k_image=0, prefer_multimodal=False), bank, e(0))
    assert out.ids[0].tolist() == [0]
    out = text_only(RetrieverConfig(k_text=3, k_image=0, allow_unimodal=False), bank, e(0))
    assert out.ids[0].tolist() == [2, -1, -1]


def test_fills_k_past_long_runs_of_duplicates():
    # 40 copies of one document outrank the two distinct ones; the first fetch (overfetch
    # 1 -> 3 candidates) sees only copies, so the retriever must fetch deeper
    dup = at(0.8, 1)
    vecs = [dup] * 40 + [at(0.5, 2), at(0.4, 3)]
    out = text_only(RetrieverConfig(k_text=3, k_image=0, overfetch=1), bank_of(vecs), e(0))
    ids = out.ids[0].tolist()
    assert ids[0] < 40 and ids[1:] == [40, 41]
    assert out.stats.as_dict()["fill_rate"] == 1.0


def test_pads_with_minus_one_when_bank_cannot_fill():
    out = text_only(RetrieverConfig(k_text=3, k_image=0), bank_of([at(0.8, 1)] * 5), e(0))
    assert out.ids[0, 0] >= 0 and out.ids[0, 1:].tolist() == [-1, -1]
    assert np.isnan(out.scores[0, 1:]).all()
    assert out.stats.as_dict()["fill_rate"] == pytest.approx(1 / 3)


def test_missing_modality_hands_over_its_quota():
    bank = bank_of([at(s, i + 1) for i, s in enumerate([0.8, 0.7, 0.6, 0.5, 0.4])])
    r = Retriever(bank, cfg=RetrieverConfig(k_text=2, k_image=2))
    out = r.retrieve_vectors(
        np.zeros((1, D), np.float32), e(0)[None], has_text=np.array([False]), has_image=np.array([True])
    )
    assert out.ids[0].tolist() == [0, 1, 2, 3]


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mod = rng.choice([T, I, M], size=200).astype(np.uint8)
    bank = MemoryBank.from_arrays(x, mod)
    q = x[:20] + 0.2 * rng.standard_normal((20, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cfg = RetrieverConfig(batch_size=7, dedup_threshold=0.6)
    together = Retriever(bank, cfg=cfg).retrieve_vectors(q, q[::-1].copy(), query_ids=np.arange(20))
    for i in range(20):
        one = Retriever(bank, cfg=cfg).retrieve_vectors(q[i : i + 1], q[::-1][i : i + 1].copy(),
                                                        query_ids=np.array([i]))
        np.testing.assert_array_equal(one.ids[0], together.ids[i])


# ---- query dropout ----------------------------------------------------------------------


def test_query_dropout_drops_stated_fraction_and_is_seeded():
    words = [f"w{i}" for i in range(20)]
    text = " ".join(words)
    out = drop_query_words(text, rate=0.2, seed=3, query_id=11)
    kept = out.split()
    assert len(kept) == 16
    assert kept == [w for w in words if w in set(kept)]  # order kept, nothing invented
    assert drop_query_words(text, rate=0.2, seed=3, query_id=11) == out
    others = {drop_query_words(text, rate=0.2, seed=3, query_id=q) for q in range(20)}
    assert len(others) > 10  # depends on the query id ...
    assert len({drop_query_words(text, rate=0.2, seed=s, query_id=11) for s in range(10)}) > 5  # ... and the seed
    assert len(drop_query_words("one two three four five", rate=0.2, seed=0, query_id=0).split()) == 4
    assert drop_query_words("circle", rate=0.9, seed=0, query_id=0) == "circle"  # never empties a query
    assert drop_query_words(text, rate=0.0, seed=0, query_id=0) == text


def test_query_dropout_rate_over_many_queries():
    text = " ".join(f"w{i}" for i in range(10))
    dropped = [10 - len(drop_query_words(text, rate=0.2, seed=0, query_id=q).split()) for q in range(200)]
    assert set(dropped) == {2}
    counts = np.zeros(10)
    for q in range(2000):
        kept = set(drop_query_words(text, rate=0.2, seed=0, query_id=q).split())
        counts += [f"w{i}" not in kept for i in range(10)]
    np.testing.assert_allclose(counts / 2000, 0.2, atol=0.04)  # every word equally likely
    # short captions: 0.2 * 3 words is rounded stochastically, so 20% are dropped on average
    short = [3 - len(drop_query_words("a red circle", rate=0.2, seed=0, query_id=q).split()) for q in range(3000)]
    assert set(short) == {0, 1}
    assert np.mean(short) / 3 == pytest.approx(0.2, abs=0.02)


def test_config_validation():
    with pytest.raises(ValueError, match="query_dropout"):
        RetrieverConfig(query_dropout=1.5)
    with pytest.raises(ValueError, match="k_text"):
        RetrieverConfig(k_text=0, k_image=0)


def test_encoder_bank_dimension_mismatch():
    from cm3leon.retrieval.encoder import DualEncoder, DualEncoderConfig, DualEncoderModel
    from cm3leon.tokenize.text_bpe import TextTokenizer

    tok = TextTokenizer.train(["a red circle", "a blue square"] * 5, 260)
    enc = DualEncoder(DualEncoderModel(DualEncoderConfig(vocab_size=tok.vocab_size, dim=8, width=16,
                                                         channels=(4, 8))), tok)
    with pytest.raises(ValueError, match="8-d vectors but the index holds 16-d"):
        Retriever(bank_of([e(1)]), enc)


def test_approximate_index_scores_are_rescored_exactly():
    # with a coarse PQ index the stored scores are approximate; the policy must see exact
    # cosines (and order) from the document vectors, so its thresholds keep their meaning
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:10] + 0.3 * rng.standard_normal((10, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    bank = MemoryBank.from_arrays(x, factory="IVF8,PQ2")
    bank.index.nprobe = 8
    cfg = RetrieverConfig(k_text=4, k_image=0, max_relevance=1.01, dedup_threshold=1.01)
    out = Retriever(bank, cfg=cfg).retrieve_vectors(q, np.zeros_like(q), has_image=np.zeros(10, bool))
    exact = np.einsum("nkd,nd->nk", x[out.ids], q)
    np.testing.assert_allclose(out.scores, exact, atol=1e-5)
    assert (np.diff(out.scores, axis=1) <= 1e-6).all()
    approx, _ = bank.index.search(q, 4)
    assert np.abs(approx - out.scores).max() > 1e-3  # the index alone would have reported other numbers


def _reference_select(cand_ids, cand_scores, cand_emb, cand_multi, *, k, cfg, query_id, avoid_emb, picked_ids):
    """The policy as a plain candidate-by-candidate loop (what select_candidates vectorises)."""
    order = [j for j in range(len(cand_ids)) if cand_ids[j] >= 0 and not (cfg.exclude_self and cand_ids[j] == query_id)
             and cand_scores[j] <= cfg.max_relevance]
    order = [j for j in order if cand_multi[j]] + [j for j in order if not cand_multi[j]]
    kept, seen, picked, dups = list(avoid_emb), set(picked_ids), [], 0
    for j in order:
        if len(picked) == k:
            break
        if int(cand_ids[j]) in seen or any(float(v @ cand_emb[j]) > cfg.dedup_threshold for v in kept):
            dups += 1
            continue
        picked.append(j)
        seen.add(int(cand_ids[j]))
        kept.append(cand_emb[j])
    return picked, dups


@pytest.mark.parametrize("seed", range(6))
def test_select_candidates_matches_a_plain_loop(seed):
    from cm3leon.retrieval.retriever import PolicyStats, select_candidates

    rng = np.random.default_rng(seed)
    n, dim = 60, 8
    base = rng.normal(size=(6, dim))  # few directions + noise: many near-duplicates, as in Shapes
    emb = base[rng.integers(0, 6, n)] + 0.05 * rng.normal(size=(n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ids = rng.integers(-1, 40, n)  # repeats and missing (-1) candidates
    scores = np.sort(rng.uniform(0.3, 1.0, n))[::-1].astype(np.float32)
    multi = rng.random(n) < 0.7
    avoid = emb[rng.integers(0, n, 2)] if seed % 2 else np.zeros((0, dim), np.float32)
    picked_ids = {int(i) for i in rng.integers(0, 40, 3)}
    cfg = RetrieverConfig(k_text=5, k_image=0, dedup_threshold=0.97)
    stats = PolicyStats()
    got = select_candidates(ids, scores, emb, multi, k=5, cfg=cfg, query_id=int(ids[3]),
                            avoid_emb=avoid if len(avoid) else None, picked_ids=picked_ids, stats=stats)
    want, dups = _reference_select(ids, scores, emb, multi, k=5, cfg=cfg, query_id=int(ids[3]), avoid_emb=avoid,
                                   picked_ids=picked_ids)
    assert got == want
    assert stats.dropped_duplicate == dups
