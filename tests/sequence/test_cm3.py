"""CM3 objective: the paper's example, exact inverse, boundaries, length, Poisson rate."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon.sequence.cm3 import (
    CM3Config,
    apply_spans,
    cm3_inverse,
    cm3_inverse_sequence,
    cm3_transform,
    cm3_transform_sequence,
    image_places,
    sample_poisson,
    sample_spans,
    segment_ranges,
)
from cm3leon.sequence.document import Document, ImageSegment, TextSegment, split_documents
from cm3leon.vocab import Vocab

V = Vocab(text_size=20, image_size=16, image_seq_len=4, n_masks=8)
WORDS = ["Image", "of", "a", "chameleon", ":"]


def words(*ws: str) -> list[int]:
    return V.text_to_ids([WORDS.index(w) for w in ws])


def names(ids: list[int]) -> list[str]:
    """Readable tokens: words for text ids, special names otherwise."""
    out = []
    for i in ids:
        if V.text_offset <= i < V.text_offset + len(WORDS):
            out.append(WORDS[i - V.text_offset])
        else:
            out.append(V.token_name(i))
    return out


IMAGE = V.codes_to_ids([3, 1, 4, 1])
DOC = [V.eos_id, *words("Image", "of", "a", "chameleon", ":"), V.break_id, *IMAGE]


def test_paper_single_span_example() -> None:
    # "Image of a chameleon: [image]" -> "Image of <mask>: [image] <infill> a chameleon" (§2.2)
    out = apply_spans(DOC, V, [(3, 5)])
    img = names(IMAGE)
    assert names(out) == ["<eos>", "Image", "of", "<mask:0>", ":", "<break>", *img, "<infill>", "a", "chameleon"]
    assert cm3_inverse(out, V) == DOC


def test_whole_caption_span_is_the_cfg_unconditional_stream() -> None:
    out = apply_spans(DOC, V, [(1, 6)])
    assert out[:3] == [V.eos_id, V.mask_id(0), V.break_id]
    assert out[3 : 3 + V.image_seq_len] == IMAGE
    assert out[3 + V.image_seq_len :] == [V.infill_id, *words("Image", "of", "a", "chameleon", ":")]


def test_multi_span_layout_is_in_order() -> None:
    out = apply_spans(DOC, V, [(1, 2), (4, 5), (7, 9)])
    assert names(out) == (
        ["<eos>", "<mask:0>", "of", "a", "<mask:1>", ":", "<break>", "<mask:2>"]
        + names(IMAGE[2:])
        + ["<infill>", "Image", "<infill>", "chameleon", "<infill>"]
        + names(IMAGE[:2])
    )
    assert cm3_inverse(out, V) == DOC


def test_zero_spans_is_identity_and_does_not_alias() -> None:
    out = cm3_transform(DOC, V, random.Random(0), poisson_lambda=0.0)
    assert out == DOC and out is not DOC


def test_inputs_never_mutated() -> None:
    doc = list(DOC)
    for seed in range(50):
        cm3_transform(doc, V, random.Random(seed), poisson_lambda=3.0)
    assert doc == DOC


def test_bad_inputs_are_rejected_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="start with <eos>"):
        cm3_transform(DOC[1:], V, random.Random(0))
    with pytest.raises(ValueError, match="crosses a <break>"):
        apply_spans(DOC, V, [(4, 8)])
    with pytest.raises(ValueError, match="already CM3-transformed"):
        cm3_transform(apply_spans(DOC, V, [(3, 5)]), V, random.Random(0))
    with pytest.raises(ValueError, match="overlapping"):
        apply_spans(DOC, V, [(1, 3), (2, 4)])
    with pytest.raises(ValueError, match="in order"):
        cm3_inverse([V.eos_id, V.mask_id(1), V.infill_id, *words("a")], V)
    with pytest.raises(ValueError, match="spans but"):
        cm3_inverse([V.eos_id, *words("a"), V.infill_id, *words("a")], V)
    with pytest.raises(ValueError):
        CM3Config(segment_choice="bogus")


# ---- property tests over random documents -----------------------------------------------

segment = st.one_of(
    st.lists(st.integers(0, V.text_size - 1), min_size=1, max_size=12).map(lambda t: ("t", t)),
    st.lists(st.integers(0, V.image_size - 1), min_size=V.image_seq_len, max_size=V.image_seq_len).map(
        lambda c: ("i", c)
    ),
)


def to_doc(segs: list[tuple[str, list[int]]]) -> list[int]:
    return Document(
        tuple(TextSegment(tuple(v)) if k == "t" else ImageSegment(tuple(v)) for k, v in segs)
    ).to_ids(V)


documents = st.lists(segment, min_size=0, max_size=5).map(to_doc)


@settings(max_examples=300, deadline=None)
@given(doc=documents, seed=st.integers(0, 2**32 - 1), lam=st.floats(0.0, 4.0), whole=st.floats(0, 1))
def test_round_trip_boundaries_and_length(doc: list[int], seed: int, lam: float, whole: float) -> None:
    spans = sample_spans(doc, V, random.Random(seed), poisson_lambda=lam, whole_segment_prob=whole)
    out = cm3_transform(doc, V, random.Random(seed), poisson_lambda=lam, whole_segment_prob=whole)
    assert out == apply_spans(doc, V, spans)
    assert cm3_inverse(out, V) == doc
    n = len(spans)
    assert len(out) == len(doc) + 2 * n
    assert out.count(V.infill_id) == n
    assert [i for i in out if V.is_mask(i)] == [V.mask_id(k) for k in range(n)]
    # every span lies inside one segment, never touches a separator, no overlap
    segs = segment_ranges(doc, V)
    for s, e in spans:
        assert any(a <= s < e <= b for _, a, b in segs)
        assert V.eos_id not in doc[s:e] and V.break_id not in doc[s:e]
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    # the separators are untouched, in the same order
    assert [i for i in out if i in (V.eos_id, V.break_id)] == [i for i in doc if i in (V.eos_id, V.break_id)]


@settings(max_examples=100, deadline=None)
@given(docs=st.lists(documents, min_size=1, max_size=4), seed=st.integers(0, 2**31))
def test_sequence_transform_is_per_document(docs: list[list[int]], seed: int) -> None:
    seq = [i for d in docs for i in d]
    cfg = CM3Config(poisson_lambda=2.0)
    out = cm3_transform_sequence(seq, V, random.Random(seed), cfg)
    parts = split_documents(out, V)
    assert len(parts) == len(docs)
    assert [cm3_inverse(p, V) for p in parts] == docs
    assert cm3_inverse_sequence(out, V) == seq


def test_text_only_when_images_excluded() -> None:
    for seed in range(200):
        spans = sample_spans(DOC, V, random.Random(seed), poisson_lambda=3.0, mask_images=False)
        assert all(e <= 6 for _, e in spans)


def test_max_spans_is_respected() -> None:
    doc = [V.eos_id] + [x for t in range(30) for x in (V.text_offset + t % 20, V.break_id)][:-1]
    for seed in range(200):
        out = cm3_transform(doc, V, random.Random(seed), poisson_lambda=6.0, max_spans=2)
        assert out.count(V.infill_id) <= 2


def test_poisson_sampler_matches_pmf() -> None:
    rng = random.Random(1)
    n = 20000
    draws = [sample_poisson(rng, 1.0) for _ in range(n)]
    for k in range(4):
        expected = math.exp(-1.0) / math.factorial(k)
        observed = draws.count(k) / n
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_number_of_spans_follows_poisson_rate() -> None:
    # 64 one-token segments: every span is a whole segment, collisions are retried, so the
    # realised number of spans is the Poisson draw (clipped at 8; P(>8) ~ 1e-6 for lambda=1).
    doc = [V.eos_id]
    for t in range(64):
        doc += [V.text_offset + t % V.text_size] + ([V.break_id] if t < 63 else [])
    rng = random.Random(7)
    n = 4000
    counts = [cm3_transform(doc, V, rng).count(V.infill_id) for _ in range(n)]
    mean = sum(counts) / n
    p0 = counts.count(0) / n
    assert abs(mean - 1.0) < 4 * math.sqrt(1.0 / n)
    assert abs(p0 - math.exp(-1)) < 4 * math.sqrt(math.exp(-1) * (1 - math.exp(-1)) / n)


def test_whole_caption_masking_happens_often_enough_for_cfg() -> None:
    rng = random.Random(3)
    n = 2000
    uncond = sum(
        cm3_transform(DOC, V, rng, mask_images=False)[:3] == [V.eos_id, V.mask_id(0), V.break_id] for _ in range(n)
    )
    # P(1+ span) * P(whole) = (1 - e^-1) * 0.25 ~= 0.158 at least (partial spans can cover it too)
    assert uncond / n > 0.12


def test_image_places_hand_example() -> None:
    """A span cut out of an image keeps its places, and the image goes on after it."""
    a, b, c, d = V.codes_to_ids([9, 8, 7, 6])
    doc = [V.eos_id, *words("a"), V.break_id, a, b, c, d]
    out = apply_spans(doc, V, [(4, 6)])  # b c
    assert out == [V.eos_id, *words("a"), V.break_id, a, V.mask_id(0), d, V.infill_id, b, c]
    assert image_places(out, V) == [-1, -1, -1, 0, -1, 3, -1, 1, 2]
    # untransformed: places are just the run index; a second image starts again at 0
    two = doc + [V.eos_id, V.break_id, a, b]
    assert image_places(two, V) == [-1, -1, -1, 0, 1, 2, 3, -1, -1, 0, 1]


@settings(max_examples=200, deadline=None)
@given(n_docs=st.integers(1, 3), n_images=st.integers(0, 3), seed=st.integers(0, 2**31), lam=st.floats(0.0, 4.0))
def test_image_places_are_the_untransformed_places(n_docs: int, n_images: int, seed: int, lam: float) -> None:
    """Image codes that spell their own place must read back exactly, whatever spans were cut."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        segs = [("t", [V.text_offset + rng.randrange(5) for _ in range(rng.randint(1, 4))])]
        for _ in range(n_images):
            segs.append(("i", list(range(V.image_seq_len))))
            if rng.random() < 0.5:
                segs.append(("t", [V.text_offset + rng.randrange(5) for _ in range(rng.randint(1, 3))]))
        docs.append(to_doc(segs))
    row = cm3_transform_sequence([i for d in docs for i in d], V, rng, CM3Config(poisson_lambda=lam))
    places = image_places(row, V)
    assert len(places) == len(row)
    for t, p in zip(row, places, strict=True):
        assert p == (t - V.image_offset if t >= V.image_offset else -1)


def test_image_places_tolerate_a_cut_tail() -> None:
    """A row cut inside a tail (or a mask without its span) still gets places, never an error."""
    a, b, c, d = V.codes_to_ids([0, 1, 2, 3])
    row = [V.eos_id, V.break_id, a, V.mask_id(0), d, V.mask_id(1)]
    assert image_places(row, V) == [-1, -1, 0, -1, 1, -1]
    # a row that starts inside a tail: the orphan span's image tokens get the ids' places, not -1
    full = [V.eos_id, V.break_id, a, V.mask_id(0), d, V.infill_id, b, c]
    assert image_places(full[5:], V) == [-1, 0, 1]
