"""Crop and zoom: cut a region of the original image out for a closer look.

Both functions take a `Box` in original-image pixels and return the new image *and the box actually used*
(also in original pixels), because the region is adjusted: grown to a minimum side so a vision encoder
gets enough context, clamped to the image, and snapped outward to whole pixels. Agents must record the
returned box in their traces, not the requested one, so heat-maps and crops drawn later line up.
"""

from __future__ import annotations

import math

from PIL import Image

from foveate.errors import BoxError

from .boxes import Box
from .images import DEFAULT_MAX_PIXELS

__all__ = ["crop", "zoom"]

Resample = Image.Resampling | int


def _snap_outward(box: Box, width: int, height: int) -> Box:
    """Round ``box`` outward to integer pixel edges (floor the start, ceil the end), kept inside the image."""
    left = min(max(math.floor(box.x1), 0), width - 1)
    top = min(max(math.floor(box.y1), 0), height - 1)
    # ``max(..., left + 1)`` guarantees at least one pixel even for a sliver box on the last column.
    right = max(min(math.ceil(box.x2), width), left + 1)
    bottom = max(min(math.ceil(box.y2), height), top + 1)
    return Box(left, top, right, bottom)


def _upscaled_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """Size with the short side equal to ``short_side`` and the aspect ratio kept (long side rounded)."""
    width, height = size
    if width <= height:
        return short_side, max(short_side, round(height * short_side / width))
    return max(short_side, round(width * short_side / height)), short_side


def crop(
    image: Image.Image,
    box: Box,
    *,
    min_side: int = 28,
    upscale_min_side: int | None = None,
    resample: Resample = Image.Resampling.BICUBIC,
) -> tuple[Image.Image, Box]:
    """Crop ``box`` out of ``image``; return ``(crop, box_used)`` with ``box_used`` in original pixels.

    The box is grown about its centre so each side is at least ``min_side`` pixels (or the whole image
    side, if smaller), clamped to the image and snapped outward to whole pixels, so the crop is never
    empty and ``crop.size`` equals the size of ``box_used`` unless upscaled. With ``upscale_min_side``
    the crop is then resized (keeping its aspect ratio) so its short side is at least that many pixels;
    ``box_used`` still describes the region in the original image. Raises `BoxError` if the box does
    not intersect the image, or if upscaling would produce more than `DEFAULT_MAX_PIXELS` pixels
    (a very thin box; reject those earlier with ``parse_box(max_aspect=...)``).
    """
    if min_side < 1:
        raise ValueError(f"min_side must be at least 1 pixel, got {min_side}")
    if upscale_min_side is not None and upscale_min_side < 1:
        raise ValueError(f"upscale_min_side must be at least 1 pixel, got {upscale_min_side}")
    width, height = image.size
    grown = box.pad_to_min_side(min_side, (width, height))  # Clamps too; raises BoxError if outside.
    used = _snap_outward(grown, width, height)
    region = image.crop((int(used.x1), int(used.y1), int(used.x2), int(used.y2)))

    if upscale_min_side is not None and min(region.size) < upscale_min_side:
        new_size = _upscaled_size(region.size, upscale_min_side)
        if new_size[0] * new_size[1] > DEFAULT_MAX_PIXELS:
            raise BoxError(
                f"upscaling the {region.width}x{region.height} crop of box {used.to_int_list()} to a short side "
                f"of {upscale_min_side} would make a {new_size[0]}x{new_size[1]} image; the box is too thin"
            )
        region = region.resize(new_size, resample=resample)
    return region, used


def zoom(
    image: Image.Image,
    box: Box,
    target_long_side: int,
    *,
    min_side: int = 28,
    resample: Resample = Image.Resampling.BICUBIC,
) -> tuple[Image.Image, Box]:
    """Crop ``box`` (as `crop` does) and resize it so its long side is ``target_long_side`` pixels.

    Zooms in or out as needed, keeping the aspect ratio (the short side is rounded, and at least 1 pixel).
    Returns ``(zoomed, box_used)`` with ``box_used`` in original-image pixels.
    """
    if target_long_side < 1:
        raise ValueError(f"target_long_side must be at least 1 pixel, got {target_long_side}")
    region, used = crop(image, box, min_side=min_side)
    width, height = region.size
    scale = target_long_side / max(width, height)
    if width >= height:
        new_size = (target_long_side, max(1, round(height * scale)))
    else:
        new_size = (max(1, round(width * scale)), target_long_side)
    if new_size != region.size:
        region = region.resize(new_size, resample=resample)
    return region, used
