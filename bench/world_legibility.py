"""Is a world target legible at the demo model's input resolution? Evidence that tiny targets are not, large are.

    python bench/world_legibility.py                       # small-detail and large, 150 questions each
    python bench/world_legibility.py --presets highres --n 40
    python bench/world_legibility.py --presets zoom large --n 150      # the zoom preset beside a legible one

Each image is downscaled the way the model's processor does it (PIL bicubic to about 336 x 336 pixels, the demo
model's budget, aspect kept; ``--input``) and the question's limiting object (the one whose size class is the
row's ``target_size``) is measured:

- ``side``: the object's side in input pixels (a Qwen2-VL patch is 14 input pixels, a merged token 28).
- ``purity``: coverage of the input pixel most "inside" the object (1.0: at least one pixel is pure fill).
- ``mean_col_err``: RGB distance between the true fill and the coverage-weighted mean colour of the object at
  input resolution (0 at full resolution; grows as the object's colour bleeds into the background).
- ``margin@in`` / ``margin@zoom``: RMS grey levels separating the object from the most similar OTHER shape drawn
  in the same place (box jittered by half a pixel and +-10 % in size, since no viewer knows the exact sub-pixel
  box), at input resolution and at full resolution (what a 3x zoom restores). Small = shapes look alike.
- ``label_h``: text ink height in input pixels (text questions); ``txt_contrast``: luminance std inside the label
  box after the downscale relative to full resolution (strokes blurred into the fill push it towards 0).

All columns are medians over the questions of a family. ``legible@in`` / ``legible@2s`` / ``legible@zoom`` are
the fractions of questions whose margin reaches ``--legible-margin`` grey levels (default 40: about the margin of
a `large`-preset target at the input, whose shape the demo model reads; see the printed `large` rows).

Rows without an object target (existence "no" with no near-miss object) are skipped.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from collections import defaultdict

import numpy as np
from PIL import Image

from foveate.world import BACKGROUNDS, COLORS, SHAPES, iter_items, object_mask
from foveate.world.scenes import Scene, WorldObject


def input_size(width: int, height: int, side: int) -> tuple[int, int]:
    """Processor-style resize target: about side*side pixels in total, aspect ratio kept."""
    k = side / math.sqrt(width * height)
    return max(1, round(width * k)), max(1, round(height * k))


def canvas_mask(scene: Scene, obj: WorldObject) -> Image.Image:
    """Full-canvas coverage mask of `obj`, minus any label ink drawn on it (text is not fill colour)."""
    full = Image.new("L", (scene.width, scene.height), 0)
    x1, y1, x2, y2 = obj.box
    full.paste(object_mask(obj.shape, x2 - x1, y2 - y1), (x1, y1))
    if obj.label_placement == "on" and obj.label_box:
        full.paste(0, tuple(obj.label_box))
    return full


@functools.lru_cache(maxsize=512)
def _mask(shape: str, side: int) -> Image.Image:
    return object_mask(shape, side, side)


def shape_margin(scene: Scene, obj: WorldObject, image: np.ndarray, k: float) -> float:
    """Grey levels (RMS over the object's window) separating the observed object from the most similar OTHER shape.

    Templates of every other shape are rendered with the true fill and background, at the true box jittered by
    half a pixel of the viewing resolution and +-10 % in size (a viewer never knows the exact sub-pixel box), and
    downscaled the same way as the image. A margin of a few grey levels means "indistinguishable in practice".
    """
    x1, y1, x2, y2 = obj.box
    side = x2 - x1
    size = (round(scene.width * k), round(scene.height * k))
    pad = max(2.0, 0.15 * side * k)  # pad in viewing pixels
    wx1, wy1 = max(0, math.floor(x1 * k - pad)), max(0, math.floor(y1 * k - pad))
    wx2, wy2 = min(size[0], math.ceil(x2 * k + pad)), min(size[1], math.ceil(y2 * k + pad))
    fx1, fy1 = round(wx1 / k), round(wy1 / k)  # the same window in full-resolution pixels
    fw, fh = max(1, round((wx2 - wx1) / k)), max(1, round((wy2 - wy1) / k))
    fill, bg = np.array(COLORS[obj.color], float), np.array(BACKGROUNDS[scene.background], float)
    observed = image[wy1:wy2, wx1:wx2].astype(float)
    keep = np.ones(observed.shape[:2], dtype=bool)
    for other in scene.objects:  # label ink is not shape: ignore pixels it touches
        if other.label_box:
            lx1, ly1, lx2, ly2 = other.label_box
            keep[
                max(0, math.floor(ly1 * k) - wy1) : max(0, math.ceil(ly2 * k) - wy1),
                max(0, math.floor(lx1 * k) - wx1) : max(0, math.ceil(lx2 * k) - wx1),
            ] = False
    if not keep.any():
        return float("nan")
    # Work in coverage ("alpha") space, one channel: project colours on the background -> fill line; the RMS in
    # grey levels is then |fill - bg| times the RMS alpha difference.
    contrast = float(np.linalg.norm(fill - bg))
    alpha = np.clip(((observed - bg) @ (fill - bg)) / contrast**2, 0.0, 1.0)[keep]
    half = 0.5 / k  # half a viewing pixel, in full-resolution pixels
    best = math.inf
    for shape in SHAPES:
        if shape == obj.shape:
            continue
        for scale in (0.9, 1.0, 1.1):
            s = max(2, round(side * scale))
            offsets = {
                (round(x1 + (side - s) / 2 + dx) - fx1, round(y1 + (side - s) / 2 + dy) - fy1)
                for dx in (-half, 0.0, half)
                for dy in (-half, 0.0, half)
            }
            for ox, oy in sorted(offsets):
                local = Image.new("L", (fw, fh), 0)
                local.paste(_mask(shape, s), (ox, oy))
                if k != 1.0:
                    local = local.resize((wx2 - wx1, wy2 - wy1), Image.Resampling.BICUBIC)
                a = np.asarray(local, np.float32)[keep] / 255.0
                best = min(best, contrast * float(np.sqrt(np.mean((alpha - a) ** 2))))
    return best


def measure(scene: Scene, row: dict, image: Image.Image, side: int) -> dict[str, float] | None:
    """Legibility numbers for the row's limiting object, or None if it has no object target."""
    objs = [scene.object(i) for i in row["object_ids"]]
    objs = [o for o in objs if o.size_class == row["target_size"]]
    if not objs:
        return None
    obj = min(objs, key=lambda o: o.box[2] - o.box[0])
    size = input_size(scene.width, scene.height, side)
    small = image.resize(size, Image.Resampling.BICUBIC)
    full_arr, small_arr = np.asarray(image), np.asarray(small)
    k = size[0] / scene.width
    cover = np.asarray(canvas_mask(scene, obj).resize(size, Image.Resampling.BOX), float) / 255.0
    best = np.unravel_index(int(np.argmax(cover)), cover.shape)
    fill = np.array(COLORS[obj.color], float)
    mean = (small_arr.astype(float) * cover[..., None]).sum(axis=(0, 1)) / cover.sum()
    out = {
        "side": (obj.box[2] - obj.box[0]) * k,
        "purity": float(cover[best]),
        "mean_col_err": float(np.linalg.norm(mean - fill)),
        "margin@in": shape_margin(scene, obj, small_arr, k),
        "margin@zoom": shape_margin(scene, obj, full_arr, 1.0),
        "margin@2s": _margin_in_window(scene, obj, image, side),
    }
    if row["family"] == "text" and obj.label_box:
        lx1, ly1, lx2, ly2 = obj.label_box
        out["label_h"] = (ly2 - ly1) * k
        lum_full = full_arr[ly1:ly2, lx1:lx2].astype(float).mean(axis=2).std()
        sx1, sy1 = math.floor(lx1 * k), math.floor(ly1 * k)
        sx2, sy2 = max(sx1 + 1, math.ceil(lx2 * k)), max(sy1 + 1, math.ceil(ly2 * k))
        lum_small = small_arr[sy1:sy2, sx1:sx2].astype(float).mean(axis=2).std()
        out["txt_contrast"] = lum_small / max(lum_full, 1e-6)
    return out


def _margin_in_window(scene: Scene, obj: WorldObject, image: Image.Image, side: int) -> float:
    """Shape margin in a crop of side ``2 * side`` around the object, downscaled to ``side`` (ViCrop's r = 2).

    Seen at half resolution locally, the same as the whole image downscaled 2x; when the whole image is already
    seen at least that finely (a 672 px scene at a 336 input), the window is the image and nothing is gained.
    """
    size = input_size(scene.width, scene.height, side)
    k = max(0.5, size[0] / scene.width)
    view = image.resize((round(scene.width * k), round(scene.height * k)), Image.Resampling.BICUBIC)
    return shape_margin(scene, obj, np.asarray(view), k)


COLUMNS = ("side", "purity", "mean_col_err", "margin@in", "margin@2s", "margin@zoom", "label_h", "txt_contrast")
LEGIBLE = ("margin@in", "margin@2s", "margin@zoom")


def summarise(values: list[dict[str, float]], legible_margin: float) -> list[str]:
    cells = []
    for col in COLUMNS:
        xs = [v[col] for v in values if col in v and not math.isnan(v[col])]
        cells.append(f"{statistics.median(xs):.2f}" if xs else "-")  # medians: robust to the odd clipped box
    for col in LEGIBLE:
        xs = [v[col] for v in values if not math.isnan(v[col])]
        cells.append(f"{sum(x >= legible_margin for x in xs) / len(xs):.2f}" if xs else "-")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small-detail", "large"])
    parser.add_argument("--n", type=int, default=150, help="questions per preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", type=int, default=336, help="model input side (total pixels ~ input^2)")
    parser.add_argument("--legible-margin", type=float, default=40.0, help="grey levels that count as legible")
    args = parser.parse_args()

    header = ["preset", "family", "n", *COLUMNS, *(c.replace("margin", "legible") for c in LEGIBLE)]
    lines = [header]
    for preset in args.presets:
        groups: dict[str, list[dict[str, float]]] = defaultdict(list)
        skipped = 0
        for image, scene, row in iter_items(args.n, args.seed, preset):
            m = measure(scene, row, image, args.input)
            if m is None:
                skipped += 1
                continue
            groups[row["family"]].append(m)
            groups["ALL"].append(m)
        for family in sorted(groups, key=lambda f: (f == "ALL", f)):
            lines.append([preset, family, str(len(groups[family])), *summarise(groups[family], args.legible_margin)])
        if skipped:
            print(f"{preset}: {skipped} rows without an object target skipped")
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    for r in lines:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


if __name__ == "__main__":
    main()
