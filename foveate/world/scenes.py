"""Seeded synthetic scenes with exact ground truth: shapes, colours, sizes, text labels, boxes and relations.

The world exists to make "zooming in" measurable. Object sizes are fixed fractions of the canvas chosen against
the demo model's input resolution (a 672 px scene is seen at about 224 px, a 3x downscale):

============  ===========  =================  =====================================================
size class    px at 672    px at 224 input    what survives the downscale
============  ===========  =================  =====================================================
tiny          12-20        4-7                a coloured dot; shape and adjacent text are gone
small         28-44        9-15               colour and rough shape; adjacent text is gone
medium        80-130       27-43              everything, including the label drawn on it
large         170-260      57-87              everything
============  ===========  =================  =====================================================

Sizes scale with the canvas short side (``short / 672``) times `SceneConfig.object_scale`, so a 2048 px scene
with ``object_scale=0.6`` has tiny objects that are relatively smaller than at 672 (the V* regime).

Coordinates follow the project convention (absolute pixels, ``x1 < x2``, ``y1 < y2``, continuous edges): an
object of side ``s`` at ``x1`` covers pixel columns ``x1 .. x1 + s - 1`` and has ``x2 = x1 + s``, so
``image.crop(box)`` returns exactly the object. Everything needed to render a scene lives in the `Scene`
(including the clutter seed), so `render_scene` is a pure function and PNGs are reproducible byte for byte.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from foveate.world.describe import describe_scene, position_phrase  # noqa: F401 (position_phrase: part of this API)

__all__ = [
    "BACKGROUNDS",
    "CLUTTER_KINDS",
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "SIZE_CLASSES",
    "Scene",
    "SceneConfig",
    "WorldObject",
    "as_random",
    "compute_relations",
    "generate_scene",
    "label_font",
    "object_mask",
    "position_phrase",
    "render_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
# Pairwise RGB distance >= ~95 so a colour name is never a judgement call; black/white are dropped per scene when
# they would vanish into the background (see `_usable_colors`).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "green": (40, 160, 60),
    "blue": (35, 80, 220),
    "yellow": (240, 220, 30),
    "purple": (135, 55, 185),
    "orange": (245, 125, 20),
    "cyan": (30, 200, 215),
    "pink": (245, 140, 200),
    "brown": (130, 80, 35),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Backgrounds are unsaturated so no object colour can be mistaken for them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light gray": (222, 222, 218),
    "beige": (236, 228, 208),
    "pale blue": (212, 224, 236),
    "dark gray": (46, 46, 50),
    "slate": (38, 50, 62),
}
CLUTTER_KINDS: tuple[str, ...] = ("noise", "stripes", "lines")
SIZE_CLASSES: tuple[str, ...] = ("tiny", "small", "medium", "large")
# Side ranges in pixels on the 672 px reference canvas (scaled by short side / 672 * object_scale).
SIZE_RANGES_672: dict[str, tuple[int, int]] = {
    "tiny": (12, 20),
    "small": (28, 44),
    "medium": (80, 130),
    "large": (170, 260),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# Label characters: no I/O/Q/0/1/8, which are confusable with each other or with B even at full resolution.
LABEL_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ2345679"
# Where a label fits INSIDE a shape: (width, height, centre y) of the allowed ink rectangle as fractions of the
# side. The star's interior is too small for legible text, so star labels go next to it.
_LABEL_INTERIOR: dict[str, tuple[float, float, float]] = {
    "square": (0.80, 0.60, 0.50),
    "circle": (0.66, 0.42, 0.50),
    "hexagon": (0.66, 0.42, 0.50),
    "diamond": (0.56, 0.36, 0.50),
    "cross": (0.86, 0.30, 0.50),
    "triangle": (0.50, 0.28, 0.73),
}
_MIN_COLOR_DISTANCE_TO_BG = 80.0


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are composed. All randomness comes from the rng passed to `generate_scene`."""

    canvas_sizes: tuple[tuple[int, int], ...] = ((672, 672),)  # (width, height) choices, one picked per scene
    object_scale: float = 1.0  # multiplier on the size-class ranges after scaling them with the canvas
    n_objects: tuple[int, int] = (6, 12)  # inclusive range of objects attempted per scene
    size_weights: tuple[tuple[str, float], ...] = (("tiny", 0.35), ("small", 0.2), ("medium", 0.3), ("large", 0.15))
    min_size_counts: tuple[tuple[str, int], ...] = (("tiny", 2), ("medium", 1))  # guaranteed before weighting
    # Non-uniform priors make POPE "popular" negatives meaningful: popular = frequent under these weights.
    shape_weights: tuple[float, ...] = (0.22, 0.18, 0.16, 0.13, 0.11, 0.10, 0.10)  # aligned with SHAPES
    color_weights: tuple[float, ...] = (0.14, 0.13, 0.12, 0.11, 0.09, 0.09, 0.08, 0.07, 0.06, 0.06, 0.05)  # COLORS
    label_prob: float = 0.4  # chance that an object carries a 1-2 character label
    clutter_prob: float = 0.3  # chance of a cluttered (textured) background instead of a plain one
    clutter_kinds: tuple[str, ...] = CLUTTER_KINDS  # textures to choose from when cluttered
    dark_background_prob: float = 0.3  # chance of a dark background
    margin_frac: float = 0.012  # minimum gap between objects (and labels), fraction of the short side
    relation_margin_frac: float = 0.02  # boxes must be this far apart for a left/right/above/below relation
    max_placement_tries: int = 300  # rejection-sampling attempts per object before it is dropped


@dataclass
class WorldObject:
    """One drawn object. `box` is the shape's tight box; `label_box` is the ink box of its text, if any."""

    id: str
    shape: str
    color: str
    size_class: str
    box: list[int]
    label: str | None = None
    label_box: list[int] | None = None
    label_placement: str | None = None  # "on" (drawn on the shape) or "next" (drawn beside it)
    label_font_size: int | None = None
    label_color: list[int] | None = None

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]

    def attrs(self) -> dict[str, Any]:
        """The attributes a question may refer to."""
        return {"shape": self.shape, "color": self.color, "size": self.size_class, "label": self.label}


@dataclass
class Scene:
    """A scene's full ground truth. `render_scene(scene)` draws it; nothing else is needed."""

    id: str
    width: int
    height: int
    background: str
    clutter: str  # "none" or one of CLUTTER_KINDS
    objects: list[WorldObject]
    relations: list[dict[str, str]] = field(default_factory=list)
    description: str = ""
    clutter_seed: int = 0

    @property
    def clutter_split(self) -> str:
        return "plain" if self.clutter == "none" else "cluttered"

    def object(self, object_id: str) -> WorldObject:
        return next(o for o in self.objects if o.id == object_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Inverse of `to_dict`; extra keys (a scenes.jsonl row's "image", "preset") are ignored."""
        names = {f.name for f in fields(cls)}
        objects = [WorldObject(**o) for o in data["objects"]]
        return cls(**{k: v for k, v in data.items() if k in names and k != "objects"}, objects=objects)


def as_random(rng: random.Random | np.random.Generator | int) -> random.Random:
    """Accept a stdlib Random, a numpy Generator or an int seed; the world itself draws from `random.Random`."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    return random.Random(rng)


def _luminance(rgb: tuple[int, int, int] | list[int]) -> float:
    """WCAG relative luminance, used to pick black or white text with the better contrast."""

    def lin(c: float) -> float:
        c /= 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(float(c)) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast_text_color(rgb: tuple[int, int, int]) -> list[int]:
    lum = _luminance(rgb)
    black, white = (lum + 0.05) / 0.05, 1.05 / (lum + 0.05)
    return [15, 15, 15] if black >= white else [250, 250, 250]


@functools.lru_cache(maxsize=256)
def label_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Aileron, Pillow >= 10.1): no system fonts, so renders are reproducible."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # pragma: no cover - Pillow built without FreeType
        raise RuntimeError("foveate.world needs Pillow with FreeType support for scalable label fonts")
    return font


def _stroke(font_size: int) -> int:
    # Aileron Regular is thin; a faux-bold stroke keeps big labels legible after the 3x input downscale.
    return font_size // 24


def _ink_bbox(text: str, font_size: int) -> tuple[int, int, int, int]:
    return label_font(font_size).getbbox(text, stroke_width=_stroke(font_size))


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of `shape` normalised to fill the unit square exactly (so the box is tight)."""
    if shape == "triangle":
        pts = [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    elif shape == "diamond":
        pts = [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    elif shape == "hexagon":
        pts = [(1.0, 0.5), (0.75, 0.0), (0.25, 0.0), (0.0, 0.5), (0.25, 1.0), (0.75, 1.0)]
    elif shape == "cross":
        a, b = 1 / 3, 2 / 3
        pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)]
    elif shape == "star":
        # Inner radius 0.45 R (a little fatter than the regular 0.38) so small stars keep their points.
        pts = [
            (
                math.cos(math.radians(-90 + 36 * k)) * (1.0 if k % 2 == 0 else 0.45),
                math.sin(math.radians(-90 + 36 * k)) * (1.0 if k % 2 == 0 else 0.45),
            )
            for k in range(10)
        ]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [((x - x0) / w, (y - y0) / h) for x, y in pts]


def object_mask(shape: str, width: int, height: int) -> Image.Image:
    """Anti-aliased coverage mask ("L") of a shape filling a width x height box.

    Drawn at 4x and box-filtered down, so small shapes get soft edges instead of jagged staircases that would
    make tiny objects look more distinct than a real photo of them would.
    """
    ss = 4 if max(width, height) <= 256 else 2
    big = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(big)
    sx, sy = width * ss - 1, height * ss - 1
    if shape == "circle":
        draw.ellipse((0, 0, sx, sy), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, sx, sy), fill=255)
    else:
        draw.polygon([(x * sx, y * sy) for x, y in _unit_polygon(shape)], fill=255)
    return big.resize((width, height), Image.Resampling.BOX)


def _side_range(size_class: str, width: int, height: int, cfg: SceneConfig) -> tuple[int, int]:
    k = min(width, height) / 672.0 * cfg.object_scale
    lo, hi = SIZE_RANGES_672[size_class]
    return max(3, round(lo * k)), max(4, round(hi * k))


def _usable_colors(bg: tuple[int, int, int], cfg: SceneConfig) -> tuple[list[str], list[float]]:
    """Colours far enough from the background to be seen (drops white on light and black on dark grounds)."""
    names, weights = [], []
    for (name, rgb), w in zip(COLORS.items(), cfg.color_weights, strict=True):
        if math.dist(rgb, bg) >= _MIN_COLOR_DISTANCE_TO_BG:
            names.append(name)
            weights.append(w)
    return names, weights


def _random_label(rng: random.Random, taken: set[str]) -> str:
    while True:
        text = "".join(rng.choice(LABEL_ALPHABET) for _ in range(rng.choice((1, 2))))
        if text not in taken:
            taken.add(text)
            return text


def _label_layout(
    shape: str, size_class: str, label: str, box: list[int], canvas: tuple[int, int], margin: int
) -> tuple[str, int, list[int]] | None:
    """Choose placement, font size and ink box for a label; None if a beside-label would leave the canvas."""
    x1, y1, x2, y2 = box
    side = x2 - x1
    if size_class in ("medium", "large") and shape in _LABEL_INTERIOR:
        wf, hf, cyf = _LABEL_INTERIOR[shape]
        size = max(8, round(0.45 * side))
        while True:  # shrink until the ink fits the shape's interior rectangle
            bx1, by1, bx2, by2 = _ink_bbox(label, size)
            if (bx2 - bx1 <= wf * side and by2 - by1 <= hf * side) or size <= 8:
                break
            size -= 1
        cx, cy = x1 + side / 2, y1 + cyf * side
        w, h = bx2 - bx1, by2 - by1
        left, top = round(cx - w / 2), round(cy - h / 2)
        return "on", size, [left, top, left + w, top + h]
    # Beside the object. Tiny labels are about as tall as the object, so they vanish at input resolution with it.
    factor = {"tiny": 0.9, "small": 0.5}.get(size_class, 0.45)
    size = max(12, round(factor * side))  # 12 px Aileron is the smallest size still crisp when read at full res
    bx1, by1, bx2, by2 = _ink_bbox(label, size)
    w, h = bx2 - bx1, by2 - by1
    gap = max(2, round(0.2 * side))
    top = round((y1 + y2) / 2 - h / 2)
    for left in (x2 + gap, x1 - gap - w):
        lb = [left, top, left + w, top + h]
        if lb[0] >= margin and lb[1] >= margin and lb[2] <= canvas[0] - margin and lb[3] <= canvas[1] - margin:
            return "next", size, lb
    return None


def _overlaps(a: list[int], b: list[int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _union(a: list[int], b: list[int] | None) -> list[int]:
    return list(a) if b is None else [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


def compute_relations(objects: list[WorldObject], margin: int) -> list[dict[str, str]]:
    """All unambiguous pairwise relations: A is "left of" B only if A's box ends `margin` px before B's starts."""
    out: list[dict[str, str]] = []
    for a in objects:
        for b in objects:
            if a is b:
                continue
            if a.box[2] + margin <= b.box[0]:
                out.append({"subject": a.id, "relation": "left of", "object": b.id})
            if b.box[2] + margin <= a.box[0]:
                out.append({"subject": a.id, "relation": "right of", "object": b.id})
            if a.box[3] + margin <= b.box[1]:
                out.append({"subject": a.id, "relation": "above", "object": b.id})
            if b.box[3] + margin <= a.box[1]:
                out.append({"subject": a.id, "relation": "below", "object": b.id})
    return out


def generate_scene(
    rng: random.Random | np.random.Generator | int, config: SceneConfig | None = None, scene_id: str = "scene"
) -> Scene:
    """Sample a scene: canvas, background, objects (non-overlapping, with labels), relations and description."""
    cfg = config or SceneConfig()
    r = as_random(rng)
    width, height = r.choice(cfg.canvas_sizes)
    dark = r.random() < cfg.dark_background_prob
    bg_names = [n for n, rgb in BACKGROUNDS.items() if (sum(rgb) < 384) == dark]
    background = r.choice(bg_names)
    clutter = r.choice(cfg.clutter_kinds) if r.random() < cfg.clutter_prob else "none"
    clutter_seed = r.getrandbits(32)
    short = min(width, height)
    margin = max(3, round(cfg.margin_frac * short))

    # Sizes: guaranteed minimums first, then weighted draws; placed largest first so big objects still fit.
    n = r.randint(*cfg.n_objects)
    sizes = [s for s, k in cfg.min_size_counts for _ in range(k)]
    names, weights = zip(*cfg.size_weights, strict=True)
    sizes += r.choices(names, weights=weights, k=max(0, n - len(sizes)))
    sizes.sort(key=SIZE_CLASSES.index, reverse=True)
    colors, color_w = _usable_colors(BACKGROUNDS[background], cfg)

    objects: list[WorldObject] = []
    occupied: list[list[int]] = []
    labels_taken: set[str] = set()
    for size_class in sizes:
        lo, hi = _side_range(size_class, width, height, cfg)
        side = r.randint(lo, hi)
        shape = r.choices(SHAPES, weights=cfg.shape_weights)[0]
        color = r.choices(colors, weights=color_w)[0]
        label = _random_label(r, labels_taken) if r.random() < cfg.label_prob else None
        for _ in range(cfg.max_placement_tries):
            x1 = r.randint(margin, width - margin - side)
            y1 = r.randint(margin, height - margin - side)
            box = [x1, y1, x1 + side, y1 + side]
            layout = _label_layout(shape, size_class, label, box, (width, height), margin) if label else None
            if label and layout is None:
                continue
            footprint = _union(box, layout[2] if layout else None)
            if any(_overlaps(footprint, o, margin) for o in occupied):
                continue
            occupied.append(footprint)
            obj = WorldObject(id="", shape=shape, color=color, size_class=size_class, box=box, label=label)
            if layout:
                obj.label_placement, obj.label_font_size, obj.label_box = layout
                fill = COLORS[color] if layout[0] == "on" else BACKGROUNDS[background]
                obj.label_color = _contrast_text_color(fill)
            objects.append(obj)
            break
        else:
            if label:
                labels_taken.discard(label)  # dropped object: free its label for later objects
    # Ids in reading order (top to bottom, left to right) so they are stable and human-friendly.
    objects.sort(key=lambda o: (o.box[1] + o.box[3], o.box[0] + o.box[2]))
    for i, obj in enumerate(objects):
        obj.id = f"o{i}"
    scene = Scene(
        id=scene_id,
        width=width,
        height=height,
        background=background,
        clutter=clutter,
        objects=objects,
        relations=compute_relations(objects, max(2, round(cfg.relation_margin_frac * short))),
        clutter_seed=clutter_seed,
    )
    scene.description = describe_scene(scene)
    return scene


def _background_array(scene: Scene) -> np.ndarray:
    """Background pixels (H, W, 3) uint8. Clutter is grey-only and faint so it cannot pass for an object."""
    h, w = scene.height, scene.width
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    gen = np.random.default_rng(scene.clutter_seed)
    short = min(w, h)
    if scene.clutter == "noise":
        # Blotchy low-frequency noise plus fine grain, same offset on all channels (no hue).
        cell = max(4, short // 40)
        coarse = gen.random((h // cell + 2, w // cell + 2), dtype=np.float32)
        coarse_img = (
            Image.fromarray(coarse * 255).convert("L").resize((w + 2 * cell, h + 2 * cell), Image.Resampling.BILINEAR)
        )
        low = np.asarray(coarse_img, dtype=np.float32)[cell : cell + h, cell : cell + w] / 255.0 - 0.5
        fine = gen.random((h, w), dtype=np.float32) - 0.5
        img = img + (28.0 * low + 14.0 * fine)[..., None]
    elif scene.clutter == "stripes":
        period = gen.uniform(0.015, 0.045) * short
        angle = gen.uniform(0, math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        img = img + (10.0 * np.sin(phase))[..., None]
    elif scene.clutter == "lines":
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        sign = -1 if sum(BACKGROUNDS[scene.background]) > 384 else 1
        lw = max(1, round(short / 1000))
        for _ in range(int(0.4 * short)):
            x0, y0 = gen.uniform(0, w), gen.uniform(0, h)
            length, ang = gen.uniform(0.03, 0.3) * short, gen.uniform(0, 2 * math.pi)
            tone = base + sign * gen.uniform(18, 45)
            fill = tuple(int(c) for c in np.clip(tone, 0, 255))
            draw.line((x0, y0, x0 + length * math.cos(ang), y0 + length * math.sin(ang)), fill=fill, width=lw)
        return np.asarray(pil)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image. Pure function of `scene`: same scene, same pixels."""
    image = Image.fromarray(_background_array(scene), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        image.paste(COLORS[obj.color], (x1, y1, x2, y2), object_mask(obj.shape, x2 - x1, y2 - y1))
        if obj.label and obj.label_box and obj.label_font_size:
            size = obj.label_font_size
            bx1, by1, _, _ = _ink_bbox(obj.label, size)
            origin = (obj.label_box[0] - bx1, obj.label_box[1] - by1)
            fill = tuple(obj.label_color or (0, 0, 0))
            draw.text(origin, obj.label, font=label_font(size), fill=fill, stroke_width=_stroke(size), stroke_fill=fill)
    return image
