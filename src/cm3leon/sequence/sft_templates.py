"""SFT task templates (paper §4, Table 5) and their rendering into training documents and prompts.

Every SFT task is ONE interleaved document built from a template, trained with the same
CM3 objective as pretraining (§4). The templates are data (:data:`TASKS`): a task is a
list of segments (text with ``{placeholders}``, or image slots) joined by ``<break>``, plus
which field is the *target* (the answer). The same table renders

- the training document (:func:`render_training`: ids + the target's span), and
- the inference prompt (:func:`render_prompt`): the training document with its target
  cut (a target at the end: ``... <break>`` then the model writes the image) or masked
  in CM3 infilling form (a target inside: ``... <mask:0> ... <infill>`` then the model
  writes the answer),

so the two never drift apart: ``prompt + answer == infill_form(training document)``.

A vocabulary with an id table (a converted Chameleon, no CM3 sentinels) renders the same
table causally with the model's own markers: the images of a text task come first, every
image is wrapped in the begin/end-of-image ids, the document ends with the end-of-text id
and the prompt is everything before the target (``<s> <begin-image> IMAGE <end-image>
Question: what color? Answer:`` then the model writes `` red.`` and ``</s>``).

Text pieces are encoded separately (literal text, then each field's value), so a field's
tokens never merge with their neighbours and the answer is always a whole token span; a
space before a placeholder is carried by the field's value (``"Answer: {answer}"`` encodes
``"Answer:"`` then ``" blue"``), as byte-level BPE expects.

Box coordinates (spatially grounded generation) are written as text:
``"(x0, y0) -> (x1, y1)"`` (the form of the paper's Fig. 5) with each coordinate the
percentage of the image side, rounded (a 0..100 grid; :data:`BOX_GRID`).

A filled task is an :class:`SFTExample`; where examples come from is
:mod:`cm3leon.sequence.sft_sources`, writing them as shards :mod:`cm3leon.sequence.sft_shards`,
and the training mixture :mod:`cm3leon.sequence.sft_mixture`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cm3leon.data.shards import TextEncoder
from cm3leon.sequence.cm3 import apply_spans
from cm3leon.vocab import Kind, Vocab

BOX_GRID = 100
_FIELD_RE = re.compile(r"\{(\w+)\}")


# ----------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class TextSlot:
    """A text segment: literal text with ``{field}`` placeholders."""

    template: str

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(_FIELD_RE.findall(self.template))


@dataclass(frozen=True)
class ImageSlot:
    """An image segment filled from ``fields[field]`` (VQ codes, or a PIL image before tokenizing)."""

    field: str


Slot = TextSlot | ImageSlot


@dataclass(frozen=True)
class TaskTemplate:
    """One SFT task: prompt variants (each a list of segments) and its target field(s).

    ``target`` is the answer field; for answers made of several fields (ScienceQA's
    explanation + answer) ``target_end`` names the last one and the target is the whole
    token span from the start of ``target`` to the end of ``target_end``.
    """

    name: str
    source: str  # the paper's data set(s) for this template (Table 5)
    variants: tuple[tuple[Slot, ...], ...]
    target: str
    target_end: str | None = None

    def __post_init__(self) -> None:
        for v in self.variants:
            names = [f for s in v for f in (s.fields if isinstance(s, TextSlot) else (s.field,))]
            if self.target not in names or (self.target_end or self.target) not in names:
                raise ValueError(f"task {self.name!r}: a variant lacks the target field {self.target!r}")

    @property
    def target_kind(self) -> str:
        """``"image"`` if the answer is an image, else ``"text"``."""
        return "image" if any(isinstance(s, ImageSlot) and s.field == self.target for s in self.variants[0]) else "text"

    def fields(self, variant: int = 0) -> tuple[str, ...]:
        """Every field a variant needs, in order of appearance."""
        out: list[str] = []
        for s in self.variants[variant]:
            out.extend(s.fields if isinstance(s, TextSlot) else (s.field,))
        return tuple(dict.fromkeys(out))


def _task(
    name: str, source: str, *variants: Sequence[Slot | str], target: str, target_end: str | None = None
) -> TaskTemplate:
    """A TaskTemplate from variants written as segment lists (str = text, ``"<image:f>"`` = image slot)."""
    def slot(s: Slot | str) -> Slot:
        if isinstance(s, str):
            m = re.fullmatch(r"<image:(\w+)>", s)
            return ImageSlot(m.group(1)) if m else TextSlot(s)
        return s

    return TaskTemplate(name, source, tuple(tuple(slot(s) for s in v) for v in variants), target, target_end)


def _control(name: str, source: str, feature: str) -> TaskTemplate:
    return _task(name, source,
                 [f"Make high quality image from {feature}", "<image:condition>", "{caption}", "<image:image>"],
                 target="image")


_Q = "Question: {question}"
_CTX = "Question: {question}\nContext: {context}\nOptions: {options}\n"

# The SFT task table (paper Table 5; "[newline]" is "\n"; "<br>" separates segments).
TASKS: dict[str, TaskTemplate] = {
    t.name: t
    for t in (
        # ---- image-focused: the target is the last image
        _task("edit", "InstructPix2Pix",
              ["Edit first image following the instruction", "<image:source>", "{instruction}", "<image:image>"],
              target="image"),
        _task("write", "OCR (how-to-write)", ['draw "{text}"', "<image:image>"], target="image"),
        _task("grounding", "Object Detection (spatially grounded)",
              ["Generate high quality image of {caption} with segmentations {objects}", "<image:image>"],
              target="image"),
        _control("edge_to_image", "Edge-to-Image", "canny edge features"),
        _control("seg_to_image", "Seg-to-Image", "a segmentation map"),
        _control("hed_to_image", "Hed-to-Image", "hed features"),
        _control("pose_to_image", "Pose-to-Image", "openpose features"),
        _control("depth_to_image", "Depth-to-Image", "depth features"),
        _control("norm_to_image", "Norm-to-Image", "3D norm features"),
        _control("scribble_to_image", "Scribble-to-Image", "children's scribbles"),
        # Plain text-to-image, the pretraining form (paper Fig. 5: SFT also trains text-to-image);
        # without it SFT teaches "an image follows a condition" only and text-to-image degrades.
        _task("text_to_image", "Shutterstock (pretraining form)", ["{caption}", "<image:image>"], target="image"),
        # ---- text-focused: the target is text before the image (CM3 infilling)
        _task("caption", "COCO / Flickr30k",
              ["{caption}", "<image:image>"],
              ["Describe the given picture. {caption}", "<image:image>"],
              target="caption"),
        _task("detailed_caption", "Image Paragraph",
              ["Describe the given picture in very detail. {caption}", "<image:image>"],
              ["Describe all the objects in the given image in very detail. {caption}", "<image:image>"],
              ["Generate a long caption for the given image. {caption}", "<image:image>"],
              target="caption"),
        _task("narration", "Localized Narratives",
              ["Generate a long narration of what is happening in the given image. {caption}", "<image:image>"],
              ["Generate a long caption for the given image. {caption}", "<image:image>"],
              target="caption"),
        _task("vqa", "VQA2 / VizWiz / OKVQA",
              [_Q + " Answer: {answer}.", "<image:image>"],
              [_Q + "\n{answer}", "<image:image>"],
              [_Q + " The answer is {answer}.", "<image:image>"],
              target="answer"),
        _task("vqa_context", "OKVQA (with context)",
              [_CTX + "Answer: {answer}.", "<image:image>"], target="answer"),
        _task("reasoning", "ScienceQA",
              [_CTX + "Answer: Let's think step-by-step: {explanation} So the answer is {answer}.", "<image:image>"],
              target="explanation", target_end="answer"),
    )
}


def get_task(name: str) -> TaskTemplate:
    """The template named ``name``, with an error listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown SFT task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def format_box(box: Sequence[float], width: float, height: float | None = None, *, grid: int = BOX_GRID) -> str:
    """``"(x0, y0) -> (x1, y1)"`` with pixel coordinates quantized to ``0..grid`` (percent by default)."""
    h = width if height is None else height
    if len(box) != 4 or width <= 0 or h <= 0:
        raise ValueError(f"box must be [x0, y0, x1, y1] with a positive image size, got {box} on {width}x{h}")
    q = [min(grid, max(0, round(v / s * grid))) for v, s in zip(box, (width, h, width, h))]
    return f"({q[0]}, {q[1]}) -> ({q[2]}, {q[3]})"


def format_options(options: Sequence[str]) -> str:
    """ScienceQA-style choices: ``"(A) red (B) blue"``."""
    return " ".join(f"({chr(65 + k)}) {o}" for k, o in enumerate(options))


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """A rendered training document: unified ids and the target's span ``[start, end)``."""

    ids: list[int]
    target: tuple[int, int]
    kind: str  # "image" | "text"

    @property
    def answer(self) -> list[int]:
        return self.ids[self.target[0] : self.target[1]]


def _text_pieces(template: str) -> list[tuple[str | None, str]]:
    """``[(field or None, text)]``; a space before a placeholder moves onto the field."""
    parts = _FIELD_RE.split(template)  # literal, field, literal, field, ...
    out: list[tuple[str | None, str]] = []
    for k, p in enumerate(parts):
        if k % 2 == 0:
            lit = p[:-1] if p.endswith(" ") and k + 1 < len(parts) else p
            out.append((None, lit))
        else:
            lead = " " if parts[k - 1].endswith(" ") else ""
            out.append((p, lead))
    return out


def render_training(
    task: str | TaskTemplate,
    fields: Mapping[str, Any],
    text_tok: TextEncoder,
    vocab: Vocab,
    *,
    variant: int = 0,
) -> Rendered:
    """The training document of a filled example: ids + target span.

    Text fields are strings; image fields are VQ codes (``L`` ints, list or tensor).
    """
    t = task if isinstance(task, TaskTemplate) else get_task(task)
    if not 0 <= variant < len(t.variants):
        raise ValueError(f"task {t.name!r} has {len(t.variants)} template variants; got variant={variant}")
    missing = [f for f in t.fields(variant) if f not in fields or fields[f] is None]
    if missing:
        raise ValueError(f"task {t.name!r} needs fields {list(t.fields(variant))}; missing {missing}")
    ids = [vocab.eos_id]
    span: dict[str, tuple[int, int]] = {}
    slots = list(t.variants[variant])
    if vocab.ids is not None and t.target_kind == "text":
        # A model without CM3 infilling reads left to right: the images a text answer is about
        # come first, so the answer can be the document's causal continuation.
        slots = [s for s in slots if isinstance(s, ImageSlot)] + [s for s in slots if not isinstance(s, ImageSlot)]
    for k, slot in enumerate(slots):
        ids.extend(vocab.segment_prefix(Kind.IMAGE if isinstance(slot, ImageSlot) else Kind.TEXT, first=k == 0))
        if isinstance(slot, ImageSlot):
            value = fields[slot.field]
            codes = value.tolist() if hasattr(value, "tolist") else list(value) if isinstance(value, Sequence) else None
            if codes is None or len(codes) != vocab.image_seq_len or not all(isinstance(c, int) for c in codes):
                raise ValueError(
                    f"task {t.name!r}: image field {slot.field!r} must be {vocab.image_seq_len} VQ codes "
                    f"(tokenize images first, e.g. with tokenize_sft), got {type(value).__name__}"
                )
            if min(codes) < 0 or max(codes) >= vocab.image_size:
                raise ValueError(f"task {t.name!r}: codes of {slot.field!r} are outside [0, {vocab.image_size})")
            span[slot.field] = (len(ids), len(ids) + len(codes))
            ids.extend(vocab.codes_to_ids(codes))
            ids.extend(vocab.segment_suffix(Kind.IMAGE))
            continue
        start = len(ids)
        for name, text in _text_pieces(slot.template):
            if name is not None:
                value = fields[name]
                if not isinstance(value, str):
                    raise ValueError(f"task {t.name!r}: text field {name!r} must be a str, got {type(value).__name__}")
                text = text + value
            s = len(ids)
            ids.extend(vocab.text_to_ids(text_tok.encode(text)) if text else [])
            if name is not None:
                span[name] = (s, len(ids))
        if len(ids) == start:
            raise ValueError(f"task {t.name!r}: a text segment rendered empty; fill its fields")
    s, e = span[t.target][0], span[t.target_end or t.target][1]
    if e <= s:
        raise ValueError(f"task {t.name!r}: the target {t.target!r} is empty")
    if vocab.ids is not None:  # the model's own end of document: a text answer is followed by its stop id
        ids.append(vocab.ids.end_text)
    return Rendered(ids, (s, e), t.target_kind)


def infill_form(ids: Sequence[int], target: tuple[int, int], vocab: Vocab) -> list[int]:
    """The training document with its target as the CM3 span (a target at the end, or any target of a
    vocabulary without sentinels, stays causal)."""
    s, e = target
    if e == len(ids) or vocab.ids is not None:  # a model without infilling trains on the causal form
        return list(ids)
    return apply_spans(ids, vocab, [(s, e)])


def render_prompt(
    task: str | TaskTemplate,
    fields: Mapping[str, Any],
    text_tok: TextEncoder,
    vocab: Vocab,
    *,
    variant: int = 0,
) -> tuple[list[int], str]:
    """Inference prompt and target kind (``"image"``/``"text"``); answer fields may be absent.

    Target at the end (image tasks): the prompt ends with ``<break>`` and the model writes
    the L image tokens. Target inside (text tasks): the answer is replaced by ``<mask:0>``
    and the prompt ends with ``<infill>``; the model writes the answer, then ``<eos>``.
    """
    t = task if isinstance(task, TaskTemplate) else get_task(task)
    filled = dict(fields)
    order = t.fields(variant)
    lo, hi = order.index(t.target), order.index(t.target_end or t.target)
    for name in order[lo : hi + 1]:  # answer fields: any placeholder, they are cut or masked
        if filled.get(name) is None:
            filled[name] = [0] * vocab.image_seq_len if t.target_kind == "image" else "x"
    r = render_training(t, filled, text_tok, vocab, variant=variant)
    s, e = r.target
    if e == len(r.ids) or vocab.ids is not None:  # causal: everything before the target
        return r.ids[:s], r.kind
    form = infill_form(r.ids, r.target, vocab)
    return form[: len(r.ids) - (e - s) + 2], r.kind  # body with <mask:0>, then <infill>


# ----------------------------------------------------------------------------- examples


class SFTExample(NamedTuple):
    """A filled task: ``fields`` hold strings and images (PIL, or VQ codes once tokenized)."""

    task: str
    fields: dict[str, Any]
    variant: int = 0


def pick_variant(task: str, rng: random.Random) -> int:
    """A template variant of ``task`` drawn uniformly with ``rng``."""
    return rng.randrange(len(get_task(task).variants))
