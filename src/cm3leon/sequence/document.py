"""A document is a list of text and image segments; this module lays it out as ids.

Layout (paper §2.1, Fig. 8-9; DESIGN.md): a document starts with ``<eos>`` and its
segments are separated by ``<break>``::

    caption + image:   <eos> caption <break> IMAGE
    interleaved:       <eos> text <break> IMAGE <break> text ...

Several documents (retrieved ones first, the query last) are simply concatenated: each
one's leading ``<eos>`` separates it from the previous one.

A vocabulary with an explicit id table (a converted Chameleon) lays the same document out
with the model's own markers: ``<s> caption <begin-image> IMAGE <end-image>``
(:meth:`Vocab.segment_prefix` / :meth:`Vocab.segment_suffix`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cm3leon.vocab import Kind, Vocab


@dataclass(frozen=True)
class TextSegment:
    """Text as tokenizer-local BPE ids (not unified ids)."""

    bpe_ids: tuple[int, ...]


@dataclass(frozen=True)
class ImageSegment:
    """An image as exactly L VQ codebook indices (not unified ids)."""

    codes: tuple[int, ...]


Segment = TextSegment | ImageSegment


@dataclass(frozen=True)
class Document:
    """An ordered list of text/image segments."""

    segments: tuple[Segment, ...]

    @classmethod
    def caption_image(cls, bpe_ids: list[int], codes: list[int]) -> Document:
        """The paper's caption-image document: ``<eos> caption <break> IMAGE``."""
        return cls((TextSegment(tuple(bpe_ids)), ImageSegment(tuple(codes))))

    @property
    def has_text(self) -> bool:
        return any(isinstance(s, TextSegment) for s in self.segments)

    @property
    def has_image(self) -> bool:
        return any(isinstance(s, ImageSegment) for s in self.segments)

    def to_ids(self, vocab: Vocab) -> list[int]:
        """Unified ids: ``<eos>`` then the segments joined by ``<break>`` (or wrapped in the id table's markers)."""
        out = [vocab.eos_id]
        for k, seg in enumerate(self.segments):
            kind = Kind.TEXT if isinstance(seg, TextSegment) else Kind.IMAGE
            out.extend(vocab.segment_prefix(kind, first=k == 0))
            if isinstance(seg, TextSegment):
                out.extend(vocab.text_to_ids(list(seg.bpe_ids)))
            else:
                if len(seg.codes) != vocab.image_seq_len:
                    raise ValueError(
                        f"image segment has {len(seg.codes)} codes but the vocabulary expects "
                        f"exactly {vocab.image_seq_len} (image tokenizer and model config disagree)"
                    )
                out.extend(vocab.codes_to_ids(list(seg.codes)))
            out.extend(vocab.segment_suffix(kind))
        return out

    @classmethod
    def from_ids(cls, ids: list[int], vocab: Vocab) -> Document:
        """Inverse of :meth:`to_ids` for a single document (must start with ``<eos>``)."""
        if not ids or ids[0] != vocab.eos_id:
            raise ValueError("a document's ids must start with <eos>")
        segs: list[Segment] = []
        body = ids[1:]
        if vocab.eos_id in body:
            raise ValueError("from_ids got several documents; split them with split_documents first")
        markers = {vocab.break_id, vocab.end_image_id}
        for kind, run in vocab.split_segments(body):
            if len(run) == 1 and run[0] in markers:
                continue
            if kind is Kind.TEXT and all(vocab.kind(i) is Kind.TEXT for i in run):
                segs.append(TextSegment(tuple(vocab.ids_to_text(run))))
            elif kind is Kind.IMAGE:
                segs.append(ImageSegment(tuple(vocab.ids_to_codes(run))))
            else:
                raise ValueError(
                    f"segment mixes modalities or holds specials: {[vocab.token_name(i) for i in run[:8]]}"
                )
        return cls(tuple(segs))


def split_documents(ids: list[int], vocab: Vocab) -> list[list[int]]:
    """Split a concatenation of documents at each ``<eos>`` (each part keeps its ``<eos>``)."""
    docs: list[list[int]] = []
    for i in ids:
        if i == vocab.eos_id:
            docs.append([i])
        elif not docs:
            raise ValueError("ids must start with <eos>")
        else:
            docs[-1].append(i)
    return docs
