"""ViCrop map geometry: vectorised box selection against a brute-force double loop, blocks, tiling, masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from foveate.tools.saliency import (
    RATIOS,
    block_layout,
    carve_image,
    fine_factor,
    high_pass_mask,
    pool_to_grid,
    select_box,
    split_blocks,
    tile_maps,
    window_cells,
    window_sums,
)


def brute_force(values, image_size, input_side, ratios=RATIOS):
    """The reference algorithm as a plain double loop (on the same fine grid the vectorised code uses)."""
    width, height = image_size
    if input_side >= width and input_side >= height:
        return None, None
    factor = fine_factor(values.shape)
    fine = np.kron(np.asarray(values, dtype=np.float64), np.ones((factor, factor)))
    rows, cols = fine.shape
    best = None
    for ratio in ratios:
        kh, kw = window_cells(input_side * ratio, image_size, fine.shape)
        if kh >= rows and kw >= cols:
            continue
        sums = np.zeros((rows - kh + 1, cols - kw + 1))
        top, where = -np.inf, (0, 0)
        for y in range(rows - kh + 1):
            for x in range(cols - kw + 1):
                sums[y, x] = fine[y : y + kh, x : x + kw].sum()
                if sums[y, x] > top:
                    top, where = sums[y, x], (y, x)
        y, x = where
        neighbours = [
            sums[r, c]
            for r, c in ((y, x - factor), (y, x + factor), (y - factor, x), (y + factor, x))
            if 0 <= r < sums.shape[0] and 0 <= c < sums.shape[1]
        ]
        sharp = (top - np.mean(neighbours)) / (kh * kw) if neighbours else 0.0
        if best is None or sharp > best[0]:
            best = (sharp, ratio, y, x, kh, kw)
    if best is None:
        return None, None
    sharp, ratio, y, x, kh, kw = best
    cx, cy = (x + kw / 2) * width / cols, (y + kh / 2) * height / rows
    side = input_side * ratio

    def fit(centre, limit):
        if side >= limit:
            return 0.0, float(limit)
        low = min(max(centre - side / 2, 0.0), limit - side)
        return low, low + side

    (x1, x2), (y1, y2) = fit(cx, width), fit(cy, height)
    return [x1, y1, x2, y2], ratio


CASES = [  # (map grid, image size, input side)
    ((8, 8), (672, 672), 224),
    ((8, 8), (672, 672), 200),
    ((6, 11), (1200, 640), 224),  # wide
    ((12, 4), (300, 900), 224),  # tall: windows slide only vertically
    ((16, 16), (2048, 2048), 336),
    ((5, 7), (500, 350), 100),
    ((3, 3), (90, 90), 28),
]


@pytest.mark.parametrize("grid, size, side", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_select_box_matches_brute_force_on_integer_maps(grid, size, side, seed):
    """Integer maps make the summed-area table exact, so even tie-breaking must agree."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 50, size=grid).astype(np.float64)
    if seed == 3:
        values[:] = 7  # all ties
    expected_box, expected_ratio = brute_force(values, size, side)
    chosen = select_box(values, size, side)
    assert chosen.ratio == expected_ratio
    assert chosen.box.to_list() == pytest.approx(expected_box)


@pytest.mark.parametrize("grid, size, side", CASES)
def test_select_box_matches_brute_force_on_float_maps(grid, size, side):
    rng = np.random.default_rng(sum(grid) + side)
    values = rng.random(grid) ** 4  # peaky, like attention
    expected_box, expected_ratio = brute_force(values, size, side)
    chosen = select_box(values, size, side)
    assert chosen.ratio == expected_ratio
    assert chosen.box.to_list() == pytest.approx(expected_box)
    box = chosen.box
    assert 0 <= box.x1 < box.x2 <= size[0] and 0 <= box.y1 < box.y2 <= size[1]


def test_window_sums_against_direct_sums():
    rng = np.random.default_rng(0)
    grid = rng.random((9, 13))
    sums = window_sums(grid, 4, 5)
    assert sums.shape == (6, 9)
    for y in range(6):
        for x in range(9):
            assert sums[y, x] == pytest.approx(grid[y : y + 4, x : x + 5].sum())


def test_selection_finds_a_planted_peak_and_is_square():
    values = np.full((8, 8), 0.01)
    values[6, 1] = 5.0  # bottom-left cell of a 672 px image: pixels (84..168, 504..588)
    chosen = select_box(values, (672, 672), 224)
    box = chosen.box
    assert box.width == box.height == pytest.approx(224 * chosen.ratio)
    assert box.contains_point(126, 546)


def test_no_crop_when_the_image_fits_the_input():
    assert select_box(np.ones((8, 8)), (224, 224), 224).box is None
    assert select_box(np.ones((4, 6)), (200, 150), 224).box is None
    assert select_box(np.ones((8, 8)), (230, 230), 224).box is not None


@pytest.mark.parametrize(
    "size, layout",
    [
        ((672, 672), (1, 1)),
        ((1024, 1024), (1, 1)),
        ((2048, 2048), (2, 2)),
        ((2048, 1536), (2, 2)),
        ((600, 3000), (3, 1)),  # tall: the reference's int(v·W/H) would give zero-width blocks
        ((3000, 600), (1, 3)),
        ((1025, 5), (1, 2)),
        ((5, 4000), (4, 1)),
    ],
)
def test_blocks_cover_the_image_without_empty_blocks(size, layout):
    boxes, got = split_blocks(size, 1024)
    assert got == layout == block_layout(size, 1024)
    assert len(boxes) == layout[0] * layout[1]
    assert all(b.width >= 1 and b.height >= 1 for b in boxes)
    assert sum(b.area for b in boxes) == size[0] * size[1]
    assert max(b.width for b in boxes) <= max(1024, size[0] / layout[1] + 1)
    assert boxes[0].x1 == 0 and boxes[0].y1 == 0 and boxes[-1].x2 == size[0] and boxes[-1].y2 == size[1]


def test_tiling_places_blocks_row_major_and_equalises_grids():
    maps = [np.full((2, 3), i, dtype=float) for i in range(4)]
    maps[3] = np.full((1, 3), 3.0)  # one block's grid came out a row shorter
    tiled = tile_maps(maps, (2, 2))
    assert tiled.shape == (4, 6)
    assert tiled[0, 0] == 0 and tiled[0, 5] == 1 and tiled[3, 0] == 2 and tiled[3, 5] == 3
    with pytest.raises(ValueError):
        tile_maps(maps[:3], (2, 2))


def test_pool_and_high_pass_mask_shapes():
    image = Image.new("RGB", (100, 60), "white")
    image.paste((0, 0, 0), (40, 20, 60, 40))
    mask = high_pass_mask(image, (56, 84))
    assert mask.shape == (84, 56) and mask.dtype == bool and 0 < mask.mean() <= 0.5
    pooled = pool_to_grid(np.arange(84 * 56, dtype=float).reshape(84, 56), (3, 2))
    assert pooled.shape == (3, 2) and pooled[0, 0] < pooled[0, 1] < pooled[1, 0]
    assert pooled.mean() == pytest.approx((84 * 56 - 1) / 2, rel=1e-6)


def test_carve_keeps_attended_pixels_and_fades_the_rest():
    image = Image.new("RGB", (80, 80), (250, 0, 0))
    values = np.zeros((4, 4))
    values[0, 0] = 1.0
    masked = carve_image(image, values, keep=0.1, floor=0.0)
    assert masked.size == image.size
    assert masked.getpixel((2, 2)) == (250, 0, 0)
    assert masked.getpixel((78, 78)) == (128, 128, 128)
    assert math.isclose(np.asarray(carve_image(image, np.ones((4, 4)))).mean(), np.asarray(image).mean())
