"""Retrieval-augmented row building: layout, labels, fitting, packing, determinism."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cm3leon.data.shards import Shards, attach_neighbors, write_documents
from cm3leon.sequence.build import (
    IGNORE_INDEX,
    PretrainDataset,
    collate,
    fit_example,
    to_row,
    truncate_document,
)
from cm3leon.sequence.cm3 import CM3Config, cm3_inverse, image_places, segment_ranges
from cm3leon.sequence.document import Document, split_documents
from cm3leon.vocab import Kind, Vocab

V = Vocab(text_size=50, image_size=32, image_seq_len=8, n_masks=8)
N = 40


def make_docs(n: int, seed: int = 0) -> list[list[int]]:
    """Unique caption+image documents (the caption starts with the doc number)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        cap = [i % V.text_size, i // V.text_size] + [rng.randrange(V.text_size) for _ in range(rng.randint(1, 6))]
        img = [rng.randrange(V.image_size) for _ in range(V.image_seq_len)]
        docs.append(Document.caption_image(cap, img).to_ids(V))
    return docs


@pytest.fixture()
def shards(tmp_path: Path) -> Shards:
    docs = make_docs(N)
    write_documents(tmp_path / "sh", V, docs)
    rng = np.random.default_rng(0)
    nb = np.stack([rng.permutation(N)[:4] for _ in range(N)]).astype(np.int64)
    nb[:, 3] = -1  # "none" entries are ignored
    nb[0, 0] = 0  # a self-neighbour is ignored
    attach_neighbors(tmp_path / "sh", nb, rows="shard")
    return Shards(tmp_path / "sh")


def window_of(row: dict[str, torch.Tensor]) -> list[int]:
    """The real ids of a row."""
    return [i for i, l in zip(row["ids"].tolist(), row["labels"].tolist()) if l != IGNORE_INDEX]


def docs_of(window: list[int]) -> list[list[int]]:
    return [cm3_inverse(d, V) for d in split_documents(window, V)]


def test_labels_are_ids_and_pad_is_ignored(shards: Shards) -> None:
    ds = PretrainDataset(shards, seq_len=96, seed=1)
    for i in range(10):
        row = ds[i]
        ids, labels = row["ids"], row["labels"]
        assert ids.shape == labels.shape == (96,) and ids.dtype == labels.dtype == torch.long
        real = ids != V.pad_id
        n = int(real.sum())
        assert bool(real[:n].all()) and not bool(real[n:].any())  # pad only at the end
        assert n > 0 and torch.equal(labels[:n], ids[:n])  # the trainer shifts (HF convention)
        assert bool((labels[n:] == IGNORE_INDEX).all())


def test_layout_retrieved_then_query_each_cm3(shards: Shards) -> None:
    index = {tuple(d): k for k, d in enumerate(shards)}
    ds = PretrainDataset(shards, seq_len=200, seed=3, pack=False)
    for i in range(len(ds)):
        docs = docs_of(window_of(ds[i]))
        ks = [index[tuple(d)] for d in docs]  # every document is an original, uncut
        q = int(ds.order[i])
        assert ks[-1] == q
        allowed = {int(x) for x in shards.neighbors[q] if x >= 0 and x != q}
        assert set(ks[:-1]) <= allowed and len(set(ks[:-1])) == len(ks) - 1
        assert len(ks) - 1 == min(3, len(allowed))  # 3 retrieved whenever 3 candidates exist


def test_images_never_cut_and_spans_inside_segments(shards: Shards) -> None:
    ds = PretrainDataset(shards, seq_len=70, seed=0, cm3=CM3Config(poisson_lambda=2.0))
    images = spans = 0
    for i in range(len(ds)):
        w = window_of(ds[i])
        for d in docs_of(w):
            for kind, s, e in segment_ranges(d, V):
                if kind is Kind.IMAGE:
                    assert e - s == V.image_seq_len
                    images += 1
        for d in split_documents(w, V):  # as trained: each span follows an <infill> in the tail
            for span in _split(d, V.infill_id)[1:]:
                assert {V.kind(t) for t in span} in ({Kind.TEXT}, {Kind.IMAGE}), [V.token_name(t) for t in span]
                spans += 1
    assert images > 0 and spans > 0  # both properties were exercised


def _split(ids: list[int], sep: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    for t in ids:
        if t == sep:
            out.append([])
        else:
            out[-1].append(t)
    return out


def test_deterministic_by_seed_and_index(tmp_path: Path, shards: Shards) -> None:
    a = PretrainDataset(shards, seq_len=96, seed=5)
    b = PretrainDataset(Shards(shards.path), seq_len=96, seed=5)
    c = PretrainDataset(shards, seq_len=96, seed=6)
    for i in [7, 0, 3, 7]:  # order of access does not matter
        assert torch.equal(a[i]["ids"], b[i]["ids"])
    assert any(not torch.equal(a[i]["ids"], c[i]["ids"]) for i in range(5))
    assert sorted(a.order.tolist()) == list(range(N))


def test_retrieved_dropped_first_when_too_long(shards: Shards) -> None:
    longest = int(shards.lengths.max())
    # room for the query plus at most one more document (with up to 2 CM3 spans each)
    ds = PretrainDataset(shards, seq_len=2 * longest + 2, seed=0, pack=False, cm3=CM3Config(max_spans=1))
    for i in range(len(ds)):
        docs = docs_of(window_of(ds[i]))
        assert docs[-1] == shards[int(ds.order[i])]
        assert len(docs) <= 2


def test_no_retrieval_and_dropout(shards: Shards) -> None:
    for kw in ({"n_retrieved": 0}, {"retrieval_dropout": 1.0}):
        ds = PretrainDataset(shards, seq_len=200, seed=0, pack=False, **kw)
        for i in range(10):
            assert len(docs_of(window_of(ds[i]))) == 1


def test_retrieval_dropout_rate(shards: Shards) -> None:
    ds = PretrainDataset(shards, seq_len=200, seed=0, pack=False, retrieval_dropout=0.5)
    plain = sum(len(docs_of(window_of(ds[i]))) == 1 for i in range(len(ds)))
    assert 8 <= plain <= 32  # Binomial(40, 0.5)


def test_packing_fills_rows_with_whole_examples(shards: Shards) -> None:
    index = {tuple(d): k for k, d in enumerate(shards)}
    packed = PretrainDataset(shards, seq_len=256, seed=2, n_retrieved=0)
    single = PretrainDataset(shards, seq_len=256, seed=2, n_retrieved=0, pack=False)
    fill_p = np.mean([int((packed[i]["ids"] != V.pad_id).sum()) for i in range(10)])
    fill_s = np.mean([int((single[i]["ids"] != V.pad_id).sum()) for i in range(10)])
    assert fill_p > 3 * fill_s and fill_p > 200
    for i in range(10):
        docs = docs_of(window_of(packed[i]))
        assert docs[0] == shards[int(packed.order[i])]
        assert all(tuple(d) in index for d in docs)


def test_too_long_query_is_cut_at_a_segment_boundary(tmp_path: Path) -> None:
    long_text = Document.caption_image(list(range(40)), [1] * V.image_seq_len).to_ids(V)
    sh = write_documents(tmp_path / "s", V, [long_text])
    ds = PretrainDataset(sh, seq_len=30, seed=0, pack=False)
    assert ds.n_truncated_queries == 1
    for i in range(5):
        w = window_of(PretrainDataset(sh, seq_len=30, seed=i, pack=False)[0])
        (doc,) = docs_of(w)
        assert V.break_id not in doc and doc == long_text[: len(doc)]  # caption only, image not cut
        assert len(w) <= 30


def test_truncate_document_and_fit_example() -> None:
    doc = Document.caption_image([1, 2, 3], [0] * V.image_seq_len).to_ids(V)  # 1 + 3 + 1 + 8
    assert truncate_document(doc, 13, V) == doc
    assert truncate_document(doc, 12, V) == doc[:4]
    assert truncate_document(doc, 3, V) == doc[:3]  # text may be cut
    img_first = Document((Document.caption_image([], [0] * 8).segments[1],)).to_ids(V)
    assert truncate_document(img_first, 5, V) is None  # image never cut
    a, b, q = [1] * 5, [1] * 4, [1] * 6
    assert fit_example([a, b, q], 15) == [a, b, q]
    assert fit_example([a, b, q], 14) == [b, q]
    assert fit_example([a, b, q], 5) is None


def test_to_row_and_collate() -> None:
    row = to_row([1, 10, 11, 12], 6, V)
    assert row["ids"].tolist() == [1, 10, 11, 12, 0, 0]
    assert row["labels"].tolist() == [1, 10, 11, 12, -100, -100]
    full = to_row(list(range(1, 7)), 6, V)
    assert full["labels"].tolist() == [1, 2, 3, 4, 5, 6]
    assert row["image_idx"].tolist() == [-1] * 6  # no image ids
    b = collate([row, full])
    assert b["ids"].shape == b["image_idx"].shape == (2, 6)
    with pytest.raises(ValueError):
        to_row(list(range(7)), 6, V)


def test_dataloader_and_clear_errors(shards: Shards) -> None:
    ds = PretrainDataset(shards.path, seq_len=64, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["ids"].shape == (4, 64)
    with pytest.raises(ValueError, match="cannot hold one image"):
        PretrainDataset(shards, seq_len=5)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_rows_carry_untransformed_image_places(shards: Shards) -> None:
    """``image_idx`` is each image token's place before CM3 moved spans (-1 elsewhere, pad included)."""
    ds = PretrainDataset(shards, seq_len=200, seed=2, cm3=CM3Config(poisson_lambda=3.0, whole_segment_prob=0.0))
    moved = 0
    for i in range(len(ds)):
        row = ds[i]
        w = window_of(row)
        assert row["image_idx"][: len(w)].tolist() == image_places(w, V)
        assert bool((row["image_idx"][len(w):] == -1).all())
        # a run of image ids that does not start at place 0 follows a mask inside an image
        places = row["image_idx"].tolist()
        moved += sum(1 for t in range(1, len(w)) if places[t] > 0 and places[t - 1] == -1)
    assert moved > 0  # partial image spans happened, so ids alone would mislabel places
