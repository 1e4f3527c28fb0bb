"""Pixels of a Shapes scene: the image, its segmentation / depth / edge maps, rendered words."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cm3leon.shapes.world import BACKGROUND, COLORS, Scene, ShapesConfig, label_map

# Segmentation maps fill each object with its class color on black.
SEG_PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (255, 0, 0),
    "square": (0, 255, 0),
    "triangle": (0, 0, 255),
    "diamond": (255, 255, 0),
}
WRITE_WORDS: tuple[str, ...] = (
    "red", "green", "blue", "cat", "dog", "sun", "star", "tree", "book", "fish", "bird",
    "hat", "cup", "moon", "box", "cake", "ship", "key", "lamp", "door", "sky", "leaf",
    "rain", "snow", "shape", "cube", "dot", "line", "art", "map",
)


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

