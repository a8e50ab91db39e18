"""Crop and zoom: the crop is never empty or outside the image, and the returned box is its exact region."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from foveate.errors import BoxError
from foveate.tools.boxes import Box
from foveate.tools.crop import crop, zoom


def coordinate_image(width: int, height: int) -> Image.Image:
    """Each pixel encodes its own position (R = x, G = y, mod 256), so a crop reveals where it came from."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs % 256, ys % 256, np.full_like(xs, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


IMAGES = {size: coordinate_image(*size) for size in [(1, 1), (5, 40), (120, 80), (300, 200)]}


@st.composite
def image_and_box(draw: st.DrawFn) -> tuple[Image.Image, Box]:
    """One of the test images and a box overlapping it (possibly sticking out, possibly tiny)."""
    image = IMAGES[draw(st.sampled_from(sorted(IMAGES)))]
    width, height = image.size
    x1 = draw(st.floats(-20, width - 0.01))
    y1 = draw(st.floats(-20, height - 0.01))
    x2 = draw(st.floats(max(x1, 0) + 0.01, width + 20))
    y2 = draw(st.floats(max(y1, 0) + 0.01, height + 20))
    return image, Box(x1, y1, x2, y2)


@settings(max_examples=100, deadline=None)
@given(image_and_box(), st.integers(1, 64))
def test_crop_matches_returned_box(case: tuple[Image.Image, Box], min_side: int) -> None:
    image, box = case
    width, height = image.size
    region, used = crop(image, box, min_side=min_side)
    # Integer region inside the image, never empty, exactly the size of the returned box.
    assert used.to_list() == [float(v) for v in used.to_int_list()]
    assert 0 <= used.x1 < used.x2 <= width and 0 <= used.y1 < used.y2 <= height
    assert region.size == (used.width, used.height)
    # Grown to min_side where the image allows, and still covering the part of the box inside the image.
    assert used.width >= min(min_side, width) and used.height >= min(min_side, height)
    clamped = box.clamp(width, height)
    assert used.x1 <= clamped.x1 and used.y1 <= clamped.y1 and used.x2 >= clamped.x2 and used.y2 >= clamped.y2
    # The pixels really come from that region.
    assert region.getpixel((0, 0)) == (int(used.x1) % 256, int(used.y1) % 256, 7)
    last = region.getpixel((region.width - 1, region.height - 1))
    assert last == ((int(used.x2) - 1) % 256, (int(used.y2) - 1) % 256, 7)


def test_crop_snaps_outward_and_grows_about_centre() -> None:
    image = IMAGES[(300, 200)]
    region, used = crop(image, Box(10.2, 20.7, 60.5, 70.1), min_side=1)
    assert used == Box(10, 20, 61, 71) and region.size == (51, 51)
    region, used = crop(image, Box(100, 100, 104, 104), min_side=28)
    assert used == Box(88, 88, 116, 116) and region.size == (28, 28)
    region, used = crop(image, Box(0, 0, 3, 3), min_side=28)  # Grown, then shifted inside at the corner.
    assert used == Box(0, 0, 28, 28)


def test_crop_of_tiny_images_never_empty() -> None:
    region, used = crop(IMAGES[(1, 1)], Box(0.2, 0.2, 0.3, 0.3))
    assert region.size == (1, 1) and used == Box(0, 0, 1, 1)
    region, used = crop(IMAGES[(5, 40)], Box(4.99, 0, 5, 1), min_side=28)
    assert region.size == (5, 28) and used == Box(0, 0, 5, 28)


def test_crop_upscales_short_side_keeping_aspect() -> None:
    image = IMAGES[(300, 200)]
    region, used = crop(image, Box(10, 10, 50, 30), min_side=1, upscale_min_side=100)
    assert used == Box(10, 10, 50, 30)  # The box still describes the original region...
    assert region.size == (200, 100)  # ...while the image is 5x larger with the same aspect.
    assert region.getpixel((0, 0)) == (10, 10, 7)
    big, _ = crop(image, Box(0, 0, 200, 150), upscale_min_side=100)
    assert big.size == (200, 150)  # Already large enough: untouched.


def test_crop_rejects_outside_and_too_thin_boxes() -> None:
    image = IMAGES[(300, 200)]
    with pytest.raises(BoxError, match="entirely outside the 300x200 image"):
        crop(image, Box(400, 0, 500, 50))
    with pytest.raises(BoxError, match="too thin"):
        crop(Image.new("RGB", (20_000, 1)), Box(0, 0, 20_000, 1), upscale_min_side=448)
    with pytest.raises(ValueError, match="min_side"):
        crop(image, Box(0, 0, 10, 10), min_side=0)


@pytest.mark.parametrize(
    ("box", "target", "expected"),
    [
        (Box(0, 0, 100, 50), 400, (400, 200)),  # Zoom in.
        (Box(0, 0, 300, 200), 150, (150, 100)),  # Zoom out.
        (Box(10, 10, 40, 100), 45, (15, 45)),  # Portrait: the long side is the height.
    ],
)
def test_zoom_sets_long_side(box: Box, target: int, expected: tuple[int, int]) -> None:
    zoomed, used = zoom(IMAGES[(300, 200)], box, target)
    assert zoomed.size == expected
    assert used == box


def test_zoom_keeps_thin_crops_at_least_one_pixel() -> None:
    zoomed, used = zoom(IMAGES[(300, 200)], Box(0, 0, 300, 2), 10, min_side=1)
    assert zoomed.size == (10, 1) and used == Box(0, 0, 300, 2)
