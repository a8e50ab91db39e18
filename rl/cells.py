"""The cell rule the auxiliary heads share (`rl.vision_aux`, `rl.box_aux`): which object owns a merged token."""

from __future__ import annotations

import numpy as np

IGNORE = -100  # the label of a token no loss reads


def cell_owners(coverage: np.ndarray, n_objects: int, min_cover: float = 0.3) -> np.ndarray:
    """Per cell of a `cell_coverage` grid, raster order: the index of the object covering the most of it when that
    is at least `min_cover`, else -1 (background, an object edge, a sliver of a tiny object)."""
    if not n_objects:
        return np.full(coverage[0].size, -1)
    objects = coverage[:n_objects].reshape(n_objects, -1)
    return np.where(objects.max(axis=0) >= min_cover, objects.argmax(axis=0), -1)
