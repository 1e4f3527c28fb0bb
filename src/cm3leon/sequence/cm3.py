"""The CM3 causal-masked objective (paper §2.2) as pure functions over id lists.

A document (``<eos> seg <break> seg ...``, see :mod:`cm3leon.sequence.document`) becomes an
infilling instance by cutting ``n`` non-overlapping spans out of it, putting sentinel
``<mask:i>`` where span ``i`` was (``i`` in order of appearance) and appending the spans
at the end, each introduced by ``<infill>``::

    input    <eos> Image of a chameleon : <break> IMAGE
    1 span   <eos> Image of <mask:0> : <break> IMAGE <infill> a chameleon
    2 spans  <eos> <mask:0> of a <mask:1> : <break> IMAGE <infill> Image <infill> chameleon

Layout rule: the k-th ``<infill>`` of the tail holds the span of ``<mask:k>``. Spans hold
only text or image ids, never a special, so splitting the tail at ``<infill>`` is
unambiguous and :func:`cm3_inverse` is exact. Each span adds two ids (its sentinel and its
``<infill>``): ``len(out) == len(in) + 2 * n_spans``. With one span it reads exactly like
the paper's ``Image of <mask>: [image] <infill> a chameleon``; with zero spans the
document is unchanged (plain causal LM).

Where spans may lie (paper §2.2 and metaseq's ``CausalMaskedDataset``, the public
reference): the number of spans is Poisson(lambda) clipped to ``[0, max_spans]``; unlike
metaseq, which masks anywhere in the token block, a span here lies inside ONE segment and
never covers or crosses ``<eos>``/``<break>`` (the paper's modification: no image
generation "from an arbitrary midpoint"). A span's segment is drawn uniformly among the
segments (default) or by length; its end points are two sorted uniforms scaled to the
segment, as in metaseq; with probability ``whole_segment_prob`` it is the whole segment.
Whole-segment spans matter: masking a caption gives ``<eos> <mask:0> <break> IMAGE
<infill> caption``, whose prefix ``<eos> <mask:0> <break>`` is exactly the unconditional
stream of classifier-free guidance (§3.1). Candidate spans that overlap an already chosen
one are rejected (metaseq's greedy rule), so a document may get fewer spans than drawn.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from cm3leon.sequence.document import split_documents
from cm3leon.vocab import Kind, Vocab

Span = tuple[int, int]  # [start, end) positions in a document's ids

SEGMENT_CHOICES = ("uniform", "length")


@dataclass(frozen=True)
class CM3Config:
    """Knobs of the CM3 transform (paper §2.2).

    ``max_spans=None`` means ``vocab.n_masks``. ``mask_images=False`` keeps spans in text
    segments only. ``segment_choice`` is ``"uniform"`` (every segment equally likely, so
    short captions get masked as often as 1024-token images) or ``"length"``
    (proportional to segment length, closest to metaseq's position-uniform spans).
    """

    poisson_lambda: float = 1.0
    max_spans: int | None = None
    whole_segment_prob: float = 0.25
    mask_images: bool = True
    segment_choice: str = "uniform"

    def __post_init__(self) -> None:
        if not (self.poisson_lambda >= 0 and math.isfinite(self.poisson_lambda)):
            raise ValueError(f"CM3Config.poisson_lambda must be a finite number >= 0, got {self.poisson_lambda}")
        if self.max_spans is not None and self.max_spans < 0:
            raise ValueError(f"CM3Config.max_spans must be >= 0 or None, got {self.max_spans}")
        if not 0.0 <= self.whole_segment_prob <= 1.0:
            raise ValueError(f"CM3Config.whole_segment_prob must be in [0, 1], got {self.whole_segment_prob}")
        if self.segment_choice not in SEGMENT_CHOICES:
            raise ValueError(f"CM3Config.segment_choice must be one of {SEGMENT_CHOICES}, got {self.segment_choice!r}")

    def apply(self, ids: Sequence[int], vocab: Vocab, rng: random.Random) -> list[int]:
        """:func:`cm3_transform_sequence` with this config."""
        return cm3_transform_sequence(ids, vocab, rng, self)


def sample_poisson(rng: random.Random, lam: float) -> int:
    """One draw from Poisson(``lam``) using ``rng`` (Knuth's method; fine for small lambda)."""
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation keeps the loop short for unusual settings
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def check_document(ids: Sequence[int], vocab: Vocab) -> None:
    """Raise unless ``ids`` is ONE untransformed document: ``<eos>`` first, ``<break>`` between
    segments and no other special id (an id table: its document start first, then only text,
    image ids, its image markers and a final end of text)."""
    if vocab.ids is not None:
        _check_table_document(ids, vocab)
        return
    if not ids or ids[0] != vocab.eos_id:
        raise ValueError("a CM3 document must start with <eos>; split sequences with split_documents first")
    n_special, size, brk = vocab.n_special, vocab.size, vocab.break_id
    # one pass with plain comparisons: this runs on every training document
    bad = next((i for i in ids[1:] if (i < n_special and i != brk) or i < 0 or i >= size), None)
    if bad is not None:
        vocab.kind(bad)  # raises for ids outside the vocabulary
        raise ValueError(
            f"document holds {vocab.token_name(bad)} (only <eos> at the start and <break> between "
            "segments are allowed); is it already CM3-transformed or several documents?"
        )


def _check_table_document(ids: Sequence[int], vocab: Vocab) -> None:
    t = vocab.ids
    assert t is not None
    if not ids or ids[0] != t.doc_start:
        raise ValueError(f"a document must start with {vocab.token_name(t.doc_start)}; "
                         "split sequences with split_documents first")
    x = torch.as_tensor(list(ids), dtype=torch.long)
    if int(x.min()) < 0 or int(x.max()) >= vocab.size:
        vocab.kind(next(i for i in ids if not 0 <= i < vocab.size))  # raises, naming the id
    bad = vocab.kinds_tensor(x) == 0
    bad[0] = False
    bad &= (x != t.begin_image) & (x != t.end_image)
    bad[-1] &= bool(x[-1] != t.end_text)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(
            f"document holds {vocab.token_name(int(x[k]))} at position {k} (only the document start first, image "
            "markers around images and a final end of text are allowed); is it several documents, or does the "
            "text tokenizer map words to a reserved id (an unknown token)?"
        )


def segment_ranges(ids: Sequence[int], vocab: Vocab) -> list[tuple[Kind, int, int]]:
    """The non-empty segments of one document as ``(kind, start, end)`` positions in ``ids``."""
    ids = ids if isinstance(ids, list) else list(ids)
    out: list[tuple[Kind, int, int]] = []
    start, n, brk = 1, len(ids), vocab.break_id
    while start <= n:
        try:
            end = ids.index(brk, start)
        except ValueError:
            end = n
        if end > start:
            out.append((vocab.kind(ids[start]), start, end))
        start = end + 1
    return out


def sample_spans(
    ids: Sequence[int],
    vocab: Vocab,
    rng: random.Random,
    *,
    poisson_lambda: float = 1.0,
    max_spans: int | None = None,
    whole_segment_prob: float = 0.25,
    mask_images: bool = True,
    segment_choice: str = "uniform",
) -> list[Span]:
    """Draw non-overlapping spans, each inside one segment, sorted by position."""
    check_document(ids, vocab)
    cap = vocab.n_masks if max_spans is None else min(max_spans, vocab.n_masks)
    n = min(sample_poisson(rng, poisson_lambda), cap)
    if n == 0:  # always for a vocabulary without sentinels (an id table): the document stays causal
        return []
    segs = [s for s in segment_ranges(ids, vocab) if mask_images or s[0] is not Kind.IMAGE]
    if not segs:
        return []
    weights = [e - s for _, s, e in segs] if segment_choice == "length" else None
    chosen: list[Span] = []
    # metaseq draws n^2 candidates and keeps the non-intersecting ones greedily.
    for _ in range(max(1, n * n)):
        if len(chosen) == n:
            break
        _, s, e = rng.choices(segs, weights=weights)[0]
        length = e - s
        if rng.random() < whole_segment_prob:
            cand = (s, e)
        else:
            a, b = sorted((rng.random(), rng.random()))
            lo = int(a * length)
            hi = min(length, max(lo + 1, int(b * length + 0.5)))
            cand = (s + lo, s + hi)
        if all(cand[1] <= c[0] or c[1] <= cand[0] for c in chosen):
            chosen.append(cand)
    return sorted(chosen)


def apply_spans(ids: Sequence[int], vocab: Vocab, spans: Sequence[Span], *, check: bool = True) -> list[int]:
    """Move the given spans of one document to the end (see the module layout).

    ``spans`` must be sorted, non-overlapping, non-empty, and each inside one segment.
    ``check=False`` skips re-validating a document that was just validated.
    """
    if check:
        check_document(ids, vocab)
    if len(spans) > vocab.n_masks:
        raise ValueError(f"{len(spans)} spans but only {vocab.n_masks} <mask:i> sentinels; raise Vocab.n_masks")
    body: list[int] = []
    tail: list[int] = []
    prev = 0
    for i, (s, e) in enumerate(spans):
        if not (prev <= s < e <= len(ids)) or (i == 0 and s < 1):
            raise ValueError(f"span {(s, e)} is empty, out of order, overlapping or outside the document")
        if vocab.break_id in ids[s:e]:
            raise ValueError(f"span {(s, e)} crosses a <break>; spans must lie inside one segment")
        body.extend(ids[prev:s])
        body.append(vocab.mask_id(i))
        tail.append(vocab.infill_id)
        tail.extend(ids[s:e])
        prev = e
    body.extend(ids[prev:])
    return body + tail


def cm3_transform(
    ids: Sequence[int],
    vocab: Vocab,
    rng: random.Random,
    *,
    poisson_lambda: float = 1.0,
    max_spans: int | None = None,
    whole_segment_prob: float = 0.25,
    mask_images: bool = True,
    segment_choice: str = "uniform",
) -> list[int]:
    """CM3-transform ONE document (starting with ``<eos>``); returns a new list.

    Zero spans returns a copy of ``ids``; see the module docstring for the layout.
    """
    spans = sample_spans(
        ids,
        vocab,
        rng,
        poisson_lambda=poisson_lambda,
        max_spans=max_spans,
        whole_segment_prob=whole_segment_prob,
        mask_images=mask_images,
        segment_choice=segment_choice,
    )
    return apply_spans(ids, vocab, spans, check=False)


def cm3_inverse(ids: Sequence[int], vocab: Vocab) -> list[int]:
    """Exact inverse of :func:`cm3_transform` / :func:`apply_spans` for one document."""
    ids = list(ids)
    if not ids or ids[0] != vocab.eos_id or vocab.eos_id in ids[1:]:
        raise ValueError("cm3_inverse expects ONE document starting with <eos>")
    cut = ids.index(vocab.infill_id) if vocab.infill_id in ids else len(ids)
    body, tail = ids[:cut], ids[cut:]
    spans: list[list[int]] = []
    for i in tail:
        if i == vocab.infill_id:
            spans.append([])
        elif vocab.is_mask(i) or i == vocab.break_id or i == vocab.pad_id:
            raise ValueError(f"{vocab.token_name(i)} inside an infilled span; not a CM3 layout")
        else:
            spans[-1].append(i)
    out: list[int] = []
    n_seen = 0
    for i in body:
        if vocab.is_mask(i):
            k = vocab.mask_index(i)
            if k != n_seen:
                raise ValueError(f"<mask:{k}> found where <mask:{n_seen}> was expected; sentinels must be in order")
            if k >= len(spans):
                raise ValueError(f"<mask:{k}> has no matching <infill> span (only {len(spans)} spans)")
            out.extend(spans[k])
            n_seen += 1
        else:
            out.append(i)
    if n_seen != len(spans):
        raise ValueError(f"{len(spans)} <infill> spans but {n_seen} <mask:i> sentinels")
    return out


def cm3_transform_sequence(
    ids: Sequence[int],
    vocab: Vocab,
    rng: random.Random,
    cfg: CM3Config | None = None,
) -> list[int]:
    """Apply :func:`cm3_transform` to each document of a concatenation, independently."""
    cfg = cfg or CM3Config()
    out: list[int] = []
    for doc in split_documents(list(ids), vocab):
        out.extend(
            cm3_transform(
                doc,
                vocab,
                rng,
                poisson_lambda=cfg.poisson_lambda,
                max_spans=cfg.max_spans,
                whole_segment_prob=cfg.whole_segment_prob,
                mask_images=cfg.mask_images,
                segment_choice=cfg.segment_choice,
            )
        )
    return out


def cm3_inverse_sequence(ids: Sequence[int], vocab: Vocab) -> list[int]:
    """Exact inverse of :func:`cm3_transform_sequence`."""
    out: list[int] = []
    for doc in split_documents(list(ids), vocab):
        out.extend(cm3_inverse(doc, vocab))
    return out


def image_places(ids: Sequence[int], vocab: Vocab) -> list[int]:
    """Each token's place inside its image in the UN-transformed document, -1 for non-image ids.

    ``ids`` is a row of CM3-transformed documents (each starting with ``<eos>``). An image
    token's place is its index in the image (0 .. ``vocab.image_seq_len - 1``) before the
    transform moved spans around: after a ``<mask:i>`` cut out of an image, the image
    continues at the place after the span, and the span in the tail keeps its own places.
    Models with a place-in-image embedding (``ModelConfig.image_tokens``) read these during
    training; computed from the ids alone the places would restart at 0 after every mask.
    A malformed row is read as far as it goes: a ``<mask:i>`` without its span is skipped,
    and image tokens of a span no mask refers to (a row cut inside a document) get the
    places the ids alone give (as :func:`~cm3leon.model.transformer.image_index`).
    """
    ids = list(ids)
    out = [-1] * len(ids)
    if vocab.ids is not None:  # no CM3 layout: each run of image ids is one image, in order
        L, run = vocab.image_seq_len, 0
        for t, kind in enumerate(vocab.kinds_tensor(torch.as_tensor(ids, dtype=torch.long)).tolist()):
            if kind == 2:
                out[t] = run % L
                run += 1
            else:
                run = 0
        return out
    first_img, L, eos, infill = vocab.image_offset, vocab.image_seq_len, vocab.eos_id, vocab.infill_id

    def count_runs(positions: Iterable[int]) -> None:
        """Number the image ids along ``positions``: runs of image ids count up from 0."""
        run = 0
        for t in positions:
            if ids[t] >= first_img:
                out[t] = run % L
                run += 1
            else:
                run = 0

    count_runs(range(len(ids)))  # the ids' own places; kept where no document order applies
    starts = [i for i, t in enumerate(ids) if t == eos]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    for s, e in zip(starts, [*starts[1:], len(ids)], strict=True):
        doc = ids[s:e]
        cut = doc.index(infill) if infill in doc else len(doc)
        spans: list[list[int]] = []
        for j in range(cut, len(doc)):
            if doc[j] == infill:
                spans.append([])
            else:
                spans[-1].append(j)
        order: list[int] = []  # positions in ``doc``, in un-transformed order
        for j in range(cut):
            if vocab.is_mask(doc[j]):
                k = vocab.mask_index(doc[j])
                order.extend(spans[k] if k < len(spans) else ())
            else:
                order.append(j)
        count_runs(s + j for j in order)
    return out
