"""Exact duplicate captions: the ``duplicates`` rule of the retrieval policy, on tiny banks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cm3leon.data.records import DocRecord
from cm3leon.retrieval.index import MemoryBank, build_bank, record_hashes
from cm3leon.retrieval.retriever import Retriever, RetrieverConfig, is_copy

D = 8


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


# Four documents captioned "digit 3" (ids 0-3, doc 1 holds the same image bytes as the query,
# doc 0) and two "digit 8" (ids 4-5). Same-caption documents sit close to the caption vector
# e0, as an encoder that treats equal captions as positives puts them.
CAPTION = {3: 11, 8: 22}  # caption hashes
VECS = [unit([1, 0.20, 0, 0, 0, 0, 0, 0]), unit([1, 0.20, 0, 0, 0, 0, 0, 0]), unit([1, 0, 0.15, 0, 0, 0, 0, 0]),
        unit([1, 0, 0, 0.17, 0, 0, 0, 0]), unit([0.8, 0, 0, 0, 0.6, 0, 0, 0]), unit([0.75, 0, 0, 0, 0, 0.66, 0, 0])]
HASHES = np.array([[11, 100], [11, 100], [11, 102], [11, 103], [22, 104], [22, 105]], np.uint64)


def bank(hashes=HASHES) -> MemoryBank:
    return MemoryBank.from_arrays(np.stack(VECS), hashes=hashes)


def retrieve(cfg: RetrieverConfig, b: MemoryBank, query_id: int = 0):
    """A text query for the caption of document ``query_id`` (the caption vector e0)."""
    q = unit([1, 0, 0, 0, 0, 0, 0, 0])[None]
    return Retriever(b, cfg=cfg).retrieve_vectors(q, np.zeros_like(q), has_text=np.array([True]),
                                                  has_image=np.array([False]), query_ids=np.array([query_id]))


def test_paper_rule_skips_every_document_with_the_querys_caption():
    out = retrieve(RetrieverConfig(k_text=2, k_image=0), bank())
    assert out.ids[0].tolist() == [4, 5]  # only the other caption's documents are left
    assert out.stats.capped_same_caption == 3  # docs 1-3 scored > 0.9 and share the caption


def test_content_rule_keeps_same_caption_documents_but_drops_true_copies():
    out = retrieve(RetrieverConfig(k_text=2, k_image=0, duplicates="content"), bank())
    # doc 1 holds the query's own image: a copy; docs 2 and 3 are other images of the same caption
    assert out.ids[0].tolist() == [2, 3]
    assert out.stats.dropped_copy == 1
    assert out.stats.dropped_relevance == 0


def test_content_rule_still_caps_other_captions():
    # a document with another caption but a score above the cap is a near-copy by the paper's rule
    vecs = [VECS[0], unit([1, 0, 0, 0, 0, 0, 0, 0.2]), VECS[4]]
    hashes = np.array([[11, 100], [33, 200], [22, 104]], np.uint64)
    b = MemoryBank.from_arrays(np.stack(vecs), hashes=hashes)
    out = retrieve(RetrieverConfig(k_text=1, k_image=0, duplicates="content"), b)
    assert out.ids[0].tolist() == [2]
    assert out.stats.dropped_relevance == 1


def test_content_rule_equals_paper_rule_on_unique_captions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = np.stack([np.arange(1, 121), np.arange(1001, 1121)], axis=1).astype(np.uint64)
    b = MemoryBank.from_arrays(x, hashes=hashes)
    q = x[:30] + 0.2 * rng.standard_normal((30, D)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    base = dict(max_relevance=0.8, dedup_threshold=0.7)
    paper = Retriever(b, cfg=RetrieverConfig(**base)).retrieve_vectors(q, q[::-1].copy(), query_ids=np.arange(30))
    content = Retriever(b, cfg=RetrieverConfig(duplicates="content", **base)).retrieve_vectors(
        q, q[::-1].copy(), query_ids=np.arange(30))
    np.testing.assert_array_equal(paper.ids, content.ids)
    assert paper.stats.dropped_relevance > 0  # the cap did act


def test_picks_sharing_a_caption_are_not_near_duplicates_of_each_other():
    # docs 2 and 3 have cosine ~0.98 (> 0.95): as different captions they would collapse to one
    assert float(VECS[2] @ VECS[3]) > 0.95
    out = retrieve(RetrieverConfig(k_text=3, k_image=0, duplicates="content"), bank())
    assert out.ids[0].tolist() == [2, 3, 4]
    # but a second copy of an image already picked is a duplicate
    hashes = HASHES.copy()
    hashes[3, 1] = 102  # doc 3 now holds doc 2's image bytes
    out = retrieve(RetrieverConfig(k_text=3, k_image=0, duplicates="content"), bank(hashes))
    assert out.ids[0].tolist() == [2, 4, 5]


def test_content_rule_needs_hashes():
    with pytest.raises(ValueError, match="hashes.npy"):
        Retriever(MemoryBank.from_arrays(np.stack(VECS)), cfg=RetrieverConfig(duplicates="content"))
    with pytest.raises(ValueError, match="duplicates"):
        RetrieverConfig(duplicates="caption")


def test_is_copy_rules():
    h = np.array([[1, 5], [1, 6], [2, 5], [1, 0], [2, 0]], np.uint64)
    assert is_copy(h, np.array([1, 5], np.uint64)).tolist() == [True, False, True, False, False]  # same image
    assert is_copy(h, np.array([1, 0], np.uint64)).tolist() == [False, False, False, True, False]  # text-only
    assert not is_copy(h, np.array([0, 0], np.uint64)).any()


class _Toy:
    """An encoder stand-in: text -> e0 + a per-caption axis, image -> its mean colour."""

    name, dim = "toy", D

    def embed_text(self, texts):
        return np.stack([unit([1.0] + [0.3 * (hash(t) % 3 == i) for i in range(D - 1)]) for t in texts])

    def embed_image(self, images):
        return np.stack([unit([1.0, *(np.asarray(im, np.float32).mean((0, 1)) / 255.0), 0, 0, 0, 0]) for im in images])

    def embed_documents(self, records):
        from cm3leon.retrieval.encoder_base import combine_embeddings

        t, v = self.embed_text([r.text for r in records]), self.embed_image([r.image for r in records])
        n = len(records)
        return combine_embeddings(t, v, has_text=np.ones(n, bool), has_image=np.ones(n, bool))


def test_build_bank_writes_hashes_and_retrieve_hashes_queries(tmp_path):
    ims = [Image.new("RGB", (4, 4), (10 * i, 0, 0)) for i in range(4)]
    recs = [DocRecord(str(i), "digit 3" if i < 3 else "digit 8", ims[i], {}) for i in range(4)]
    b = build_bank(recs, n=4, encoder=_Toy(), out=tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded.hashes is not None and loaded.hashes.shape == (4, 2)
    assert [tuple(map(int, h)) for h in loaded.hashes] == [record_hashes(r) for r in recs]
    assert loaded.hashes[0, 0] == loaded.hashes[1, 0] != loaded.hashes[3, 0]
    assert len({int(h) for h in loaded.hashes[:, 1]}) == 4
    # a query record holding document 0's content: document 0 is a copy, 1 and 2 share its caption
    r = Retriever(b, _Toy(), RetrieverConfig(k_text=2, k_image=0, duplicates="content", max_relevance=0.5))
    out = r.retrieve([DocRecord("q", "digit 3", ims[0].copy(), {})])
    assert sorted(out.ids[0].tolist()) == [1, 2]
    assert out.stats.dropped_copy == 1
