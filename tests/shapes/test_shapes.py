"""The Shapes world: annotations agree with pixels, determinism, the Shapes dataset, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm3leon.cli import main as cli_main
from cm3leon.data.dataset import Dataset
from cm3leon.data.records import DocRecord
from cm3leon.shapes.captions import describe, hard_negative_captions, parse_caption, reading_order
from cm3leon.shapes.dataset import TASKS, iter_examples, make_example, scene_of, write_shapes_dataset
from cm3leon.shapes.render import SEG_PALETTE, depth_level, render, render_word
from cm3leon.shapes.world import (
    BACKGROUND,
    COLORS,
    CORNERS,
    POSITIONS,
    SHAPES,
    ObjectSpec,
    Scene,
    ShapeObject,
    ShapesConfig,
    sample_scene,
)

# Reference areas of each shape's footprint relative to its d x d box (continuous geometry).
AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def _is(arr: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(arr == np.array(color), axis=-1)


def _in_box(shape: tuple[int, int], box: list[int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return m


def _examples(size: int, n: int, seed: int = 7) -> list[DocRecord]:
    return list(iter_examples(n, ShapesConfig(size=size), seed=seed))


@pytest.fixture(scope="module")
def ex32() -> list[DocRecord]:
    return _examples(32, 120)


@pytest.fixture(scope="module")
def ex64() -> list[DocRecord]:
    return _examples(64, 40)


@pytest.fixture(params=["ex32", "ex64"])
def examples(request: pytest.FixtureRequest) -> list[DocRecord]:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------ scenes and pixels


def test_config_validation():
    with pytest.raises(ValueError, match="32, 64, 128 or 256"):
        ShapesConfig(size=48)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="caption_order"):
        ShapesConfig(caption_order="random")
    assert ShapesConfig(size=32).side("small") == 9 and ShapesConfig(size=32).side("large") == 15


def test_palette_colors_are_well_separated():
    cols = [np.array(c, float) for c in [*COLORS.values(), BACKGROUND]]
    dists = [np.linalg.norm(a - b) for i, a in enumerate(cols) for b in cols[i + 1:]]
    assert min(dists) >= 100


def test_every_object_is_inside_its_box_and_mostly_visible(examples):
    for rec in examples:
        arr = _pixels(rec.image)
        S = arr.shape[0]
        objs = rec.meta["objects"]
        assert 1 <= len(objs) <= 3
        for color in COLORS:
            mine = [o for o in objs if o["color"] == color]
            pix = _is(arr, COLORS[color])
            union = np.zeros(pix.shape, bool)
            for o in mine:
                union |= _in_box(pix.shape, o["box"])
            assert not (pix & ~union).any(), (rec.id, color)  # every colored pixel lies in its object's box
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
            assert x1 - x0 == y1 - y0 == o["d"]
            assert o["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            visible = (_is(arr, COLORS[o["color"]]) & _in_box(arr.shape[:2], o["box"])).sum()
            full = AREA_FRACTION[o["shape"]] * o["d"] ** 2
            assert visible >= 0.6 * full, (rec.id, o)
            if o["z"] == len(objs) - 1:  # the top object is fully visible: its area matches geometry
                assert abs(visible - full) <= 0.2 * full + 2 * o["d"], (rec.id, o)
            # named grid cell from the center
            col, row = int(3 * o["center"][0] // S), int(3 * o["center"][1] // S)
            assert o["position"] == POSITIONS[3 * row + col]
        bg = _is(arr, BACKGROUND)
        assert bg.sum() + sum(_is(arr, c).sum() for c in COLORS.values()) == S * S  # no other colors


def test_sizes_are_clearly_distinct(ex32):
    sides = Counter((o["size"], o["d"]) for r in ex32 for o in r.meta["objects"])
    assert set(sides) == {("small", 9), ("large", 15)}


def test_segmentation_depth_and_edges_agree_with_the_image(examples):
    for rec in examples:
        arr = _pixels(rec.image)
        seg = _pixels(rec.meta["images"]["seg"])
        depth = _pixels(rec.meta["images"]["depth"])
        edge = _pixels(rec.meta["images"]["edge"])
        objs = rec.meta["objects"]
        bg = _is(arr, BACKGROUND)
        assert _is(seg, SEG_PALETTE["background"])[bg].all()
        assert (depth[bg] == 0).all()
        for o in objs:  # a pixel of object o's color inside its box has o's class and layer
            mine = _is(arr, COLORS[o["color"]]) & _in_box(bg.shape, o["box"])
            others = [p for p in objs if p["color"] == o["color"] and p is not o]
            for p in others:
                mine &= ~_in_box(bg.shape, p["box"])
            assert _is(seg, SEG_PALETTE[o["shape"]])[mine].all(), rec.id
            assert (depth[mine] == depth_level(o["z"])).all(), rec.id
        # edges: binary, and only next to a color change in the image
        assert set(np.unique(edge)) <= {0, 255}
        e = edge[..., 0] > 0
        change = np.zeros(e.shape, bool)
        diff_y = np.any(arr[1:] != arr[:-1], axis=-1)
        diff_x = np.any(arr[:, 1:] != arr[:, :-1], axis=-1)
        change[1:] |= diff_y
        change[:-1] |= diff_y
        change[:, 1:] |= diff_x
        change[:, :-1] |= diff_x
        near = np.zeros_like(change)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= np.roll(np.roll(change, dy, 0), dx, 1)
        assert not (e & ~near).any(), rec.id
        assert e.sum() > 0


def test_edit_pairs_change_only_the_target(examples):
    kinds = Counter()
    for rec in examples:
        edit = rec.meta["edit"]
        kinds[edit["kind"]] += 1
        src, dst = rec.meta["objects"], edit["objects"]
        before, after = _pixels(rec.image), _pixels(rec.meta["images"]["edit_image"])
        changed = np.any(before != after, axis=-1)
        assert changed.any(), (rec.id, edit)
        allowed = np.zeros(changed.shape, bool)
        strip = lambda o: {k: o[k] for k in ("shape", "color", "size", "x0", "y0", "d")}  # noqa: E731
        if edit["kind"] == "add":
            assert edit["target"] is None and len(dst) == len(src) + 1
            assert [strip(o) for o in dst[:-1]] == [strip(o) for o in src]
            allowed |= _in_box(changed.shape, dst[-1]["box"])
            assert edit["instruction"] == "add " + describe([ObjectSpec(**{k: dst[-1][k] for k in (
                "shape", "color", "size", "position")})], detailed=True)
        else:
            t = edit["target"]
            allowed |= _in_box(changed.shape, src[t]["box"])
            rest_src = [strip(o) for i, o in enumerate(src) if i != t]
            if edit["kind"] == "remove":
                assert [strip(o) for o in dst] == rest_src
                assert edit["instruction"].startswith("remove the ")
            else:
                assert [strip(o) for i, o in enumerate(dst) if i != t] == rest_src
                allowed |= _in_box(changed.shape, dst[t]["box"])
                a, b = src[t], dst[t]
                if edit["kind"] == "recolor":
                    assert a["color"] != b["color"] and edit["instruction"].endswith(" " + b["color"])
                    assert (a["shape"], a["x0"], a["y0"]) == (b["shape"], b["x0"], b["y0"])
                elif edit["kind"] == "reshape":
                    assert a["shape"] != b["shape"] and edit["instruction"].endswith(" " + b["shape"])
                elif edit["kind"] == "move":
                    assert a["position"] != b["position"] and edit["instruction"].endswith(b["position"])
            assert src[t]["color"] in edit["instruction"] and src[t]["shape"] in edit["instruction"]
        assert not (changed & ~allowed).any(), (rec.id, edit)
        # the edited image is exactly the rendering of the edited scene
        assert np.array_equal(after, _pixels(render(Scene.from_dicts(rec.meta["size"], dst))))
    assert set(kinds) == {"recolor", "reshape", "move", "add", "remove"}, kinds


def test_captions_round_trip_through_the_parser(examples):
    for rec in examples:
        scene = scene_of(rec)
        truth = [ObjectSpec.from_object(o, scene.size) for o in scene.objects]
        detailed = parse_caption(rec.meta["captions"]["detailed"])
        assert [(s.shape, s.color, s.size, s.position) for s in detailed] == \
            [(s.shape, s.color, s.size, s.position) for s in truth]
        short = parse_caption(rec.text)
        assert Counter((s.color, s.shape) for s in short) == Counter((s.color, s.shape) for s in truth)
        assert all(s.size is None and s.position is None for s in short)


def test_reading_order_captions_list_objects_top_to_bottom_then_left_to_right():
    cfg = ShapesConfig(max_objects=3, caption_order="reading")
    rank = {"top": 0, "center": 1, "bottom": 2}
    seen_multi = 0
    for seed in range(60):
        rec = make_example(seed, cfg)
        z_rec = make_example(seed, ShapesConfig(max_objects=3))
        assert rec.meta["objects"] == z_rec.meta["objects"]  # same scene, only the caption order differs
        said = parse_caption(rec.meta["captions"]["detailed"])
        assert sorted((s.shape, s.color, s.position) for s in said) == \
            sorted((o["shape"], o["color"], o["position"]) for o in rec.meta["objects"])
        keys = [(rank[next((w for w in ("top", "bottom") if w in s.position), "center")],
                 0 if "left" in s.position else 2 if "right" in s.position else 1) for s in said]
        assert keys == sorted(keys)
        seen_multi += len(said) > 1
    assert seen_multi > 20
    specs = [ObjectSpec("circle", "red", "small", "bottom right"), ObjectSpec("square", "blue", "large", "top"),
             ObjectSpec("triangle", "green", "small", "left"), ObjectSpec("diamond", "red", "small", "top left")]
    assert [s.shape for s in reading_order(specs)] == ["diamond", "square", "triangle", "circle"]


def test_parse_caption_tolerates_variants():
    specs = parse_caption("Draw two big Red Circles and a tiny blue diamond in the middle.")
    assert specs == [ObjectSpec("circle", "red", "large"), ObjectSpec("circle", "red", "large"),
                     ObjectSpec("diamond", "blue", "small", "center")]
    assert parse_caption("a photo of a dog") == []


def test_hard_negative_captions_swap_bindings_first_then_change_one_attribute():
    cap = "a large red circle at the top left and a small blue square at the bottom right"
    negs = hard_negative_captions(cap, np.random.default_rng(0), 6)
    assert len(negs) == len(set(negs)) == 6 and cap not in negs
    truth = parse_caption(cap)
    key = lambda specs: sorted((s.shape, s.color, s.size, s.position) for s in specs)  # noqa: E731
    for n in negs:
        said = parse_caption(n)
        assert len(said) == 2 and key(said) != key(truth)
        assert reading_order(said) == said  # still in reading order, like the training captions
    # the first four swap one attribute between the two objects: the same words, other bindings
    for n in negs[:4]:
        for attr in ("shape", "color", "size", "position"):
            assert sorted(getattr(s, attr) for s in parse_caption(n)) == sorted(getattr(s, attr) for s in truth)
    assert negs[0] == "a large blue circle at the top left and a small red square at the bottom right"
    # one object: no swaps, only single-attribute changes; deterministic for a seed
    one = hard_negative_captions("a small green diamond in the center", np.random.default_rng(1), 3)
    assert len(one) == 3 and all(len(parse_caption(n)) == 1 for n in one)
    assert one == hard_negative_captions("a small green diamond in the center", np.random.default_rng(1), 3)
    assert hard_negative_captions("a photo of a dog", np.random.default_rng(0)) == []


def test_vqa_and_reasoning_answers_follow_from_the_scene(examples):
    for rec in examples:
        objs = rec.meta["objects"]
        qa = rec.meta["vqa"]
        assert qa[0] == {"question": "how many objects are there?", "answer": str(len(objs)), "type": "count"}
        for item in qa:
            q, a = item["question"], item["answer"]
            if q.startswith("what color is the "):
                shape = q[len("what color is the "):-1]
                assert [o["color"] for o in objs if o["shape"] == shape] == [a]
            elif q.startswith("what shape is the "):
                color = q[len("what shape is the "):].split()[0]
                assert [o["shape"] for o in objs if o["color"] == color] == [a]
            elif q.startswith("is there "):
                (spec,) = parse_caption(q)
                present = any((o["color"], o["shape"]) == (spec.color, spec.shape) for o in objs)
                assert a == ("yes" if present else "no")
            elif q.startswith("how many ") and q != "how many objects are there?":
                shape = q.split()[2][:-1]
                assert a == str(sum(o["shape"] == shape for o in objs))
            elif q.startswith("where is "):
                (spec,) = parse_caption(q.replace("where is the", "where is a"))
                cands = [o for o in objs if (o["color"], o["shape"]) == (spec.color, spec.shape)
                         and spec.size in (None, o["size"])]
                assert a in {o["position"] for o in cands}
        r = rec.meta["reasoning"]
        assert set(r) == {"question", "context", "options", "explanation", "answer"}
        assert r["answer"] in r["options"]
        if r["question"].startswith("How many corners"):
            assert r["answer"] == str(sum(CORNERS[o["shape"]] for o in objs))


def test_write_images_show_the_word(examples):
    for rec in examples[:10]:
        img = _pixels(rec.meta["images"]["write_image"])
        ink = _is(img, (0, 0, 0))
        assert set(map(tuple, img.reshape(-1, 3))) <= {(0, 0, 0), BACKGROUND}
        ys, xs = np.nonzero(ink)
        S = img.shape[0]
        assert xs.max() - xs.min() + 1 >= 0.4 * S  # fills the canvas legibly
        assert abs((xs.min() + xs.max()) / 2 - S / 2) <= 2  # centered
    assert render_word("cat", 32).tobytes() != render_word("dog", 32).tobytes()
    with pytest.raises(ValueError, match="too long"):
        render_word("triangles", 32)


def test_all_shapes_render_distinctly_at_32px():
    imgs = {s: render(Scene(32, (ShapeObject(s, "red", "small", 11, 11, 9),))).tobytes() for s in SHAPES}
    assert len(set(imgs.values())) == len(SHAPES)


def test_example_is_deterministic_and_seed_dependent():
    a, b, c = make_example(3), make_example(3), make_example(4)
    assert a.image.tobytes() == b.image.tobytes()
    assert json.dumps({k: v for k, v in a.meta.items() if k != "images"}) == \
        json.dumps({k: v for k, v in b.meta.items() if k != "images"})
    assert a.meta["images"]["edit_image"].tobytes() == b.meta["images"]["edit_image"].tobytes()
    assert a.meta["objects"] != c.meta["objects"]


def test_scene_statistics_cover_the_world():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, ShapesConfig()) for _ in range(300)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and {o.color for o in objs} == set(COLORS)
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3}
    assert {s.position(o) for s in scenes for o in s.objects} == set(POSITIONS)


def test_snapped_world_keeps_every_position_and_sprites_on_the_grid():
    cfg = ShapesConfig(snap=4)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, cfg) for _ in range(300)]
    objs = [o for sc in scenes for o in sc.objects]
    assert all(o.x0 % 4 == 0 and o.y0 % 4 == 0 for o in objs)
    assert {sc.position(o) for sc in scenes for o in sc.objects} == set(POSITIONS)
    ex = make_example(3, cfg)  # edits (move/add) stay on the grid too
    assert all(o["x0"] % 4 == 0 and o["y0"] % 4 == 0 for o in ex.meta["edit"]["objects"])
    with pytest.raises(ValueError, match="snap"):
        ShapesConfig(snap=5)


# ------------------------------------------------------------------ the Shapes dataset


def test_shapes_dataset_matches_make_example_and_ignores_worker_count(tmp_path: Path):
    a = write_shapes_dataset(tmp_path / "a", 45, size=32, seed=5, workers=1, chunk=10)
    b = write_shapes_dataset(tmp_path / "b", 45, size=32, seed=5, workers=2, chunk=7)
    parts_a, parts_b = sorted(a.glob("*.parquet")), sorted(b.glob("*.parquet"))
    assert parts_a and [p.name for p in parts_a] == [p.name for p in parts_b]
    for pa_, pb in zip(parts_a, parts_b):
        assert pa_.read_bytes() == pb.read_bytes()
    ds = Dataset(a)
    assert len(ds) == 45 and ds.tasks == {t: 45 for t in TASKS}
    ref = make_example([5, 17], ShapesConfig(size=32), id="shapes-5-0000017")
    got = ds[17]
    assert got.id == ref.id and got.text == ref.text and got.image.tobytes() == ref.image.tobytes()
    for name, img in ref.meta["images"].items():
        assert got.meta["images"][name].tobytes() == img.tobytes(), name
    assert got.meta["objects"] == ref.meta["objects"]


# ------------------------------------------------------------------ CLI


def test_cli_shapes_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "s"
    assert cli_main(["data", "shapes", "--out", str(out), "--n", "30", "--size", "32", "--seed", "0",
                     "--workers", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["data", "inspect", str(out), "--examples", "1"]) == 0
    text = capsys.readouterr().out
    assert "format:  dataset" in text and "records: 30 read" in text
    for task in TASKS:
        assert f"  {task} " in text
    assert "bad rows: 30 ok, 0 skipped" in text
    assert cli_main(["data", "shapes", "--out", str(out), "--n", "5"]) == 1  # exists: clear error
    assert "already exists" in capsys.readouterr().err


def test_cli_help_has_examples(capsys: pytest.CaptureFixture[str]):
    for sub in ("shapes", "inspect"):
        with pytest.raises(SystemExit):
            cli_main(["data", sub, "--help"])
        assert "example" in capsys.readouterr().out
