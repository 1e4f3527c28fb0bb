"""A Shapes record -> SFT examples: one per task of the paper's mixture (Table 5) the record carries."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from cm3leon.sequence.sft_templates import SFTExample, format_box, format_options, pick_variant
from cm3leon.shapes.captions import position_phrase


def narration(objects: Sequence[Mapping[str, Any]]) -> str:
    """A long narration of a scene (``meta["objects"]``): the object count, then each object in drawing order."""
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
        out.append(SFTExample(task, fields, pick_variant(task, rng)))

    for tag in meta.get("tasks", []):
        for task in SHAPES_TASKS.get(tag, ()):
            if task == "caption":
                add(task, caption=meta["captions"]["short"], image=record.image)
            elif task == "text_to_image":
                add(task, caption=meta["captions"]["detailed"], image=record.image)
            elif task == "detailed_caption":
                add(task, caption=meta["captions"]["detailed"], image=record.image)
            elif task == "narration":
                add(task, caption=narration(meta["objects"]), image=record.image)
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
