"""The language of the Shapes world: captions (short, detailed), their parser, hard negatives,
referring expressions."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from cm3leon.shapes.world import COLORS, POSITIONS, SHAPES, SIZES, ObjectSpec, Scene, ShapeObject

_POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def article(word: str) -> str:
    """``"a"`` or ``"an"`` for ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    """``"circle"`` -> ``"circles"``."""
    return shape + "s"


def join_phrases(parts: Sequence[str]) -> str:
    """``["x", "y", "z"]`` -> ``"x, y and z"``."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def position_phrase(position: str) -> str:
    """``"top left"`` -> ``"at the top left"``, ``"center"`` -> ``"in the center"``, ..."""
    return _POSITION_PHRASES[position]


def describe_object(obj: ObjectSpec | ShapeObject, canvas: int | None = None, *, detailed: bool = True) -> str:
    """``"a large red circle at the top left"`` (detailed) or ``"a red circle"``."""
    spec = obj if isinstance(obj, ObjectSpec) else ObjectSpec.from_object(obj, canvas or 0)
    words = [spec.color, spec.shape]
    if detailed and spec.size:
        words.insert(0, spec.size)
    text = f"{article(words[0])} {' '.join(words)}"
    if detailed and spec.position:
        text += " " + position_phrase(spec.position)
    return text


def reading_order(specs: Sequence[ObjectSpec]) -> list[ObjectSpec]:
    """``specs`` sorted top to bottom, then left to right, by named position (stable)."""
    return sorted(specs, key=lambda s: POSITIONS.index(s.position or "center"))  # POSITIONS is in reading order


def describe(scene: Scene | Sequence[ObjectSpec], detailed: bool = False) -> str:
    """Caption of a scene: short (``"a red circle and two blue squares"``) or detailed
    (``"a large red circle at the top left and a small blue square at the bottom right"``)."""
    specs = (
        [ObjectSpec.from_object(o, scene.size) for o in scene.objects] if isinstance(scene, Scene) else list(scene)
    )
    if not specs:
        return "an empty canvas"
    if detailed:
        return join_phrases([describe_object(s, detailed=True) for s in specs])
    groups: Counter[tuple[str, str]] = Counter((s.color, s.shape) for s in specs)
    parts = []
    for (color, shape), k in groups.items():  # first-occurrence order
        parts.append(f"{article(color)} {color} {shape}" if k == 1 else f"{NUMBER_WORDS[k]} {color} {plural(shape)}")
    return join_phrases(parts)


_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
_POS_WORDS = {**{p: p for p in POSITIONS}, "middle": "center", "centre": "center"}
_CAPTION_RE = re.compile(
    r"\b(?P<count>an?|one|two|three|four|five)\s+"
    r"(?:(?P<size>" + "|".join(_SIZE_WORDS) + r")\s+)?"
    r"(?P<color>" + "|".join(COLORS) + r")\s+"
    r"(?P<shape>" + "|".join(SHAPES) + r")(?P<plural>s)?\b"
    r"(?:\s+(?:at|on|in)\s+the\s+"
    r"(?P<pos>top left|top right|bottom left|bottom right|top|bottom|left|right|center|centre|middle))?"
)


def parse_caption(text: str) -> list[ObjectSpec]:
    """Objects named in a Shapes caption (inverse of :func:`describe`, short or detailed).

    Accepts counts (``"two red circles"``), optional sizes (small/large, also tiny/big) and
    optional positions (``"at the top left"``, ``"in the center"``/``"in the middle"``).
    """
    specs: list[ObjectSpec] = []
    for m in _CAPTION_RE.finditer(text.lower()):
        k = _COUNT_WORDS[m["count"]]
        size = _SIZE_WORDS[m["size"]] if m["size"] else None
        pos = _POS_WORDS[m["pos"]] if m["pos"] else None
        specs.extend(ObjectSpec(m["shape"], m["color"], size, pos) for _ in range(k))
    return specs


_ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "position": POSITIONS,
}


def hard_negative_captions(caption: str, rng: np.random.Generator, k: int = 4) -> list[str]:
    """Up to ``k`` captions that differ from a detailed ``caption`` in one binding or attribute.

    First every caption with one attribute (color, shape, size, position) swapped between
    two objects (the binding errors a bag-of-words encoder cannot see), then captions with
    one attribute of one object changed, drawn at random to fill ``k``. What a contrastive
    re-ranker must learn to tell apart (NegCLIP-style hard negatives, used by
    ``train_dual_encoder(negatives=...)``). A caption in reading order stays in reading
    order. Returns [] if nothing is parsed.
    """
    specs = parse_caption(caption)
    if not specs:
        return []
    in_reading_order = reading_order(specs) == specs
    base = describe(specs, detailed=True)
    swaps: dict[str, None] = {}
    changes: dict[str, None] = {}

    def add(to: dict[str, None], new: list[ObjectSpec]) -> None:
        text = describe(reading_order(new) if in_reading_order else new, detailed=True)
        if text != base and text not in swaps:
            to[text] = None

    for attr in _ATTRIBUTE_VALUES:
        for i, a in enumerate(specs):
            if getattr(a, attr) is None:
                continue
            for j in range(i + 1, len(specs)):
                new = list(specs)
                new[i] = dataclasses.replace(a, **{attr: getattr(specs[j], attr)})
                new[j] = dataclasses.replace(specs[j], **{attr: getattr(a, attr)})
                add(swaps, new)
    for attr, values in _ATTRIBUTE_VALUES.items():
        for i, a in enumerate(specs):
            if getattr(a, attr) is None:
                continue
            for v in values:
                if v != getattr(a, attr):
                    new = list(specs)
                    new[i] = dataclasses.replace(a, **{attr: v})
                    add(changes, new)
    out = list(swaps)[:k]
    rest = list(changes)  # add() keeps swaps out of changes
    if len(out) < k and rest:
        pick = rng.choice(len(rest), size=min(k - len(out), len(rest)), replace=False)
        out += [rest[i] for i in sorted(pick)]
    return out


def refer(scene: Scene, z: int) -> str | None:
    """Shortest unambiguous noun phrase for object ``z`` (``"the red circle"``,
    ``"the large red circle"``, ``"the red circle on the left"``), or None if none is."""
    target = ObjectSpec.from_object(scene.objects[z], scene.size)
    specs = [ObjectSpec.from_object(o, scene.size) for o in scene.objects]
    for fields in (("color", "shape"), ("size", "color", "shape"), ("color", "shape", "position"),
                   ("size", "color", "shape", "position")):
        key = tuple(getattr(target, f) for f in fields)
        if sum(tuple(getattr(s, f) for f in fields) == key for s in specs) == 1:
            words = [getattr(target, f) for f in fields if f != "position"]
            phrase = "the " + " ".join(words)
            if "position" in fields:
                phrase += " " + position_phrase(target.position or "center")
            return phrase
    return None

