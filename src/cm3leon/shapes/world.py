"""The built-in Shapes world: procedural images of a few colored shapes with exact ground truth.

A scene holds 1-3 objects, each a ``shape`` (circle, square, triangle, diamond) of one of six
``color``s and two ``size``s, placed freely on a white canvas; its named ``position`` is the
cell of a 3x3 grid holding its center. Later objects are drawn over earlier ones (their ``z``
is their index). Rendering is aliasing-free (a pixel belongs to a shape iff its center does),
so colors are exact and every annotation can be checked against the pixels.

From one scene every task of the paper's SFT mixture (Table 5) is derived: short and detailed
captions, boxes (spatial grounding), segmentation / edge / depth maps (structure-to-image),
VQA pairs, a reasoning item, an edit pair (recolor, reshape, move, add, remove) and a
"how to write" image of a rendered word. :func:`make_example` packs all of them into a
:class:`DocRecord`; :func:`write_shapes_dataset` writes many to the dataset format.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from cm3leon.data.dataset import DatasetWriter, record_to_row
from cm3leon.data.records import DocRecord

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Six colors at least ~100 apart in RGB so nearest-color snapping survives noise and blur.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 0),
    "purple": (130, 40, 170),
    "orange": (250, 120, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SIZES: tuple[str, ...] = ("small", "large")
# Object side length as a fraction of the canvas: 9 px vs 15 px at 32 px.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.28, "large": 0.47}
# 3x3 grid cells, row-major, named by the cell holding the object's center.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
_POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
# Segmentation maps fill each object with its class color on black.
SEG_PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (255, 0, 0),
    "square": (0, 255, 0),
    "triangle": (0, 0, 255),
    "diamond": (255, 255, 0),
}
CORNERS: dict[str, int] = {"circle": 0, "triangle": 3, "square": 4, "diamond": 4}
WRITE_WORDS: tuple[str, ...] = (
    "red", "green", "blue", "cat", "dog", "sun", "star", "tree", "book", "fish", "bird",
    "hat", "cup", "moon", "box", "cake", "ship", "key", "lamp", "door", "sky", "leaf",
    "rain", "snow", "shape", "cube", "dot", "line", "art", "map",
)
EDIT_KINDS: tuple[str, ...] = ("recolor", "reshape", "move", "add", "remove")
TASKS: tuple[str, ...] = (
    "caption", "detailed_caption", "grounding", "segmentation", "edge", "depth",
    "vqa", "reasoning", "edit", "write",
)
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


CAPTION_ORDERS = ("z", "reading")


@dataclass(frozen=True)
class ShapesConfig:
    """Knobs of the Shapes world.

    ``size`` is the canvas side in pixels (32, 64, 128 or 256); each object keeps at least
    ``min_visible`` of its pixels visible and in one piece under the objects drawn over it.
    ``snap`` puts every object's top-left corner on a multiple of ``snap`` pixels (1: any
    pixel). Snapping to the image tokenizer's patch size (4 for ``shapes-32``) makes each
    shape/color/size one "sprite" of codes wherever it sits, an easier world for a model
    trained for minutes; all nine named positions stay reachable. ``caption_order`` orders
    the objects of the detailed caption: ``"z"`` (drawing order, random) or ``"reading"``
    (top to bottom, then left to right by named position: the order a raster-scan decoder
    draws them in, which makes binding each phrase to its object easier for a small model).
    """

    size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    min_visible: float = 0.65
    snap: int = 1
    caption_order: str = "z"

    def __post_init__(self) -> None:
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"caption_order must be one of {CAPTION_ORDERS}, got {self.caption_order!r}")
        if self.size not in (32, 64, 128, 256):
            raise ValueError(f"Shapes image size must be 32, 64, 128 or 256, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if not 1 <= self.snap <= self.size // 8:
            raise ValueError(f"snap must be in [1, size/8 = {self.size // 8}], got {self.snap}")

    def corner(self, rng: np.random.Generator, d: int) -> tuple[int, int]:
        """A random top-left corner for a ``d``-pixel object inside the canvas, on the ``snap`` grid."""
        hi = (self.size - d) // self.snap
        return int(rng.integers(0, hi + 1)) * self.snap, int(rng.integers(0, hi + 1)) * self.snap

    def side(self, size_name: str) -> int:
        """Side length in pixels of a ``small``/``large`` object."""
        return int(round(self.size * SIZE_FRACTIONS[size_name]))


@dataclass(frozen=True)
class ShapeObject:
    """One object: class attributes plus its integer square footprint ``[x0, x0+d) x [y0, y0+d)``."""

    shape: str
    color: str
    size: str
    x0: int
    y0: int
    d: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.d / 2.0, self.y0 + self.d / 2.0)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``[x0, y0, x1, y1]`` in pixels, x1/y1 exclusive; every pixel of the shape lies inside."""
        return (self.x0, self.y0, self.x0 + self.d, self.y0 + self.d)


@dataclass(frozen=True)
class Scene:
    """A canvas of ``size`` pixels and objects in drawing order (index = z, later on top)."""

    size: int
    objects: tuple[ShapeObject, ...]

    def position(self, obj: ShapeObject) -> str:
        return grid_position(obj.center, self.size)

    def to_dicts(self) -> list[dict[str, Any]]:
        """The scene description stored in ``meta["objects"]``."""
        return [
            {
                "shape": o.shape, "color": o.color, "size": o.size,
                "center": [o.center[0], o.center[1]], "box": list(o.box),
                "position": self.position(o), "z": z, "x0": o.x0, "y0": o.y0, "d": o.d,
            }
            for z, o in enumerate(self.objects)
        ]

    @classmethod
    def from_dicts(cls, size: int, objects: Sequence[dict[str, Any]]) -> Scene:
        """Inverse of :meth:`to_dicts` (objects sorted by ``z``)."""
        objs = sorted(objects, key=lambda o: o["z"])
        return cls(size, tuple(ShapeObject(o["shape"], o["color"], o["size"], o["x0"], o["y0"], o["d"]) for o in objs))


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt says about one object; unspecified attributes are None."""

    shape: str
    color: str
    size: str | None = None
    position: str | None = None
    box: tuple[int, int, int, int] | None = None

    @classmethod
    def from_object(cls, obj: ShapeObject, canvas: int) -> ObjectSpec:
        return cls(obj.shape, obj.color, obj.size, grid_position(obj.center, canvas), obj.box)


# --------------------------------------------------------------------------- geometry


def grid_position(center: tuple[float, float], size: int) -> str:
    """Name of the 3x3 grid cell holding ``center`` on a ``size`` x ``size`` canvas."""
    cx, cy = center
    col = min(2, max(0, int(cx * 3 // size)))
    row = min(2, max(0, int(cy * 3 // size)))
    return POSITIONS[3 * row + col]


@functools.lru_cache(maxsize=2048)
def shape_mask(shape: str, d: int) -> np.ndarray:
    """Boolean ``[d, d]`` footprint of ``shape``: a pixel is in iff its center is (read-only)."""
    m = _shape_mask(shape, d)
    m.flags.writeable = False
    return m


def _shape_mask(shape: str, d: int) -> np.ndarray:
    if shape not in CORNERS:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    c = (np.arange(d) + 0.5) / d  # pixel centers in [0, 1]
    u, v = c[None, :], c[:, None]
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(u - 0.5) <= v / 2.0 + 1e-9
    return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + 1e-9  # diamond


def label_map(scene: Scene) -> np.ndarray:
    """``int16 [S, S]``: index of the visible object at each pixel, -1 for background."""
    lab = np.full((scene.size, scene.size), -1, dtype=np.int16)
    for z, o in enumerate(scene.objects):
        m = shape_mask(o.shape, o.d)
        view = lab[o.y0:o.y0 + o.d, o.x0:o.x0 + o.d]
        view[m] = z
    return lab


def _lookup(lab: np.ndarray, colors: Sequence[tuple[int, int, int]], bg: tuple[int, int, int]) -> Image.Image:
    table = np.array([*colors, bg], dtype=np.uint8)  # index -1 -> background
    return Image.fromarray(table[lab], mode="RGB")


def render(scene: Scene, cfg: ShapesConfig | None = None, *, labels: np.ndarray | None = None) -> Image.Image:
    """The RGB image of ``scene`` (exact palette colors on a white background); ``labels``
    reuses a :func:`label_map` of the scene."""
    lab = label_map(scene) if labels is None else labels
    return _lookup(lab, [COLORS[o.color] for o in scene.objects], BACKGROUND)


def render_segmentation(scene: Scene, *, labels: np.ndarray | None = None) -> Image.Image:
    """Each visible object pixel in its shape class color of :data:`SEG_PALETTE`, background black."""
    lab = label_map(scene) if labels is None else labels
    return _lookup(lab, [SEG_PALETTE[o.shape] for o in scene.objects], SEG_PALETTE["background"])


def depth_level(z: int, max_objects: int = 3) -> int:
    """Gray level of the object drawn ``z``-th: nearer (drawn later) is brighter; background 0."""
    return int(round(255 * (z + 1) / max(3, max_objects)))


def render_depth(scene: Scene, max_objects: int = 3, *, labels: np.ndarray | None = None) -> Image.Image:
    """Layer map: each visible object pixel at :func:`depth_level` of its z, background black."""
    levels = [(depth_level(z, max_objects),) * 3 for z in range(len(scene.objects))]
    return _lookup(label_map(scene) if labels is None else labels, levels, (0, 0, 0))


def render_edges(image: Image.Image) -> Image.Image:
    """Canny edges of ``image``: white edges on black, RGB."""
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 50, 100)
    return Image.fromarray(edges, mode="L").convert("RGB")


@functools.lru_cache(maxsize=1)
def _bitmap_font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def render_word(word: str, size: int) -> Image.Image:
    """``word`` in PIL's bitmap font, scaled up (nearest neighbour) to fill a white canvas."""
    font = _bitmap_font()
    l, t, r, b = font.getbbox(word)
    glyphs = Image.new("L", (r - l + 2, b - t + 2), 0)
    ImageDraw.Draw(glyphs).text((1 - l, 1 - t), word, fill=255, font=font)
    ink = glyphs.getbbox()
    if ink is None:
        raise ValueError(f"word {word!r} renders no ink")
    glyphs = glyphs.crop(ink)
    margin = max(1, size // 16)
    scale = min((size - 2 * margin) // glyphs.width, (size - 2 * margin) // glyphs.height)
    if scale < 1:
        raise ValueError(f"word {word!r} is too long to write legibly on a {size} px canvas")
    glyphs = glyphs.resize((glyphs.width * scale, glyphs.height * scale), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    ox, oy = (size - glyphs.width) // 2, (size - glyphs.height) // 2
    canvas.paste((0, 0, 0), (ox, oy, ox + glyphs.width, oy + glyphs.height), mask=glyphs)
    return canvas


@functools.lru_cache(maxsize=8)
def writable_words(size: int) -> tuple[str, ...]:
    """The words of :data:`WRITE_WORDS` that fit a ``size`` px canvas at scale >= 1."""
    font = _bitmap_font()
    margin = max(1, size // 16)
    return tuple(w for w in WRITE_WORDS if font.getbbox(w)[2] <= size - 2 * margin)


# --------------------------------------------------------------------------- sampling


def _grid_margin(size: int) -> float:
    return max(1.0, size / 32.0)


def _well_placed(o: ShapeObject, size: int) -> bool:
    """Inside the canvas and with a center clearly inside one grid cell."""
    if o.x0 < 0 or o.y0 < 0 or o.x0 + o.d > size or o.y0 + o.d > size:
        return False
    m = _grid_margin(size)
    return all(abs(c - size * k / 3.0) >= m for c in o.center for k in (1, 2))


def _box_gap(a: ShapeObject, b: ShapeObject) -> int:
    gx = max(a.x0 - (b.x0 + b.d), b.x0 - (a.x0 + a.d))
    gy = max(a.y0 - (b.y0 + b.d), b.y0 - (a.y0 + a.d))
    return max(gx, gy)


def scene_is_valid(scene: Scene, cfg: ShapesConfig) -> bool:
    """The world's invariants: objects inside, unambiguous grid cells, same-colored objects
    apart, and each object at least ``cfg.min_visible`` visible in one 4-connected piece."""
    objs = scene.objects
    if not cfg.min_objects <= len(objs) <= cfg.max_objects:
        return False
    if not all(_well_placed(o, scene.size) for o in objs):
        return False
    gap = max(2, scene.size // 16)
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            if a.color == b.color and _box_gap(a, b) < gap:
                return False
    lab = label_map(scene)
    for z, o in enumerate(objs[:-1]):  # the top object is fully visible
        visible = lab[o.y0:o.y0 + o.d, o.x0:o.x0 + o.d] == z
        if visible.sum() < cfg.min_visible * shape_mask(o.shape, o.d).sum():
            return False
        if ndimage.label(visible)[1] != 1:
            return False
    return True


def _choice(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _sample_object(rng: np.random.Generator, cfg: ShapesConfig, **fixed: Any) -> ShapeObject:
    shape = fixed.get("shape") or _choice(rng, SHAPES)
    color = fixed.get("color") or _choice(rng, list(COLORS))
    size = fixed.get("size") or _choice(rng, SIZES)
    d = cfg.side(size)
    x0, y0 = cfg.corner(rng, d)
    return ShapeObject(shape, color, size, x0, y0, d)


def _place(
    rng: np.random.Generator, cfg: ShapesConfig, others: Sequence[ShapeObject], tries: int = 60, **fixed: Any
) -> ShapeObject | None:
    """A new object (drawn on top of ``others``) keeping the scene valid, or None."""
    relaxed = dataclasses.replace(cfg, min_objects=1, max_objects=max(cfg.max_objects, len(others) + 1))
    for _ in range(tries):
        o = _sample_object(rng, cfg, **fixed)
        if _well_placed(o, cfg.size) and scene_is_valid(Scene(cfg.size, (*others, o)), relaxed):
            return o
    return None


def sample_scene(rng: np.random.Generator, cfg: ShapesConfig | None = None) -> Scene:
    """A random valid scene of ``cfg.min_objects``..``cfg.max_objects`` objects."""
    cfg = cfg or ShapesConfig()
    while True:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        objs: list[ShapeObject] = []
        for _ in range(n):
            o = _place(rng, cfg, objs)
            if o is None:
                break
            objs.append(o)
        if len(objs) == n:
            return Scene(cfg.size, tuple(objs))


# --------------------------------------------------------------------------- language


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def _join(parts: Sequence[str]) -> str:
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
    text = f"{_article(words[0])} {' '.join(words)}"
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
        return _join([describe_object(s, detailed=True) for s in specs])
    groups: Counter[tuple[str, str]] = Counter((s.color, s.shape) for s in specs)
    parts = []
    for (color, shape), k in groups.items():  # first-occurrence order
        parts.append(f"{_article(color)} {color} {shape}" if k == 1 else f"{_NUMBER_WORDS[k]} {color} {_plural(shape)}")
    return _join(parts)


_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
_POS_WORDS = {**{p: p for p in POSITIONS}, "middle": "center", "centre": "center"}
_CAPTION_RE = re.compile(
    r"\b(?P<count>an?|one|two|three|four|five)\s+"
    r"(?:(?P<size>" + "|".join(_SIZE_WORDS) + r")\s+)?"
    r"(?P<color>" + "|".join(COLORS) + r")\s+"
    r"(?P<shape>" + "|".join(SHAPES) + r")(?P<plural>s)?\b"
    r"(?:\s+(?:at|on|in)\s+the\s+(?P<pos>top left|top right|bottom left|bottom right|top|bottom|left|right|center|centre|middle))?"
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


# --------------------------------------------------------------------------- tasks


def make_vqa(scene: Scene, rng: np.random.Generator, k: int = 6) -> list[dict[str, str]]:
    """Up to ``k`` question/answer pairs of types count, color, shape, size, position,
    relative and yes/no; the object count question is always included."""
    objs, S = scene.objects, scene.size
    n = len(objs)
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    cand: list[dict[str, str]] = []
    for shape in sorted(shapes):
        cand.append({"question": f"how many {_plural(shape)} are there?", "answer": str(shapes[shape]), "type": "count"})
    for z, o in enumerate(objs):
        if shapes[o.shape] == 1:
            cand.append({"question": f"what color is the {o.shape}?", "answer": o.color, "type": "color"})
        if colors[o.color] == 1:
            cand.append({"question": f"what shape is the {o.color} object?", "answer": o.shape, "type": "shape"})
        ref = refer(scene, z)
        if ref and "position" not in ref:
            cand.append({"question": f"where is {ref}?", "answer": scene.position(o), "type": "position"})
            cand.append({"question": f"is {ref} small or large?", "answer": o.size, "type": "size"})
    refs = [refer(scene, z) for z in range(n)]
    for a in range(n):
        for b in range(n):
            if a == b or not refs[a] or not refs[b]:
                continue
            dx = objs[b].center[0] - objs[a].center[0]
            dy = objs[b].center[1] - objs[a].center[1]
            if abs(dx) >= S / 8:
                cand.append({"question": f"is {refs[a]} to the left of {refs[b]}?",
                             "answer": "yes" if dx > 0 else "no", "type": "relative"})
            if abs(dy) >= S / 8:
                cand.append({"question": f"is {refs[a]} above {refs[b]}?",
                             "answer": "yes" if dy > 0 else "no", "type": "relative"})
    present = {(o.color, o.shape) for o in objs}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    c, s = _choice(rng, sorted(present))
    cand.append({"question": f"is there {_article(c)} {c} {s}?", "answer": "yes", "type": "yes/no"})
    c, s = _choice(rng, absent)
    cand.append({"question": f"is there {_article(c)} {c} {s}?", "answer": "no", "type": "yes/no"})
    count_q = {"question": "how many objects are there?", "answer": str(n), "type": "count"}
    picked = rng.choice(len(cand), size=min(k - 1, len(cand)), replace=False)
    return [count_q] + [cand[i] for i in sorted(int(j) for j in picked)]


def make_reasoning(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """A multiple-choice question with context, options, explanation and answer."""
    objs, n = scene.objects, len(scene.objects)
    refs = [refer(scene, z) for z in range(n)]
    items: list[dict[str, Any]] = []
    named = [z for z in range(n) if refs[z]]
    corner_hint = "Circles have no corners, triangles have three corners, and squares and diamonds have four."
    if len(named) >= 2:
        ys = sorted(named, key=lambda z: objs[z].center[1])
        if objs[ys[1]].center[1] - objs[ys[0]].center[1] >= scene.size / 8:
            top, other = ys[0], ys[1]
            items.append({
                "question": "Which object is highest in the image?", "context": "",
                "options": [refs[z] for z in named],
                "explanation": f"{refs[top].capitalize()} is {position_phrase(scene.position(objs[top]))}, "
                               f"above {refs[other]} {position_phrase(scene.position(objs[other]))}.",
                "answer": refs[top],
            })
        corners = sorted(named, key=lambda z: -CORNERS[objs[z].shape])
        if CORNERS[objs[corners[0]].shape] > CORNERS[objs[corners[1]].shape]:
            best = corners[0]
            items.append({
                "question": "Which object has the most corners?", "context": corner_hint,
                "options": [refs[z] for z in named],
                "explanation": f"{refs[best].capitalize()} is a {objs[best].shape} with "
                               f"{CORNERS[objs[best].shape]} corners, more than any other object.",
                "answer": refs[best],
            })
    total = sum(CORNERS[o.shape] for o in objs)
    shapes_list = _join([f"{_article(o.shape)} {o.shape}" for o in objs])
    opts = sorted({total, max(0, total - 1), total + 1, total + 3})
    items.append({
        "question": "How many corners do all the objects have together?", "context": corner_hint,
        "options": [str(v) for v in opts],
        "explanation": f"The image shows {shapes_list}; "
                       + " + ".join(str(CORNERS[o.shape]) for o in objs) + f" = {total}.",
        "answer": str(total),
    })
    if n >= 2:
        items.append({
            "question": "If one object were removed, how many objects would remain?", "context": "",
            "options": [str(v) for v in range(max(0, n - 2), n + 2)],
            "explanation": f"There are {_NUMBER_WORDS[n]} objects; removing one leaves {_NUMBER_WORDS.get(n - 1, str(n - 1))}."
            if n - 1 > 0 else "",
            "answer": str(n - 1),
        })
    return items[int(rng.integers(len(items)))]


def _move_target(rng: np.random.Generator, cfg: ShapesConfig, scene: Scene, z: int) -> Scene | None:
    old = scene.objects[z]
    old_pos = scene.position(old)
    for _ in range(40):
        x0, y0 = cfg.corner(rng, old.d)
        o = dataclasses.replace(old, x0=x0, y0=y0)
        if grid_position(o.center, cfg.size) == old_pos:
            continue
        new = Scene(scene.size, scene.objects[:z] + (o,) + scene.objects[z + 1:])
        if scene_is_valid(new, cfg):
            return new
    return None


def make_edit(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> tuple[dict[str, Any], Scene]:
    """A random feasible edit: ``({"kind", "instruction", "target"}, edited scene)``.

    ``target`` is the z of the edited object in the source scene (None for ``add``); the
    edited scene keeps every other object's geometry and z order.
    """
    n = len(scene.objects)
    for kind in rng.permutation(EDIT_KINDS):
        kind = str(kind)
        if kind == "add":
            if n >= cfg.max_objects:
                continue
            o = _place(rng, cfg, scene.objects)
            if o is None:
                continue
            spec = ObjectSpec.from_object(o, scene.size)
            return ({"kind": kind, "instruction": f"add {describe_object(spec)}", "target": None},
                    Scene(scene.size, (*scene.objects, o)))
        zs = [z for z in rng.permutation(n) if refer(scene, int(z))]
        for z in (int(v) for v in zs):
            ref, o = refer(scene, z), scene.objects[z]
            rest = scene.objects[:z], scene.objects[z + 1:]
            if kind == "remove":
                if n <= cfg.min_objects:
                    break
                new = Scene(scene.size, rest[0] + rest[1])
                if scene_is_valid(new, cfg):
                    return {"kind": kind, "instruction": f"remove {ref}", "target": z}, new
            elif kind == "recolor":
                for c in rng.permutation(list(COLORS)):
                    if c == o.color:
                        continue
                    new = Scene(scene.size, rest[0] + (dataclasses.replace(o, color=str(c)),) + rest[1])
                    if scene_is_valid(new, cfg):
                        return {"kind": kind, "instruction": f"make {ref} {c}", "target": z}, new
            elif kind == "reshape":
                for s in rng.permutation(list(SHAPES)):
                    if s == o.shape:
                        continue
                    new = Scene(scene.size, rest[0] + (dataclasses.replace(o, shape=str(s)),) + rest[1])
                    if scene_is_valid(new, cfg):
                        return {"kind": kind, "instruction": f"turn {ref} into {_article(str(s))} {s}", "target": z}, new
            elif kind == "move":
                new = _move_target(rng, cfg, scene, z)
                if new is not None:
                    pos = new.position(new.objects[z])
                    phrase = position_phrase(pos).replace("at the", "to the").replace("on the", "to the") \
                        .replace("in the", "to the")
                    return {"kind": kind, "instruction": f"move {ref} {phrase}", "target": z}, new
    raise RuntimeError("no feasible edit for scene")  # unreachable: recolor always works for 1 object


def _detailed_caption(scene: Scene, cfg: ShapesConfig) -> str:
    if cfg.caption_order == "reading":
        return describe(reading_order([ObjectSpec.from_object(o, scene.size) for o in scene.objects]), detailed=True)
    return describe(scene, detailed=True)


def make_example(
    seed_or_rng: int | Sequence[int] | np.random.Generator,
    cfg: ShapesConfig | None = None,
    *,
    id: str | None = None,
) -> DocRecord:
    """One Shapes document with every annotation.

    ``record.image`` is the scene, ``record.text`` its short caption; ``record.meta`` holds
    ``objects`` (the scene description), ``captions`` (short, detailed), ``vqa``,
    ``reasoning``, ``edit`` (kind, instruction, target, objects of the edited scene),
    ``write`` (the word), ``tasks`` and ``images`` (seg, edge, depth, edit_image, write_image).
    """
    cfg = cfg or ShapesConfig()
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    scene = sample_scene(rng, cfg)
    lab = label_map(scene)
    image = render(scene, cfg, labels=lab)
    edit, edited = make_edit(scene, rng, cfg)
    word = _choice(rng, writable_words(cfg.size))
    meta: dict[str, Any] = {
        "source": "shapes",
        "size": cfg.size,
        "objects": scene.to_dicts(),
        "captions": {"short": describe(scene), "detailed": _detailed_caption(scene, cfg)},
        "vqa": make_vqa(scene, rng),
        "reasoning": make_reasoning(scene, rng),
        "edit": {**edit, "objects": edited.to_dicts()},
        "write": {"text": word},
        "tasks": list(TASKS),
        "images": {
            "seg": render_segmentation(scene, labels=lab),
            "edge": render_edges(image),
            "depth": render_depth(scene, cfg.max_objects, labels=lab),
            "edit_image": render(edited, cfg),
            "write_image": render_word(word, cfg.size),
        },
    }
    if id is None:
        id = f"shapes-{seed_or_rng}" if isinstance(seed_or_rng, int) else "shapes"
    return DocRecord(id=id, text=meta["captions"]["short"], image=image, meta=meta)


def scene_of(record: DocRecord) -> Scene:
    """The :class:`Scene` stored in a Shapes record's meta."""
    return Scene.from_dicts(int(record.meta["size"]), record.meta["objects"])


# --------------------------------------------------------------------------- datasets


def _example_rows(args: tuple[int, int, int, ShapesConfig]) -> list[dict[str, Any]]:
    """Encoded rows for examples ``start..stop`` (each seeded by ``(seed, index)``)."""
    seed, start, stop, cfg = args
    return [
        record_to_row(make_example([seed, i], cfg, id=f"shapes-{seed}-{i:07d}"))
        for i in range(start, stop)
    ]


def iter_examples(n: int, cfg: ShapesConfig | None = None, seed: int = 0, start: int = 0) -> Iterator[DocRecord]:
    """Examples ``start .. start+n-1`` of the stream seeded by ``seed`` (same as in datasets)."""
    cfg = cfg or ShapesConfig()
    for i in range(start, start + n):
        yield make_example([seed, i], cfg, id=f"shapes-{seed}-{i:07d}")


def write_shapes_dataset(
    out: str | os.PathLike[str],
    n: int,
    size: int = 32,
    seed: int = 0,
    workers: int = 2,
    *,
    cfg: ShapesConfig | None = None,
    overwrite: bool = False,
    progress: bool = False,
    chunk: int = 250,
) -> Path:
    """Write ``n`` Shapes examples as a dataset at ``out``; the bytes depend only on
    ``(n, cfg, seed)``, not on ``workers``. Returns the dataset path."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    cfg = cfg or ShapesConfig(size=size)
    if cfg.size != size:
        cfg = dataclasses.replace(cfg, size=size)
    jobs = [(seed, s, min(n, s + chunk), cfg) for s in range(0, n, chunk)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc="shapes")
    with DatasetWriter(out, source="shapes", seed=seed, overwrite=overwrite,
                       extra_manifest={"shapes": dataclasses.asdict(cfg)}) as writer:
        if workers <= 1:
            results: Iterator[list[dict[str, Any]]] = map(_example_rows, jobs)
            pool = None
        else:
            import multiprocessing as mp

            pool = mp.get_context().Pool(workers)
            results = pool.imap(_example_rows, jobs)
        try:
            for rows in results:
                for row in rows:
                    writer.add_row(row)
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            if bar is not None:
                bar.close()
    return writer.out
