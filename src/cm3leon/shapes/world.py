"""The Shapes world: its vocabulary, scenes, and the sampling of valid scenes.

A scene holds 1-3 objects, each a ``shape`` (circle, square, triangle, diamond) of one of six
``color``s and two ``size``s, placed freely on a white canvas; its named ``position`` is the
cell of a 3x3 grid holding its center. Later objects are drawn over earlier ones (their ``z``
is their index). A pixel belongs to a shape iff its center does (:func:`shape_mask`), so
rendering is aliasing-free (:mod:`.render`), colors are exact and every annotation can be
checked against the pixels.

The rest of the subpackage derives everything from a scene: :mod:`.render` (the image and
its segmentation / edge / depth maps, rendered words), :mod:`.captions` (captions, their
parser, hard negatives), :mod:`.annotations` (VQA pairs, a reasoning item, an edit pair),
:mod:`.dataset` (one record with every annotation; datasets of them), :mod:`.sft_examples`
(a record -> SFT task examples) and :mod:`.judge` (does an image show what its prompt asks?).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

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
CORNERS: dict[str, int] = {"circle": 0, "triangle": 3, "square": 4, "diamond": 4}
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


def choose(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    """One of ``items``, drawn uniformly with ``rng``."""
    return items[int(rng.integers(len(items)))]


def _sample_object(rng: np.random.Generator, cfg: ShapesConfig, **fixed: Any) -> ShapeObject:
    shape = fixed.get("shape") or choose(rng, SHAPES)
    color = fixed.get("color") or choose(rng, list(COLORS))
    size = fixed.get("size") or choose(rng, SIZES)
    d = cfg.side(size)
    x0, y0 = cfg.corner(rng, d)
    return ShapeObject(shape, color, size, x0, y0, d)


def place_object(
    rng: np.random.Generator, cfg: ShapesConfig, others: Sequence[ShapeObject], tries: int = 60, **fixed: Any
) -> ShapeObject | None:
    """A new object (drawn on top of ``others``) keeping the scene valid, or None after ``tries``."""
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
            o = place_object(rng, cfg, objs)
            if o is None:
                break
            objs.append(o)
        if len(objs) == n:
            return Scene(cfg.size, tuple(objs))

