"""The Shapes judge: does a (generated) image show what its Shapes prompt asks for?

Detection (:func:`detect_objects`):

1. every pixel snaps to the nearest Shapes palette color or the white background, but only
   when it is confidently close (absolute distance and a ratio test against the second
   nearest); blurred edges and odd colors stay "unsure";
2. each color's mask is opened (dropping speckle and the thin fringes where two colors
   blend into a third) and its 8-connected components above a minimum area are objects;
3. each object is explained by the shape template (circle, square, triangle, diamond at
   every side length and offset, sharp or Gaussian-blurred) minimizing the weighted squared
   error to the object's soft membership map (unsure pixels count as a mix of the color and
   the background); template pixels lying on other objects cost little, so an object partly
   hidden behind a later one is still matched by its whole footprint. The template gives
   shape, side length (-> size class), box and center (-> 3x3 position).

Judging (:func:`judge`) matches prompt objects to detections (Hungarian assignment on
attribute agreement, color first) and reports, per object, whether each checked attribute
is right, whether the object count is right, and ``all_correct``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from cm3leon.shapes.captions import parse_caption
from cm3leon.shapes.world import (
    BACKGROUND,
    COLORS,
    SHAPES,
    SIZE_FRACTIONS,
    ObjectSpec,
    grid_position,
    shape_mask,
)

ATTRIBUTES = ("shape", "color", "size", "position", "count", "box")
DEFAULT_CHECK = ("shape", "color", "size", "position", "count")
_COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES] + [BACKGROUND], dtype=np.float32)  # [7, 3]
_BG = len(_COLOR_NAMES)
_UNKNOWN = -1
# Longest canvas side the detector works at; larger images are box-downsampled first.
_WORK_SIZE = 64
_SQUARE3 = np.ones((3, 3), dtype=bool)
_OPEN = np.ones((2, 2), dtype=bool)


@dataclass(frozen=True)
class JudgeConfig:
    """Detector thresholds (fractions are of the canvas side ``S`` or area ``S*S``)."""

    # pixel -> color snapping
    max_color_dist: float = 110.0  # RGB distance to accept a palette color
    ratio: float = 0.85  # nearest must be this much closer than the second nearest
    unknown_resid: float = 90.0  # an unsure pixel this far from the color-background line is foreign
    # blobs
    min_area: float = 0.010  # blobs under this fraction of the canvas are speckle
    # template fitting
    min_side: float = 0.15  # template sides tried, as fractions of the canvas
    max_side: float = 0.65
    occluder_cost: float = 0.2  # weight of a template pixel on another object (it may hide there)
    blur_sigmas: tuple[float, ...] = (0.0, 0.7, 1.2)  # blur levels (px) templates are tried at
    good_enough: float = 0.02  # stop trying blurrier templates once the error is this fraction


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image; ``box`` is the fitted template's ``[x0, y0, x1, y1]``
    (x1/y1 exclusive), ``area`` its visible pixels and ``fit`` the template score in [0, 1]."""

    shape: str
    color: str
    size: str
    position: str
    box: tuple[int, int, int, int]
    center: tuple[float, float]
    area: int
    fit: float

    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.shape, self.color, self.size, self.position, self.box)


@dataclass(frozen=True)
class ObjectVerdict:
    """How one prompt object fared: its matched detection (None if missing) and a boolean per
    checked attribute (``count`` is judged for the whole image, not here)."""

    expected: ObjectSpec
    detected: DetectedObject | None
    correct: dict[str, bool] = field(default_factory=dict)
    iou: float | None = None

    @property
    def all_correct(self) -> bool:
        return self.detected is not None and all(self.correct.values())


@dataclass(frozen=True)
class JudgeResult:
    """Verdict for one image: per-object results, the count check, per-attribute accuracy over
    prompt objects, the overall ``score`` (fraction of checks passed) and ``all_correct``."""

    objects: tuple[ObjectVerdict, ...]
    detected: tuple[DetectedObject, ...]
    count_correct: bool
    attribute_accuracy: dict[str, float]
    score: float
    all_correct: bool
    checked: tuple[str, ...]


def _snap(arr: np.ndarray, cfg: JudgeConfig) -> np.ndarray:
    """Per-pixel palette index (0..5 colors, 6 background) or -1 when not confident."""
    d = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, 7]
    order = np.argsort(d, axis=-1)
    nearest = order[..., 0]
    d1 = np.take_along_axis(d, order[..., :1], -1)[..., 0]
    d2 = np.take_along_axis(d, order[..., 1:2], -1)[..., 0]
    ok = (d1 <= cfg.max_color_dist) & (d1 <= cfg.ratio * d2)
    return np.where(ok, nearest, _UNKNOWN)


def _membership(arr: np.ndarray, lab: np.ndarray, ci: int, cfg: JudgeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Soft membership ``alpha`` in [0, 1] of each pixel in color ``ci`` (unsure pixels count as
    a mix of that color and the background, so blurred edges count partly) and a mask of
    pixels belonging to something else (another color, or a mix with one)."""
    bg = _PALETTE[_BG]
    v = _PALETTE[ci] - bg
    rel = arr - bg
    a = np.clip(rel @ v / float(v @ v), 0.0, 1.0)
    resid = np.linalg.norm(rel - a[..., None] * v, axis=-1)
    other_color = (lab >= 0) & (lab != _BG) & (lab != ci)
    foreign = other_color | ((lab == _UNKNOWN) & (resid > cfg.unknown_resid))
    alpha = np.where(lab == ci, 1.0, np.where(foreign, 0.0, a))
    return alpha.astype(np.float32), foreign


@functools.lru_cache(maxsize=4096)
def _template(shape: str, d: int, sigma: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The footprint of ``shape`` at side ``d`` blurred by a Gaussian of ``sigma`` px, padded by
    ``r`` px each side: ``(T, T**2, r)``."""
    t = shape_mask(shape, d).astype(np.float32)
    if sigma <= 0:
        return t, t, 0
    r = int(np.ceil(2.5 * sigma))
    t = cv2.GaussianBlur(np.pad(t, r), (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_CONSTANT)
    return t, t * t, r


def _fit_template(
    blob: np.ndarray, alpha: np.ndarray, weight: np.ndarray, S: int, cfg: JudgeConfig, slack: int = 2
) -> tuple[str, int, int, int, float]:
    """Best ``(shape, x0, y0, d, fit)`` explanation of a blob: the shape footprint (side ``d`` at
    ``(x0, y0)``, optionally blurred) minimizing the weighted squared error to the membership
    map ``alpha``, sum(weight * (alpha - template)**2) over the canvas. ``weight`` is small
    on other objects (the shape may be hidden under them). Offsets are those whose footprint
    covers the blob's box (+- ``slack``); ``fit`` = 1 - error / sum(weight * alpha**2)."""
    ys, xs = np.nonzero(blob)
    y_lo, y_hi, x_lo, x_hi = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    extent = max(y_hi - y_lo, x_hi - x_lo)
    d_lo = max(2, int(round(cfg.min_side * S)), extent - 2 * slack)
    d_hi = max(d_lo, min(int(round(cfg.max_side * S)), int(np.ceil(extent / 0.6)) + 2))
    r_max = int(np.ceil(2.5 * max(cfg.blur_sigmas)))
    pad = d_hi + slack + r_max
    wa = np.pad(weight * alpha, pad)
    wp = np.pad(weight, pad, constant_values=1.0)  # covering pixels outside the canvas costs 1
    c0 = float((weight * alpha * alpha).sum())

    def best_at(d: int, sigma: float) -> tuple[float, str, int, int, int] | None:
        # footprint origins ty in [y_hi - d - slack, y_lo + slack] (same for x)
        ty0, tx0 = y_hi - d - slack, x_hi - d - slack
        if d < 2 or ty0 > y_lo + slack or tx0 > x_lo + slack:
            return None
        found = None
        for shape in SHAPES:
            t, t2, r = _template(shape, d, sigma)
            rows = slice(ty0 - r + pad, y_lo + slack + d + r + pad)
            cols = slice(tx0 - r + pad, x_lo + slack + d + r + pad)
            err = cv2.matchTemplate(np.ascontiguousarray(wp[rows, cols]), t2, cv2.TM_CCORR)
            err -= 2.0 * cv2.matchTemplate(np.ascontiguousarray(wa[rows, cols]), t, cv2.TM_CCORR)
            k = int(np.argmin(err))
            e = float(err.flat[k]) + c0
            if found is None or e < found[0] - 1e-6:
                ty, tx = divmod(k, err.shape[1])
                found = (e, shape, tx + tx0, ty + ty0, d)
        return found

    fits: dict[tuple[int, float], tuple[float, str, int, int, int]] = {}
    for sigma in cfg.blur_sigmas:
        # coarse pass over every other side length, then refine around the two best
        for d in range(d_lo, d_hi + 1, 2):
            f = best_at(d, sigma)
            if f is not None:
                fits[d, sigma] = f
        coarse = sorted((k for k in fits if k[1] == sigma), key=lambda k: fits[k][0])[:2]
        for d, _ in coarse:
            for dd in (d - 1, d + 1):
                if (dd, sigma) not in fits and d_lo <= dd <= d_hi:
                    f = best_at(dd, sigma)
                    if f is not None:
                        fits[dd, sigma] = f
        if fits and min(f[0] for f in fits.values()) <= cfg.good_enough * c0:
            break  # a sharp (or this blurred) template explains the blob already
    if not fits:
        return ("circle", x_lo, y_lo, extent, 0.0)
    e, shape, x0, y0, d = min(fits.values(), key=lambda f: (f[0], f[4]))
    return shape, x0, y0, d, max(0.0, 1.0 - e / max(c0, 1e-6))


def detect_objects(image: Image.Image, cfg: JudgeConfig | None = None) -> list[DetectedObject]:
    """Objects in a Shapes-style image (any square size), largest first."""
    cfg = cfg or JudgeConfig()
    image = image.convert("RGB")
    if image.width != image.height:
        raise ValueError(f"the Shapes judge expects square images, got {image.width}x{image.height}")
    S0 = image.width
    scale = 1.0
    if S0 > _WORK_SIZE:
        scale = S0 / _WORK_SIZE
        image = image.resize((_WORK_SIZE, _WORK_SIZE), Image.Resampling.BOX)
    S = image.width
    arr = np.asarray(image, dtype=np.float32)
    lab = _snap(arr, cfg)
    min_area = max(3, cfg.min_area * S * S)
    small, large = SIZE_FRACTIONS["small"] * S, SIZE_FRACTIONS["large"] * S
    out = []
    for ci in range(len(_COLOR_NAMES)):
        # opening drops speckle and the thin fringes where two colors blend (red over yellow
        # reads orange, orange next to blue reads purple)
        solid = ndimage.binary_opening(lab == ci, structure=_OPEN)
        comps, n = ndimage.label(solid, structure=_SQUARE3)
        if n == 0:
            continue
        alpha_c, foreign = _membership(arr, lab, ci, cfg)
        weight = np.where(foreign, cfg.occluder_cost, 1.0).astype(np.float32)
        for k in range(1, n + 1):
            m = comps == k
            if m.sum() < min_area:
                continue
            near = ndimage.binary_dilation(m, iterations=2) & ((comps == 0) | m)
            alpha = np.where(near, alpha_c, 0.0).astype(np.float32)
            shape, x0, y0, d, fit = _fit_template(m, alpha, weight, S, cfg)
            size = "small" if d < (small + large) / 2 else "large"
            cx, cy = (x0 + d / 2.0) * scale, (y0 + d / 2.0) * scale
            box = (int(round(x0 * scale)), int(round(y0 * scale)),
                   int(round((x0 + d) * scale)), int(round((y0 + d) * scale)))
            out.append(DetectedObject(shape, _COLOR_NAMES[ci], size, grid_position((cx, cy), S0), box,
                                      (float(cx), float(cy)), int(round(m.sum() * scale * scale)), round(fit, 4)))
    out.sort(key=lambda o: -o.area)
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _as_specs(prompt: str | Sequence[ObjectSpec | dict[str, Any]]) -> list[ObjectSpec]:
    if isinstance(prompt, str):
        specs = parse_caption(prompt)
        if not specs:
            raise ValueError(
                f"no Shapes objects found in prompt {prompt!r}; write e.g. 'a red circle and a blue square'"
            )
        return specs
    out = []
    for p in prompt:
        if isinstance(p, ObjectSpec):
            out.append(p)
        elif isinstance(p, dict):
            box = tuple(p["box"]) if p.get("box") is not None else None
            out.append(ObjectSpec(p["shape"], p["color"], p.get("size"), p.get("position"), box))  # type: ignore[arg-type]
        else:
            raise ValueError(f"prompt objects must be ObjectSpec or dicts, got {type(p).__name__}")
    return out


def _agreement(spec: ObjectSpec, det: DetectedObject) -> float:
    s = 8.0 * (spec.color == det.color) + 4.0 * (spec.shape == det.shape)
    s += 2.0 * (spec.size is not None and spec.size == det.size)
    s += 1.0 * (spec.position is not None and spec.position == det.position)
    if spec.box is not None:
        s += 2.0 * box_iou(spec.box, det.box)
    return s


def judge(
    image: Image.Image,
    prompt_objects: str | Sequence[ObjectSpec | dict[str, Any]],
    *,
    check: Sequence[str] = DEFAULT_CHECK,
    box_iou_threshold: float = 0.5,
    cfg: JudgeConfig | None = None,
) -> JudgeResult:
    """Judge ``image`` against a Shapes prompt (a caption, ObjectSpecs, or ``meta["objects"]`` dicts).

    ``check`` picks attributes from :data:`ATTRIBUTES`; ``size``/``position``/``box`` are only
    checked for prompt objects that state them. ``box`` is right when IoU >= ``box_iou_threshold``.
    """
    rgb = image.convert("RGB")
    if rgb.width == rgb.height and rgb.width <= _CACHED_SIZE:
        detected: Sequence[DetectedObject] = _detect_small(rgb.tobytes(), rgb.width, cfg or JudgeConfig())
    else:
        detected = detect_objects(rgb, cfg)
    return judge_detected(detected, prompt_objects, check=check, box_iou_threshold=box_iou_threshold)


# Samples at a low temperature repeat a lot (on the quickstart's model 16 samples of a one-object
# prompt hold ~4 distinct images), so small canvases' detections are memoized by their pixels.
_CACHED_SIZE = 64


@functools.lru_cache(maxsize=8192)
def _detect_small(pixels: bytes, size: int, cfg: JudgeConfig) -> tuple[DetectedObject, ...]:
    return tuple(detect_objects(Image.frombytes("RGB", (size, size), pixels), cfg))


def judge_detected(
    detected: Sequence[DetectedObject],
    prompt_objects: str | Sequence[ObjectSpec | dict[str, Any]],
    *,
    check: Sequence[str] = DEFAULT_CHECK,
    box_iou_threshold: float = 0.5,
) -> JudgeResult:
    """:func:`judge` on the output of :func:`detect_objects` (to score one image against many prompts)."""
    unknown_attrs = [a for a in check if a not in ATTRIBUTES]
    if unknown_attrs:
        raise ValueError(f"unknown attributes to check {unknown_attrs}; choose from {ATTRIBUTES}")
    specs = _as_specs(prompt_objects)
    dets = list(detected)
    match: dict[int, int] = {}
    if specs and dets:
        gain = np.array([[_agreement(s, d) for d in dets] for s in specs])
        rows, cols = linear_sum_assignment(-gain)
        match = {int(r): int(c) for r, c in zip(rows, cols)}
    verdicts = []
    per_attr: dict[str, list[bool]] = {a: [] for a in check if a != "count"}
    for i, spec in enumerate(specs):
        det = dets[match[i]] if i in match else None
        correct: dict[str, bool] = {}
        iou = box_iou(spec.box, det.box) if det is not None and spec.box is not None else None
        for a in check:
            if a == "count":
                continue
            if a in ("size", "position", "box") and getattr(spec, a) is None:
                continue
            if det is None:
                correct[a] = False
            elif a == "box":
                correct[a] = bool(iou is not None and iou >= box_iou_threshold)
            else:
                correct[a] = getattr(spec, a) == getattr(det, a)
            per_attr[a].append(correct[a])
        verdicts.append(ObjectVerdict(spec, det, correct, iou))
    count_ok = len(dets) == len(specs)
    checks = [c for v in verdicts for c in v.correct.values()] + ([count_ok] if "count" in check else [])
    all_ok = all(checks) and all(v.detected is not None for v in verdicts)
    return JudgeResult(
        objects=tuple(verdicts),
        detected=tuple(dets),
        count_correct=count_ok,
        attribute_accuracy={a: float(np.mean(v)) for a, v in per_attr.items() if v},
        score=float(np.mean(checks)) if checks else 1.0,
        all_correct=bool(all_ok),
        checked=tuple(check),
    )
