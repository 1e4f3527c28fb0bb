"""Tokenized shards: round trip, atomic writes, clear errors, neighbours remapping."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cm3leon.data.shards import Shards, ShardWriter, attach_neighbors, write_documents
from cm3leon.sequence.document import Document
from cm3leon.vocab import Vocab

V = Vocab(text_size=30, image_size=16, image_seq_len=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_docs(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        Document.caption_image(
            [rng.randrange(V.text_size) for _ in range(rng.randint(1, 9))],
            [rng.randrange(V.image_size) for _ in range(V.image_seq_len)],
        ).to_ids(V)
        for _ in range(n)
    ]


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    docs = random_docs(25)
    sh = write_documents(tmp_path / "s", V, docs, meta={"source": "x"})
    assert len(sh) == 25 and sh.vocab == V
    assert [sh[i] for i in range(25)] == docs and list(sh) == docs
    assert sh[-1] == docs[-1]
    assert sh.lengths.tolist() == [len(d) for d in docs]
    assert sh.n_tokens == sum(map(len, docs))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format"] == "cm3leon-shards" and m["version"] == 1 and m["source"] == "x"
    assert m["dtype"] == "uint32" and Vocab.from_dict(m["vocab"]) == V
    raw = np.fromfile(tmp_path / "s" / "tokens.bin", dtype=np.uint32)
    assert raw.tolist() == [i for d in docs for i in d]
    assert sh.neighbors is None and sh.task(0) is None and sh.target(0) is None
    with pytest.raises(IndexError):
        sh[25]


def test_tasks_and_targets(tmp_path: Path) -> None:
    docs = random_docs(4)
    with ShardWriter(tmp_path / "s", V) as w:
        w.add(docs[0], task="vqa", target=(2, 4))
        w.add(docs[1], task="caption")
        w.add(docs[2])
        w.add(docs[3], task="vqa")
    sh = Shards(tmp_path / "s")
    assert [sh.task(i) for i in range(4)] == ["vqa", "caption", None, "vqa"]
    assert sh.target(0) == (2, 4) and sh.target(1) is None
    assert sh.task_names == ["caption", "vqa"]


def test_writer_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "s"
    w = ShardWriter(out, V)
    w.add(random_docs(1)[0])
    assert not out.exists()  # nothing published before finalize
    w.abort()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), ShardWriter(out, V) as w2:
        w2.add(random_docs(1)[0])
        raise RuntimeError("crash")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    write_documents(out, V, random_docs(3))
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardWriter(out, V)
    write_documents(out, V, random_docs(5, seed=1), overwrite=True)
    assert len(Shards(out)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_writer_validates_documents(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "s", V)
    with pytest.raises(ValueError, match="start"):
        w.add([V.break_id, V.text_offset])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        w.add([V.eos_id, V.size])
    with pytest.raises(ValueError, match="target span"):
        w.add([V.eos_id, V.text_offset], target=(1, 5))
    w.abort()


def test_clear_errors_for_broken_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cm3leon data tokenize"):
        Shards(tmp_path)
    d = tmp_path / "s"
    write_documents(d, V, random_docs(6))
    with pytest.raises(ValueError, match="tokenized with"):
        Shards(d, vocab=Vocab(text_size=31, image_size=16, image_seq_len=4))
    # truncated tokens.bin
    data = (d / "tokens.bin").read_bytes()
    (d / "tokens.bin").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        Shards(d)
    (d / "tokens.bin").write_bytes(data)
    # offsets that disagree with the manifest
    off = np.load(d / "offsets.npy")
    np.save(d / "offsets.npy", off[:-1])
    with pytest.raises(ValueError, match="inconsistent"):
        Shards(d)
    np.save(d / "offsets.npy", off)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(ValueError, match="re-tokenize"):
        Shards(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Shards(d)


def test_attach_neighbors_maps_dataset_rows_to_shard_rows(tmp_path: Path) -> None:
    docs = random_docs(4)
    # dataset rows 0..5, rows 1 and 4 were skipped while tokenizing
    with ShardWriter(tmp_path / "s", V) as w:
        for row, d in zip([0, 2, 3, 5], docs):
            w.add(d, source_row=row)
    nb_data = np.array([[2, 1, -1], [0, 2, 3], [5, 4, 0], [0, 1, 2], [0, 0, 0], [3, 2, 1]], dtype=np.int64)
    attach_neighbors(tmp_path / "s", nb_data)
    sh = Shards(tmp_path / "s")
    shard_of = {0: 0, 2: 1, 3: 2, 5: 3}
    expected = [[shard_of.get(int(x), -1) if x >= 0 else -1 for x in nb_data[r]] for r in (0, 2, 3, 5)]
    assert sh.neighbors.tolist() == expected
    with pytest.raises(ValueError, match="another dataset"):
        attach_neighbors(tmp_path / "s", nb_data[:4])
    with pytest.raises(ValueError, match="another dataset"):
        attach_neighbors(tmp_path / "s", np.zeros((5, 2), dtype=np.int64), rows="shard")
    np.save(tmp_path / "s" / "neighbors.npy", np.full((4, 2), 9, dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        Shards(tmp_path / "s")


def test_pickles_by_path_not_by_content(tmp_path: Path) -> None:
    import pickle

    docs = random_docs(300)
    sh = write_documents(tmp_path / "s", V, docs)
    blob = pickle.dumps(sh)
    assert len(blob) < 1000 < sh.n_tokens * 4
    again = pickle.loads(blob)
    assert list(again) == docs and again.vocab == V


def test_empty_shards(tmp_path: Path) -> None:
    sh = write_documents(tmp_path / "s", V, [])
    assert len(sh) == 0 and sh.n_tokens == 0


# ---- tokenizing a dataset end to end (real tokenizers, random VQ weights) -----------------


@pytest.fixture(scope="module")
def toolkit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from cm3leon.data.dataset import Dataset
    from cm3leon.shapes.dataset import write_shapes_dataset
    from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig
    from cm3leon.tokenize.text_bpe import TextTokenizer

    root = tmp_path_factory.mktemp("tok")
    data = write_shapes_dataset(root / "data", 5, size=32, seed=0, workers=1)
    texts = [r.text for r in Dataset(data)] * 3
    TextTokenizer.train(texts, vocab_size=300, min_frequency=1).save(root / "text")
    torch.manual_seed(0)
    ImageTokenizer(VQConfig.from_name("shapes-32")).save_pretrained(root / "image")
    return {"root": root, "data": data, "text": root / "text", "image": root / "image"}


def _run_cli(argv: list[str]) -> int:
    import argparse

    from cm3leon.commands.data_tokenize import add_tokenize_parser

    parser = argparse.ArgumentParser()
    add_tokenize_parser(parser.add_subparsers())
    args = parser.parse_args(["tokenize", *argv])
    return args.func(args)


def test_tokenize_dataset_matches_an_independent_encoding(toolkit: dict[str, Path]) -> None:
    import torch

    from cm3leon.data.dataset import Dataset
    from cm3leon.data.shards import tokenize_dataset
    from cm3leon.tokenize.image_vq import ImageTokenizer
    from cm3leon.tokenize.text_bpe import TextTokenizer

    text = TextTokenizer.load(toolkit["text"])
    image = ImageTokenizer.from_pretrained(toolkit["image"]).eval()
    out = toolkit["root"] / "plain"
    sh = tokenize_dataset(toolkit["data"], text, image, out, batch_size=2, progress=False)
    records = list(Dataset(toolkit["data"]))
    assert len(sh) == len(records) and sh.source_rows.tolist() == list(range(len(records)))
    vocab = sh.vocab
    assert (vocab.text_size, vocab.image_size, vocab.image_seq_len) == (text.vocab_size, 512, 64)
    for i, r in enumerate(records):
        with torch.no_grad():
            codes = image.encode(image.preprocess([r.image]))[0].tolist()  # one image at a time
        expected = Document.caption_image(text.encode(r.text), codes).to_ids(vocab)
        assert sh[i] == expected
    m = sh.manifest
    assert m["stats"]["docs"] == len(records) and m["fields"] == ["text", "image"]
    flipped = tokenize_dataset(toolkit["data"], text, image, toolkit["root"] / "flip", fields=("image", "text"),
                               progress=False)
    assert Document.from_ids(flipped[0], vocab).segments == tuple(reversed(Document.from_ids(sh[0], vocab).segments))
    with pytest.raises(ValueError, match="fields"):
        tokenize_dataset(toolkit["data"], text, image, toolkit["root"] / "bad", fields=("caption",))


def test_tokenize_cli_plain_with_neighbors_and_sft(toolkit: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    root = toolkit["root"]
    nb = np.array([[1, 2], [0, -1], [4, 3], [2, 1], [0, 1]], dtype=np.int64)
    np.save(root / "nb.npy", nb)
    common = ["--data", str(toolkit["data"]), "--text-tokenizer", str(toolkit["text"]),
              "--image-tokenizer", str(toolkit["image"]), "--batch-size", "4"]
    assert _run_cli([*common, "--out", str(root / "cli"), "--neighbors", str(root / "nb.npy")]) == 0
    sh = Shards(root / "cli")
    assert sh.neighbors.tolist() == nb.tolist()  # no skipped rows: dataset rows == shard rows
    assert "wrote 5 documents" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="neighbors.npy"):
        _run_cli([*common, "--out", str(root / "cli2"), "--index", str(root)])
    assert _run_cli([*common, "--out", str(root / "sft"), "--sft", "--limit", "2"]) == 0
    sft = Shards(root / "sft")
    assert len(sft) == 2 * 12 and len(sft.task_names) == 12
    assert all(sft.target(i) is not None for i in range(len(sft)))
    assert "vqa" in capsys.readouterr().out
