"""The evaluation harness's per-group accuracies (edit kind, objects per control scene), with a
stand-in pipeline whose outputs are right for known groups only."""

from __future__ import annotations

from typing import Any

from PIL import Image

from cm3leon.eval.harness import EvalConfig, eval_control, eval_edit
from cm3leon.generate.generation_config import PAPER_DEFAULTS
from cm3leon.shapes.dataset import make_example
from cm3leon.shapes.world import ShapesConfig

CFG = ShapesConfig(size=32, snap=4, max_objects=2, caption_order="reading")


class RightForSomeGroups:
    """Edits: the true edited image for recolor instructions, the unchanged source otherwise.
    Controls: the true image for one-object scenes, a blank canvas otherwise."""

    generation_config = PAPER_DEFAULTS

    def __init__(self, records: list[Any]) -> None:
        self.by_instruction = {r.meta["edit"]["instruction"]: r for r in records}
        self.by_caption = {r.meta["captions"]["short"]: r for r in records}

    def edits(self, images, instructions, **kw):
        out = []
        for im, ins in zip(images, instructions):
            r = self.by_instruction[ins]
            out.append([r.meta["images"]["edit_image"] if r.meta["edit"]["kind"] == "recolor" else im])
        return out

    def controls(self, kind, conditions, captions, **kw):
        out = []
        for cap in captions:
            r = self.by_caption[cap]
            out.append([r.image if len(r.meta["objects"]) == 1 else Image.new("RGB", r.image.size, "white")])
        return out


def _records(n: int = 60) -> list[Any]:
    recs: list[Any] = []
    instructions: set[str] = set()
    captions: set[str] = set()
    for i in range(400):
        r = make_example(i, CFG)
        ins, cap = r.meta["edit"]["instruction"], r.meta["captions"]["short"]
        if ins in instructions or cap in captions:
            continue  # the stand-in looks records up by instruction and caption
        instructions.add(ins)
        captions.add(cap)
        recs.append(r)
        if len(recs) == n:
            break
    return recs


def test_edit_accuracy_by_kind():
    recs = _records()
    res = eval_edit(RightForSomeGroups(recs), recs, EvalConfig(n=len(recs)))
    kinds = {r.meta["edit"]["kind"] for r in recs}
    assert {"recolor", "reshape", "move"} <= kinds
    m = res.metrics
    assert m["edit_accuracy_recolor"] == 1.0
    for k in kinds - {"recolor"}:
        assert m[f"edit_accuracy_{k}"] == 0.0, k  # the unchanged source fails every other edit
    share = sum(r.meta["edit"]["kind"] == "recolor" for r in recs) / len(recs)
    assert abs(m["edit_accuracy"] - share) < 1e-9


def test_control_accuracy_by_object_count():
    recs = _records()
    counts = [len(r.meta["objects"]) for r in recs]
    assert set(counts) == {1, 2}
    res = eval_control(RightForSomeGroups(recs), recs, EvalConfig(n=len(recs)), kinds=("edge", "seg"))
    for kind in ("edge", "seg"):
        assert res.metrics[f"{kind}_to_image_accuracy_1obj"] == 1.0
        assert res.metrics[f"{kind}_to_image_accuracy_2obj"] == 0.0
        assert abs(res.metrics[f"{kind}_to_image_accuracy"] - counts.count(1) / len(counts)) < 1e-9
