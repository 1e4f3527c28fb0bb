"""SFT templates (paper Table 5), prompt/training consistency, builders, mixture, dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cm3leon.data.shards import Shards
from cm3leon.sequence.build import IGNORE_INDEX
from cm3leon.sequence.cm3 import cm3_inverse
from cm3leon.sequence.document import split_documents
from cm3leon.sequence.sft_mixture import (
    DOWN_THRESHOLD,
    UP_THRESHOLD,
    SFTDataset,
    mixture_table,
    mixture_weights,
)
from cm3leon.sequence.sft_shards import tokenize_sft
from cm3leon.sequence.sft_sources import read_sft_jsonl, read_vqav2, record_sft_examples
from cm3leon.sequence.sft_templates import (
    TASKS,
    SFTExample,
    format_box,
    format_options,
    infill_form,
    render_prompt,
    render_training,
)
from cm3leon.shapes.sft_examples import shapes_sft_examples
from cm3leon.vocab import Vocab


class ByteTokenizer:
    """A reversible byte-level text tokenizer (an independent reference for decoding)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8")


TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_torch_thread")

L = 4
V = Vocab(text_size=256, image_size=16, image_seq_len=L)
IMG_A, IMG_B = [1, 2, 3, 4], [5, 6, 7, 8]


def readable(ids: list[int]) -> list[str]:
    """Segments of a document as strings: text decoded, images as 'IMG[codes]'."""
    assert ids[0] == V.eos_id
    out, cur = [], []
    for i in [*ids[1:], V.break_id]:
        if i == V.break_id:
            if all(V.text_offset <= j < V.image_offset for j in cur):
                out.append(TOK.decode(V.ids_to_text(cur)))
            else:
                out.append(f"IMG{V.ids_to_codes(cur)}")
            cur = []
        else:
            cur.append(i)
    return out


# Table 5 of the paper, written out by hand: (task, variant, fields, expected segments).
FIELDS = {
    "caption": "a red circle", "question": "what color is it?", "answer": "red", "context": "none",
    "options": "(A) red (B) blue", "explanation": "The circle is red.", "instruction": "make it blue",
    "text": "morning", "objects": "red circle at (10, 20) -> (40, 50)",
    "image": IMG_A, "source": IMG_B, "condition": IMG_B,
}
EXPECTED = [
    ("edit", 0, ["Edit first image following the instruction", f"IMG{IMG_B}", "make it blue", f"IMG{IMG_A}"]),
    ("write", 0, ['draw "morning"', f"IMG{IMG_A}"]),
    ("text_to_image", 0, ["a red circle", f"IMG{IMG_A}"]),
    ("grounding", 0, ["Generate high quality image of a red circle with segmentations "
                      "red circle at (10, 20) -> (40, 50)", f"IMG{IMG_A}"]),
    ("edge_to_image", 0, ["Make high quality image from canny edge features", f"IMG{IMG_B}", "a red circle",
                          f"IMG{IMG_A}"]),
    ("seg_to_image", 0, ["Make high quality image from a segmentation map", f"IMG{IMG_B}", "a red circle",
                         f"IMG{IMG_A}"]),
    ("depth_to_image", 0, ["Make high quality image from depth features", f"IMG{IMG_B}", "a red circle",
                           f"IMG{IMG_A}"]),
    ("hed_to_image", 0, ["Make high quality image from hed features", f"IMG{IMG_B}", "a red circle",
                         f"IMG{IMG_A}"]),
    ("pose_to_image", 0, ["Make high quality image from openpose features", f"IMG{IMG_B}", "a red circle",
                          f"IMG{IMG_A}"]),
    ("norm_to_image", 0, ["Make high quality image from 3D norm features", f"IMG{IMG_B}", "a red circle",
                          f"IMG{IMG_A}"]),
    ("scribble_to_image", 0, ["Make high quality image from children's scribbles", f"IMG{IMG_B}", "a red circle",
                              f"IMG{IMG_A}"]),
    ("caption", 0, ["a red circle", f"IMG{IMG_A}"]),
    ("caption", 1, ["Describe the given picture. a red circle", f"IMG{IMG_A}"]),
    ("detailed_caption", 0, ["Describe the given picture in very detail. a red circle", f"IMG{IMG_A}"]),
    ("detailed_caption", 1, ["Describe all the objects in the given image in very detail. a red circle",
                             f"IMG{IMG_A}"]),
    ("detailed_caption", 2, ["Generate a long caption for the given image. a red circle", f"IMG{IMG_A}"]),
    ("narration", 0, ["Generate a long narration of what is happening in the given image. a red circle",
                      f"IMG{IMG_A}"]),
    ("narration", 1, ["Generate a long caption for the given image. a red circle", f"IMG{IMG_A}"]),
    ("vqa", 0, ["Question: what color is it? Answer: red.", f"IMG{IMG_A}"]),
    ("vqa", 1, ["Question: what color is it?\nred", f"IMG{IMG_A}"]),
    ("vqa", 2, ["Question: what color is it? The answer is red.", f"IMG{IMG_A}"]),
    ("vqa_context", 0, ["Question: what color is it?\nContext: none\nOptions: (A) red (B) blue\nAnswer: red.",
                        f"IMG{IMG_A}"]),
    ("reasoning", 0, ["Question: what color is it?\nContext: none\nOptions: (A) red (B) blue\n"
                      "Answer: Let's think step-by-step: The circle is red. So the answer is red.", f"IMG{IMG_A}"]),
]
ANSWERS = {"caption": "a red circle", "detailed_caption": "a red circle", "narration": "a red circle",
           "vqa": "red", "vqa_context": "red", "reasoning": "The circle is red. So the answer is red"}


def test_every_task_and_variant_is_covered() -> None:
    assert {(t, v) for t, v, _ in EXPECTED} == {(t, v) for t in TASKS for v in range(len(TASKS[t].variants))}


@pytest.mark.parametrize("task,variant,expected", EXPECTED, ids=[f"{t}-{v}" for t, v, _ in EXPECTED])
def test_template_renders_the_papers_form(task: str, variant: int, expected: list[str]) -> None:
    r = render_training(task, FIELDS, TOK, V, variant=variant)
    assert readable(r.ids) == expected
    if r.kind == "image":
        assert r.answer == V.codes_to_ids(IMG_A) and r.target[1] == len(r.ids)
    else:
        assert TOK.decode(V.ids_to_text(r.answer)).strip() == ANSWERS[task]


@pytest.mark.parametrize("task,variant", [(t, v) for t, v, _ in EXPECTED])
def test_prompt_plus_answer_is_the_training_infill_form(task: str, variant: int) -> None:
    r = render_training(task, FIELDS, TOK, V, variant=variant)
    prompt, kind = render_prompt(task, FIELDS, TOK, V, variant=variant)
    assert kind == r.kind == TASKS[task].target_kind
    form = infill_form(r.ids, r.target, V)
    assert prompt + r.answer == form
    assert cm3_inverse(form, V) == r.ids  # the infill form is a CM3 instance of the document
    if kind == "image":
        assert prompt[-1] == V.break_id and prompt == r.ids[: -L]
    else:
        assert prompt[-1] == V.infill_id and prompt.count(V.mask_id(0)) == 1
    # the prompt does not depend on the answer, which may be left out
    answer_free = {k: v for k, v in FIELDS.items() if k not in ("answer", "explanation", "caption")
                   or (kind == "image" and k == "caption")}
    if kind == "image":
        answer_free.pop("image")
    assert render_prompt(task, answer_free, TOK, V, variant=variant)[0] == prompt


def test_caption_prompt_is_the_papers_image_to_text_prompt() -> None:
    # §2.2: image-to-caption uses "<mask>: [image] <infill>"
    prompt, kind = render_prompt("caption", {"image": IMG_A}, TOK, V, variant=0)
    assert kind == "text"
    assert prompt == [V.eos_id, V.mask_id(0), V.break_id, *V.codes_to_ids(IMG_A), V.infill_id]


def test_render_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown SFT task"):
        render_training("nope", FIELDS, TOK, V)
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        render_training("vqa", {"question": "q", "image": IMG_A}, TOK, V)
    with pytest.raises(ValueError, match="VQ codes"):
        render_training("vqa", {**FIELDS, "image": Image.new("RGB", (4, 4))}, TOK, V)
    with pytest.raises(ValueError, match="variants"):
        render_training("vqa", FIELDS, TOK, V, variant=3)
    with pytest.raises(ValueError, match="empty"):
        render_training("caption", {**FIELDS, "caption": ""}, TOK, V)


def test_with_the_real_bpe_tokenizer() -> None:
    from cm3leon.tokenize.text_bpe import TextTokenizer

    corpus = [readable(render_training(t, FIELDS, TOK, V, variant=v).ids)[0] for t, v, _ in EXPECTED] * 5
    bpe = TextTokenizer.train(corpus, vocab_size=300, min_frequency=1)
    vb = Vocab(text_size=bpe.vocab_size, image_size=16, image_seq_len=L)
    for task, variant, expected in EXPECTED:
        r = render_training(task, FIELDS, bpe, vb, variant=variant)
        text_ids = r.ids[1 : r.ids.index(vb.break_id)]
        assert bpe.decode(vb.ids_to_text(text_ids)) == next(e for e in expected if not e.startswith("IMG"))
        prompt, _ = render_prompt(task, FIELDS, bpe, vb, variant=variant)
        assert prompt + r.answer == infill_form(r.ids, r.target, vb)


def test_format_box_and_options() -> None:
    assert format_box([4, 19, 13, 28], 32) == "(12, 59) -> (41, 88)"
    assert format_box([0, 0, 64, 32], 64, 32) == "(0, 0) -> (100, 100)"
    assert format_box([0, 0, 32, 32], 32, grid=256) == "(0, 0) -> (256, 256)"
    assert format_options(["red", "blue", "3"]) == "(A) red (B) blue (C) 3"
    with pytest.raises(ValueError):
        format_box([1, 2, 3], 32)


# ---- mixture ------------------------------------------------------------------------------


def test_mixture_weights_paper_thresholds() -> None:
    counts = {"vqa": 9000, "caption": 600, "write": 30, "edit": 100}
    w = mixture_weights(counts)
    n = sum(counts.values())
    for t, c in counts.items():
        assert w[t] == pytest.approx(min(3.0, max(0.3, (1 / 4) / (c / n))))
    assert w["write"] == 3.0 and w["vqa"] == 0.3  # clipped at the thresholds
    table = mixture_table(counts, w)
    assert "write" in table and "total" in table and len(table.splitlines()) == len(counts) + 2


@settings(max_examples=200, deadline=None)
@given(counts=st.dictionaries(st.sampled_from(sorted(TASKS)), st.integers(1, 10**6), min_size=1))
def test_mixture_weights_respect_thresholds(counts: dict[str, int]) -> None:
    w = mixture_weights(counts)
    assert set(w) == set(counts)
    assert all(DOWN_THRESHOLD <= x <= UP_THRESHOLD for x in w.values())
    n = sum(counts.values())
    for t, c in counts.items():  # inside the band the mixture hits the target share exactly
        ratio = (1 / len(counts)) / (c / n)
        if DOWN_THRESHOLD < ratio < UP_THRESHOLD:
            assert w[t] == pytest.approx(ratio)


def test_mixture_target_shares_and_errors() -> None:
    w = mixture_weights({"a": 100, "b": 100}, {"a": 3, "b": 1})
    assert w == pytest.approx({"a": 1.5, "b": 0.5})
    with pytest.raises(ValueError, match="no examples"):
        mixture_weights({"a": 1}, {"zzz": 1.0})
    # one share table for data sets that lack some tasks (the sft-quickstart recipe)
    assert mixture_weights({"a": 100, "b": 100}, {"a": 3, "b": 1, "zzz": 5}, ignore_absent=True) == pytest.approx(
        {"a": 1.5, "b": 0.5})


# ---- builders + tokenizing + dataset ---------------------------------------------------------


@pytest.fixture(scope="module")
def image_tok():  # noqa: ANN201
    from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig

    torch.manual_seed(0)
    return ImageTokenizer(VQConfig.from_name("shapes-32")).eval()


@pytest.fixture(scope="module")
def shapes_records() -> list:
    from cm3leon.shapes.dataset import make_example

    return [make_example(s) for s in range(2)]


def test_shapes_builder_covers_every_shapes_task(shapes_records: list) -> None:
    exs = shapes_sft_examples(shapes_records[0], random.Random(0))
    assert {e.task for e in exs} == {
        "caption", "detailed_caption", "narration", "grounding", "seg_to_image", "edge_to_image",
        "depth_to_image", "vqa", "reasoning", "edit", "write", "text_to_image",
    }
    rec = shapes_records[0]
    by = {e.task: e for e in exs}
    assert by["caption"].fields["caption"] == rec.meta["captions"]["short"]
    assert by["edit"].fields["instruction"] == rec.meta["edit"]["instruction"]
    assert (by["vqa"].fields["question"], by["vqa"].fields["answer"]) in {
        (q["question"], q["answer"]) for q in rec.meta["vqa"]
    }
    boxes = by["grounding"].fields["objects"]
    for o in rec.meta["objects"]:
        assert f"{o['color']} {o['shape']} at {format_box(o['box'], rec.meta['size'])}" in boxes
    assert record_sft_examples(rec, random.Random(0)) == shapes_sft_examples(rec, random.Random(0))


def test_tokenize_sft_and_dataset(tmp_path: Path, shapes_records: list, image_tok) -> None:  # noqa: ANN001
    rng = random.Random(0)
    examples = [e for r in shapes_records for e in shapes_sft_examples(r, rng)]
    sh = tokenize_sft(examples, TOK, image_tok, tmp_path / "sft", batch_size=16)
    vocab = sh.vocab
    assert len(sh) == len(examples) and vocab.image_seq_len == 64
    # each shard document is exactly the rendered training document, target included
    ex = examples[3]
    codes = image_tok.encode(image_tok.preprocess([ex.fields["image"]]))[0].tolist()
    assert sh.task(3) == ex.task
    doc = sh[3]
    assert doc[sh.target(3)[0] : sh.target(3)[1]] == render_training(
        ex.task, {**ex.fields, **{k: codes for k in ("image", "source", "condition") if k in ex.fields}},
        TOK, vocab, variant=ex.variant).answer
    # dataset: infill form of the targets, mixture-balanced, deterministic
    ds = SFTDataset(sh, seq_len=400, seed=0, target_infill_prob=1.0)
    assert len(ds) == sum(max(1, round(c * ds.weights[t])) for t, c in ds.counts.items())
    index = {tuple(d): k for k, d in enumerate(sh)}
    for i in range(len(ds)):
        row = ds[i]
        real = [a for a, b in zip(row["ids"].tolist(), row["labels"].tolist()) if b != IGNORE_INDEX]
        docs = split_documents(real, vocab)
        first = int(ds.order[i])
        assert docs[0] == infill_form(sh[first], sh.target(first), vocab)
        for d in docs:
            k = index[tuple(cm3_inverse(d, vocab))]
            assert d == infill_form(sh[k], sh.target(k), vocab)
    assert torch.equal(ds[5]["ids"], SFTDataset(sh.path, seq_len=400, seed=0, target_infill_prob=1.0)[5]["ids"])
    # random CM3 instead of the target span: still an exact CM3 instance of a shard document
    ds2 = SFTDataset(sh, seq_len=400, seed=1, target_infill_prob=0.0)
    for i in range(10):
        real = [a for a, b in zip(ds2[i]["ids"].tolist(), ds2[i]["labels"].tolist()) if b != IGNORE_INDEX]
        for d in split_documents(real, vocab):
            assert tuple(cm3_inverse(d, vocab)) in index


def test_dataset_mixture_up_and_down_sampling(tmp_path: Path) -> None:
    from cm3leon.data.shards import ShardWriter

    with ShardWriter(tmp_path / "s", V) as w:
        for k in range(200):
            task = "vqa" if k < 180 else "write"
            r = render_training(task, {**FIELDS, "question": f"q{k}?"}, TOK, V)
            w.add(r.ids, task=task, target=r.target)
    ds = SFTDataset(Shards(tmp_path / "s"), seq_len=64, seed=0)
    assert ds.counts == {"vqa": 180, "write": 20}
    assert ds.weights["write"] == 3.0 and ds.weights["vqa"] == pytest.approx(100 / 180)
    tasks = [Shards(tmp_path / "s").task(int(d)) for d in ds.order]
    assert tasks.count("write") == 60 and tasks.count("vqa") == 100
    assert len(set(int(d) for d in ds.order if d >= 180)) == 20  # every rare example repeated
    assert "write" in ds.table()


def test_user_data_readers(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    img.save(tmp_path / "COCO_val2014_000000000042.jpg")
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"image_id": 42, "question": "what color?", "question_id": 1},
        {"image_id": 7, "question": "missing image?", "question_id": 2}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 1, "image_id": 42, "multiple_choice_answer": "red", "answers": []},
        {"question_id": 2, "image_id": 7, "multiple_choice_answer": "no", "answers": []}]}))
    (vqa,) = list(read_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path))
    assert vqa.task == "vqa" and vqa.fields["answer"] == "red" and vqa.fields["image"].size == (8, 8)
    lines = [
        {"input": "a.png", "instruction": "make it blue", "output": "b.png"},
        {"task": "edge_to_image", "condition": "a.png", "caption": "a cat", "image": "b.png"},
        {"task": "vqa", "fields": {"question": "q?", "answer": "yes", "image": "a.png"}, "variant": 2},
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    exs = list(read_sft_jsonl(tmp_path / "x.jsonl"))
    assert [e.task for e in exs] == ["edit", "edge_to_image", "vqa"] and exs[2].variant == 2
    assert exs[0].fields["instruction"] == "make it blue" and hasattr(exs[0].fields["source"], "convert")
    (tmp_path / "bad.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(ValueError, match="names no task"):
        list(read_sft_jsonl(tmp_path / "bad.jsonl"))


def test_coco_style_records_become_captioning_and_text_to_image() -> None:
    from cm3leon.data.records import DocRecord

    rec = DocRecord(id="1", text="a dog on a beach", image=Image.new("RGB", (8, 8)))
    ex, t2i = record_sft_examples(rec, random.Random(0))
    assert isinstance(ex, SFTExample) and ex.task == "caption" and ex.fields["caption"] == "a dog on a beach"
    assert t2i.task == "text_to_image" and t2i.fields == ex.fields
    assert record_sft_examples(DocRecord(id="2", text="only text"), random.Random(0)) == []


def test_empty_mixture_rejected(tmp_path: Path) -> None:
    from cm3leon.data.shards import write_documents

    sh = write_documents(tmp_path / "s", V, [render_training("vqa", FIELDS, TOK, V).ids])
    with pytest.raises(ValueError, match="empty"):
        SFTDataset(sh, seq_len=64, weights={"vqa": 0.0})
    assert np.asarray(SFTDataset(sh, seq_len=64).order).tolist() == [0]
