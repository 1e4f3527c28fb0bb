"""Shapes records (one scene with every annotation) and Shapes datasets.

:func:`make_example` packs a scene and everything derived from it (captions, boxes,
segmentation / edge / depth maps, VQA pairs, a reasoning item, an edit pair, a "how to
write" image) into a :class:`DocRecord`; :func:`write_shapes_dataset` writes many to the
dataset format.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cm3leon.data.dataset import DatasetWriter, dataset_files, record_to_row
from cm3leon.data.records import DocRecord
from cm3leon.shapes.annotations import make_edit, make_reasoning, make_vqa
from cm3leon.shapes.captions import describe, reading_order
from cm3leon.shapes.render import (
    render,
    render_depth,
    render_edges,
    render_segmentation,
    render_word,
    writable_words,
)
from cm3leon.shapes.world import ObjectSpec, Scene, ShapesConfig, choose, label_map, sample_scene
from cm3leon.workspace import check_replaceable

# The annotations every record carries (``meta["tasks"]``).
TASKS: tuple[str, ...] = (
    "caption", "detailed_caption", "grounding", "segmentation", "edge", "depth",
    "vqa", "reasoning", "edit", "write",
)


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
    word = choose(rng, writable_words(cfg.size))
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
    ``(n, cfg, seed)``, not on ``workers``. Returns the dataset path. ``overwrite`` replaces
    an existing dataset only: a directory holding other files is refused before any work
    (:class:`cm3leon.workspace.NotOwnedError`)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    cfg = cfg or ShapesConfig(size=size)
    if cfg.size != size:
        cfg = dataclasses.replace(cfg, size=size)
    jobs = [(seed, s, min(n, s + chunk), cfg) for s in range(0, n, chunk)]
    if overwrite:
        check_replaceable(out, dataset_files)  # before the progress bar and the worker pool
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
