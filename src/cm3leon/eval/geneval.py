"""GenEval-style evaluation (Ghosh et al. 2023, github.com/djghosh13/geneval), scored by the Shapes judge.

GenEval scores text-to-image alignment on six tasks (:data:`TAGS`): ``single_object``,
``two_object``, ``counting``, ``colors``, ``position`` and ``color_attr``. Its prompts file,
``evaluation_metadata.jsonl``, holds one JSON object per line::

    {"tag": "position", "include": [{"class": "square", "count": 1},
     {"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "..."}

``include`` clauses must all hold (the class found at least ``count`` times; its ``color``
and its ``position`` relative to an earlier clause's objects where given), ``exclude``
clauses must not (``count`` or more of the class fails the image).

This module

- ships :data:`SHAPES_PROMPTS`, a prompts file in that format for the Shapes world
  (:func:`shapes_prompts` writes it): classes are the Shapes shapes, colors the Shapes
  colors, prompts are Shapes captions (what the models are trained on);
- reads any such file (:func:`load_metadata`; classes, colors and relations the Shapes
  judge does not know are reported, and those prompts are generated but not scored);
- generates images with a pipeline into GenEval's folder layout (:func:`generate_layout`)::

      OUT/00000/metadata.jsonl      the prompt's line of the metadata file
      OUT/00000/samples/0000.png    sample 0, 1, ... (4-digit names)
      OUT/00000/grid.png            the samples side by side (optional in GenEval)

  so the official detector-based scorer (``evaluation/evaluate_images.py OUT``) runs on
  it unchanged;
- scores a folder in that layout with the Shapes judge by GenEval's rules
  (:func:`score_folder`), writing ``results.jsonl`` (one line per image: ``filename``,
  ``tag``, ``prompt``, ``correct``, ``reason``, ``metadata``, ``details``, as GenEval's) and
  returning the per-task table (:class:`GenevalScores`; overall = mean of the task
  accuracies, as GenEval's ``summary_scores.py``).

Scoring rules (GenEval's ``evaluate``, with the Shapes judge's detections for the detector's):
detections whose template fit (the judge's confidence) exceeds :data:`MIN_FIT` (GenEval's
confidence threshold, 0.3) are grouped by shape (the class) and ordered most confident
first; a clause takes the first ``count`` of its class and fails if there are fewer; its
``color`` must be the detected color of all of those; its ``position`` ``[relation, k]``
must hold between each of them and each object matched by clause ``k`` (boxes' centers,
offset shrunk by 0.1 x the summed box sides per axis, relation = the direction whose unit
component exceeds 0.5; y grows downwards); an ``exclude`` clause fails when ``count`` or
more of its class are detected.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from cm3leon.shapes.captions import describe, reading_order
from cm3leon.shapes.judge import DetectedObject, detect_objects
from cm3leon.shapes.world import COLORS, SHAPES, SIZES, ObjectSpec
from cm3leon.workspace import WorkspaceLock, check_replaceable

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's default: offsets shrink by this times the summed box sides
# GenEval keeps detections above 0.3 confidence; the template fit plays the detector's confidence. Renders,
# blurred or JPEG-compressed, fit at 0.85 or more; blobs that match no shape fit near 0.
MIN_FIT = 0.3
SHAPES_PROMPTS_NAME = "geneval_prompts.jsonl"
MARKER = "cm3leon_geneval.json"  # what generate_layout wrote into OUT (its owner marker)
RESULTS = "results.jsonl"
FORMAT = "cm3leon-geneval"
_SAMPLE_RE = re.compile(r"\d+\.png")
_LAYOUT_RE = re.compile(r"\d{5}/(metadata\.jsonl|grid\.png|samples/\d{4}\.png)|" + re.escape(RESULTS) + "|"
                        + re.escape(MARKER))

# The grid cells of the Shapes prompts of each relation, (object, target): the object and its
# target share a row (left of / right of) or a column (above / below) at opposite ends.
_RELATION_CELLS: dict[str, tuple[tuple[str, str], ...]] = {
    "left of": (("top left", "top right"), ("left", "right"), ("bottom left", "bottom right")),
    "right of": (("top right", "top left"), ("right", "left"), ("bottom right", "bottom left")),
    "above": (("top left", "bottom left"), ("top", "bottom"), ("top right", "bottom right")),
    "below": (("bottom left", "top left"), ("bottom", "top"), ("bottom right", "top right")),
}


def shapes_prompts_path() -> Path:
    """The shipped Shapes prompts file (``cm3leon/shapes/geneval_prompts.jsonl``)."""
    return Path(str(resources.files("cm3leon.shapes").joinpath(SHAPES_PROMPTS_NAME)))


# ---- the Shapes prompts ------------------------------------------------------------------------
def shapes_prompts(seed: int = 0) -> list[dict[str, Any]]:
    """GenEval metadata for the Shapes world: 152 prompts, the six tasks, deterministic in ``seed``.

    Prompts are Shapes captions, which always name colors: ``"a red circle"`` (single_object,
    colors: every shape in every color), ``"a red circle and a blue square"`` (two_object,
    color_attr: each ordered pair of distinct shapes twice, distinct colors), ``"three red
    circles"`` (counting 2-4, the most objects a Shapes scene holds; exactly that many: an
    ``exclude`` of one more) and detailed captions in reading order for position (``"a small
    red circle on the left and a large blue square on the right"``; the two objects at
    opposite ends of one row or column). As in GenEval, only colors and color_attr check the
    colors; position checks the relation, not the named cells or sizes.
    """
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    color_pairs = [(a, b) for a in colors for b in colors if a != b]
    out: list[dict[str, Any]] = []

    def add(tag: str, include: list[dict[str, Any]], prompt: str, exclude: list[dict[str, Any]] | None = None) -> None:
        d: dict[str, Any] = {"tag": tag, "include": include}
        if exclude:
            d["exclude"] = exclude
        d["prompt"] = prompt
        out.append(d)

    for shape in SHAPES:
        for color in colors:
            add("single_object", [{"class": shape, "count": 1}], describe([ObjectSpec(shape, color)]))
    for a, b in pairs:
        for i in rng.choice(len(color_pairs), 2, replace=False):
            ca, cb = color_pairs[i]
            add("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}],
                describe([ObjectSpec(a, ca), ObjectSpec(b, cb)]))
    for shape in SHAPES:
        for n in (2, 3, 4):
            for i in rng.choice(len(colors), 2, replace=False):
                add("counting", [{"class": shape, "count": n}], describe([ObjectSpec(shape, colors[i])] * n),
                    exclude=[{"class": shape, "count": n + 1}])
    for shape in SHAPES:
        for color in colors:
            add("colors", [{"class": shape, "count": 1, "color": color}], describe([ObjectSpec(shape, color)]))
    for rel in RELATIONS:
        for k, i in enumerate(rng.choice(len(pairs), 8, replace=False)):
            a, b = pairs[i]  # a is `rel` b
            ca, cb = color_pairs[int(rng.integers(len(color_pairs)))]
            sa, sb = (SIZES[int(j)] for j in rng.integers(len(SIZES), size=2))
            cell_a, cell_b = _RELATION_CELLS[rel][k % 3]
            specs = reading_order([ObjectSpec(a, ca, sa, cell_a), ObjectSpec(b, cb, sb, cell_b)])
            add("position", [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                describe(specs, detailed=True))
    for a, b in pairs:
        for i in rng.choice(len(color_pairs), 2, replace=False):
            ca, cb = color_pairs[i]
            add("color_attr", [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                describe([ObjectSpec(a, ca), ObjectSpec(b, cb)]))
    return out


def write_prompts(prompts: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write metadata as GenEval's ``create_prompts.py`` does: one ``json.dumps`` line each."""
    path = Path(path)
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


# ---- reading a metadata file -------------------------------------------------------------------
@dataclass(frozen=True)
class GenevalPrompt:
    """One line of a GenEval metadata file: its exact text (``line``, no newline) and parsed ``meta``."""

    index: int
    line: str
    meta: dict[str, Any]

    @property
    def prompt(self) -> str:
        return str(self.meta["prompt"])

    @property
    def tag(self) -> str:
        return str(self.meta.get("tag", ""))


def load_metadata(path: str | Path) -> list[GenevalPrompt]:
    """The prompts of a GenEval ``evaluation_metadata.jsonl`` (``"shapes"``: the shipped Shapes file).

    Blank lines are skipped; a line that is not a JSON object with a string ``prompt`` is an error.
    """
    p = shapes_prompts_path() if str(path) == "shapes" else Path(path)
    out: list[GenevalPrompt] = []
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{p}:{n}: not JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
            raise ValueError(f"{p}:{n}: a GenEval metadata line is a JSON object with a 'prompt' string")
        for key in ("include", "exclude"):
            if not isinstance(meta.get(key, []), list):
                raise ValueError(f"{p}:{n}: {key!r} must be a list of clauses")
        out.append(GenevalPrompt(len(out), raw.rstrip("\r\n"), meta))
    if not out:
        raise ValueError(f"{p} holds no prompts")
    return out


def unscorable(meta: dict[str, Any]) -> list[str]:
    """Why the Shapes judge cannot score this metadata ([] if it can): unknown classes, colors,
    relations or position targets."""
    why: list[str] = []
    include = meta.get("include", [])
    for where, clauses in (("include", include), ("exclude", meta.get("exclude", []))):
        for i, c in enumerate(clauses):
            if not isinstance(c, dict) or not isinstance(c.get("count", 1), int):
                why.append(f"{where}[{i}] is not a clause")
                continue
            if c.get("class") not in SHAPES:
                why.append(f"unknown class {c.get('class')!r}")
            if "color" in c and c["color"] not in COLORS:
                why.append(f"unknown color {c['color']!r}")
            if where == "include" and "position" in c:
                pos = c["position"]
                if not (isinstance(pos, (list, tuple)) and len(pos) == 2):
                    why.append(f"bad position {pos!r}")
                elif pos[0] not in RELATIONS:
                    why.append(f"unknown relation {pos[0]!r}")
                elif not (isinstance(pos[1], int) and 0 <= pos[1] < i):
                    why.append(f"position target {pos[1]!r} is not an earlier clause")
    return why


def unknown_names(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """``("classes" | "colors" | "relations", name)`` for each name in ``meta`` the Shapes judge does not know."""
    out = []
    for c in [*meta.get("include", []), *meta.get("exclude", [])]:
        if not isinstance(c, dict):
            continue
        if c.get("class") not in SHAPES:
            out.append(("classes", str(c.get("class"))))
        if "color" in c and c["color"] not in COLORS:
            out.append(("colors", str(c["color"])))
        pos = c.get("position")
        if isinstance(pos, (list, tuple)) and pos and pos[0] not in RELATIONS:
            out.append(("relations", str(pos[0])))
    return out


# ---- scoring -----------------------------------------------------------------------------------
def relations(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where box A (``[x0, y0, x1, y1]``) lies relative to box B: a subset of :data:`RELATIONS`.

    The center offset A - B shrinks towards 0 by ``threshold`` x (A's side + B's side) on each
    axis; a relation holds when that shrunk offset, divided by the length of the full offset,
    has a component beyond 0.5 in its direction (image y grows downwards, so "above" is -y).
    """
    a = np.asarray(box_a[:4], dtype=float).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    sides = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    shrunk = np.maximum(np.abs(offset) - threshold * sides, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def by_class(detected: Iterable[DetectedObject], min_fit: float = MIN_FIT) -> dict[str, list[DetectedObject]]:
    """Detections with a template fit above ``min_fit``, grouped by shape, each group most
    confident (best fit) first; equal fits keep the detector's order (largest first)."""
    out: dict[str, list[DetectedObject]] = {}
    for d in sorted((d for d in detected if d.fit > min_fit), key=lambda d: -d.fit):
        out.setdefault(d.shape, []).append(d)
    return out


def evaluate(meta: dict[str, Any], objects: dict[str, list[DetectedObject]]) -> tuple[bool, str]:
    """GenEval's verdict for one image: ``(correct, reason)``, the reasons one per line."""
    correct = True
    reasons: list[str] = []
    matched: list[list[DetectedObject] | None] = []
    for req in meta.get("include", []):
        cls, count = req["class"], int(req.get("count", 1))
        found = objects.get(cls, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [o.color for o in found]
                if colors.count(req["color"]) < count:
                    ok = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {cls}>={count}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and ok:
                rel, target = req["position"]
                targets = matched[target]
                if targets is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for o in found:
                        for t in targets:
                            rels = relations(o.box, t.box)
                            if rel not in rels:
                                ok = False
                                reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(rels))} "
                                               "target")
                                break
                        if not ok:
                            break
        correct = correct and ok
        matched.append(found if ok else None)
    for req in meta.get("exclude", []):
        cls, count = req["class"], int(req.get("count", 1))
        if len(objects.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(objects[cls])}")
    return correct, "\n".join(reasons)


def score_image(image: Image.Image, meta: dict[str, Any], min_fit: float = MIN_FIT
                ) -> tuple[bool, str, dict[str, list[DetectedObject]]]:
    """Detect the Shapes objects of ``image`` (fit above ``min_fit``) and judge them against
    ``meta``: ``(correct, reason, objects)``."""
    rgb = image.convert("RGB")
    if rgb.width != rgb.height:
        return False, f"the Shapes judge needs a square image, got {rgb.width}x{rgb.height}", {}
    objects = by_class(detect_objects(rgb), min_fit)
    ok, reason = evaluate(meta, objects)
    return ok, reason, objects


@dataclass
class GenevalScores:
    """Per-task results of a scored folder: ``tasks[tag] = (correct images, images)`` in
    :data:`TAGS` order (other tags after, by first appearance)."""

    tasks: dict[str, tuple[int, int]]
    prompts: int  # prompts scored
    prompts_any_correct: int  # of those, prompts with at least one correct sample
    unscored: list[dict[str, Any]] = field(default_factory=list)  # {"index", "prompt", "why", "meta"}

    def accuracy(self, tag: str) -> float:
        c, n = self.tasks[tag]
        return c / n if n else float("nan")

    @property
    def images(self) -> int:
        return sum(n for _, n in self.tasks.values())

    @property
    def overall(self) -> float:
        """GenEval's overall score: the mean of the task accuracies (of the tasks present)."""
        accs = [self.accuracy(t) for t, (_, n) in self.tasks.items() if n]
        return float(np.mean(accs)) if accs else float("nan")

    def unknown(self) -> dict[str, Counter[str]]:
        """The classes, colors and relations of the unscored prompts that the Shapes judge does
        not know, each with the number of prompts naming it."""
        out: dict[str, Counter[str]] = {"classes": Counter(), "colors": Counter(), "relations": Counter()}
        for u in self.unscored:
            for kind, name in set(unknown_names(u["meta"])):
                out[kind][name] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": {t: {"accuracy": self.accuracy(t), "correct": c, "images": n} for t, (c, n) in self.tasks.items()},
            "overall": self.overall, "prompts": self.prompts, "images": self.images,
            "prompts_any_correct": self.prompts_any_correct, "unscored_prompts": len(self.unscored),
            "unknown": {k: dict(v) for k, v in self.unknown().items() if v},
        }

    def table(self) -> str:
        """The six-task table and the overall score, as text."""
        lines = [f"GenEval (Shapes judge): {self.prompts} prompts, {self.images} images scored"]
        if self.images:
            lines.append(f"% correct images: {sum(c for c, _ in self.tasks.values()) / self.images:.2%}   "
                         f"% correct prompts: {self.prompts_any_correct / max(self.prompts, 1):.2%}")
        lines.append(f"{'task':<16} {'accuracy':>8}  correct / images")
        for t in [*TAGS, *(t for t in self.tasks if t not in TAGS)]:
            if t in self.tasks:
                c, n = self.tasks[t]
                lines.append(f"{t:<16} {self.accuracy(t):8.3f}  {c} / {n}")
            else:
                lines.append(f"{t:<16} {'-':>8}  (no prompts)")
        present = sum(1 for _, n in self.tasks.values() if n)
        note = "mean of the six task accuracies" if present == len(TAGS) and len(self.tasks) == len(TAGS) else \
            f"mean of the {present} task accuracies present"
        lines.append(f"{'overall':<16} {self.overall:8.3f}  ({note})")
        if self.unscored:
            unk = self.unknown()
            said = "; ".join(f"unknown {kind}: " + ", ".join(f"{name} ({n})" for name, n in c.most_common())
                             for kind, c in unk.items() if c)
            k = len(self.unscored)
            lines.append(f"not scored: {k} prompt{'s' if k != 1 else ''} the Shapes judge cannot score"
                         + (f" ({said})" if said else ""))
        return "\n".join(lines)


def _prompt_dirs(folder: Path) -> list[Path]:
    dirs = [d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()]
    return sorted(dirs, key=lambda d: int(d.name))


def score_folder(folder: str | Path, outfile: str | Path | None = None, *, min_fit: float = MIN_FIT) -> GenevalScores:
    """Score every ``<folder>/<digits>/samples/<digits>.png`` against its ``metadata.jsonl`` with the
    Shapes judge (any GenEval-layout folder: ours or another tool's). Writes one JSON line per
    scored image to ``outfile`` (None: no file); ``filename`` is relative to ``folder``."""
    folder = Path(folder)
    tasks: dict[str, list[int]] = {t: [0, 0] for t in TAGS}
    present: set[str] = set()
    prompts = any_ok = 0
    unscored: list[dict[str, Any]] = []
    lines: list[str] = []
    for d in _prompt_dirs(folder):
        text = (d / "metadata.jsonl").read_text(encoding="utf-8")
        meta = json.loads(text)
        why = unscorable(meta)
        if why:
            unscored.append({"index": d.name, "prompt": meta.get("prompt"), "why": why, "meta": meta})
            continue
        samples = d / "samples"
        names = sorted((p.name for p in samples.iterdir() if p.is_file() and _SAMPLE_RE.fullmatch(p.name)),
                       key=lambda s: int(s[:-4])) if samples.is_dir() else []
        if not names:
            continue
        tag = str(meta.get("tag", ""))
        tasks.setdefault(tag, [0, 0])
        present.add(tag)
        prompts += 1
        ok_any = False
        for name in names:
            with Image.open(samples / name) as im:
                ok, reason, objects = score_image(im, meta, min_fit)
            tasks[tag][0] += ok
            tasks[tag][1] += 1
            ok_any = ok_any or ok
            lines.append(json.dumps({
                "filename": f"{d.name}/samples/{name}", "tag": tag, "prompt": meta.get("prompt"),
                "correct": ok, "reason": reason, "metadata": json.dumps(meta),
                "details": json.dumps({c: [[*o.box, o.fit] for o in v] for c, v in objects.items()}),
                "colors": json.dumps({c: [o.color for o in v] for c, v in objects.items()}),
            }))
        any_ok += ok_any
    if outfile is not None:
        Path(outfile).write_text("".join(line + "\n" for line in lines))
    return GenevalScores({t: (c, n) for t, (c, n) in tasks.items() if t in present}, prompts, any_ok, unscored)


# ---- generating the layout ---------------------------------------------------------------------
class ImageGenerator(Protocol):
    """What :func:`generate_layout` needs of a pipeline (:class:`cm3leon.pipeline.CM3Leon`)."""

    def generate_images(self, prompts: Sequence[str], *, n: int | None = None, seed: int = 0,
                        **kw: Any) -> Sequence[Any]: ...


class _LayoutFiles:
    """The relative paths :func:`generate_layout` writes (a :data:`cm3leon.workspace.Owner`'s container)."""

    def __contains__(self, rel: object) -> bool:
        return isinstance(rel, str) and _LAYOUT_RE.fullmatch(rel) is not None


def layout_files(path: Path) -> Container[str] | None:
    """Owner of a GenEval output folder: its files if :data:`MARKER` says :func:`generate_layout` wrote it."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return _LayoutFiles() if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def _grid(images: Sequence[Image.Image], pad: int = 2) -> Image.Image:
    w, h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (len(images) * (w + pad) + pad, h + 2 * pad), "black")
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), (pad + k * (w + pad), pad))
    return grid


def generate_layout(pipe: ImageGenerator, prompts: Sequence[GenevalPrompt], out: str | Path, *,
                    samples: int | None = None, seed: int = 0, batch_size: int = 16, grid: bool = True,
                    metadata_file: str | None = None, **settings: Any) -> int:
    """Generate ``samples`` images per prompt with ``pipe.generate_images`` and write GenEval's layout.

    ``samples`` and every keyword of ``settings`` left None come from the model directory's
    ``generation_config.json`` (``text_to_image``). Prompts are decoded ``batch_size`` at a
    time, each batch with ``seed``: the same seed, prompts and batch size give the same
    images. ``out`` must be absent, empty, or a folder this function wrote (it is cleared
    first); one run at a time holds it. Returns the images per prompt.
    """
    if not prompts:
        raise ValueError("no prompts to generate")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = Path(out)
    settings = {k: v for k, v in settings.items() if v is not None}
    with WorkspaceLock(out):
        check_replaceable(out, layout_files)
        for child in out.iterdir():
            if child.name in (MARKER, RESULTS):
                child.unlink()
            elif child.is_dir() and child.name.isdigit():
                shutil.rmtree(child)
        (out / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1, "metadata_file": metadata_file,
                                              "prompts": len(prompts), "seed": seed, "settings": settings}, indent=2))
        per_prompt = 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            results = pipe.generate_images([p.prompt for p in chunk], n=samples, seed=seed, **settings)
            for p, r in zip(chunk, results):
                d = out / f"{p.index:05d}"
                (d / "samples").mkdir(parents=True)
                (d / "metadata.jsonl").write_text(p.line + "\n", encoding="utf-8")
                for k, im in enumerate(r.images):
                    im.save(d / "samples" / f"{k:04d}.png")
                if grid and r.images:
                    _grid(r.images).save(d / "grid.png")
                per_prompt = len(r.images)
    return per_prompt


def run_geneval(pipe: ImageGenerator, metadata: str | Path | Sequence[GenevalPrompt], out: str | Path, *,
                samples: int | None = None, seed: int = 0, batch_size: int = 16, limit: int | None = None,
                **settings: Any) -> GenevalScores:
    """Generate the GenEval layout for ``metadata`` (a file, ``"shapes"``, or loaded prompts) into
    ``out`` and score it with the Shapes judge; writes ``out/results.jsonl`` and the scores into
    ``out/cm3leon_geneval.json``. ``limit`` keeps the first prompts only."""
    name = None if not isinstance(metadata, (str, Path)) else str(metadata)
    prompts = list(load_metadata(metadata) if isinstance(metadata, (str, Path)) else metadata)[:limit]
    n = generate_layout(pipe, prompts, out, samples=samples, seed=seed, batch_size=batch_size,
                        metadata_file=name, **settings)
    out = Path(out)
    scores = score_folder(out, out / RESULTS)
    marker = json.loads((out / MARKER).read_text())
    marker.update(samples=n, scores=scores.to_dict())
    (out / MARKER).write_text(json.dumps(marker, indent=2, default=float))
    return scores
