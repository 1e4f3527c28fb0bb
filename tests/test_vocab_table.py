"""A vocabulary with an explicit id table (a converted Chameleon): image ids out of code order, the
model's own markers around images, and the layout every consumer reads from it (documents, the
unconditional stream, prompts)."""

from __future__ import annotations

import pytest
import torch

from cm3leon.generate.guidance import unconditional_prompt
from cm3leon.sequence.document import Document, ImageSegment, TextSegment, split_documents
from cm3leon.sequence.sft_templates import render_prompt, render_training
from cm3leon.vocab import IdTable, Kind, Vocab

# 0 <s>, 1 <pad>, 2 </s>, 3 reserved, 4..11 image ids (shuffled code order), 12 <eoss>, 13 <racm3:break>, 14.. text
IMAGE = (9, 4, 11, 6, 5, 10, 7, 8)
TABLE = IdTable(size=30, doc_start=0, end_text=2, pad=1, begin_image=13, end_image=12, image=IMAGE, reserved=(3,))
V = Vocab.from_table(TABLE, image_seq_len=4)


class Words:
    """A text encoder whose ids are the model's ids (as a converted model's tokenizer)."""

    def encode(self, text: str) -> list[int]:
        return [14 + len(w) for w in text.split()]


def test_kinds_masks_and_codes():
    assert V.size == 30 and V.image_size == 8 and V.text_size == 30 - 5 - 8 - 1
    kinds = [V.kind(i) for i in range(V.size)]
    assert kinds.count(Kind.IMAGE) == 8 and kinds.count(Kind.SPECIAL) == 6 and kinds.count(Kind.TEXT) == 16
    assert V.codes_to_ids([0, 1, 7]) == [9, 4, 8] and V.ids_to_codes([9, 4, 8]) == [0, 1, 7]
    codes = torch.arange(8)
    assert torch.equal(V.ids_to_codes(V.codes_to_ids(codes)), codes)
    assert V.image_mask().nonzero().flatten().tolist() == sorted(IMAGE)
    tm = V.text_mask()
    assert tm[2] and tm[0] and tm[13] and not tm[12] and not tm[1] and not tm[3]  # stops yes, eoi/pad/reserved no
    assert V.text_to_ids([20, 21]) == [20, 21]  # the tokenizer's ids are the model's
    assert V.kinds_tensor(torch.tensor([0, 20, 9])).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="infill"):
        _ = V.infill_id
    with pytest.raises(ValueError, match="no <mask> sentinels"):
        V.mask_id(0)
    with pytest.raises(ValueError, match="one range"):
        _ = V.image_offset


def test_dict_round_trip_and_contiguous_vocab_unchanged():
    assert Vocab.from_dict(V.to_dict()) == V
    plain = Vocab(text_size=10, image_size=4, image_seq_len=2)
    assert "ids" not in plain.to_dict() and Vocab.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="both control and image"):
        IdTable(size=30, doc_start=0, end_text=2, pad=1, begin_image=13, end_image=12, image=(0, 4))


def test_document_layout_uses_the_models_markers():
    doc = Document((TextSegment((20, 21)), ImageSegment((0, 1, 2, 3)), TextSegment((22,))))
    ids = doc.to_ids(V)
    assert ids == [0, 20, 21, 13, 9, 4, 11, 6, 12, 22]  # <s> text <racm3:break> image <eoss> text
    assert Document.from_ids(ids, V) == doc
    assert split_documents(ids + ids, V) == [ids, ids]


def test_unconditional_prompt_is_chameleons_own():
    prompt = [0, 20, 21, 13]  # <s> caption <racm3:break>
    assert unconditional_prompt(prompt, V) == [0, 13]
    with_image = [0, 13, 9, 4, 11, 6, 12, 20, 21, 13]  # an input image, an instruction, a new image
    assert unconditional_prompt(with_image, V) == [0, 13, 9, 4, 11, 6, 12, 13]  # Chameleon's "image conditioned"
    assert unconditional_prompt(with_image, V, mask_images=True) == [0, 13]  # and its "unconditioned"


def test_prompts_are_causal_with_images_first():
    ids, kind = render_prompt("text_to_image", {"caption": "a bb"}, Words(), V)
    assert kind == "image" and ids == [0, 15, 16, 13]
    ids, kind = render_prompt("vqa", {"image": [0, 1, 2, 3], "question": "what"}, Words(), V)
    assert kind == "text" and ids[:7] == [0, 13, 9, 4, 11, 6, 12]  # the image, then the question
    assert all(V.kind(i) is Kind.TEXT for i in ids[7:])
    r = render_training("caption", {"image": [0, 1, 2, 3], "caption": "a bb"}, Words(), V, variant=1)
    s, e = r.target
    assert r.ids[:7] == [0, 13, 9, 4, 11, 6, 12] and r.ids[s:e] == [15, 16] and r.ids[e:] == [2]  # then </s>
