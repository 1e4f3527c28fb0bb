"""Supervised fine-tuning: task templates (paper §4, Table 5), builders, mixture, dataset.

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

Text pieces are encoded separately (literal text, then each field's value), so a field's
tokens never merge with their neighbours and the answer is always a whole token span; a
space before a placeholder is carried by the field's value (``"Answer: {answer}"`` encodes
``"Answer:"`` then ``" blue"``), as byte-level BPE expects.

Box coordinates (spatially grounded generation) are written as text:
``"(x0, y0) -> (x1, y1)"`` (the form of the paper's Fig. 5) with each coordinate the
percentage of the image side, rounded (a 0..100 grid; :data:`BOX_GRID`).

The mixture (App. E.1: "up/down sampling strategy with a threshold of 3/0.3"): each task
gets weight ``clip(target_share / natural_share, 0.3, 3)`` (default target: equal shares),
i.e. rare tasks are repeated up to 3x and common tasks are kept down to 30%.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from cm3leon.data.shards import ImageEncoder, Shards, ShardWriter, TextEncoder, encode_images, vocab_for
from cm3leon.sequence.build import open_shards, pack_row, row_rng, to_row, truncate_document
from cm3leon.sequence.cm3 import CM3Config, apply_spans, cm3_transform
from cm3leon.vocab import Vocab

log = logging.getLogger(__name__)

BOX_GRID = 100
UP_THRESHOLD = 3.0
DOWN_THRESHOLD = 0.3
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


def _task(name: str, source: str, *variants: Sequence[Slot | str], target: str, target_end: str | None = None) -> TaskTemplate:
    """A TaskTemplate from variants written as segment lists (str = text, ``"<image:f>"`` = image slot)."""
    def slot(s: Slot | str) -> Slot:
        if isinstance(s, str):
            m = re.fullmatch(r"<image:(\w+)>", s)
            return ImageSlot(m.group(1)) if m else TextSlot(s)
        return s

    return TaskTemplate(name, source, tuple(tuple(slot(s) for s in v) for v in variants), target, target_end)


def _control(name: str, source: str, feature: str) -> TaskTemplate:
    return _task(name, source, [f"Make high quality image from {feature}", "<image:condition>", "{caption}", "<image:image>"],
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
    for k, slot in enumerate(t.variants[variant]):
        if k:
            ids.append(vocab.break_id)
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
    return Rendered(ids, (s, e), t.target_kind)


def infill_form(ids: Sequence[int], target: tuple[int, int], vocab: Vocab) -> list[int]:
    """The training document with its target as the CM3 span (a target at the end stays causal)."""
    s, e = target
    if e == len(ids):
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
    if e == len(r.ids):
        return r.ids[:s], r.kind
    form = infill_form(r.ids, r.target, vocab)
    return form[: len(r.ids) - (e - s) + 2], r.kind  # body with <mask:0>, then <infill>


# ----------------------------------------------------------------------------- examples


class SFTExample(NamedTuple):
    """A filled task: ``fields`` hold strings and images (PIL, or VQ codes once tokenized)."""

    task: str
    fields: dict[str, Any]
    variant: int = 0


def _pick_variant(task: str, rng: random.Random) -> int:
    return rng.randrange(len(get_task(task).variants))


def _shapes_narration(objects: Sequence[Mapping[str, Any]]) -> str:
    from cm3leon.shapes.captions import position_phrase

    n = len(objects)
    head = f"The image shows {n} object{'s' if n != 1 else ''} on a white background."
    parts = [
        f"{'A' if o['size'][0] not in 'aeiou' else 'An'} {o['size']} {o['color']} {o['shape']} is "
        f"{position_phrase(o['position'])}."
        for o in sorted(objects, key=lambda o: o["z"])
    ]
    return " ".join([head, *parts])


# Shapes' task names (meta["tasks"]) -> SFT tasks built from them.
SHAPES_TASKS: dict[str, tuple[str, ...]] = {
    "caption": ("caption", "text_to_image"),
    "detailed_caption": ("detailed_caption", "narration"),
    "grounding": ("grounding",),
    "segmentation": ("seg_to_image",),
    "edge": ("edge_to_image",),
    "depth": ("depth_to_image",),
    "vqa": ("vqa",),
    "reasoning": ("reasoning",),
    "edit": ("edit",),
    "write": ("write",),
}


def shapes_sft_examples(record: Any, rng: random.Random) -> list[SFTExample]:
    """One example per SFT task a Shapes record carries (template variants and VQA pair drawn from ``rng``)."""
    meta = record.meta
    images = meta.get("images", {})
    size = float(meta["size"])
    out: list[SFTExample] = []

    def add(task: str, **fields: Any) -> None:
        out.append(SFTExample(task, fields, _pick_variant(task, rng)))

    for tag in meta.get("tasks", []):
        for task in SHAPES_TASKS.get(tag, ()):
            if task == "caption":
                add(task, caption=meta["captions"]["short"], image=record.image)
            elif task == "text_to_image":
                add(task, caption=meta["captions"]["detailed"], image=record.image)
            elif task == "detailed_caption":
                add(task, caption=meta["captions"]["detailed"], image=record.image)
            elif task == "narration":
                add(task, caption=_shapes_narration(meta["objects"]), image=record.image)
            elif task == "grounding":
                objs = ", ".join(
                    f"{o['color']} {o['shape']} at {format_box(o['box'], size)}"
                    for o in sorted(meta["objects"], key=lambda o: o["z"])
                )
                add(task, caption=meta["captions"]["short"], objects=objs, image=record.image)
            elif task in ("seg_to_image", "edge_to_image", "depth_to_image"):
                key = {"seg_to_image": "seg", "edge_to_image": "edge", "depth_to_image": "depth"}[task]
                add(task, condition=images[key], caption=meta["captions"]["short"], image=record.image)
            elif task == "vqa":
                qa = rng.choice(meta["vqa"])
                add(task, question=qa["question"], answer=qa["answer"], image=record.image)
            elif task == "reasoning":
                r = meta["reasoning"]
                add(task, question=r["question"], context=r["context"] or "none",
                    options=format_options(r["options"]), explanation=r["explanation"] or "-",
                    answer=r["answer"], image=record.image)
            elif task == "edit":
                add(task, source=record.image, instruction=meta["edit"]["instruction"], image=images["edit_image"])
            elif task == "write":
                add(task, text=meta["write"]["text"], image=images["write_image"])
    return out


def record_sft_examples(record: Any, rng: random.Random) -> list[SFTExample]:
    """SFT examples of any record: every task of a Shapes record; captioning and text-to-image
    (the pretraining form, which keeps SFT from eroding text-to-image) for caption+image."""
    if record.meta.get("source") == "shapes":
        return shapes_sft_examples(record, rng)
    if record.image is not None and record.text:
        fields = {"caption": record.text, "image": record.image}
        return [SFTExample("caption", fields, _pick_variant("caption", rng)),
                SFTExample("text_to_image", dict(fields), _pick_variant("text_to_image", rng))]
    return []


def _load_image(path: Path) -> Any:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with Image.open(path) as im:
        return im.convert("RGB")


def read_vqav2(
    questions: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    *,
    seed: int = 0,
) -> Iterator[SFTExample]:
    """VQA examples from VQAv2-format files (questions + annotations json, COCO image folder).

    The answer is the annotation's ``multiple_choice_answer``; images are found by the
    12-digit COCO image id in their file name (``COCO_val2014_000000000042.jpg``).
    """
    qs = json.loads(Path(questions).read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads(Path(annotations).read_text())["annotations"]}
    files: dict[int, Path] = {}
    for p in Path(images).iterdir():
        m = re.search(r"(\d{6,})\.\w+$", p.name)
        if m:
            files[int(m.group(1))] = p
    rng = random.Random(seed)
    for q in qs:
        a = anns.get(q["question_id"])
        img = files.get(int(q["image_id"]))
        if a is None or img is None:
            log.debug("skipping VQA question %s (no annotation or image)", q.get("question_id"))
            continue
        yield SFTExample("vqa", {"question": q["question"], "answer": a["multiple_choice_answer"],
                                 "image": _load_image(img)}, _pick_variant("vqa", rng))


def read_sft_jsonl(path: str | os.PathLike[str], *, seed: int = 0, task: str | None = None) -> Iterator[SFTExample]:
    """Examples from a JSONL file, one ``{"task": ..., "fields": {...}}`` per line.

    Image fields are file paths (relative to the file's folder). Convenience layouts:
    InstructPix2Pix-style ``{"input": img, "instruction": str, "output": img}`` (task
    ``edit``) and control triples ``{"condition": img, "caption": str, "image": img,
    "task": "edge_to_image"}``. ``task`` sets the task for lines that lack one.
    """
    p = Path(path)
    rng = random.Random(seed)
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n} is not valid JSON ({e})") from e
        if "fields" in row:
            name, fields = row.get("task", task), dict(row["fields"])
        elif {"input", "instruction", "output"} <= set(row):
            name, fields = "edit", {"source": row["input"], "instruction": row["instruction"], "image": row["output"]}
        else:
            name, fields = row.get("task", task), {k: v for k, v in row.items() if k != "task"}
        if name is None:
            raise ValueError(f"{p}:{n} names no task; add \"task\" or pass task=")
        t = get_task(name)
        for s in t.variants[0]:
            if isinstance(s, ImageSlot) and isinstance(fields.get(s.field), str):
                fields[s.field] = _load_image(p.parent / fields[s.field])
        variant = int(row["variant"]) if "variant" in row else _pick_variant(name, rng)
        yield SFTExample(name, fields, variant)


# ----------------------------------------------------------------------------- tokenizing


def tokenize_sft(
    examples: Iterable[SFTExample],
    text_tok: TextEncoder,
    image_tok: ImageEncoder,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    n_masks: int = 8,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
) -> Shards:
    """Render examples into shards tagged with their task and target span (VQ in batches)."""
    vocab = vocab_for(text_tok, image_tok, n_masks=n_masks)
    counts: Counter[str] = Counter()
    writer = ShardWriter(out_dir, vocab, overwrite=overwrite)
    try:
        batch: list[SFTExample] = []
        for ex in examples:
            batch.append(ex)
            if len(batch) == batch_size:
                _write_sft_batch(batch, writer, vocab, text_tok, image_tok, counts)
                batch = []
        _write_sft_batch(batch, writer, vocab, text_tok, image_tok, counts)
        writer.finalize({"kind": "sft", "task_counts": dict(sorted(counts.items())), **(meta or {})})
    except BaseException:
        writer.abort()
        raise
    return Shards(out_dir)


def _write_sft_batch(
    batch: list[SFTExample], writer: ShardWriter, vocab: Vocab, text_tok: TextEncoder, image_tok: ImageEncoder,
    counts: Counter[str],
) -> None:
    slots = [
        (k, s.field)
        for k, ex in enumerate(batch)
        for s in get_task(ex.task).variants[ex.variant]
        if isinstance(s, ImageSlot) and hasattr(ex.fields.get(s.field), "convert")  # PIL images
    ]
    codes = encode_images(image_tok, [batch[k].fields[f] for k, f in slots])
    filled = [dict(ex.fields) for ex in batch]
    for (k, f), c in zip(slots, codes):
        filled[k][f] = c
    for ex, fields in zip(batch, filled):
        r = render_training(ex.task, fields, text_tok, vocab, variant=ex.variant)
        writer.add(r.ids, task=ex.task, target=r.target)
        counts[ex.task] += 1


# ----------------------------------------------------------------------------- mixture


def mixture_weights(
    counts: Mapping[str, int],
    target_shares: Mapping[str, float] | None = None,
    *,
    up: float = UP_THRESHOLD,
    down: float = DOWN_THRESHOLD,
    ignore_absent: bool = False,
) -> dict[str, float]:
    """Per-task sampling weight ``clip(target_share / natural_share, down, up)`` (App. E.1).

    ``target_shares`` default to equal shares over the tasks present. A share naming a
    task with no examples is an error, or (``ignore_absent``) logged and dropped, so one
    share table can serve data sets that lack some tasks.
    """
    if not 0 < down <= 1 <= up:
        raise ValueError(f"need 0 < down <= 1 <= up, got down={down}, up={up}")
    present = {t: n for t, n in counts.items() if n > 0}
    if not present:
        return {}
    shares = dict(target_shares) if target_shares is not None else {t: 1.0 for t in present}
    unknown = set(shares) - set(present)
    if unknown and not ignore_absent:
        raise ValueError(f"target shares name tasks with no examples: {sorted(unknown)}")
    if unknown:
        log.warning("target shares for tasks with no examples are ignored: %s", sorted(unknown))
    total_share = sum(shares.get(t, 0.0) for t in present)
    if total_share <= 0:
        raise ValueError("target shares must be positive for at least one present task")
    total = sum(present.values())
    return {
        t: min(up, max(down, (shares.get(t, 0.0) / total_share) / (n / total)))
        for t, n in present.items()
    }


def mixture_table(counts: Mapping[str, int], weights: Mapping[str, float]) -> str:
    """A plain-text table: task, examples, natural %, weight, sampled examples, sampled %."""
    eff = {t: _effective(counts[t], weights.get(t, 0.0)) for t in counts}
    n, m = sum(counts.values()) or 1, sum(eff.values()) or 1
    lines = [f"{'task':<20}{'examples':>10}{'natural%':>10}{'weight':>8}{'sampled':>10}{'sampled%':>10}"]
    for t in sorted(counts):
        lines.append(
            f"{t:<20}{counts[t]:>10}{100 * counts[t] / n:>10.1f}{weights.get(t, 0.0):>8.2f}"
            f"{eff[t]:>10}{100 * eff[t] / m:>10.1f}"
        )
    lines.append(f"{'total':<20}{sum(counts.values()):>10}{100.0:>10.1f}{'':>8}{sum(eff.values()):>10}{100.0:>10.1f}")
    return "\n".join(lines)


def _effective(n: int, w: float) -> int:
    return max(1, int(math.floor(n * w + 0.5))) if n and w > 0 else 0


class SFTDataset(torch.utils.data.Dataset):
    """Map-style SFT rows over task-tagged shards (from :func:`tokenize_sft`), mixture-balanced.

    An epoch holds ``round(n_t * w_t)`` examples of task ``t`` (repeats for up-sampled
    tasks, a seeded subset for down-sampled ones), shuffled. Each example is trained with
    the CM3 objective: with probability ``target_infill_prob`` its target is the masked
    span (exactly the inference layout of :func:`render_prompt`), otherwise random CM3
    spans are drawn as in pretraining. Rows are packed like :class:`PretrainDataset`'s;
    row ``i`` is a deterministic function of ``(seed, i)``.
    """

    def __init__(
        self,
        shards: Shards | str | os.PathLike[str],
        *,
        seq_len: int,
        seed: int = 0,
        cm3: CM3Config | dict[str, Any] | None = None,
        target_infill_prob: float = 0.5,
        target_shares: Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
        up: float = UP_THRESHOLD,
        down: float = DOWN_THRESHOLD,
        ignore_absent_shares: bool = False,
        pack: bool = True,
        max_fill_tries: int = 4,
    ) -> None:
        self.shards = open_shards(shards)
        self.vocab = self.shards.vocab
        self.cm3 = CM3Config(**cm3) if isinstance(cm3, dict) else (cm3 or CM3Config())
        if not 0.0 <= target_infill_prob <= 1.0:
            raise ValueError(f"target_infill_prob must be in [0, 1], got {target_infill_prob}")
        if seq_len < self.vocab.image_seq_len + 1:
            raise ValueError(f"seq_len={seq_len} cannot hold one image ({self.vocab.image_seq_len} tokens + <eos>)")
        n = len(self.shards)
        if n == 0:
            raise ValueError(f"{self.shards.path} holds no documents")
        self.seq_len, self.seed, self.pack, self.max_fill_tries = seq_len, seed, pack, max_fill_tries
        self.target_infill_prob = target_infill_prob
        tags = np.asarray(self.shards.task_ids) if self.shards.task_ids is not None else np.full(n, -1)
        by_task = {name: np.flatnonzero(tags == k) for k, name in enumerate(self.shards.task_names)}
        by_task["untagged"] = np.flatnonzero(tags < 0)
        by_task = {t: v for t, v in by_task.items() if len(v)}
        self.counts = {t: len(v) for t, v in by_task.items()}
        self.weights = dict(weights) if weights is not None else mixture_weights(
            self.counts, target_shares, up=up, down=down, ignore_absent=ignore_absent_shares)
        rng = np.random.default_rng(seed)
        parts = []
        for t in sorted(by_task):
            docs = by_task[t][rng.permutation(len(by_task[t]))]
            k = _effective(len(docs), self.weights.get(t, 0.0))
            parts.append(np.resize(docs, k))  # cycles through the permutation for up-sampled tasks
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if len(order) == 0:
            raise ValueError("the SFT mixture is empty: every task has weight 0")
        self.order = order[rng.permutation(len(order))]
        self.n_too_long = int(np.sum(self.shards.lengths > seq_len))
        log.info("SFT mixture (%d rows per epoch):\n%s", len(self.order), self.table())
        if self.n_too_long:
            log.warning("%d SFT documents are longer than seq_len=%d and will be cut", self.n_too_long, seq_len)

    def table(self) -> str:
        """The mixture as a printable table."""
        return mixture_table(self.counts, self.weights)

    def __len__(self) -> int:
        return len(self.order)

    def example(self, doc: int, rng: random.Random, budget: int, first: bool) -> list[int] | None:
        """CM3 form of one SFT document within ``budget`` (None if it cannot fit whole)."""
        ids = self.shards[doc]
        target = self.shards.target(doc)
        if target is not None and rng.random() < self.target_infill_prob:
            out = infill_form(ids, target, self.vocab)
        else:
            c = self.cm3
            out = cm3_transform(ids, self.vocab, rng, poisson_lambda=c.poisson_lambda, max_spans=c.max_spans,
                                whole_segment_prob=c.whole_segment_prob, mask_images=c.mask_images,
                                segment_choice=c.segment_choice)
        if len(out) <= budget:
            return out
        return truncate_document(ids, budget, self.vocab) if first else None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        rng = row_rng(self.seed, i)
        window = pack_row(
            int(self.order[i]), self.example, lambda r: int(self.order[r.randrange(n)]), rng,
            self.seq_len, pack=self.pack, max_fill_tries=self.max_fill_tries,
        )
        return to_row(window, self.seq_len, self.vocab)
