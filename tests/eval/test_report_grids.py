"""The report's sample grids (`save_grid`: upscaled framed tiles, column headers, row labels,
pass/fail frames), the verdicts the harness passes into them, and the report page that shows
them (which model each target is judged on, the environment block)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFont

from cm3leon.eval import harness
from cm3leon.eval.harness import FAIL, FRAME, PASS, EvalConfig, eval_control, eval_edit, save_grid
from cm3leon.generate.generation_config import PAPER_DEFAULTS
from cm3leon.quickstart import SHAPES_GENERATION, get_preset
from cm3leon.report import write_report
from cm3leon.shapes.dataset import make_example
from cm3leon.shapes.world import ShapesConfig

WHITE = (255, 255, 255)


def _solid(color: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def _bbox(grid: Image.Image, color: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), inclusive, of the pixels of exactly ``color``."""
    ys, xs = np.nonzero((np.asarray(grid) == color).all(axis=-1))
    assert len(xs), f"no pixel of {color}"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _pixel(grid: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in grid.getpixel((x, y)))  # type: ignore[union-attr]


def test_tiles_are_upscaled_4x_with_nearest_neighbour_and_framed(tmp_path: Path) -> None:
    im = _solid((10, 20, 200))
    im.putpixel((0, 0), (250, 250, 0))  # one odd pixel: nearest neighbour makes it a 4x4 block
    grid = Image.open(save_grid([[im, _solid((0, 200, 0))]], tmp_path / "g.png"))
    x0, y0, x1, y1 = _bbox(grid, (250, 250, 0))
    assert (x1 - x0 + 1, y1 - y0 + 1) == (4, 4)  # 32 px -> 128 px tiles
    bx0, by0, bx1, by1 = _bbox(grid, (10, 20, 200))
    assert (bx1 - bx0 + 1, by1 - by0 + 1) == (128, 128) and (bx0, by0) == (x0, y0)
    assert _pixel(grid, x0 - 1, y0 + 10) == FRAME  # a grey frame, visible on white
    gx0, _, _, _ = _bbox(grid, (0, 200, 0))
    assert _pixel(grid, (bx1 + gx0) // 2, y0 + 10) == WHITE  # a white gap between the two framed tiles


def test_explicit_scale_and_small_images(tmp_path: Path) -> None:
    grid = Image.open(save_grid([[_solid((10, 20, 200), 16)]], tmp_path / "g.png"))
    x0, _, x1, _ = _bbox(grid, (10, 20, 200))
    assert x1 - x0 + 1 == 128  # 16 px: 8x
    native = Image.open(save_grid([[_solid((10, 20, 200), 16), _solid((0, 200, 0), 16)]], tmp_path / "n.png",
                                  scale=1))
    x0, _, x1, _ = _bbox(native, (10, 20, 200))
    assert x1 - x0 + 1 == 16  # `cm3leon generate` writes its images at native size


def test_headers_and_labels_are_drawn_in_a_readable_size(tmp_path: Path) -> None:
    rows = [[_solid((10, 20, 200)), _solid((0, 200, 0)), _solid((200, 0, 0))]] * 2
    plain = Image.open(save_grid(rows, tmp_path / "plain.png"))
    headed = Image.open(save_grid(rows, tmp_path / "headed.png", headers=["input", "target", "output"]))
    assert headed.width == plain.width and headed.height >= plain.height + 14  # one line of 14 px text
    strip = np.asarray(headed)[: headed.height - plain.height]
    ink = (strip < 200).any(axis=-1)
    assert ink[:, : plain.width // 3].any() and ink[:, 2 * plain.width // 3 :].any()  # first and last header
    glyph_rows = np.nonzero(ink.any(axis=1))[0]
    assert glyph_rows.max() - glyph_rows.min() >= 9  # text about 14 px tall (the old labels were ~5 px)

    short = Image.open(save_grid(rows, tmp_path / "short.png", labels=["a red circle", "a blue square"]))
    long_label = "a large purple triangle at the top left and a small orange diamond at the bottom left " * 2
    wrapped = Image.open(save_grid(rows, tmp_path / "long.png", labels=[long_label, "x"]))
    assert short.height > plain.height and wrapped.height > short.height  # a long label wraps onto more lines
    assert wrapped.width == short.width  # ...and never widens the grid


def test_verdicts_frame_tiles_green_red_or_grey_with_a_word_under_them(tmp_path: Path) -> None:
    colors = [(10, 20, 200), (0, 200, 200), (200, 200, 0)]
    rows = [[_solid(c) for c in colors]]
    grid = Image.open(save_grid(rows, tmp_path / "v.png", verdicts=[[None, True, False]]))
    frames = []
    for c in colors:
        x0, y0, x1, y1 = _bbox(grid, c)
        frames.append(_pixel(grid, x0 - 1, (y0 + y1) // 2))
        frames[-1:] += [_pixel(grid, x1 + 1, (y0 + y1) // 2), _pixel(grid, (x0 + x1) // 2, y1 + 1)]
    assert frames == [FRAME] * 3 + [PASS] * 3 + [FAIL] * 3
    below = np.asarray(grid)[_bbox(grid, colors[0])[3] + 5 :]
    assert (below == PASS).all(axis=-1).any() and (below == FAIL).all(axis=-1).any()  # "pass" / "fail" written
    unjudged = Image.open(save_grid(rows, tmp_path / "u.png"))
    assert grid.height > unjudged.height  # the words take a line; grids without verdicts do not


def test_old_pillow_falls_back_to_the_bitmap_font_scaled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def old_pillow(size: float | None = None) -> Any:  # Pillow 10.0: no size, the bitmap font only
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont()

    monkeypatch.setattr(harness.ImageFont, "load_default", old_pillow)
    rows = [[_solid((10, 20, 200)), _solid((0, 200, 0))]]
    grid = Image.open(save_grid(rows, tmp_path / "old.png", headers=["real", "output"]))
    plain = Image.open(save_grid(rows, tmp_path / "plain.png"))
    ink = (np.asarray(grid)[: grid.height - plain.height] < 200).any(axis=-1)
    text_rows = np.nonzero(ink.any(axis=1) & (ink.mean(axis=1) < 0.5))[0]  # not the underline
    assert text_rows.max() - text_rows.min() >= 12  # the ~7 px bitmap glyphs, doubled


# ---- the harness passes its verdicts into the grids and the examples ------------------------------------
CFG = ShapesConfig(size=32, snap=4, max_objects=2, caption_order="reading")


class RightForTheFirst:
    """Edits and controls: the true image for the first record, a blank canvas for the others."""

    generation_config = PAPER_DEFAULTS

    def __init__(self, records: list[Any]) -> None:
        self.first = records[0]

    def edits(self, images, instructions, **kw):
        return [[self.first.meta["images"]["edit_image"] if ins == self.first.meta["edit"]["instruction"]
                 else Image.new("RGB", im.size, "white")] for im, ins in zip(images, instructions)]

    def controls(self, kind, conditions, captions, **kw):
        return [[self.first.image if cap == self.first.meta["captions"]["short"]
                 else Image.new("RGB", self.first.image.size, "white")] for cap in captions]


def _records(n: int = 4) -> list[Any]:
    recs, seen = [], set()
    for i in range(100):
        r = make_example(i, CFG)
        key = (r.meta["edit"]["instruction"], r.meta["captions"]["short"])
        if key[0] not in {k[0] for k in seen} and key[1] not in {k[1] for k in seen}:
            seen.add(key)
            recs.append(r)
        if len(recs) == n:
            return recs
    raise AssertionError("not enough distinct records")


def _has(grid: Image.Image, color: tuple[int, int, int]) -> bool:
    return bool((np.asarray(grid) == color).all(axis=-1).any())


def test_edit_and_control_grids_carry_the_judges_verdicts(tmp_path: Path) -> None:
    recs = _records()
    cfg = EvalConfig(n=len(recs), grid_dir=str(tmp_path))
    edit = eval_edit(RightForTheFirst(recs), recs, cfg)
    assert [e["correct"] for e in edit.examples] == [True, False, False, False]
    grid = Image.open(edit.grid)
    assert _has(grid, PASS) and _has(grid, FAIL)
    control = eval_control(RightForTheFirst(recs), recs, cfg, kinds=("edge",))
    assert [(e["kind"], e["correct"]) for e in control.examples] == [("edge", True), ("edge", False), ("edge", False)]
    assert _has(Image.open(control.grid), PASS)
    for res in (edit, control):
        json.dumps(dataclasses.asdict(res))  # TaskResult stays JSON-ready (metrics.json, report.json)


# ---- the report page --------------------------------------------------------------------------------------
def test_report_says_which_model_is_judged_and_where_it_ran(tmp_path: Path) -> None:
    save_grid([[_solid((10, 20, 200)), _solid((0, 200, 0))]], tmp_path / "grids" / "t2i.png",
              headers=["real", "samples, best first"], verdicts=[[None, True]])
    t2i = {"metrics": {"judge_all_correct_1obj": 0.7, "clip_score": 20.0}, "grid": str(tmp_path / "grids" / "t2i.png"),
           "examples": []}
    pre = {"tasks": {"t2i": {**t2i, "metrics": {"judge_all_correct_1obj": 0.5, "clip_score": 18.0}}}}
    sft = {"tasks": {"t2i": t2i, "edit": {"metrics": {"edit_accuracy": 0.25}, "grid": None,
                                          "examples": [{"instruction": "remove the red circle", "correct": False}]},
                     "caption": {"metrics": {"caption_attribute_accuracy": 0.9}, "grid": None,
                                 "examples": [{"truth": "a red circle", "output": "a red circle", "correct": True}]}}}
    report = write_report(tmp_path, preset=get_preset("smoke"), generation=SHAPES_GENERATION,
                          timings={"data": 1.0, "eval": 2.0}, results={}, eval_pre=pre, eval_sft=sft, wall=3.0)
    rows = {(r["task"], r["metric"]): r for r in report["metrics"]}
    assert rows[("t2i", "judge_all_correct_1obj")]["meets_target"] is True
    assert rows[("t2i", "judge_all_correct_1obj")]["meets_target_pretrained"] is False
    assert rows[("edit", "edit_accuracy")]["judged_on"] == "sft"
    assert rows[("t2i", "clip_score")]["judged_on"] is None
    env = json.loads((tmp_path / "report.json").read_text())["environment"]
    assert {"commit", "torch", "torch_threads", "train_seed", "eval_seed", "platform", "cpu_count",
            "cuda_devices"} <= set(env)
    assert env["commit"] and env["torch_threads"] >= 1
    page = (tmp_path / "report.html").read_text()
    assert 'MISSED</span> (SFT)' in page and 'met</span> (SFT)' in page
    assert "pretrained model" in page and "SFT model" in page
    assert "image-rendering:pixelated" in page and 'src="grids/t2i.png"' in page
    assert f"commit</dt><dd>{env['commit']}" in page and "torch threads" in page and "Stage timings" in page
    assert '<td class="ok">pass</td>' in page  # the caption example's verdict
