"""Boxes: property-based checks of conversions, IoU, clamping and padding, plus every parse_box error."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foveate.errors import BoxError
from foveate.tools.boxes import (
    Box,
    from_normalized,
    from_resized,
    from_thousand,
    iou,
    parse_box,
    to_normalized,
    to_resized,
    to_thousand,
)

# Per-test settings, not a loaded profile: a profile would change Hypothesis for every test in the session.
fast = settings(max_examples=100, deadline=None)

sizes = st.tuples(st.integers(1, 8000), st.integers(1, 8000))


@st.composite
def image_and_box(draw: st.DrawFn) -> tuple[tuple[int, int], Box]:
    """An image size and a box inside it, each side at least 1e-3 px (subnormal sides vanish on scaling)."""
    width, height = draw(sizes)
    x1 = draw(st.floats(0, width - 1e-3))
    y1 = draw(st.floats(0, height - 1e-3))
    return (width, height), Box(x1, y1, draw(st.floats(x1 + 1e-3, width)), draw(st.floats(y1 + 1e-3, height)))


@st.composite
def any_box(draw: st.DrawFn, span: float = 2000.0) -> Box:
    """A non-degenerate box anywhere in [-span, span]^2 (may lie partly or wholly outside an image)."""
    x1 = draw(st.floats(-span, span))
    y1 = draw(st.floats(-span, span))
    return Box(x1, y1, x1 + draw(st.floats(0.01, span)), y1 + draw(st.floats(0.01, span)))


def close(a: list[float], b: list[float], scale: float) -> bool:
    """Coordinates equal up to float round-off relative to the image scale."""
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9 * scale) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------- conversions


@fast
@given(image_and_box())
def test_normalized_round_trip(case: tuple[tuple[int, int], Box]) -> None:
    size, box = case
    normalized = to_normalized(box, size)
    assert all(0.0 <= v <= 1.0 for v in normalized)
    assert close(from_normalized(normalized, size).to_list(), box.to_list(), max(size))


@fast
@given(image_and_box())
def test_thousand_round_trip(case: tuple[tuple[int, int], Box]) -> None:
    size, box = case
    thousand = to_thousand(box, size)
    assert all(0.0 <= v <= 1000.0 for v in thousand)
    assert close(from_thousand(thousand, size).to_list(), box.to_list(), max(size))


@fast
@given(image_and_box(), sizes)
def test_resized_round_trip(case: tuple[tuple[int, int], Box], resized: tuple[int, int]) -> None:
    size, box = case
    assert close(from_resized(to_resized(box, size, resized), size, resized).to_list(), box.to_list(), max(size))


def test_conversion_examples() -> None:
    assert from_normalized([0.25, 0.5, 0.75, 1.0], (400, 200)) == Box(100, 100, 300, 200)
    assert from_thousand([250, 500, 750, 1000], (400, 200)) == Box(100, 100, 300, 200)
    assert from_resized([50, 50, 150, 100], (400, 200), (200, 100)) == Box(100, 100, 300, 200)
    assert to_thousand(Box(100, 100, 300, 200), (400, 200)) == [250, 500, 750, 1000]


# ---------------------------------------------------------------------------------------------- geometry


@fast
@given(any_box(), any_box())
def test_iou_is_symmetric_and_bounded(a: Box, b: Box) -> None:
    value = iou(a, b)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(iou(b, a))
    assert a.iou(b) == value


@fast
@given(any_box())
def test_iou_with_itself_is_one(box: Box) -> None:
    assert box.iou(box) == pytest.approx(1.0)


@fast
@given(any_box(), st.floats(0, 500), st.floats(-500, 500))
def test_disjoint_boxes_have_zero_iou(box: Box, gap: float, dy: float) -> None:
    other = Box(box.x2 + gap, box.y1 + dy, box.x2 + gap + 10, box.y2 + dy)
    assert box.intersection(other) is None
    assert iou(box, other) == 0.0


def test_iou_example() -> None:
    assert iou(Box(0, 0, 10, 10), Box(5, 0, 15, 10)) == pytest.approx(50 / 150)


@fast
@given(any_box(), sizes)
def test_clamp_keeps_inside_or_raises(box: Box, size: tuple[int, int]) -> None:
    width, height = size
    try:
        clamped = box.clamp(width, height)
    except BoxError as exc:
        assert box.intersection(Box(0, 0, width, height)) is None
        assert "entirely outside" in str(exc)
        return
    assert 0 <= clamped.x1 < clamped.x2 <= width and 0 <= clamped.y1 < clamped.y2 <= height
    assert clamped == box.intersection(Box(0, 0, width, height))


@fast
@given(image_and_box(), st.floats(0.5, 1000))
def test_pad_to_min_side_properties(case: tuple[tuple[int, int], Box], min_side: float) -> None:
    (width, height), box = case
    padded = box.pad_to_min_side(min_side, (width, height))
    eps = 1e-9 * max(width, height)
    # Inside the image, hence never larger than it.
    assert -eps <= padded.x1 and padded.x2 <= width + eps and -eps <= padded.y1 and padded.y2 <= height + eps
    # Each side reaches min_side unless the image itself is smaller.
    assert padded.width >= min(min_side, width) - eps and padded.height >= min(min_side, height) - eps
    # It only grows: the original box is still covered, and long-enough sides are untouched.
    assert padded.x1 <= box.x1 + eps and padded.x2 >= box.x2 - eps
    assert padded.y1 <= box.y1 + eps and padded.y2 >= box.y2 - eps
    if box.width >= min_side:
        assert (padded.x1, padded.x2) == (box.x1, box.x2)


def test_pad_to_min_side_examples() -> None:
    image = (100, 50)
    assert Box(40, 20, 44, 24).pad_to_min_side(10, image) == Box(37, 17, 47, 27)  # Grown about the centre.
    assert Box(0, 0, 2, 2).pad_to_min_side(10, image) == Box(0, 0, 10, 10)  # Shifted inside at the corner.
    assert Box(98, 48, 100, 50).pad_to_min_side(10, image) == Box(90, 40, 100, 50)
    assert Box(10, 10, 20, 20).pad_to_min_side(500, image) == Box(0, 0, 100, 50)  # Capped at the image.
    assert Box(-50, -50, 20, 20).pad_to_min_side(5, image) == Box(0, 0, 20, 20)  # Clamped first.
    with pytest.raises(BoxError, match="entirely outside"):
        Box(200, 0, 300, 10).pad_to_min_side(10, image)


def test_box_basics() -> None:
    box = Box(1, 2, 11, 7)
    assert (box.width, box.height, box.area, box.center) == (10, 5, 50, (6, 4.5))
    assert box.to_list() == [1.0, 2.0, 11.0, 7.0] and all(type(v) is float for v in box.to_list())
    assert json.loads(json.dumps(box.to_list())) == [1, 2, 11, 7]
    assert Box(0.5, 1.49, 2.5, 3.51).to_int_list() == [1, 1, 3, 4]  # Half up, not banker's rounding.
    assert {box: "ok"}[Box(1.0, 2.0, 11.0, 7.0)] == "ok"  # Hashable, and ints equal floats.
    assert box.contains_point(1, 2) and box.contains_point(6, 4) and not box.contains_point(0, 4)
    assert box.expand(2) == Box(-4, -0.5, 16, 9.5)
    assert box.square() == Box(1, -0.5, 11, 9.5)
    assert box.intersection(Box(5, 5, 20, 20)) == Box(5, 5, 11, 7)


@pytest.mark.parametrize(
    ("values", "message"),
    [((0, 0, 0, 5), "empty or inverted"), ((5, 0, 1, 5), "empty or inverted"), ((0, 0, math.nan, 1), "not finite")],
)
def test_box_constructor_enforces_convention(values: tuple[float, ...], message: str) -> None:
    with pytest.raises(BoxError, match=message):
        Box(*values)


def test_expand_rejects_bad_factor() -> None:
    with pytest.raises(BoxError, match="expand factor must be a positive number"):
        Box(0, 0, 1, 1).expand(0)


# ---------------------------------------------------------------------------------------------- parse_box

IMAGE = (640, 480)


def test_parse_box_accepts_lists_tuples_strings_and_dicts() -> None:
    expected = Box(10, 20, 30, 40)
    assert parse_box([10, 20, 30, 40], IMAGE) == expected
    assert parse_box((10.0, "20", " 30 ", "4e1"), IMAGE) == expected
    assert parse_box({"x1": 10, "y1": 20, "x2": 30, "y2": 40, "label": "cat"}, IMAGE) == expected
    assert parse_box([0.25, 0.5, 0.5, 1.0], IMAGE, convention="normalized") == Box(160, 240, 320, 480)
    assert parse_box([250, 500, 500, 1000], IMAGE, convention="thousand") == Box(160, 240, 320, 480)


def test_parse_box_clamps_unless_told_not_to() -> None:
    assert parse_box([-10, -10, 700, 100], IMAGE) == Box(0, 0, 640, 100)
    assert parse_box([-10, -10, 700, 100], IMAGE, clamp=False) == Box(-10, -10, 700, 100)


@pytest.mark.parametrize(
    ("values", "kwargs", "message"),
    [
        ([1, 2, 3], {}, r"box must have 4 values \(x1, y1, x2, y2\), got 3"),
        ([1, 2, 3, 4, 5], {}, "got 5"),
        ({"x1": 1, "y1": 2, "x2": 3}, {}, "box dict must have keys x1, y1, x2, y2; missing: y2"),
        ("10, 20, 30, 40", {}, "box must be a list of 4 numbers .* got str"),
        (None, {}, "got NoneType"),
        ([1, "two", 3, 4], {}, "box value y1 is not a number: 'two'"),
        ([1, 2, None, 4], {}, "box value x2 is not a number: None"),
        ([True, 2, 3, 4], {}, "box value x1 is not a number: True"),
        ([1, 2, float("nan"), 4], {}, "box value x2 is not finite: nan"),
        ([1, 2, 3, "inf"], {}, "box value y2 is not finite: inf"),
        ([30, 20, 10, 40], {}, r"inverted or empty: x2 \(10\) must be greater than x1 \(30\)"),
        ([10, 20, 30, 20], {}, r"inverted or empty: y2 \(20\) must be greater than y1 \(20\)"),
        ([700, 10, 800, 20], {}, r"box \[700, 10, 800, 20\] \(pixels\) lies entirely outside the 640x480 image"),
        ([1.1, 0, 1.5, 1], {"convention": "normalized"}, r"\(normalized\) lies entirely outside"),
        ([-20, 10, 0, 20], {}, "entirely outside"),  # Touching the edge is not overlapping.
        ([10, 10, 10.5, 50], {}, r"box is too small: 0.5x40 pixels after clamping .* at least 1 pixels"),
        ([-100, 10, 4, 50], {"min_side": 8}, r"too small: 4x40 pixels after clamping.*at least 8 pixels"),
        ([10, 10, 15, 50], {"min_side": 8, "clamp": False}, r"too small: 5x40 pixels, each side"),
        ([0, 0, 200, 10], {"max_aspect": 10}, "box aspect ratio 20 exceeds the maximum of 10"),
        ([0, 0, 10, 10], {"convention": "xyxy"}, "unknown box convention 'xyxy'"),
    ],
)
def test_parse_box_errors(values: object, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BoxError, match=message):
        parse_box(values, IMAGE, **kwargs)  # type: ignore[arg-type]


@fast
@given(st.lists(st.one_of(st.floats(allow_nan=True), st.text(max_size=5), st.none()), max_size=6), sizes)
def test_parse_box_never_raises_anything_but_box_error(values: list[object], size: tuple[int, int]) -> None:
    try:
        box = parse_box(values, size)
    except BoxError:
        return
    assert 0 <= box.x1 < box.x2 <= size[0] and 0 <= box.y1 < box.y2 <= size[1]
