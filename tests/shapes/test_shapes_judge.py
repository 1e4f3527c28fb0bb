"""The Shapes judge on rendered scenes: right on true pairs, near chance on shuffled pairs,
robust to noise and blur, and sensitive to each attribute."""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cm3leon.shapes.captions import describe
from cm3leon.shapes.judge import box_iou, detect_objects, judge, judge_detected
from cm3leon.shapes.render import render
from cm3leon.shapes.world import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    ShapeObject,
    ShapesConfig,
    sample_scene,
)

log = logging.getLogger(__name__)


def _specs(scene: Scene) -> list[ObjectSpec]:
    return [ObjectSpec.from_object(o, scene.size) for o in scene.objects]


def _degrade(img: Image.Image, rng: np.random.Generator, sigma: float, blur: float) -> Image.Image:
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, np.float32) + rng.normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(2024)
    return [sample_scene(rng, ShapesConfig(size=32 if i % 2 else 64)) for i in range(300)]


@pytest.fixture(scope="module")
def detections(scenes) -> list[list]:
    return [detect_objects(render(s)) for s in scenes]


def test_true_pairs_pass_and_shuffled_pairs_fail(scenes, detections):
    dets = detections
    ok = [judge_detected(d, _specs(s)).all_correct for s, d in zip(scenes, dets)]
    rate = float(np.mean(ok))
    # shuffled: image i judged against the prompt of a scene of the same canvas size
    shuffled = [judge_detected(d, _specs(scenes[(i + 2) % len(scenes)])).all_correct for i, d in enumerate(dets)]
    shuffled_rate = float(np.mean(shuffled))
    log.info("judge all_correct: true pairs %.3f, shuffled %.3f", rate, shuffled_rate)
    assert rate >= 0.98, rate
    assert shuffled_rate < 0.05, shuffled_rate


def test_noisy_and_blurred_images(scenes):
    rng = np.random.default_rng(0)
    ok = []
    for s in scenes[:60]:
        img = _degrade(render(s), rng, sigma=10.0, blur=0.5 * s.size / 32)
        ok.append(judge(img, _specs(s)).all_correct)
    assert np.mean(ok) >= 0.95, np.mean(ok)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_compression_and_resampling_artifacts(scenes):
    """Stand-ins for VQ-GAN reconstructions: JPEG blocks and chroma bleeding; a 2x down-up
    resample at 64 px (at 32 px that leaves ~4 px objects, beyond any judge)."""
    ok_jpeg = [judge(_jpeg(render(s), 75), _specs(s)).all_correct for s in scenes[:60]]
    big = [s for s in scenes[:80] if s.size == 64]
    bilinear = Image.Resampling.BILINEAR
    ok_resample = [judge(render(s).resize((32, 32), bilinear).resize((64, 64), bilinear), _specs(s)).all_correct
                   for s in big]
    assert np.mean(ok_jpeg) >= 0.95, np.mean(ok_jpeg)
    assert np.mean(ok_resample) >= 0.95, np.mean(ok_resample)


def test_each_shape_color_and_size_is_recognised_at_32px():
    for shape in SHAPES:
        for color in COLORS:
            for size in SIZES:
                d = ShapesConfig().side(size)
                obj = ShapeObject(shape, color, size, 16 - d // 2 - 1, 16 - d // 2 - 1, d)
                (det,) = detect_objects(render(Scene(32, (obj,))))
                assert (det.shape, det.color, det.size, det.position) == (shape, color, size, "center")
                assert det.box == obj.box and det.fit == 1.0


def test_positions_and_boxes(scenes, detections):
    ious = []
    for s, dets in zip(scenes, detections):
        res = judge_detected(dets, _specs(s), check=("shape", "color", "size", "position", "count", "box"))
        ious += [v.iou for v in res.objects if v.iou is not None]
    assert np.mean(np.array(ious) >= 0.5) >= 0.99 and np.median(ious) == 1.0
    assert {d.position for dets in detections for d in dets} == set(POSITIONS)  # every grid cell is reported


def test_caption_prompts(scenes, detections):
    for s, dets in zip(scenes[:40], detections):
        assert judge_detected(dets, describe(s, detailed=True)).all_correct
        short = judge_detected(dets, describe(s))
        assert short.all_correct and "size" not in short.attribute_accuracy  # short captions state no size
    assert judge(render(scenes[0]), describe(scenes[0], detailed=True)).all_correct


def test_each_wrong_attribute_is_caught(scenes, detections):
    rng = np.random.default_rng(1)
    for s, dets in zip(scenes[:60], detections):
        specs = _specs(s)
        k = int(rng.integers(len(specs)))
        for attr, choices in (("color", list(COLORS)), ("shape", list(SHAPES)), ("size", list(SIZES)),
                              ("position", list(POSITIONS))):
            wrong = next(c for c in choices if c != getattr(specs[k], attr))
            bad = specs[:k] + [dataclasses.replace(specs[k], **{attr: wrong})] + specs[k + 1:]
            res = judge_detected(dets, bad)
            assert not res.all_correct and res.score < 1.0, (attr, s)
            assert res.attribute_accuracy[attr] < 1.0, (attr, s)
        extra = specs + [ObjectSpec("circle", "red", "small", "center")]
        res = judge_detected(dets, extra)
        assert not res.count_correct and not res.all_correct
        assert any(v.detected is None for v in res.objects)


def test_blank_and_foreign_images():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert detect_objects(white) == []
    res = judge(white, "a red circle")
    assert not res.all_correct and res.objects[0].detected is None and res.score == 0.0
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert not judge(noise, "a red circle").all_correct
    big = render(Scene(256, (ShapeObject("triangle", "blue", "large", 20, 30, 120),)))
    (det,) = detect_objects(big)
    assert (det.shape, det.color, det.size) == ("triangle", "blue", "large")
    assert box_iou(det.box, (20, 30, 140, 150)) > 0.9


def test_bad_arguments():
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    with pytest.raises(ValueError, match="no Shapes objects"):
        judge(img, "a photo of a dog")
    with pytest.raises(ValueError, match="unknown attributes"):
        judge(img, "a red circle", check=("colour",))
    with pytest.raises(ValueError, match="square"):
        detect_objects(Image.new("RGB", (32, 16)))


def test_repeated_small_images_are_detected_once(scenes):
    from cm3leon.shapes.judge import _detect_small

    scene = next(s for s in scenes if s.size == 32)
    img = render(scene)
    copy = Image.frombytes("RGB", img.size, img.convert("RGB").tobytes())  # same pixels, another object
    before = _detect_small.cache_info().hits
    first, second = judge(img, _specs(scene)), judge(copy, _specs(scene))
    assert _detect_small.cache_info().hits > before
    assert first == second
    assert list(first.detected) == detect_objects(img)  # the memo returns what detection gives
