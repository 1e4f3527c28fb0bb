"""Where SFT examples come from: dataset records, VQAv2 files, JSONL files.

:func:`record_sft_examples` turns any dataset record into examples (every task of a Shapes
record; captioning and text-to-image for a caption+image record); :func:`read_vqav2` and
:func:`read_sft_jsonl` read data sets in those formats. Images stay PIL images until
:func:`cm3leon.sequence.sft_shards.tokenize_sft` encodes them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cm3leon.sequence.sft_templates import ImageSlot, SFTExample, get_task, pick_variant
from cm3leon.shapes.sft_examples import shapes_sft_examples

log = logging.getLogger(__name__)


def record_sft_examples(record: Any, rng: random.Random) -> list[SFTExample]:
    """SFT examples of any record: every task of a Shapes record; captioning and text-to-image
    (the pretraining form, which keeps SFT from eroding text-to-image) for caption+image."""
    if record.meta.get("source") == "shapes":
        return shapes_sft_examples(record, rng)
    if record.image is not None and record.text:
        fields = {"caption": record.text, "image": record.image}
        return [SFTExample("caption", fields, pick_variant("caption", rng)),
                SFTExample("text_to_image", dict(fields), pick_variant("text_to_image", rng))]
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
                                 "image": _load_image(img)}, pick_variant("vqa", rng))


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
        variant = int(row["variant"]) if "variant" in row else pick_variant(name, rng)
        yield SFTExample(name, fields, variant)
