"""Geometry over saliency maps: multi-scale window selection, high-resolution blocks, pure-grad and CARVE masks.

Pure numpy/PIL, no model: `agents/vicrop.py` (and any tool that grounds a phrase in a map) calls these on the
maps a white-box policy returns, and the tests check `select_box` against a brute-force double loop.

Box selection ("MLLMs Know Where to Look", ICLR 2025, §4 and the reference code's adaptive window):
for each ratio ``r`` in ``RATIOS`` a square window of side ``s·r`` original pixels (``s`` = the model's input
side) slides over the map; the window with the largest attention sum is that ratio's candidate, and its
*sharpness* is ``(max sum − mean of the 4 neighbouring window sums) / window area``; the sharpest ratio wins.
If even ``r = 1`` covers the whole image there is nothing to zoom into and no box is returned.

How this differs from the reference loop, and why:
- Vectorised: every window sum comes from one summed-area table (an integral image), so a ratio costs
  O(cells) numpy work instead of a Python double loop over positions.
- The map is first upsampled (nearest, mass-preserving) to a fine grid of about `FINE_CELLS` per side, so
  the window side can follow ``s·r`` closely; on the raw token grid the reference has to round ``s·r`` down to a
  whole number of 28-px (or 84-px, for a small model seeing a large image) cells, which makes several ratios
  collapse onto the same window. Windows slide with a stride of one fine cell.
- The 4 neighbours are the windows one *map cell* (not one fine cell) away, as in the reference, where the
  stride is one map cell; neighbours outside the map are left out of the mean (a window with no neighbour
  at all has sharpness 0).
- The crop is the exact ``s·r`` square about the best window's centre, shifted (not shrunk) inside the image,
  and clamped only where the image is smaller than the square; the reference clips a ``s·r`` square at the
  edges, which can shrink it.
- Ties (equal sums) resolve to the first window in row-major order, and the first of equally sharp ratios
  wins, so results never depend on float noise in the loop order.

High resolution: images whose long side exceeds ``block_side`` are split into ``ceil(W/b) × ceil(H/b)`` blocks
with edges from ``linspace`` (every block at least one pixel wide — the reference computes block sides as
``int(v·W/H)``, which is 0 for thin images), each block is mapped on its own, and the block maps are tiled into
one map on which the box is selected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from foveate.tools.boxes import Box

RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)  # window side / model input side (the paper's candidate scales)
FINE_CELLS = 96  # target fine-grid cells along the longer map side


# ---- summed-area window sums --------------------------------------------------------------------------------
def upsample(values: np.ndarray, factor: int) -> np.ndarray:
    """Nearest upsampling by an integer ``factor`` (each cell repeated ``factor × factor`` times).

    Not divided by ``factor²``: a uniform scale changes no argmax and no comparison of sharpness across
    ratios, and leaving it out keeps integer maps exact in the summed-area table (`select_box` rescales the
    reported sums)."""
    grid = np.asarray(values, dtype=np.float64)
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def window_sums(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sum of every ``height × width`` window (stride 1) of ``grid``: shape ``(R − height + 1, C − width + 1)``."""
    rows, cols = grid.shape
    if not (1 <= height <= rows and 1 <= width <= cols):
        raise ValueError(f"window {height}x{width} does not fit a {rows}x{cols} grid")
    table = np.zeros((rows + 1, cols + 1), dtype=np.float64)
    table[1:, 1:] = np.asarray(grid, dtype=np.float64).cumsum(axis=0).cumsum(axis=1)
    return table[height:, width:] - table[:-height, width:] - table[height:, :-width] + table[:-height, :-width]


def neighbour_mean(sums: np.ndarray, row: int, col: int, step: int) -> float | None:
    """Mean of the window sums ``step`` positions left, right, above and below ``(row, col)`` that exist."""
    values = [
        sums[r, c]
        for r, c in ((row, col - step), (row, col + step), (row - step, col), (row + step, col))
        if 0 <= r < sums.shape[0] and 0 <= c < sums.shape[1]
    ]
    return float(np.mean(values)) if values else None


# ---- box selection ------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """The best window at one ratio, on the fine grid."""

    ratio: float
    row: int
    col: int
    height: int  # fine cells
    width: int
    total: float  # map mass inside the window
    sharpness: float


@dataclass
class Selection:
    """The chosen crop (``box`` is None when the whole image already fits the model's input)."""

    box: Box | None
    ratio: float | None = None
    sharpness: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)
    reason: str = ""


def fine_factor(grid: tuple[int, int], fine_cells: int = FINE_CELLS) -> int:
    """Integer upsampling factor that brings the longer map side to about ``fine_cells``."""
    return max(1, math.ceil(fine_cells / max(grid)))


def _fit(centre: float, side: float, limit: float) -> tuple[float, float]:
    """An interval of length ``side`` about ``centre``, shifted inside ``[0, limit]`` (clamped if longer)."""
    if side >= limit:
        return 0.0, float(limit)
    low = min(max(centre - side / 2, 0.0), limit - side)
    return low, low + side


def window_cells(side: float, image_size: tuple[int, int], fine_shape: tuple[int, int]) -> tuple[int, int]:
    """A window of ``side`` original pixels in fine cells (height, width), at least 1, at most the grid."""
    width, height = image_size
    rows, cols = fine_shape
    cell_h, cell_w = height / rows, width / cols
    return min(rows, max(1, round(side / cell_h))), min(cols, max(1, round(side / cell_w)))


def select_box(
    values: np.ndarray,
    image_size: tuple[int, int],
    input_side: float,
    ratios: Sequence[float] = RATIOS,
    fine_cells: int = FINE_CELLS,
) -> Selection:
    """Pick the crop from a saliency map over an image of ``image_size`` (width, height); see the module doc."""
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {grid.shape}")
    if not np.all(np.isfinite(grid)):
        grid = np.nan_to_num(grid, nan=0.0, posinf=0.0, neginf=0.0)
    width, height = image_size
    if input_side >= width and input_side >= height:
        return Selection(None, reason=f"the {width}x{height} image fits the model's {input_side:g}-px input")
    factor = fine_factor(grid.shape, fine_cells)
    fine = upsample(grid, factor)
    candidates: list[Candidate] = []
    for ratio in ratios:
        kh, kw = window_cells(input_side * ratio, image_size, fine.shape)
        if kh >= fine.shape[0] and kw >= fine.shape[1]:
            continue  # this scale already covers the whole image: nothing to choose
        sums = window_sums(fine, kh, kw)
        row, col = np.unravel_index(int(np.argmax(sums)), sums.shape)
        total = float(sums[row, col])
        around = neighbour_mean(sums, int(row), int(col), factor)
        sharpness = 0.0 if around is None else (total - around) / (kh * kw * factor * factor)
        total /= factor * factor  # mass of the original map inside the window
        candidates.append(Candidate(float(ratio), int(row), int(col), kh, kw, total, sharpness))
    if not candidates:
        return Selection(None, reason="every window scale covers the whole map")
    best = max(candidates, key=lambda c: c.sharpness)  # max() keeps the first of equal values
    cell_h, cell_w = height / fine.shape[0], width / fine.shape[1]
    cx = (best.col + best.width / 2) * cell_w
    cy = (best.row + best.height / 2) * cell_h
    side = input_side * best.ratio
    x1, x2 = _fit(cx, side, width)
    y1, y2 = _fit(cy, side, height)
    return Selection(Box(x1, y1, x2, y2), best.ratio, best.sharpness, candidates, reason=f"ratio {best.ratio:g}")


# ---- high-resolution blocks ---------------------------------------------------------------------------------
def block_layout(image_size: tuple[int, int], block_side: int | None) -> tuple[int, int]:
    """(rows, cols) of blocks: 1×1 unless the long side exceeds ``block_side`` (None or 0 disables splitting)."""
    width, height = image_size
    if not block_side or max(width, height) <= block_side:
        return 1, 1
    return max(1, math.ceil(height / block_side)), max(1, math.ceil(width / block_side))


def split_blocks(image_size: tuple[int, int], block_side: int | None) -> tuple[list[Box], tuple[int, int]]:
    """Row-major block boxes covering the image exactly, and the layout; no block is empty."""
    width, height = image_size
    rows, cols = block_layout(image_size, block_side)
    xs = np.round(np.linspace(0, width, cols + 1)).astype(int)
    ys = np.round(np.linspace(0, height, rows + 1)).astype(int)
    boxes = [
        Box(float(xs[c]), float(ys[r]), float(xs[c + 1]), float(ys[r + 1])) for r in range(rows) for c in range(cols)
    ]
    return boxes, (rows, cols)


def resample_nearest(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-cell resampling of a map to ``shape`` (used when block grids differ by a cell)."""
    grid = np.asarray(values)
    if grid.shape == tuple(shape):
        return grid
    rows = np.minimum((np.arange(shape[0]) * grid.shape[0]) // shape[0], grid.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * grid.shape[1]) // shape[1], grid.shape[1] - 1)
    return grid[np.ix_(rows, cols)]


def tile_maps(maps: Sequence[np.ndarray], layout: tuple[int, int]) -> np.ndarray:
    """Tile row-major block maps into one map; blocks are brought to the largest block grid first."""
    rows, cols = layout
    if len(maps) != rows * cols:
        raise ValueError(f"{len(maps)} block maps for a {rows}x{cols} layout")
    shape = (max(m.shape[0] for m in maps), max(m.shape[1] for m in maps))
    cells = [resample_nearest(m, shape) for m in maps]
    return np.block([[cells[r * cols + c] for c in range(cols)] for r in range(rows)])


# ---- pure-grad high-pass mask -------------------------------------------------------------------------------
def high_pass_mask(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The paper's edge mask at ``size`` (width, height): ‖image − 3×3 Gaussian blur‖₂ over channels, 7×7
    median filtered, kept where above its median. Removes gradient noise on flat regions."""
    pixels = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    kernel = np.array([1.0, 2.0, 1.0], dtype=np.float32) / 4.0
    rows = sum(kernel[i] * padded[i : i + pixels.shape[0]] for i in range(3))
    blurred = sum(kernel[j] * rows[:, j : j + pixels.shape[1]] for j in range(3))
    edges = np.linalg.norm(pixels - blurred, axis=2).astype(np.float32)
    smoothed = np.asarray(Image.fromarray(edges, "F").filter(ImageFilter.MedianFilter(7)), dtype=np.float32)
    return smoothed > np.median(smoothed)


def pool_to_grid(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean-pool a per-pixel map onto a (rows, cols) grid (cells split by integer edges, none empty)."""
    rows, cols = grid
    height, width = values.shape
    ys = np.round(np.linspace(0, height, rows + 1)).astype(int)
    xs = np.round(np.linspace(0, width, cols + 1)).astype(int)
    table = np.zeros((height + 1, width + 1), dtype=np.float64)
    table[1:, 1:] = values.astype(np.float64).cumsum(0).cumsum(1)
    sums = table[ys[1:]][:, xs[1:]] - table[ys[:-1]][:, xs[1:]] - table[ys[1:]][:, xs[:-1]] + table[ys[:-1]][:, xs[:-1]]
    areas = np.maximum(np.outer(np.diff(ys), np.diff(xs)), 1)
    return (sums / areas).astype(np.float32)


# ---- CARVE-style masked image -------------------------------------------------------------------------------
def carve_image(image: Image.Image, values: np.ndarray, keep: float = 0.25, floor: float = 0.15) -> Image.Image:
    """The image with low-attention regions faded toward grey (CARVE replaces the input with such an image).

    The map is upsampled bilinearly to the image, the top ``keep`` fraction of pixels gets weight 1 and the
    rest fades linearly with their value down to ``floor``; pixels become ``w·pixel + (1 − w)·grey``.
    """
    width, height = image.size
    grid = np.asarray(values, dtype=np.float32)
    grid = grid - grid.min()
    up = np.asarray(Image.fromarray(grid, "F").resize((width, height), Image.BILINEAR), dtype=np.float32)
    threshold = float(np.quantile(up, 1.0 - keep))
    weight = np.clip(up / threshold, 0.0, 1.0) if threshold > 0 else np.ones_like(up)
    weight = floor + (1.0 - floor) * weight
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = weight[..., None] * pixels + (1.0 - weight[..., None]) * 128.0
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")


def image_blocks(image: Image.Image, high_res_block: int | None) -> tuple[list[Image.Image], tuple[int, int]]:
    """The image whole (``[image], (1, 1)``), or its blocks (`split_blocks`) and their (rows, columns) layout."""
    blocks, layout = split_blocks(image.size, high_res_block)
    if layout == (1, 1):
        return [image], layout
    return [image.crop(tuple(int(v) for v in b.to_list())) for b in blocks], layout
