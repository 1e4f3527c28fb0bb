"""Question/answer pairs, a reasoning item and an edit pair of a Shapes scene, with exact answers."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from cm3leon.shapes.captions import (
    NUMBER_WORDS,
    article,
    describe_object,
    join_phrases,
    plural,
    position_phrase,
    refer,
)
from cm3leon.shapes.world import (
    COLORS,
    CORNERS,
    SHAPES,
    ObjectSpec,
    Scene,
    ShapesConfig,
    choose,
    grid_position,
    place_object,
    scene_is_valid,
)

EDIT_KINDS: tuple[str, ...] = ("recolor", "reshape", "move", "add", "remove")


def make_vqa(scene: Scene, rng: np.random.Generator, k: int = 6) -> list[dict[str, str]]:
    """Up to ``k`` question/answer pairs of types count, color, shape, size, position,
    relative and yes/no; the object count question is always included."""
    objs, S = scene.objects, scene.size
    n = len(objs)
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    cand: list[dict[str, str]] = []
    for shape in sorted(shapes):
        cand.append({"question": f"how many {plural(shape)} are there?", "answer": str(shapes[shape]), "type": "count"})
    for z, o in enumerate(objs):
        if shapes[o.shape] == 1:
            cand.append({"question": f"what color is the {o.shape}?", "answer": o.color, "type": "color"})
        if colors[o.color] == 1:
            cand.append({"question": f"what shape is the {o.color} object?", "answer": o.shape, "type": "shape"})
        ref = refer(scene, z)
        if ref and "position" not in ref:
            cand.append({"question": f"where is {ref}?", "answer": scene.position(o), "type": "position"})
            cand.append({"question": f"is {ref} small or large?", "answer": o.size, "type": "size"})
    refs = [refer(scene, z) for z in range(n)]
    for a in range(n):
        for b in range(n):
            if a == b or not refs[a] or not refs[b]:
                continue
            dx = objs[b].center[0] - objs[a].center[0]
            dy = objs[b].center[1] - objs[a].center[1]
            if abs(dx) >= S / 8:
                cand.append({"question": f"is {refs[a]} to the left of {refs[b]}?",
                             "answer": "yes" if dx > 0 else "no", "type": "relative"})
            if abs(dy) >= S / 8:
                cand.append({"question": f"is {refs[a]} above {refs[b]}?",
                             "answer": "yes" if dy > 0 else "no", "type": "relative"})
    present = {(o.color, o.shape) for o in objs}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    c, s = choose(rng, sorted(present))
    cand.append({"question": f"is there {article(c)} {c} {s}?", "answer": "yes", "type": "yes/no"})
    c, s = choose(rng, absent)
    cand.append({"question": f"is there {article(c)} {c} {s}?", "answer": "no", "type": "yes/no"})
    count_q = {"question": "how many objects are there?", "answer": str(n), "type": "count"}
    picked = rng.choice(len(cand), size=min(k - 1, len(cand)), replace=False)
    return [count_q] + [cand[i] for i in sorted(int(j) for j in picked)]


def make_reasoning(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """A multiple-choice question with context, options, explanation and answer."""
    objs, n = scene.objects, len(scene.objects)
    refs = [refer(scene, z) for z in range(n)]
    items: list[dict[str, Any]] = []
    named = [z for z in range(n) if refs[z]]
    corner_hint = "Circles have no corners, triangles have three corners, and squares and diamonds have four."
    if len(named) >= 2:
        ys = sorted(named, key=lambda z: objs[z].center[1])
        if objs[ys[1]].center[1] - objs[ys[0]].center[1] >= scene.size / 8:
            top, other = ys[0], ys[1]
            items.append({
                "question": "Which object is highest in the image?", "context": "",
                "options": [refs[z] for z in named],
                "explanation": f"{refs[top].capitalize()} is {position_phrase(scene.position(objs[top]))}, "
                               f"above {refs[other]} {position_phrase(scene.position(objs[other]))}.",
                "answer": refs[top],
            })
        corners = sorted(named, key=lambda z: -CORNERS[objs[z].shape])
        if CORNERS[objs[corners[0]].shape] > CORNERS[objs[corners[1]].shape]:
            best = corners[0]
            items.append({
                "question": "Which object has the most corners?", "context": corner_hint,
                "options": [refs[z] for z in named],
                "explanation": f"{refs[best].capitalize()} is a {objs[best].shape} with "
                               f"{CORNERS[objs[best].shape]} corners, more than any other object.",
                "answer": refs[best],
            })
    total = sum(CORNERS[o.shape] for o in objs)
    shapes_list = join_phrases([f"{article(o.shape)} {o.shape}" for o in objs])
    opts = sorted({total, max(0, total - 1), total + 1, total + 3})
    items.append({
        "question": "How many corners do all the objects have together?", "context": corner_hint,
        "options": [str(v) for v in opts],
        "explanation": f"The image shows {shapes_list}; "
                       + " + ".join(str(CORNERS[o.shape]) for o in objs) + f" = {total}.",
        "answer": str(total),
    })
    if n >= 2:
        items.append({
            "question": "If one object were removed, how many objects would remain?", "context": "",
            "options": [str(v) for v in range(max(0, n - 2), n + 2)],
            "explanation": (f"There are {NUMBER_WORDS[n]} objects; removing one leaves "
                            f"{NUMBER_WORDS.get(n - 1, str(n - 1))}.") if n - 1 > 0 else "",
            "answer": str(n - 1),
        })
    return items[int(rng.integers(len(items)))]


def _move_target(rng: np.random.Generator, cfg: ShapesConfig, scene: Scene, z: int) -> Scene | None:
    old = scene.objects[z]
    old_pos = scene.position(old)
    for _ in range(40):
        x0, y0 = cfg.corner(rng, old.d)
        o = dataclasses.replace(old, x0=x0, y0=y0)
        if grid_position(o.center, cfg.size) == old_pos:
            continue
        new = Scene(scene.size, scene.objects[:z] + (o,) + scene.objects[z + 1:])
        if scene_is_valid(new, cfg):
            return new
    return None


def make_edit(scene: Scene, rng: np.random.Generator, cfg: ShapesConfig) -> tuple[dict[str, Any], Scene]:
    """A random feasible edit: ``({"kind", "instruction", "target"}, edited scene)``.

    ``target`` is the z of the edited object in the source scene (None for ``add``); the
    edited scene keeps every other object's geometry and z order.
    """
    n = len(scene.objects)
    for kind in rng.permutation(EDIT_KINDS):
        kind = str(kind)
        if kind == "add":
            if n >= cfg.max_objects:
                continue
            o = place_object(rng, cfg, scene.objects)
            if o is None:
                continue
            spec = ObjectSpec.from_object(o, scene.size)
            return ({"kind": kind, "instruction": f"add {describe_object(spec)}", "target": None},
                    Scene(scene.size, (*scene.objects, o)))
        zs = [z for z in rng.permutation(n) if refer(scene, int(z))]
        for z in (int(v) for v in zs):
            ref, o = refer(scene, z), scene.objects[z]
            rest = scene.objects[:z], scene.objects[z + 1:]
            if kind == "remove":
                if n <= cfg.min_objects:
                    break
                new = Scene(scene.size, rest[0] + rest[1])
                if scene_is_valid(new, cfg):
                    return {"kind": kind, "instruction": f"remove {ref}", "target": z}, new
            elif kind == "recolor":
                for c in rng.permutation(list(COLORS)):
                    if c == o.color:
                        continue
                    new = Scene(scene.size, rest[0] + (dataclasses.replace(o, color=str(c)),) + rest[1])
                    if scene_is_valid(new, cfg):
                        return {"kind": kind, "instruction": f"make {ref} {c}", "target": z}, new
            elif kind == "reshape":
                for s in rng.permutation(list(SHAPES)):
                    if s == o.shape:
                        continue
                    new = Scene(scene.size, rest[0] + (dataclasses.replace(o, shape=str(s)),) + rest[1])
                    if scene_is_valid(new, cfg):
                        return {"kind": kind, "instruction": f"turn {ref} into {article(str(s))} {s}", "target": z}, new
            elif kind == "move":
                new = _move_target(rng, cfg, scene, z)
                if new is not None:
                    pos = new.position(new.objects[z])
                    phrase = position_phrase(pos).replace("at the", "to the").replace("on the", "to the") \
                        .replace("in the", "to the")
                    return {"kind": kind, "instruction": f"move {ref} {phrase}", "target": z}, new
    raise RuntimeError("no feasible edit for scene")  # unreachable: recolor always works for 1 object

