"""Bounding boxes: one internal convention, conversions to model conventions, and strict parsing.

Inside foveate a box is always a `Box` in **absolute float pixels of the original image**, with
``x1 < x2`` and ``y1 < y2`` (x grows right, y grows down, edges are continuous coordinates, so the box
``Box(0, 0, W, H)`` covers a whole ``W x H`` image). Model conventions are converted at the policy edge:

- ``normalized``: fractions of the image in [0, 1];
- ``thousand``: [0, 1000] as used by Qwen2-VL's grounding format (``round()`` them when writing a prompt);
- ``resized``: pixels of the resized image the model actually saw.

Image and resized sizes are ``(width, height)`` tuples, in the same order as Pillow's ``Image.size``.
`parse_box` is the one place untrusted coordinates (model output, user input) become a `Box`; it raises
`foveate.errors.BoxError` with a message that names exactly what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from foveate.errors import BoxError

__all__ = [
    "Box",
    "Convention",
    "from_normalized",
    "from_resized",
    "from_thousand",
    "iou",
    "parse_box",
    "to_normalized",
    "to_resized",
    "to_thousand",
]

Convention = Literal["pixels", "normalized", "thousand"]
_CONVENTIONS: tuple[str, ...] = ("pixels", "normalized", "thousand")
_NAMES = ("x1", "y1", "x2", "y2")


def _fmt(value: float) -> str:
    """Format a coordinate for error messages without float noise (``12`` rather than ``12.000000001``)."""
    return f"{value:.6g}"


def _check_size(size: Sequence[float], what: str = "image_size") -> tuple[float, float]:
    """Validate a ``(width, height)`` pair; a non-positive size can only be a caller bug."""
    if len(size) != 2:
        raise ValueError(f"{what} must be (width, height), got {size!r}")
    width, height = float(size[0]), float(size[1])
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"{what} must be positive and finite, got {size!r}")
    return width, height


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in absolute pixels of the original image (``x1 < x2``, ``y1 < y2``, floats).

    Frozen and hashable, so boxes can key dicts and sit in graph state; `to_list` gives plain JSON floats.
    """

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        """Coerce to built-in floats (numpy scalars are not JSON-serialisable) and enforce the convention."""
        values = []
        for name in _NAMES:
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise BoxError(f"box coordinate {name} is not finite ({value})")
            object.__setattr__(self, name, value)
            values.append(value)
        x1, y1, x2, y2 = values
        if not (x2 > x1 and y2 > y1):
            raise BoxError(
                f"box {self.to_list()} is empty or inverted: need x1 < x2 and y1 < y2 "
                f"(absolute pixels of the original image)"
            )

    @property
    def width(self) -> float:
        """Horizontal extent in pixels."""
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        """Vertical extent in pixels."""
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        """Area in square pixels."""
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """Centre point ``(cx, cy)``."""
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def to_list(self) -> list[float]:
        """``[x1, y1, x2, y2]`` as plain floats, ready for JSON."""
        return [self.x1, self.y1, self.x2, self.y2]

    def to_int_list(self) -> list[int]:
        """``[x1, y1, x2, y2]`` rounded half up (not banker's rounding, so 2.5 and 3.5 both go up)."""
        return [math.floor(v + 0.5) for v in self.to_list()]

    def clamp(self, width: float, height: float) -> Box:
        """Clip to the image ``[0, width] x [0, height]``; raises `BoxError` if nothing is left."""
        x1, y1 = max(self.x1, 0.0), max(self.y1, 0.0)
        x2, y2 = min(self.x2, float(width)), min(self.y2, float(height))
        if not (x2 > x1 and y2 > y1):
            raise BoxError(f"box {self.to_list()} lies entirely outside the {_fmt(width)}x{_fmt(height)} image")
        return Box(x1, y1, x2, y2)

    def intersection(self, other: Box) -> Box | None:
        """The overlapping box, or ``None`` when the boxes only touch or do not overlap."""
        x1, y1 = max(self.x1, other.x1), max(self.y1, other.y1)
        x2, y2 = min(self.x2, other.x2), min(self.y2, other.y2)
        if x2 > x1 and y2 > y1:
            return Box(x1, y1, x2, y2)
        return None

    def iou(self, other: Box) -> float:
        """Intersection over union, in [0, 1]."""
        return iou(self, other)

    def contains_point(self, x: float, y: float) -> bool:
        """Whether ``(x, y)`` lies inside the box or on its edge."""
        return self.x1 <= x <= self.x2 and self.y1 <= y <= self.y2

    def expand(self, factor: float) -> Box:
        """Scale width and height by ``factor`` about the centre (not clamped; ``factor < 1`` shrinks)."""
        if not (factor > 0 and math.isfinite(factor)):
            raise BoxError(f"expand factor must be a positive number, got {factor}")
        cx, cy = self.center
        half_w, half_h = self.width * factor / 2, self.height * factor / 2
        return Box(cx - half_w, cy - half_h, cx + half_w, cy + half_h)

    def square(self) -> Box:
        """The smallest square about the same centre that contains this box (not clamped)."""
        cx, cy = self.center
        half = max(self.width, self.height) / 2
        return Box(cx - half, cy - half, cx + half, cy + half)

    def pad_to_min_side(self, min_side: float, image_size: Sequence[float]) -> Box:
        """Grow each side to at least ``min_side`` pixels, keeping the result inside the image.

        The box is first clamped to the image (`BoxError` if it lies outside), then each side shorter than
        ``min(min_side, image side)`` grows about its centre and is shifted back inside the image if it
        crossed an edge. The result therefore contains the clamped box, lies inside the image, and is never
        larger than the image; sides already long enough are unchanged. Used so crops keep enough context
        for a vision encoder (e.g. one 28-pixel Qwen2-VL patch at least).
        """
        width, height = _check_size(image_size)
        clamped = self.clamp(width, height)
        x1, x2 = _grow_interval(clamped.x1, clamped.x2, min_side, width)
        y1, y2 = _grow_interval(clamped.y1, clamped.y2, min_side, height)
        return Box(x1, y1, x2, y2)


def _grow_interval(lo: float, hi: float, min_side: float, limit: float) -> tuple[float, float]:
    """Grow ``[lo, hi]`` (inside ``[0, limit]``) to ``min(min_side, limit)`` about its centre, then shift inside."""
    target = min(float(min_side), limit)
    if hi - lo >= target:
        return lo, hi
    centre = (lo + hi) / 2
    lo, hi = centre - target / 2, centre + target / 2
    if lo < 0:
        lo, hi = 0.0, target
    elif hi > limit:
        lo, hi = limit - target, limit
    return max(lo, 0.0), min(hi, limit)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes, in [0, 1] (0 for boxes that only touch)."""
    inter = a.intersection(b)
    if inter is None:
        return 0.0
    union = a.area + b.area - inter.area
    return min(1.0, inter.area / union) if union > 0 else 0.0


def _four(values: Sequence[float]) -> tuple[float, float, float, float]:
    """Unpack exactly four coordinates, with a `BoxError` for any other length."""
    if len(values) != 4:
        raise BoxError(f"box must have 4 values (x1, y1, x2, y2), got {len(values)}")
    return float(values[0]), float(values[1]), float(values[2]), float(values[3])


def from_normalized(values: Sequence[float], image_size: Sequence[float]) -> Box:
    """Box from ``[x1, y1, x2, y2]`` fractions of the image (0-1) into original pixels."""
    width, height = _check_size(image_size)
    x1, y1, x2, y2 = _four(values)
    return Box(x1 * width, y1 * height, x2 * width, y2 * height)


def to_normalized(box: Box, image_size: Sequence[float]) -> list[float]:
    """``[x1, y1, x2, y2]`` of ``box`` as fractions of the image (0-1)."""
    width, height = _check_size(image_size)
    return [box.x1 / width, box.y1 / height, box.x2 / width, box.y2 / height]


def from_thousand(values: Sequence[float], image_size: Sequence[float]) -> Box:
    """Box from Qwen2-VL style ``[x1, y1, x2, y2]`` in 0-1000 into original pixels."""
    x1, y1, x2, y2 = _four(values)
    return from_normalized([x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000], image_size)


def to_thousand(box: Box, image_size: Sequence[float]) -> list[float]:
    """``[x1, y1, x2, y2]`` of ``box`` in 0-1000 (floats; round them when formatting a prompt)."""
    return [v * 1000 for v in to_normalized(box, image_size)]


def from_resized(values: Sequence[float], image_size: Sequence[float], resized_size: Sequence[float]) -> Box:
    """Box from pixels of the resized model input (``resized_size``) into pixels of the original image."""
    width, height = _check_size(image_size)
    r_width, r_height = _check_size(resized_size, "resized_size")
    x1, y1, x2, y2 = _four(values)
    sx, sy = width / r_width, height / r_height
    return Box(x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def to_resized(box: Box, image_size: Sequence[float], resized_size: Sequence[float]) -> list[float]:
    """``[x1, y1, x2, y2]`` of ``box`` in pixels of the resized model input (``resized_size``)."""
    width, height = _check_size(image_size)
    r_width, r_height = _check_size(resized_size, "resized_size")
    sx, sy = r_width / width, r_height / height
    return [box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy]


def _coerce_values(values: Any) -> list[float]:
    """Turn 4 numbers / numeric strings (or an x1..y2 mapping) into floats, naming the first bad value."""
    if isinstance(values, Box):
        return values.to_list()
    if isinstance(values, Mapping):
        missing = [name for name in _NAMES if name not in values]
        if missing:
            raise BoxError(f"box dict must have keys x1, y1, x2, y2; missing: {', '.join(missing)}")
        values = [values[name] for name in _NAMES]
    elif isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise BoxError(f"box must be a list of 4 numbers (x1, y1, x2, y2), got {type(values).__name__}")
    items = list(values)
    if len(items) != 4:
        raise BoxError(f"box must have 4 values (x1, y1, x2, y2), got {len(items)}: {_preview(items)}")
    floats = []
    for name, item in zip(_NAMES, items, strict=True):
        # bool is an int subclass, but True as a coordinate is always a bug upstream.
        if isinstance(item, bool):
            raise BoxError(f"box value {name} is not a number: {item!r}")
        try:
            value = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            raise BoxError(f"box value {name} is not a number: {_preview(item)}") from None
        if not math.isfinite(value):
            raise BoxError(f"box value {name} is not finite: {value}")
        floats.append(value)
    return floats


def _preview(value: Any, limit: int = 60) -> str:
    """A short repr for error messages (model output can be arbitrarily long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_box(
    values: Any,
    image_size: Sequence[float],
    *,
    convention: Convention = "pixels",
    min_side: float = 1.0,
    max_aspect: float | None = None,
    clamp: bool = True,
) -> Box:
    """Validate untrusted coordinates and return a `Box` in original-image pixels.

    ``values`` is a list/tuple (any non-string iterable) of 4 numbers or numeric strings, or a mapping with
    keys ``x1, y1, x2, y2``, in ``convention`` ("pixels", "normalized" 0-1, or "thousand" 0-1000).
    With ``clamp`` the box is clipped to the image; ``min_side`` and ``max_aspect`` (long side / short side)
    are checked on the final box. Raises `BoxError` for: wrong length, non-numeric or non-finite values,
    inverted boxes (x2 <= x1 or y2 <= y1), boxes entirely outside the image, a side below ``min_side``, or an
    aspect ratio above ``max_aspect``.
    """
    if convention not in _CONVENTIONS:
        raise BoxError(f"unknown box convention {convention!r}; expected one of {', '.join(_CONVENTIONS)}")
    width, height = _check_size(image_size)
    x1, y1, x2, y2 = _coerce_values(values)
    if x2 <= x1:
        raise BoxError(f"box is inverted or empty: x2 ({_fmt(x2)}) must be greater than x1 ({_fmt(x1)})")
    if y2 <= y1:
        raise BoxError(f"box is inverted or empty: y2 ({_fmt(y2)}) must be greater than y1 ({_fmt(y1)})")

    if convention == "normalized":
        box = from_normalized([x1, y1, x2, y2], (width, height))
    elif convention == "thousand":
        box = from_thousand([x1, y1, x2, y2], (width, height))
    else:
        box = Box(x1, y1, x2, y2)

    image = Box(0.0, 0.0, width, height)
    if box.intersection(image) is None:
        shown = ", ".join(_fmt(v) for v in (x1, y1, x2, y2))
        raise BoxError(f"box [{shown}] ({convention}) lies entirely outside the {_fmt(width)}x{_fmt(height)} image")
    if clamp:
        box = box.clamp(width, height)

    if min(box.width, box.height) < min_side:
        after = " after clamping to the image" if clamp else ""
        raise BoxError(
            f"box is too small: {_fmt(box.width)}x{_fmt(box.height)} pixels{after}, "
            f"each side must be at least {_fmt(min_side)} pixels"
        )
    if max_aspect is not None:
        aspect = max(box.width, box.height) / min(box.width, box.height)
        if aspect > max_aspect:
            raise BoxError(f"box aspect ratio {aspect:.3g} exceeds the maximum of {_fmt(max_aspect)}")
    return box
