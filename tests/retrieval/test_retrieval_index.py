"""FAISS index: exactness against brute force, id maps, persistence, knobs, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cm3leon.retrieval.index import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    MemoryBank,
    MemoryIndex,
    Modality,
    load_embeddings,
    write_embeddings,
)


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, n_clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, n_clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, top, 1), top


def test_flat_search_equals_brute_force():
    x, q = unit_rows(500, 16, 0), unit_rows(7, 16, 1)
    idx = MemoryIndex.build(x)
    scores, ids = idx.search(q, 10)
    ref_s, ref_i = brute_force(x, q, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-6)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_custom_ids_map_back_and_rows_of_inverts():
    x, q = unit_rows(200, 8, 2), unit_rows(5, 8, 3)
    ids = np.random.default_rng(0).permutation(10_000)[:200].astype(np.int64)
    idx = MemoryIndex.build(x, ids=ids)
    _, got = idx.search(q, 4)
    _, ref_rows = brute_force(x, q, 4)
    np.testing.assert_array_equal(got, ids[ref_rows])
    np.testing.assert_array_equal(idx.rows_of(ids), np.arange(200))
    assert idx.rows_of(np.array([10_001, -1])).tolist() == [-1, -1]


def test_add_continues_ids_and_rejects_duplicates():
    x = unit_rows(30, 8)
    idx = MemoryIndex.build(x[:20])
    idx.add(x[20:])
    assert idx.ids.tolist() == list(range(30))
    _, got = idx.search(x[25:26], 1)
    assert got[0, 0] == 25
    with pytest.raises(ValueError, match="unique"):
        idx.add(x[:1], ids=np.array([3]))


def test_k_larger_than_bank_pads_with_minus_one():
    x = unit_rows(3, 8)
    scores, ids = MemoryIndex.build(x).search(x[:1], 5)
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2]
    assert ids[0, 3:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 3:]).all()


def test_ivf_with_all_lists_probed_is_exact():
    x, q = clustered(2000, 32, seed=4), clustered(20, 32, seed=5)
    idx = MemoryIndex.build(x, factory="IVF16,Flat", train_size=1000)
    assert idx.nprobe == 1
    idx.nprobe = 16
    _, ids = idx.search(q, 10)
    _, ref = brute_force(x, q, 10)
    np.testing.assert_array_equal(ids, ref)


def test_only_flat_counts_as_exact():
    """A "Flat" index returns exact inner products (the retriever skips rescoring it)."""
    x = clustered(300, 8, seed=6)
    assert MemoryIndex.build(x).exact
    assert not MemoryIndex.build(x, factory="IVF4,Flat", train_size=300).exact
    assert not MemoryIndex.build(x, factory="HNSW8").exact


def test_ivf_pq_and_hnsw_have_useful_recall():
    x, q = clustered(3000, 32, seed=6), clustered(50, 32, seed=7)
    _, ref = brute_force(x, q, 10)
    for factory, knob, value in (("IVF32,PQ8", "nprobe", 8), ("HNSW16", "efSearch", 64)):
        idx = MemoryIndex.build(x, factory=factory)
        setattr(idx, knob, value)
        assert getattr(idx, knob) == value
        _, ids = idx.search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
        assert recall > 0.5, (factory, recall)
    with pytest.raises(ValueError, match="nprobe"):
        MemoryIndex.build(x[:50]).nprobe = 4


def test_save_load_round_trip(tmp_path):
    x, q = clustered(1000, 16, seed=8), unit_rows(9, 16, 9)
    idx = MemoryIndex.build(x, factory="IVF8,Flat", ids=np.arange(1000) + 5, encoder_name="enc-x", info={"data": "d"})
    idx.nprobe = 3
    before = idx.search(q, 6)
    idx.save(tmp_path / "ix")
    assert not list((tmp_path / "ix").glob("*.tmp"))
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["dim"] == 16 and meta["n"] == 1000 and meta["factory"] == "IVF8,Flat"
    assert meta["encoder"] == "enc-x" and meta["info"] == {"data": "d"} and meta["nprobe"] == 3
    for mmap in (False, True):
        back = MemoryIndex.load(tmp_path / "ix", mmap=mmap)
        assert back.nprobe == 3
        after = back.search(q, 6)
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_allclose(after[0], before[0], rtol=1e-6)


def test_embeddings_file_streams_and_builds_from_memmap(tmp_path):
    x = unit_rows(250, 8)
    path = write_embeddings(tmp_path / EMBEDDINGS_FILE, (x[s : s + 64] for s in range(0, 250, 64)), n=250, dim=8)
    emb = load_embeddings(path)
    assert isinstance(emb, np.memmap)
    np.testing.assert_array_equal(np.asarray(emb), x)
    idx = MemoryIndex.build(emb, batch_size=100)
    assert idx.search(x[7:8], 1)[1][0, 0] == 7
    with pytest.raises(ValueError, match="announced"):
        write_embeddings(tmp_path / "bad.npy", [x[:10]], n=11, dim=8)
    assert not list(tmp_path.glob("bad.npy*"))


def test_bank_save_load(tmp_path):
    x = unit_rows(40, 8)
    mod = np.array([Modality.MULTI, Modality.TEXT] * 20, np.uint8)
    bank = MemoryBank.from_arrays(x, mod)
    bank.save(tmp_path / "bank")
    back = MemoryBank.load(tmp_path / "bank")
    np.testing.assert_array_equal(np.asarray(back.embeddings), x)
    np.testing.assert_array_equal(np.asarray(back.modality), mod)
    assert len(back) == 40 and back.dim == 8


# ---- bad input -----------------------------------------------------------------------


def test_empty_bank_is_refused():
    with pytest.raises(ValueError, match="empty"):
        MemoryIndex.build(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="empty"):
        MemoryIndex.empty(8).search(unit_rows(1, 8), 1)


def test_dimension_mismatch_is_explained():
    idx = MemoryIndex.build(unit_rows(10, 8), encoder_name="dual-8d")
    with pytest.raises(ValueError, match="dimension 16.*8-d"):
        idx.search(unit_rows(1, 16), 3)


def test_bad_factory_and_too_few_training_points():
    with pytest.raises(ValueError, match="index_factory"):
        MemoryIndex.build(unit_rows(10, 8), factory="Bogus")
    with pytest.raises(ValueError, match="PQ m must divide"):
        MemoryIndex.build(unit_rows(300, 10), factory="IVF4,PQ3")
    with pytest.raises(ValueError, match="IVF lists"):
        MemoryIndex.build(unit_rows(50, 8), factory="IVF1024,Flat")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MemoryIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        MemoryIndex.load(tmp_path / "empty")
    MemoryBank.from_arrays(unit_rows(10, 8)).save(tmp_path / "b")
    (tmp_path / "b" / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        MemoryBank.load(tmp_path / "b")
    MemoryBank.from_arrays(unit_rows(10, 8)).save(tmp_path / "c")
    (tmp_path / "c" / EMBEDDINGS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="embeddings.npy"):
        MemoryBank.load(tmp_path / "c")
