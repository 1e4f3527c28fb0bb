"""Benchmark prompts -> pipeline -> metrics (+ sample grids).

Every task runs on held-out Shapes records, whose exact annotations let the Shapes judge
score controllability object by object (DESIGN.md). Real-data metrics (FD-CLIP, CLIP
score, CIDEr, VQA accuracy) are computed alongside with the functions of
:mod:`cm3leon.eval.metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cm3leon.data.records import DocRecord
from cm3leon.eval import metrics
from cm3leon.generate.generation_config import GenerationConfig, TaskDecoding
from cm3leon.pipeline import CM3Leon
from cm3leon.shapes.captions import parse_caption
from cm3leon.shapes.judge import judge

log = logging.getLogger(__name__)

TASKS = ("t2i", "caption", "vqa", "edit", "control", "ground")
VQA_TYPES = ("color", "shape", "count")
T2I_CHECKS = ("shape", "color", "size", "position", "count")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; how to decode comes from ``decoding``, by default the model's
    ``generation_config.json`` (:attr:`CM3Leon.generation_config`)."""

    n: int = 64  # records (prompts) per task
    decoding: GenerationConfig | None = None
    batch_size: int = 32
    seed: int = 0
    grid_dir: str | None = None  # write PNG grids here


def _decoding(pipe: CM3Leon, cfg: EvalConfig, task: str) -> TaskDecoding:
    return (cfg.decoding or pipe.generation_config).task(task)


def _image_settings(d: TaskDecoding, *names: str) -> dict[str, Any]:
    """The pipeline keywords ``names`` (``n`` is ``d.samples``) taken from ``d``."""
    return {k: d.samples if k == "n" else getattr(d.sampling, k) for k in names}


@dataclass
class TaskResult:
    """Metrics of one task plus a few examples for the report."""

    task: str
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)
    grid: str | None = None
    seconds: float = 0.0


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _by_group(ok: Sequence[bool], groups: Sequence[Any], name: str) -> dict[str, float]:
    """``{name.format(g): accuracy over the items of group g}`` for every group present."""
    out: dict[str, float] = {}
    for g in sorted(set(groups), key=str):
        out[name.format(g)] = float(np.mean([o for o, x in zip(ok, groups) if x == g]))
    return out


def _objects(meta_objects: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(o) for o in meta_objects]


# Grid colours: a grey frame around every tile (visible on white), green / red where the judge passed / failed it.
FRAME = (150, 150, 150)
PASS = (26, 127, 55)
FAIL = (207, 34, 46)
TEXT = (29, 35, 48)
HEADER = (47, 95, 208)


def _font(size: int) -> Any:
    """A TrueType font of ``size`` px (Pillow >= 10.1); older Pillow: its bitmap default (scaled when drawn)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _bitmap_scale(size: int) -> int:
    """How much the ~11 px bitmap font is enlarged to stand for a ``size`` px font."""
    return max(1, -(-size // 11))


def _text_width(font: Any, text: str, size: int) -> float:
    w = font.getlength(text)
    return w if isinstance(font, ImageFont.FreeTypeFont) else w * _bitmap_scale(size)


def _line_height(font: Any, size: int) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        return size + 4
    return font.getbbox("Ag")[3] * _bitmap_scale(size) + 4


def _draw_text(grid: Image.Image, xy: tuple[int, int], text: str, font: Any, size: int,
               fill: tuple[int, int, int]) -> None:
    if isinstance(font, ImageFont.FreeTypeFont):
        ImageDraw.Draw(grid).text(xy, text, font=font, fill=fill)
        return
    # the ~11 px bitmap font, drawn on its own and enlarged with nearest neighbour to about ``size`` px
    k = _bitmap_scale(size)
    left, top, right, bottom = font.getbbox(text)
    if right <= 0 or bottom <= 0:
        return
    mask = Image.new("L", (right, bottom), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
    mask = mask.resize((right * k, bottom * k), Image.NEAREST)
    grid.paste(Image.new("RGB", mask.size, fill), xy, mask)


def _fit(font: Any, text: str, width: float, size: int) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels."""
    if _text_width(font, text, size) <= width:
        return text
    while text and _text_width(font, text + "...", size) > width:
        text = text[:-1]
    return text + "..." if text else ""


def _wrap(font: Any, text: str, width: float, size: int, max_lines: int = 3) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (the last one cut with "...")."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(font, lines[-1] + " " + word, size) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
    return [_fit(font, ln, width, size) for ln in lines] or [""]


def save_grid(rows: Sequence[Sequence[Image.Image]], path: str | Path, *, labels: Sequence[str] | None = None,
              scale: int | None = None, headers: Sequence[str] | None = None,
              verdicts: Sequence[Sequence[bool | None]] | None = None, font_size: int = 14) -> Path:
    """Write a PNG grid: one row per list, every image upscaled with nearest neighbour and framed.

    ``scale`` defaults to the smallest factor that makes tiles at least 128 px (4x for 32 px
    images). ``labels`` (one per row) are written above their row, wrapped; ``headers`` name
    the columns once at the top (the last header spans the columns after it, e.g.
    ``["real", "samples, best first"]``). ``verdicts`` (one list per row, parallel to the
    images) frame a tile green for True, red for False, grey for None, and write pass/fail under it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [list(r) for r in rows]
    cols = max(len(r) for r in rows)
    src_w = max(im.width for r in rows for im in r)
    src_h = max(im.height for r in rows for im in r)
    scale = scale or max(1, -(-128 // src_w))
    tw, th = src_w * scale, src_h * scale
    frame, gap = (3, 4) if scale > 1 else (1, 2)
    cw, ch = tw + 2 * frame, th + 2 * frame
    width = gap + cols * (cw + gap)
    font = _font(font_size)
    line_h = _line_height(font, font_size)
    text_w = width - 2 * gap
    label_lines = [_wrap(font, str(t), text_w, font_size) for t in labels] if labels else [[] for _ in rows]
    marks = [list(v) for v in verdicts] if verdicts else [[] for _ in rows]
    header_h = line_h + 4 if headers else 0
    row_gap = 3 * gap if labels else gap  # a label sits closer to its own row than to the row above
    row_h = [len(ls) * line_h + ch + (line_h if any(m is not None for m in mk) else 0) + row_gap
             for ls, mk in zip(label_lines, marks)]
    grid = Image.new("RGB", (width, gap + header_h + sum(row_h) - row_gap + gap), "white")
    draw = ImageDraw.Draw(grid)
    if headers:
        for j, name in enumerate(headers[:cols]):
            span = cols - j if j == len(headers) - 1 else 1
            x0, x1 = gap + j * (cw + gap), gap + (j + span) * (cw + gap) - gap
            _draw_text(grid, (x0 + 2, gap), _fit(font, name, x1 - x0 - 4, font_size), font, font_size, HEADER)
            draw.line([(x0, gap + line_h + 1), (x1 - 1, gap + line_h + 1)], fill=HEADER, width=2)
    y = gap + header_h
    for i, row in enumerate(rows):
        for k, line in enumerate(label_lines[i]):
            _draw_text(grid, (gap + 2, y + k * line_h), line, font, font_size, TEXT)
        y_tile = y + len(label_lines[i]) * line_h
        for j, im in enumerate(row):
            x = gap + j * (cw + gap)
            ok = marks[i][j] if j < len(marks[i]) else None
            color = FRAME if ok is None else (PASS if ok else FAIL)
            draw.rectangle([x, y_tile, x + cw - 1, y_tile + ch - 1], fill=color)
            grid.paste(im.convert("RGB").resize((tw, th), Image.NEAREST), (x + frame, y_tile + frame))
            if ok is not None:
                _draw_text(grid, (x + 2, y_tile + ch + 1), "pass" if ok else "fail", font, font_size, color)
        y += row_h[i]
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path


# ---- text-to-image ----------------------------------------------------------------------
def eval_t2i(pipe: CM3Leon, records: Sequence[DocRecord], cfg: EvalConfig, *, name: str = "t2i",
             real_features: np.ndarray | None = None, **overrides: Any) -> TaskResult:
    """Text-to-image from detailed captions; judged on shape, color, size, position and count.

    Decoding is the ``text_to_image`` defaults with ``overrides`` (any :class:`TaskDecoding`
    field: ``guidance``, ``mode`` — ``top_p``, ``cd_k`` or ``mix`` —, ``rerank``, ``retrieve``,
    ``samples``...). With re-ranking the best sample of each prompt is judged; without it,
    every sample is, so the rates are per sample.
    """
    t0 = time.perf_counter()
    d = _decoding(pipe, cfg, "text_to_image").replace(**overrides)
    rerank = d.rerank and pipe.reranker is not None
    prompts = [r.meta["captions"]["detailed"] for r in records]
    best: list[Image.Image] = []
    all_samples: list[list[Image.Image]] = []
    for chunk in _chunks(prompts, cfg.batch_size):
        res = pipe.generate_images(
            list(chunk), **_image_settings(d, "n", "guidance", "temperature", "top_p", "top_k", "cd_k", "cd_alpha"),
            mode=d.mode, retrieve=d.retrieve, rerank=rerank, seed=cfg.seed,
        )
        for r in res:
            best.append(r.images[0])
            all_samples.append(r.images)
    # Re-ranked: the pick of each prompt is judged. Not re-ranked: every sample is (the
    # per-sample rate), which makes a sampling ablation precise at no extra decoding cost.
    judged = list(zip(best, records)) if rerank else [(im, r) for ims, r in zip(all_samples, records) for im in ims]
    verdicts = [judge(im, _objects(r.meta["objects"]), check=T2I_CHECKS) for im, r in judged]
    n_obj = np.array([len(r.meta["objects"]) for _, r in judged])
    ok = np.array([v.all_correct for v in verdicts], float)
    m: dict[str, float] = {"judge_all_correct": float(ok.mean())}
    for k in (1, 2, 3):
        if (n_obj == k).any():
            m[f"judge_all_correct_{k}obj"] = float(ok[n_obj == k].mean())
    for attr in ("shape", "color", "size", "position"):
        vals = [v.attribute_accuracy[attr] for v in verdicts if attr in v.attribute_accuracy]
        if vals:
            m[f"attr_{attr}"] = float(np.mean(vals))
    m["count_correct"] = float(np.mean([v.count_correct for v in verdicts]))
    if pipe.encoder is not None:
        m["clip_score"] = metrics.clip_score(prompts, best, pipe.encoder)
        if real_features is not None and len(best) >= 2:
            fake = metrics.image_features(best, pipe.encoder)
            m["fd_clip"] = metrics.frechet_distance(real_features, fake)
    grid = None
    shown = _grid_rows(np.array([len(r.meta["objects"]) for r in records]), 8)
    per_prompt = len(verdicts) // max(len(records), 1)  # 1, or the samples when every sample is judged
    # the verdict of each shown sample: the re-ranked pick only, or every sample
    sample_ok = {i: [bool(verdicts[i * per_prompt + j].all_correct) if j < per_prompt else None
                     for j in range(len(all_samples[i]))] for i in shown}
    if cfg.grid_dir:
        grid = str(save_grid([[records[i].image, *all_samples[i]] for i in shown],
                             Path(cfg.grid_dir) / f"{name}.png", labels=[prompts[i] for i in shown],
                             headers=["real", "samples, best first" if rerank else "samples"],
                             verdicts=[[None, *sample_ok[i]] for i in shown]))
    examples = [{"prompt": prompts[i], "all_correct": bool(verdicts[i * per_prompt].all_correct),
                 "objects": len(records[i].meta["objects"]), "samples_correct": sample_ok[i]} for i in shown]
    return TaskResult(name, m, examples, grid, time.perf_counter() - t0)


def _grid_rows(n_obj: np.ndarray, k: int) -> list[int]:
    """Indices of up to ``k`` prompts to show, shared evenly among the object counts present."""
    groups = [list(np.flatnonzero(n_obj == c)) for c in sorted(set(n_obj.tolist()))]
    rows: list[int] = []
    while len(rows) < min(k, len(n_obj)):
        for g in groups:
            if g and len(rows) < k:
                rows.append(int(g.pop(0)))
    return sorted(rows)


# ---- image-to-text ----------------------------------------------------------------------
def _caption_attr_correct(text: str, objects: Sequence[dict[str, Any]]) -> bool:
    said = sorted((o.shape, o.color) for o in parse_caption(text))
    truth = sorted((o["shape"], o["color"]) for o in objects)
    return said == truth


def eval_caption(pipe: CM3Leon, records: Sequence[DocRecord], cfg: EvalConfig) -> TaskResult:
    """Short captions: attribute accuracy (every object's shape and color named, none extra) and CIDEr."""
    t0 = time.perf_counter()
    outs: list[str] = []
    for chunk in _chunks(records, cfg.batch_size):
        outs.extend(pipe.captions([r.image for r in chunk],
                                  max_new_tokens=_decoding(pipe, cfg, "caption").max_new_tokens))
    ok = [_caption_attr_correct(c, r.meta["objects"]) for c, r in zip(outs, records)]
    refs = {i: [r.meta["captions"]["short"], r.meta["captions"]["detailed"]] for i, r in enumerate(records)}
    m = {"caption_attribute_accuracy": float(np.mean(ok)),
         "cider": metrics.cider({i: c for i, c in enumerate(outs)}, refs)}
    ex = [{"truth": r.meta["captions"]["short"], "output": c, "correct": bool(k)}
          for r, c, k in zip(records[:8], outs[:8], ok[:8])]
    return TaskResult("caption", m, ex, None, time.perf_counter() - t0)


def eval_vqa(pipe: CM3Leon, records: Sequence[DocRecord], cfg: EvalConfig) -> TaskResult:
    """VQA accuracy (official normalization) on color/shape/count questions, per type and overall."""
    t0 = time.perf_counter()
    items = [(r, qa) for r in records for qa in r.meta["vqa"] if qa["type"] in VQA_TYPES]
    rng = np.random.default_rng(cfg.seed)
    if len(items) > cfg.n * 2:
        items = [items[i] for i in sorted(rng.choice(len(items), cfg.n * 2, replace=False))]
    outs: list[str] = []
    for chunk in _chunks(items, cfg.batch_size):
        outs.extend(pipe.answers([r.image for r, _ in chunk], [qa["question"] for _, qa in chunk],
                                 max_new_tokens=_decoding(pipe, cfg, "vqa").max_new_tokens))
    acc = [metrics.vqa_accuracy(o, [qa["answer"]] * 10) for o, (_, qa) in zip(outs, items)]
    m = {"vqa_accuracy": float(np.mean(acc)) if acc else float("nan")}
    for t in VQA_TYPES:
        a = [x for x, (_, qa) in zip(acc, items) if qa["type"] == t]
        if a:
            m[f"vqa_accuracy_{t}"] = float(np.mean(a))
    ex = [{"question": qa["question"], "truth": qa["answer"], "output": o, "correct": bool(a >= 1.0)}
          for o, (_, qa), a in zip(outs[:8], items[:8], acc[:8])]
    return TaskResult("vqa", m, ex, None, time.perf_counter() - t0)


# ---- image-to-image ---------------------------------------------------------------------
def eval_edit(pipe: CM3Leon, records: Sequence[DocRecord], cfg: EvalConfig) -> TaskResult:
    """Editing: the edited image must match the edited scene exactly (instruction satisfied, rest kept)."""
    t0 = time.perf_counter()
    outs: list[Image.Image] = []
    for chunk in _chunks(records, cfg.batch_size):
        res = pipe.edits([r.image for r in chunk], [r.meta["edit"]["instruction"] for r in chunk], seed=cfg.seed,
                         **_image_settings(_decoding(pipe, cfg, "edit"), "image_guidance", "text_guidance",
                                           "temperature", "top_p", "n"))
        outs.extend(x[0] for x in res)
    verdicts = [judge(o, _objects(r.meta["edit"]["objects"]), check=T2I_CHECKS) for o, r in zip(outs, records)]
    m = {"edit_accuracy": float(np.mean([v.all_correct for v in verdicts])),
         "edit_score": float(np.mean([v.score for v in verdicts]))}
    # Shapes records name the edit's kind (recolor, reshape, move, add, remove); other data may not.
    kinds = [r.meta["edit"].get("kind") for r in records]
    if all(kinds):
        m.update(_by_group([v.all_correct for v in verdicts], kinds, "edit_accuracy_{}"))
    grid = None
    if cfg.grid_dir:
        k = min(8, len(records))
        grid = str(save_grid([[r.image, r.meta["images"]["edit_image"], o] for r, o in zip(records[:k], outs[:k])],
                             Path(cfg.grid_dir) / "edit.png",
                             labels=[r.meta["edit"]["instruction"] for r in records[:k]],
                             headers=["input", "target", "output"],
                             verdicts=[[None, None, bool(v.all_correct)] for v in verdicts[:k]]))
    ex = [{"instruction": r.meta["edit"]["instruction"], "kind": r.meta["edit"].get("kind"),
           "correct": bool(v.all_correct)} for r, v in zip(records[:8], verdicts[:8])]
    return TaskResult("edit", m, ex, grid, time.perf_counter() - t0)


def eval_control(pipe: CM3Leon, records: Sequence[DocRecord], cfg: EvalConfig,
                 kinds: Sequence[str] = ("edge", "seg", "depth")) -> TaskResult:
    """Edge/segmentation/depth-to-image: judge accuracy against the source scene."""
    t0 = time.perf_counter()
    m: dict[str, float] = {}
    rows: list[list[Image.Image]] = []
    labels: list[str] = []
    marks: list[list[bool | None]] = []
    ex: list[dict[str, Any]] = []
    for kind in kinds:
        outs: list[Image.Image] = []
        for chunk in _chunks(records, cfg.batch_size):
            res = pipe.controls(kind, [r.meta["images"][kind] for r in chunk],
                                [r.meta["captions"]["short"] for r in chunk], seed=cfg.seed,
                                **_image_settings(_decoding(pipe, cfg, "control"), "guidance", "temperature", "top_p",
                                                  "n"))
            outs.extend(x[0] for x in res)
        ok = [judge(o, _objects(r.meta["objects"]), check=T2I_CHECKS).all_correct for o, r in zip(outs, records)]
        m[f"{kind}_to_image_accuracy"] = float(np.mean(ok))
        m.update(_by_group(ok, [len(r.meta["objects"]) for r in records], f"{kind}_to_image_accuracy_{{}}obj"))
        rows.extend([r.meta["images"][kind], o, r.image] for r, o in zip(records[:3], outs[:3]))
        labels.extend(f"{kind} -> image: {r.meta['captions']['short']}" for r in records[:3])
        marks.extend([None, bool(k), None] for k in ok[:3])
        ex.extend({"kind": kind, "prompt": r.meta["captions"]["short"], "correct": bool(k)}
                  for r, k in zip(records[:3], ok[:3]))
    grid = (str(save_grid(rows, Path(cfg.grid_dir) / "control.png", labels=labels,
                          headers=["condition", "output", "real"], verdicts=marks)) if cfg.grid_dir else None)
    return TaskResult("control", m, ex, grid, time.perf_counter() - t0)


def eval_ground(pipe: CM3Leon, records: Sequence[DocRecord], cfg: EvalConfig) -> TaskResult:
    """Spatially grounded generation: mean IoU of each object's box with the detected object."""
    t0 = time.perf_counter()
    outs: list[Image.Image] = []
    for chunk in _chunks(records, cfg.batch_size):
        objs = [[(f"{o['color']} {o['shape']}", o["box"]) for o in sorted(r.meta["objects"], key=lambda o: o["z"])]
                for r in chunk]
        res = pipe.grounds([r.meta["captions"]["short"] for r in chunk], objs, seed=cfg.seed,
                           **_image_settings(_decoding(pipe, cfg, "grounding"), "guidance", "temperature", "top_p",
                                             "n"))
        outs.extend(x[0] for x in res)
    ious, ok, record_iou = [], [], []
    for o, r in zip(outs, records):
        v = judge(o, _objects(r.meta["objects"]), check=("shape", "color", "box", "count"))
        box_iou = [x.iou if x.iou is not None else 0.0 for x in v.objects]
        ious.extend(box_iou)
        record_iou.append(float(np.mean(box_iou)) if box_iou else 0.0)
        ok.append(bool(v.all_correct))
    m = {"ground_mean_iou": float(np.mean(ious)), "ground_all_correct": float(np.mean(ok))}
    k = min(8, len(records))
    captions = [r.meta["captions"]["short"] for r in records[:k]]
    grid = None
    if cfg.grid_dir:
        grid = str(save_grid([[r.image, o] for r, o in zip(records[:k], outs[:k])], Path(cfg.grid_dir) / "ground.png",
                             labels=[f"{c} (IoU {u:.2f})" for c, u in zip(captions, record_iou)],
                             headers=["real", "output"], verdicts=[[None, x] for x in ok[:k]]))
    ex = [{"prompt": c, "mean_iou": u, "correct": x} for c, u, x in zip(captions, record_iou, ok)]
    return TaskResult("ground", m, ex, grid, time.perf_counter() - t0)


def run_eval(
    pipe: CM3Leon, records: Sequence[DocRecord], tasks: Sequence[str], cfg: EvalConfig
) -> dict[str, TaskResult]:
    """Run the named tasks on ``records`` (Shapes records with full annotations)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown eval tasks {unknown}; choose from {TASKS}")
    records = list(records)[: cfg.n]
    if not records:
        raise ValueError("no evaluation records")
    fns = {"t2i": eval_t2i, "caption": eval_caption, "vqa": eval_vqa, "edit": eval_edit,
           "control": eval_control, "ground": eval_ground}
    out = {}
    for t in tasks:
        log.info("eval %s on %d records", t, len(records))
        out[t] = fns[t](pipe, records, cfg)
        log.info("eval %s: %s (%.1fs)", t, {k: round(v, 3) for k, v in out[t].metrics.items()}, out[t].seconds)
    return out
