"""The `zoom` preset: V*-style scenes where a crop decides the answer.

A large plain canvas (1344-2048 px) holds a few small shapes (36-52 px) far apart, each in its own colour. A
question names its target by something that survives the downscale to the model's input (its colour, or where
it is: "the object in the top left") and asks for something that does not (its shape):

    What shape is the red object?                                      (open: answers ["star"])
    What shape is the object in the top left?
    (A) circle
    (B) star
    (C) square
    (D) cross
    Answer with the option's letter from the given choices directly.   (multiple choice: answers ["B", "star"])

At the demo model's input (at most 336 x 336 pixels) a 40-px shape on a 1344-px canvas is 10 px wide, under one
14-px patch, and on a 2048-px canvas 6-8 px: its colour survives, its shape does not (`bench/world_legibility.py
--presets zoom` measures it). A crop of side ``crop_side`` (336, the oracle crop's and ViCrop's smallest
window) shows it at full size. The multiple-choice text follows V* Bench's published question files
(``"...\\n(A) ...\\n(B) ...\\nAnswer with the option's letter from the given choices directly."``); its rows carry
``options`` and ``scoring: "choice"`` (`foveate.eval.metrics.choice_match` accepts the letter or the option).

Ground truth guarantees, checked at generation and by tests:

- every target's description is unique: colours are distinct within a scene; a position phrase is used only
  when the target is the one object whose centre lies in that cell of the 3 x 3 grid (for an edge phrase such
  as "at the top", in that whole row or column, as people read it: `fits_position`), at least
  ``boundary_margin`` of the canvas away from the cell's edges (the target never sits on a boundary);
- the crop around a target holds nothing else at all: the square window of side ``max(2 x the object's side,
  crop_side)`` about its centre, shifted inside the canvas (the oracle crop's rule, `agents/oracle_crop.py`),
  intersects no other object's box, and object centres are at least ``min_center_distance`` apart.

Sizes are absolute pixels (not scaled with the canvas as the other presets' are): the target must stay legible
in a crop of fixed side, whatever the canvas.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from foveate.world.describe import describe_scene
from foveate.world.scenes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Scene,
    SceneConfig,
    WorldObject,
    as_random,
    compute_relations,
    position_phrase,
)

__all__ = [
    "MC_INSTRUCTION",
    "ZoomConfig",
    "crop_window",
    "fits_position",
    "format_choices",
    "generate_zoom_scene",
    "position_cell",
    "zoom_questions",
]

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGH"
_SHAPE_SYNONYMS = {"cross": ["plus"], "diamond": ["rhombus"], "circle": ["disc"]}  # as in world.questions
_MIN_COLOR_DISTANCE_TO_BG = 80.0


@dataclass(frozen=True)
class ZoomConfig:
    """What makes a zoom scene and its questions (canvas, colours and backgrounds come from `SceneConfig`)."""

    side: tuple[int, int] = (36, 52)  # inclusive object side range, absolute pixels
    crop_side: int = 336  # the window the "nothing else in the crop" guarantee is checked for (model input side)
    min_center_distance: int = 250  # pixels between any two object centres
    boundary_margin: float = 0.06  # position references need the centre this far (fraction) from grid lines
    multiple_choice_prob: float = 0.5  # share of questions asked V*-style with lettered options
    n_options: int = 4  # options per multiple-choice question (the answer and n-1 other shapes)
    reference_weights: tuple[tuple[str, float], ...] = (("color", 0.5), ("position", 0.5))
    max_placement_tries: int = 400  # rejection-sampling attempts per object before it is dropped


def _fit(centre: float, side: float, limit: float) -> tuple[float, float]:
    """An interval of length ``side`` about ``centre`` shifted inside ``[0, limit]`` (clamped if longer)."""
    if side >= limit:
        return 0.0, float(limit)
    low = min(max(centre - side / 2, 0.0), limit - side)
    return low, low + side


def crop_window(box: list[int], width: int, height: int, crop_side: int) -> tuple[float, float, float, float]:
    """The oracle crop's window around ``box``: side ``max(2 x long side, crop_side)``, shifted inside the canvas."""
    side = max(2 * max(box[2] - box[0], box[3] - box[1]), crop_side)
    x1, x2 = _fit((box[0] + box[2]) / 2, side, width)
    y1, y2 = _fit((box[1] + box[3]) / 2, side, height)
    return x1, y1, x2, y2


def _intersects(a: tuple[float, ...] | list[int], b: tuple[float, ...] | list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def position_cell(box: list[int], width: int, height: int, margin: float) -> tuple[int, int] | None:
    """(row, col) of the box centre on the 3 x 3 grid, or None when it lies within ``margin`` of a grid line."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    cells = []
    for v in (cx, cy):
        index = min(2, int(v * 3))
        if any(abs(v - line) < margin for line in (1 / 3, 2 / 3)):
            return None
        cells.append(index)
    return cells[1], cells[0]


def _usable_colors(background: str) -> list[str]:
    bg = BACKGROUNDS[background]
    return [name for name, rgb in COLORS.items() if math.dist(rgb, bg) >= _MIN_COLOR_DISTANCE_TO_BG]


def _place(r: random.Random, side: int, width: int, height: int, placed: list[list[int]], cfg: ZoomConfig):
    """A box for a new object whose crop holds no placed object and lies in no placed object's crop."""
    margin = 8
    for _ in range(cfg.max_placement_tries):
        x1, y1 = r.randint(margin, width - margin - side), r.randint(margin, height - margin - side)
        box = [x1, y1, x1 + side, y1 + side]
        centre = (x1 + side / 2, y1 + side / 2)
        window = crop_window(box, width, height, cfg.crop_side)
        ok = all(
            math.dist(centre, ((o[0] + o[2]) / 2, (o[1] + o[3]) / 2)) >= cfg.min_center_distance
            and not _intersects(window, o)
            and not _intersects(crop_window(o, width, height, cfg.crop_side), box)
            for o in placed
        )
        if ok:
            return box
    return None


def generate_zoom_scene(
    rng: random.Random | int, scene_cfg: SceneConfig, cfg: ZoomConfig, scene_id: str = "scene"
) -> Scene:
    """A plain canvas with `scene_cfg.n_objects` small shapes, distinct colours, each alone in its crop."""
    r = as_random(rng)
    width, height = r.choice(scene_cfg.canvas_sizes)
    dark = r.random() < scene_cfg.dark_background_prob
    background = r.choice([n for n, rgb in BACKGROUNDS.items() if (sum(rgb) < 384) == dark])
    colors = _usable_colors(background)
    n = min(r.randint(*scene_cfg.n_objects), len(colors))
    picked = r.sample(colors, n)
    objects: list[WorldObject] = []
    for color in picked:
        side = r.randint(*cfg.side)
        box = _place(r, side, width, height, [o.box for o in objects], cfg)
        if box is None:
            continue
        shape = r.choices(SHAPES, weights=scene_cfg.shape_weights)[0]
        objects.append(WorldObject(id="", shape=shape, color=color, size_class="tiny", box=box))
    objects.sort(key=lambda o: (o.box[1] + o.box[3], o.box[0] + o.box[2]))
    for i, obj in enumerate(objects):
        obj.id = f"o{i}"
    short = min(width, height)
    scene = Scene(
        id=scene_id,
        width=width,
        height=height,
        background=background,
        clutter="none",
        objects=objects,
        relations=compute_relations(objects, max(2, round(scene_cfg.relation_margin_frac * short))),
        clutter_seed=r.getrandbits(32),
    )
    scene.description = describe_scene(scene)
    return scene


def fits_position(cell: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether an object in grid cell ``other`` also fits the position phrase of ``cell``.

    A corner ("in the top left") or the centre names one cell; an edge phrase ("at the top", "on the left") is
    read by people as the whole row or column, so an object in a corner of that side fits it too.
    """
    row, col = cell
    if row == 1 and col != 1:  # on the left / on the right
        return other[1] == col
    if col == 1 and row != 1:  # at the top / at the bottom
        return other[0] == row
    return other == cell


def _references(scene: Scene, obj: WorldObject, cfg: ZoomConfig) -> dict[str, str]:
    """The unique descriptions of ``obj`` that survive the downscale: {"color": ..., "position": ...}."""
    refs = {}
    if sum(o.color == obj.color for o in scene.objects) == 1:
        refs["color"] = f"the {obj.color} object"
    cell = position_cell(obj.box, scene.width, scene.height, cfg.boundary_margin)
    if cell is not None:
        cells = [position_cell(o.box, scene.width, scene.height, 0.0) for o in scene.objects]
        if [o for o, c in zip(scene.objects, cells, strict=True) if fits_position(cell, c)] == [obj]:
            refs["position"] = "the object " + position_phrase(obj.box, scene.width, scene.height)
    return refs


def format_choices(question: str, options: list[str]) -> str:
    """V* Bench's multiple-choice text: the question, one ``(A) option`` line each, then the instruction."""
    lines = [question] + [f"({LETTERS[i]}) {option}" for i, option in enumerate(options)]
    return "\n".join([*lines, MC_INSTRUCTION])


def _question(scene: Scene, obj: WorldObject, kind: str, phrase: str, r: random.Random, cfg: ZoomConfig):
    stem = f"What shape is {phrase}?"
    row: dict[str, Any] = {
        "family": "attribute",
        "subtype": "shape",
        "split": "small-detail",
        "clutter": scene.clutter_split,
        "boxes": [list(obj.box)],
        "target_size": obj.size_class,
        "object_ids": [obj.id],
        "reference": kind,
        "referents": [phrase],  # what a look-first answer restates (the MC text's first line is not a template)
    }
    if r.random() < cfg.multiple_choice_prob:
        others = r.sample([s for s in SHAPES if s != obj.shape], cfg.n_options - 1)
        options = [*others]
        index = r.randrange(cfg.n_options)
        options.insert(index, obj.shape)
        question = format_choices(stem, options)
        answers = [LETTERS[index], obj.shape]
        row.update(family="choice", options=options, scoring="choice")
    else:
        question, answers = stem, [obj.shape, *_SHAPE_SYNONYMS.get(obj.shape, [])]
    return {"question": question, "answers": answers, **row}


def zoom_questions(scene: Scene, rng: random.Random, k: int, cfg: ZoomConfig) -> list[dict[str, Any]]:
    """Up to ``k`` shape questions about different objects, each referenced by colour or position."""
    names = [name for name, _ in cfg.reference_weights]
    weights = [w for _, w in cfg.reference_weights]
    targets = list(scene.objects)
    rng.shuffle(targets)
    out = []
    for obj in targets:
        if len(out) >= k:
            break
        refs = _references(scene, obj, cfg)
        kinds = [(n, w) for n, w in zip(names, weights, strict=True) if n in refs]
        if not kinds:
            continue
        kind = rng.choices([n for n, _ in kinds], weights=[w for _, w in kinds])[0]
        out.append(_question(scene, obj, kind, refs[kind], rng, cfg))
    return out
