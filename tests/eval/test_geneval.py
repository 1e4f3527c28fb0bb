"""GenEval-style evaluation: the shipped Shapes prompts, GenEval's output layout, the Shapes
judge's verdicts by GenEval's rules, and ``cm3leon eval --geneval-prompts``."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cm3leon.cli import main
from cm3leon.eval.geneval import (
    MARKER,
    RELATIONS,
    RESULTS,
    TAGS,
    GenevalPrompt,
    generate_layout,
    load_metadata,
    relations,
    run_geneval,
    score_folder,
    score_image,
    shapes_prompts,
    shapes_prompts_path,
    unscorable,
)
from cm3leon.shapes.captions import parse_caption
from cm3leon.shapes.render import render
from cm3leon.shapes.world import SIZES, ObjectSpec, Scene, ShapeObject, ShapesConfig, grid_position, scene_is_valid
from cm3leon.workspace import NotOwnedError

ROOT = Path(__file__).resolve().parents[2]
# Lines of GenEval's own prompts file (COCO classes, its colors): generated, not scored.
COCO_LINES = [
    '{"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "cat", "count": 1}], '
    '"prompt": "a photo of a bench and a cat"}',
    '{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "pink"}], "prompt": "a photo of a pink '
    'circle"}',
]


# ---- reference scenes: what a perfect model draws for a Shapes prompt -------------------------
def _gap(a: ShapeObject, b: ShapeObject) -> int:
    return max(a.x0 - (b.x0 + b.d), b.x0 - (a.x0 + a.d), a.y0 - (b.y0 + b.d), b.y0 - (a.y0 + a.d))


def reference_scene(specs: list[ObjectSpec], size: int = 32, seed: int = 0) -> Scene:
    """A valid scene of exactly ``specs`` (named cells kept), objects 2 px apart (no occlusion)."""
    cfg = ShapesConfig(size=size, max_objects=4)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        objs: list[ShapeObject] = []
        for s in specs:
            name = s.size or ("small" if len(specs) > 2 else SIZES[int(rng.integers(2))])
            d = cfg.side(name)
            for _ in range(400):
                x0, y0 = cfg.corner(rng, d)
                o = ShapeObject(s.shape, s.color, name, x0, y0, d)
                if s.position and grid_position(o.center, size) != s.position:
                    continue
                if any(_gap(o, p) < 2 for p in objs):
                    continue
                if scene_is_valid(Scene(size, (*objs, o)), dataclasses.replace(cfg, min_objects=1)):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) == len(specs):
            return Scene(size, tuple(objs))
    raise AssertionError(f"no scene for {specs}")


def reference_image(prompt: str, seed: int = 0, size: int = 32) -> Image.Image:
    return render(reference_scene(parse_caption(prompt), size, seed))


class Painter:
    """A stand-in pipeline: ``paint(prompt, k)`` is sample k of a prompt; records its calls."""

    def __init__(self, paint, default_n: int = 2) -> None:
        self.paint, self.default_n, self.calls = paint, default_n, []

    def generate_images(self, prompts, *, n=None, seed=0, **kw):
        self.calls.append({"prompts": list(prompts), "n": n, "seed": seed, **kw})
        n = n or self.default_n
        return [SimpleNamespace(images=[self.paint(p, k) for k in range(n)]) for p in prompts]


def _blank(prompt: str, k: int) -> Image.Image:
    return Image.new("RGB", (32, 32), "white")


# ---- the shipped prompts ----------------------------------------------------------------------
def test_shipped_prompts_cover_the_six_tasks_in_genevals_format():
    path = shapes_prompts_path()
    assert path.is_file() and path.name == "geneval_prompts.jsonl"
    prompts = load_metadata(path)
    assert load_metadata("shapes") == prompts
    counts = Counter(p.tag for p in prompts)
    assert counts == {"single_object": 24, "two_object": 24, "counting": 24, "colors": 24, "position": 32,
                      "color_attr": 24}
    assert [p.line for p in prompts] == [json.dumps(m) for m in shapes_prompts()]  # the file is its generator's
    assert len({p.line for p in prompts}) == len(prompts)
    for p in prompts:
        m = p.meta
        assert list(m)[0] == "tag" and list(m)[-1] == "prompt" and not unscorable(m), p.line
        assert all(set(c) <= {"class", "count", "color", "position"} for c in m["include"])
        specs = parse_caption(p.prompt)  # a Shapes caption: the classes and counts the metadata names
        assert Counter(s.shape for s in specs) == Counter({c["class"]: c["count"] for c in m["include"]}), p.line
        want_color = {"colors", "color_attr"}
        assert any("color" in c for c in m["include"]) == (p.tag in want_color)
        for c in m["include"]:
            if "color" in c:
                assert any(s.shape == c["class"] and s.color == c["color"] for s in specs)
        if p.tag == "counting":
            n = m["include"][0]["count"]
            assert 2 <= n <= 4 and m["exclude"] == [{"class": m["include"][0]["class"], "count": n + 1}]
        if p.tag == "position":
            rel, target = m["include"][1]["position"]
            assert rel in RELATIONS and target == 0
            assert all(s.position and s.size for s in specs)
    assert {p.meta["include"][0]["count"] for p in prompts if p.tag == "counting"} == {2, 3, 4}
    assert Counter(p.meta["include"][1]["position"][0] for p in prompts if p.tag == "position") == \
        dict.fromkeys(RELATIONS, 8)


def test_the_prompts_file_is_package_data():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cm3leon"]
    assert any(Path("shapes/geneval_prompts.jsonl").match(pattern) for pattern in data)


def test_load_metadata_refuses_a_malformed_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "colors", "prompt": "a red circle"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not JSON"):
        load_metadata(bad)
    bad.write_text('{"tag": "colors"}\n')
    with pytest.raises(ValueError, match="'prompt' string"):
        load_metadata(bad)


# ---- the layout -------------------------------------------------------------------------------
def test_layout_matches_genevals_documented_structure(tmp_path):
    src = tmp_path / "meta.jsonl"
    lines = [*(p.line for p in load_metadata("shapes")[::30]), *COCO_LINES]
    src.write_text("\n".join(lines) + "\n")
    prompts = load_metadata(src)
    pipe = Painter(lambda p, k: Image.new("RGB", (32, 32), (10 * k, 0, 0)))
    out = tmp_path / "out"
    assert generate_layout(pipe, prompts, out, samples=3, seed=7, batch_size=4, guidance=None, top_p=0.9) == 3
    assert [c["n"] for c in pipe.calls] == [3, 3]  # two batches; settings left None are not passed
    assert all(c["seed"] == 7 and c["top_p"] == 0.9 and "guidance" not in c for c in pipe.calls)
    folders = sorted(d.name for d in out.iterdir() if d.is_dir())
    assert folders == [f"{i:05d}" for i in range(len(lines))]
    for i, line in enumerate(lines):
        d = out / f"{i:05d}"
        assert (d / "metadata.jsonl").read_text() == line + "\n"  # the prompt's exact line
        assert json.loads((d / "metadata.jsonl").read_text()) == json.loads(line)  # what GenEval's json.load reads
        assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
        assert Image.open(d / "samples" / "0002.png").getpixel((0, 0)) == (20, 0, 0)
        assert (d / "grid.png").is_file()
    assert json.loads((out / MARKER).read_text())["format"] == "cm3leon-geneval"


def test_layout_replaces_its_own_folder_and_refuses_a_foreign_one(tmp_path):
    prompts = load_metadata("shapes")[:3]
    out = tmp_path / "out"
    generate_layout(Painter(_blank), prompts, out, samples=2)
    generate_layout(Painter(_blank), prompts[:1], out, samples=1)  # a rerun replaces what it wrote
    assert sorted(p.name for p in out.iterdir()) == ["00000", MARKER]
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == ["0000.png"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(NotOwnedError):
        generate_layout(Painter(_blank), prompts, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(p.name for p in foreign.iterdir()) == [
        "notes.txt"]


# ---- scoring ----------------------------------------------------------------------------------
def test_relations_follow_genevals_geometry():
    a, b = (0, 10, 10, 20), (20, 10, 30, 20)  # a left of b, same row
    assert relations(a, b) == {"left of"} and relations(b, a) == {"right of"}
    top, bottom = (10, 0, 20, 10), (10, 20, 20, 30)
    assert relations(top, bottom) == {"above"} and relations(bottom, top) == {"below"}
    assert relations((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # diagonal: both
    assert relations((0, 0, 10, 10), (1, 0, 11, 10)) == set()  # within 0.1 x the summed sides: no relation


def test_true_scenes_score_100_percent_and_blank_canvases_0(tmp_path):
    prompts = load_metadata("shapes")
    scores = run_geneval(Painter(lambda p, k: reference_image(p, seed=k)), prompts, tmp_path / "true", samples=2)
    assert set(scores.tasks) == set(TAGS) and scores.prompts == len(prompts) and scores.images == 2 * len(prompts)
    bad = [r for r in map(json.loads, (tmp_path / "true" / RESULTS).read_text().splitlines()) if not r["correct"]]
    assert not bad, bad[:3]
    assert all(scores.accuracy(t) == 1.0 for t in TAGS) and scores.overall == 1.0
    blank = run_geneval(Painter(_blank), prompts, tmp_path / "blank", samples=1)
    assert all(blank.accuracy(t) == 0.0 for t in TAGS) and blank.overall == 0.0
    rows = [json.loads(x) for x in (tmp_path / "blank" / RESULTS).read_text().splitlines()]
    assert len(rows) == len(prompts) and {"filename", "tag", "prompt", "correct", "reason", "metadata"} <= set(rows[0])
    assert rows[0]["filename"] == "00000/samples/0000.png" and rows[0]["reason"] == "expected circle>=1, found 0"
    marker = json.loads((tmp_path / "blank" / MARKER).read_text())
    assert marker["samples"] == 1 and marker["scores"]["overall"] == 0.0


def test_a_swapped_position_scene_fails_position_only():
    for p in [p for p in load_metadata("shapes") if p.tag == "position"][:8]:
        specs = parse_caption(p.prompt)
        assert score_image(render(reference_scene(specs)), p.meta)[0], p.prompt
        swapped = [dataclasses.replace(specs[0], position=specs[1].position),
                   dataclasses.replace(specs[1], position=specs[0].position)]
        ok, reason, objects = score_image(render(reference_scene(swapped)), p.meta)
        rel = p.meta["include"][1]["position"][0]
        assert not ok and reason.startswith(f"expected {p.meta['include'][1]['class']} {rel} target, found"), reason
        assert sum(len(v) for v in objects.values()) == 2  # both objects were found: only the relation is wrong


def test_colors_counts_and_excludes_follow_genevals_rules():
    meta = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                             {"class": "square", "count": 1, "color": "blue"}]}
    assert score_image(reference_image("a red circle and a blue square"), meta)[0]
    ok, reason, _ = score_image(reference_image("a blue circle and a red square"), meta)  # colors bound wrongly
    assert not ok and "expected red circle>=1, found 0 red; and 1 blue" in reason
    three = {"tag": "counting", "include": [{"class": "triangle", "count": 3}],
             "exclude": [{"class": "triangle", "count": 4}]}
    assert score_image(reference_image("three green triangles"), three)[0]
    ok, reason, _ = score_image(reference_image("four green triangles"), three)
    assert not ok and reason == "expected triangle<4, found 4"
    ok, reason, _ = score_image(reference_image("two green triangles"), three)
    assert not ok and reason == "expected triangle>=3, found 2"


def test_blobs_that_fit_no_shape_are_not_objects():
    """GenEval drops detections under 0.3 confidence; here the template fit is the confidence."""
    a = np.full((32, 32, 3), 255, np.uint8)
    a[4:28, 4:10] = a[22:28, 4:28] = (220, 20, 30)  # a red L: the detector's best template is a poor triangle
    meta = {"tag": "single_object", "include": [{"class": "triangle", "count": 1}]}
    ok, reason, objects = score_image(Image.fromarray(a), meta)
    assert not ok and objects == {} and reason == "expected triangle>=1, found 0"
    assert score_image(Image.fromarray(a), meta, min_fit=0.0)[0]


def test_genevals_own_classes_are_written_but_not_scored(tmp_path):
    src = tmp_path / "coco.jsonl"
    src.write_text("\n".join([load_metadata("shapes")[0].line, *COCO_LINES]) + "\n")
    assert unscorable(json.loads(COCO_LINES[0])) == ["unknown class 'bench'", "unknown class 'cat'"]
    scores = run_geneval(Painter(lambda p, k: reference_image("a red circle")), src, tmp_path / "out", samples=1)
    assert (tmp_path / "out" / "00002" / "samples" / "0000.png").is_file()  # generated for the official scorer
    assert scores.prompts == 1 and len(scores.unscored) == 2 and scores.tasks == {"single_object": (1, 1)}
    assert scores.unknown() == {"classes": {"bench": 1, "cat": 1}, "colors": {"pink": 1}, "relations": {}}
    table = scores.table()
    assert "not scored: 2 prompts" in table and "bench (1)" in table and "pink (1)" in table
    assert "mean of the 1 task accuracies present" in table


def test_score_folder_reads_another_tools_folder(tmp_path):
    """GenEval's reference generator names samples with five digits; any ``\\d+.png`` is scored."""
    d = tmp_path / "00000"
    (d / "samples").mkdir(parents=True)
    meta = {"tag": "single_object", "include": [{"class": "diamond", "count": 1}], "prompt": "a photo of a diamond"}
    (d / "metadata.jsonl").write_text(json.dumps(meta))
    reference_image("a large orange diamond", size=64).save(d / "samples" / "00000.png")
    Image.new("RGB", (64, 48), "white").save(d / "samples" / "00001.png")
    (d / "samples" / "notes.txt").write_text("ignored")
    scores = score_folder(tmp_path, tmp_path / "r.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False] and "square image" in rows[1]["reason"]
    assert scores.tasks == {"single_object": (1, 2)} and scores.prompts_any_correct == 1


# ---- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("geneval") / "model", resolution=16)


def test_cli_writes_the_layout_and_prints_the_six_rows(tiny_model, tmp_path, capsys):
    shipped = load_metadata("shapes")
    first = [next(p for p in shipped if p.tag == t) for t in TAGS]
    src = tmp_path / "meta.jsonl"
    src.write_text("".join(p.line + "\n" for p in first) + COCO_LINES[0] + "\n")
    out = tmp_path / "geneval"
    rc = main(["eval", "--model", str(tiny_model), "--geneval-prompts", str(src), "--out", str(out),
               "--samples", "2", "--json", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for t in TAGS:
        assert re.search(rf"^{t}\s+\d\.\d{{3}}\s+\d+ / 2$", printed, re.M), (t, printed)
    assert re.search(r"^overall\s+\d\.\d{3}\s+\(mean of the six task accuracies\)$", printed, re.M), printed
    assert "not scored: 1 prompt the" in printed and "bench (1)" in printed
    for i in range(7):
        d = out / f"{i:05d}"
        assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert Image.open(d / "samples" / "0000.png").size == (16, 16)
    assert (out / "00006" / "metadata.jsonl").read_text() == COCO_LINES[0] + "\n"
    assert len((out / RESULTS).read_text().splitlines()) == 12
    assert set(json.loads((tmp_path / "s.json").read_text())["tasks"]) == set(TAGS)


def test_cli_geneval_flags_are_checked(tiny_model, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_model)]
    assert main([*base, "--geneval-prompts", "shapes"]) == 1
    assert "needs --out" in capsys.readouterr().err
    assert main([*base, "--geneval-prompts", "shapes", "--out", str(tmp_path / "o"), "--task", "t2i"]) == 1
    assert "--task belong to the Shapes harness" in capsys.readouterr().err
    assert main(base) == 1
    assert "give --data" in capsys.readouterr().err
    assert main([*base, "--geneval-prompts", "shapes", "--out", str(tiny_model / "geneval")]) == 1
    assert "inside the input" in capsys.readouterr().err


def test_cli_shapes_alias_with_n(tiny_model, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["eval", "--model", str(tiny_model), "--geneval-prompts", "shapes", "--out", str(out), "--n", "2",
                 "--samples", "1"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001"]
    assert (out / "00001" / "metadata.jsonl").read_text() == load_metadata("shapes")[1].line + "\n"
    assert "single_object" in capsys.readouterr().out


def test_prompt_records_are_plain_values():
    p = load_metadata("shapes")[0]
    assert isinstance(p, GenevalPrompt) and p.index == 0 and p.prompt == "a red circle" and p.tag == "single_object"
