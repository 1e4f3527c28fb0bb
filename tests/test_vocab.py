import pytest
import torch

from cm3leon.sequence.document import Document, ImageSegment, TextSegment, split_documents
from cm3leon.vocab import Kind, Vocab


def small() -> Vocab:
    return Vocab(text_size=100, image_size=32, image_seq_len=4, n_masks=3)


def test_ranges_disjoint_and_cover():
    v = small()
    kinds = [v.kind(i) for i in range(v.size)]
    assert kinds.count(Kind.SPECIAL) == v.n_special == 7
    assert kinds.count(Kind.TEXT) == 100
    assert kinds.count(Kind.IMAGE) == 32
    assert len({v.pad_id, v.eos_id, v.break_id, v.infill_id, *[v.mask_id(i) for i in range(3)]}) == 7
    with pytest.raises(ValueError):
        v.kind(v.size)
    with pytest.raises(ValueError):
        v.mask_id(3)


def test_paper_scale():
    v = Vocab.paper()
    assert v.text_size == 56320 and v.image_size == 8192 and v.image_seq_len == 1024
    assert v.size == v.n_special + 56320 + 8192


def test_masks():
    v = small()
    im, tx = v.image_mask(), v.text_mask()
    assert im.sum() == 32 and not (im & tx).any()
    assert tx[v.eos_id] and tx[v.break_id] and not tx[v.pad_id]
    assert v.text_mask(with_terminators=False).sum() == 100
    ids = torch.tensor([v.eos_id, v.text_offset, v.image_offset + 5])
    assert v.kinds_tensor(ids).tolist() == [0, 1, 2]


def test_roundtrip_dict():
    v = small()
    assert Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError, match="unknown"):
        Vocab.from_dict({**v.to_dict(), "bogus": 1})


def test_document_layout_and_inverse():
    v = small()
    doc = Document.caption_image([5, 6], [1, 2, 3, 4])
    ids = doc.to_ids(v)
    assert ids[0] == v.eos_id and ids[3] == v.break_id and len(ids) == 1 + 2 + 1 + 4
    assert Document.from_ids(ids, v) == doc
    two = ids + Document((TextSegment((9,)),)).to_ids(v)
    parts = split_documents(two, v)
    assert len(parts) == 2 and parts[0] == ids
    with pytest.raises(ValueError, match="exactly 4"):
        Document((ImageSegment((1, 2)),)).to_ids(v)


def test_split_segments_lossless():
    v = small()
    ids = Document.caption_image([5, 6], [1, 2, 3, 4]).to_ids(v)
    runs = v.split_segments(ids)
    assert [i for _, r in runs for i in r] == ids
    assert [k for k, _ in runs] == [Kind.SPECIAL, Kind.TEXT, Kind.SPECIAL, Kind.IMAGE]
