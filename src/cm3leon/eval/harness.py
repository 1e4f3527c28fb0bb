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
from PIL import Image, ImageDraw

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


def save_grid(rows: Sequence[Sequence[Image.Image]], path: str | Path, *, labels: Sequence[str] | None = None,
              scale: int = 3) -> Path:
    """Write a PNG grid (one row per list, images upscaled ``scale`` x with nearest neighbour)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(len(r) for r in rows)
    w = max(im.width for r in rows for im in r) * scale
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (cols * (w + 2), len(rows) * (w + label_h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = i * (w + label_h + 2)
        if labels:
            draw.text((2, y), labels[i][: cols * w // 6], fill=(0, 0, 0))
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, w), Image.NEAREST), (j * (w + 2), y + label_h))
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
    if cfg.grid_dir:
        grid = str(save_grid([[records[i].image, *all_samples[i]] for i in shown],
                             Path(cfg.grid_dir) / f"{name}.png", labels=[prompts[i] for i in shown]))
    per_prompt = len(verdicts) // max(len(records), 1)  # 1, or the samples when every sample is judged
    examples = [{"prompt": prompts[i], "all_correct": bool(verdicts[i * per_prompt].all_correct)} for i in shown]
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
    ex = [{"question": qa["question"], "truth": qa["answer"], "output": o} for o, (_, qa) in zip(outs[:8], items[:8])]
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
                             labels=[r.meta["edit"]["instruction"] for r in records[:k]]))
    ex = [{"instruction": r.meta["edit"]["instruction"], "correct": bool(v.all_correct)}
          for r, v in zip(records[:8], verdicts[:8])]
    return TaskResult("edit", m, ex, grid, time.perf_counter() - t0)


def eval_control(pipe: CM3Leon, records: Sequence[DocRecord], cfg: EvalConfig,
                 kinds: Sequence[str] = ("edge", "seg", "depth")) -> TaskResult:
    """Edge/segmentation/depth-to-image: judge accuracy against the source scene."""
    t0 = time.perf_counter()
    m: dict[str, float] = {}
    rows: list[list[Image.Image]] = []
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
    grid = str(save_grid(rows, Path(cfg.grid_dir) / "control.png")) if cfg.grid_dir else None
    return TaskResult("control", m, [], grid, time.perf_counter() - t0)


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
    ious, ok = [], []
    for o, r in zip(outs, records):
        v = judge(o, _objects(r.meta["objects"]), check=("shape", "color", "box", "count"))
        ious.extend(x.iou if x.iou is not None else 0.0 for x in v.objects)
        ok.append(v.all_correct)
    m = {"ground_mean_iou": float(np.mean(ious)), "ground_all_correct": float(np.mean(ok))}
    grid = None
    if cfg.grid_dir:
        k = min(8, len(records))
        grid = str(save_grid([[r.image, o] for r, o in zip(records[:k], outs[:k])], Path(cfg.grid_dir) / "ground.png",
                             labels=[r.meta["captions"]["short"] for r in records[:k]]))
    return TaskResult("ground", m, [], grid, time.perf_counter() - t0)


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
