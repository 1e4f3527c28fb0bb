"""SFT with a vocabulary that has an id table (a converted Chameleon): documents in the model's own
causal layout, checked as they are written, and trained as they are (no CM3 transform)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cm3leon.data.shards import Shards, write_documents
from cm3leon.sequence.build import IGNORE_INDEX, PretrainDataset
from cm3leon.sequence.cm3 import CM3Config, check_document, cm3_transform, image_places
from cm3leon.sequence.sft_mixture import SFTDataset
from cm3leon.sequence.sft_shards import tokenize_sft
from cm3leon.sequence.sft_templates import SFTExample, render_prompt, render_training
from cm3leon.vocab import IdTable, Vocab

# 0 <s>, 1 <pad>, 2 </s>, 3 reserved, 4..11 image ids (shuffled code order), 12 <eoss>, 13 <racm3:break>, 14.. text
IMAGE = (9, 4, 11, 6, 5, 10, 7, 8)
V = Vocab.from_table(IdTable(size=30, doc_start=0, end_text=2, pad=1, begin_image=13, end_image=12, image=IMAGE,
                             reserved=(3,)), image_seq_len=4)
IMG = [9, 4, 11, 6]  # codes 0..3


class Words:
    """A text encoder whose ids are the model's ids; unknown words map to the reserved id 3 (as <unk>)."""

    vocab_size = 30

    def encode(self, text: str) -> list[int]:
        return [3 if w == "unk" else 14 + len(w) for w in text.split()]


class Codes:
    """An image tokenizer's sizes (the examples below carry VQ codes, so nothing is encoded)."""

    codebook_size, tokens_per_image = 8, 4


def test_check_document_allows_the_models_markers_only():
    check_document([0, 20, 13, *IMG, 12, 21, 2], V)
    check_document([0, 13, *IMG, 12, 20], V)  # no final end of text: fine
    for bad, name in (([0, 20, 3, 13, *IMG, 12], "<reserved:3>"), ([0, 20, 1, 21], "<pad>"),
                      ([0, 20, 0, 21], "<doc>"), ([0, 20, 2, 21], "<end-text>")):
        with pytest.raises(ValueError, match=name):
            check_document(bad, V)
    with pytest.raises(ValueError, match="must start with <doc>"):
        check_document([20, 21], V)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        check_document([0, 30], V)


def test_cm3_transform_and_image_places_are_causal():
    doc = [0, 20, 13, *IMG, 12, 21, 13, *IMG, 12, 2]
    rng = random.Random(0)
    assert all(CM3Config(poisson_lambda=5.0).apply(doc, V, rng) == doc for _ in range(5))
    assert cm3_transform(doc, V, rng, poisson_lambda=5.0) == doc
    assert image_places(doc + doc, V) == [-1, -1, -1, 0, 1, 2, 3, -1, -1, -1, 0, 1, 2, 3, -1, -1] * 2


def test_training_document_ends_with_the_models_end_of_text():
    r = render_training("vqa", {"image": [0, 1, 2, 3], "question": "aa b", "answer": "ccc"}, Words(), V)
    s, e = r.target
    assert r.ids[:7] == [0, 13, *IMG, 12] and r.ids[s:e] == [17] and r.ids[-1] == 2
    prompt, kind = render_prompt("vqa", {"image": [0, 1, 2, 3], "question": "aa b"}, Words(), V)
    assert kind == "text" and prompt == r.ids[:s]  # the prompt, then the answer and "." and </s>
    r = render_training("text_to_image", {"caption": "aa", "image": [0, 1, 2, 3]}, Words(), V)
    assert r.ids == [0, 16, 13, *IMG, 12, 2] and r.answer == IMG


def test_tokenize_sft_writes_the_table_layout_and_names_a_reserved_id(tmp_path: Path):
    examples = [SFTExample("caption", {"caption": "aa b", "image": [0, 1, 2, 3]}),
                SFTExample("text_to_image", {"caption": "aa", "image": [3, 2, 1, 0]})]
    shards = tokenize_sft(examples, Words(), Codes(), tmp_path / "sft", vocab=V)
    assert shards.vocab == V and shards.manifest["task_counts"] == {"caption": 1, "text_to_image": 1}
    assert shards[0] == [0, 13, *IMG, 12, 16, 15, 2] and shards.target(0) == (7, 9)
    assert shards[1] == [0, 16, 13, 6, 11, 4, 9, 12, 2] and shards.target(1) == (3, 7)
    bad = [*examples, SFTExample("caption", {"caption": "aa unk", "image": [0, 1, 2, 3]})]
    with pytest.raises(ValueError, match=r"SFT example 3 \(caption\).*<reserved:3>.*unknown token"):
        tokenize_sft(bad, Words(), Codes(), tmp_path / "bad", vocab=V)

    class Wide(Codes):
        tokens_per_image = 16

    with pytest.raises(ValueError, match="16 tokens per image but the model's vocabulary 8 and 4"):
        tokenize_sft(examples, Words(), Wide(), tmp_path / "wide", vocab=V)


def test_sft_rows_are_the_documents_as_written(tmp_path: Path):
    docs = [[0, 13, *IMG, 12, 16, 15, 2], [0, 16, 13, *IMG, 12, 2]]
    write_documents(tmp_path / "s", V, docs, tag=lambda i: ("caption", "text_to_image")[i])
    ds = SFTDataset(Shards(tmp_path / "s"), seq_len=24, seed=0, target_infill_prob=0.5, pack=True)
    for i in range(len(ds)):
        row = ds[i]
        ids = row["ids"].tolist()
        n = sum(1 for t in ids if t != V.pad_id)
        real = ids[:n]
        while real:  # packed documents, each exactly as written
            doc = next(d for d in docs if real[: len(d)] == d)
            real = real[len(doc):]
        assert torch.equal(row["labels"][:n], row["ids"][:n]) and (row["labels"][n:] == IGNORE_INDEX).all()
        assert row["image_idx"].tolist() == image_places(ids, V)
    pre = PretrainDataset(Shards(tmp_path / "s"), seq_len=24, seed=0, pack=False)  # continued pretraining: causal too
    for i in range(len(pre)):
        doc = docs[int(pre.order[i])]
        assert pre[i]["ids"][: len(doc)].tolist() == doc
