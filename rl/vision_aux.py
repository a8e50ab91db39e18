"""An auxiliary dense objective that makes a from-scratch vision tower informative before the decoder needs it.

Measured on the demo model (configs/demo.yaml): trained on question answering alone, a randomly initialised
Qwen2-VL learns the world's answer priors long before its vision tower carries colour or shape, and then stays
there — its direct accuracy was the same with and without the right crop. Pretrained VLMs never face this
because their vision encoder comes from CLIP-style pretraining; this module stands in for that pretraining.

Every merged vision token (one cell of the image's merge grid, 28×28 input pixels in Qwen2-VL) is labelled
from the world's exact ground truth with the colour and the shape of the object that covers it, or
"background", and two linear heads on the merger's output are trained with cross-entropy beside the language
loss. Linear heads on purpose: they ask the tokens the decoder reads to carry these attributes linearly.
The heads exist only during training (`attach` / `detach`); saved models are plain Qwen2-VL checkpoints.

Cell labels (`cell_targets`): the object that covers at least `min_cover` of the cell (the one drawn last
wins where objects overlap); "background" only where the cell shows no object pixel at all; every other cell
(an object edge, a tiny object that covers a sliver) is ignored rather than called background.
Only the full scene image of an example is labelled; crops and tool-returned images are ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from foveate.world.scenes import COLORS, SHAPES, Scene, object_mask

IGNORE = -100
COLOR_CLASSES: tuple[str, ...] = ("background", *COLORS)
SHAPE_CLASSES: tuple[str, ...] = ("background", *SHAPES)


def object_index_map(scene: Scene) -> np.ndarray:
    """Per pixel of the scene: the index of the object drawn there (later objects on top), or -1."""
    index = np.full((scene.height, scene.width), -1, dtype=np.int16)
    for number, obj in enumerate(scene.objects):
        x1, y1, x2, y2 = obj.box
        mask = np.asarray(object_mask(obj.shape, x2 - x1, y2 - y1)) >= 128
        index[y1:y2, x1:x2][mask] = number
    return index


def cell_targets(scene: Scene, grid_h: int, grid_w: int, min_cover: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Colour and shape class ids (or IGNORE) for each cell of a grid_h × grid_w grid, in raster order."""
    index = object_index_map(scene)
    rows = np.linspace(0, scene.height, grid_h + 1).round().astype(int)
    cols = np.linspace(0, scene.width, grid_w + 1).round().astype(int)
    n_objects = len(scene.objects)
    # coverage[k, i, j] = pixels of object k (k = n_objects: background) in cell (i, j); reduceat sums each span.
    one_hot = np.stack([index == k for k in range(n_objects)] + [index == -1]).astype(np.int32)
    coverage = np.add.reduceat(np.add.reduceat(one_hot, rows[:-1], axis=1), cols[:-1], axis=2)
    cell_area = np.outer(np.diff(rows), np.diff(cols))
    best = coverage[:n_objects].argmax(axis=0) if n_objects else np.zeros((grid_h, grid_w), dtype=int)
    best_cover = coverage[:n_objects].max(axis=0) / cell_area if n_objects else np.zeros((grid_h, grid_w))
    colors = np.full((grid_h, grid_w), IGNORE, dtype=np.int64)
    shapes = np.full((grid_h, grid_w), IGNORE, dtype=np.int64)
    empty = coverage[n_objects] == cell_area
    colors[empty] = shapes[empty] = 0
    for number, obj in enumerate(scene.objects):
        cells = (best == number) & (best_cover >= min_cover)
        colors[cells] = COLOR_CLASSES.index(obj.color)
        shapes[cells] = SHAPE_CLASSES.index(obj.shape)
    return colors.ravel(), shapes.ravel()


def batch_targets(
    examples: list[dict[str, Any]], scene_image_index: list[int], image_grid_thw: torch.Tensor, merge_size: int = 2
) -> dict[str, torch.Tensor]:
    """Targets for every merged token of a batch (images in processor order); IGNORE for unlabelled images."""
    colors, shapes = [], []
    labelled = {
        image: example["scene"]
        for image, example in zip(scene_image_index, examples, strict=True)
        if example.get("scene") is not None
    }
    for image, (t, h, w) in enumerate(image_grid_thw.tolist()):
        grid_h, grid_w = h // merge_size, w // merge_size
        if image in labelled:
            color, shape = cell_targets(labelled[image], grid_h, grid_w)
            colors.append(np.tile(color, t))
            shapes.append(np.tile(shape, t))
        else:
            colors.append(np.full(t * grid_h * grid_w, IGNORE))
            shapes.append(np.full(t * grid_h * grid_w, IGNORE))
    return {
        "aux_color": torch.from_numpy(np.concatenate(colors)),
        "aux_shape": torch.from_numpy(np.concatenate(shapes)),
    }


class VisionAuxHeads(nn.Module):
    """Two linear probes on the merged vision tokens; `attach` hooks them onto a Qwen2-VL model."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.color = nn.Linear(hidden_size, len(COLOR_CLASSES))
        self.shape = nn.Linear(hidden_size, len(SHAPE_CLASSES))
        self.merged: torch.Tensor | None = None  # the merger output of the latest forward pass

    def loss(
        self, aux_color: torch.Tensor, aux_shape: torch.Tensor, background_weight: float | None = None
    ) -> torch.Tensor:
        """Colour + shape cross-entropy. ``background_weight=None``: the mean over every labelled cell;
        a number w: the mean over object cells + w × the mean over background cells (about 60 of a scene's 64
        cells are background, so the plain mean is mostly background and says little about the objects)."""
        if self.merged is None or self.merged.shape[0] != aux_color.shape[0]:
            raise RuntimeError("vision aux targets do not match the merged tokens of the forward pass")
        features, self.merged = self.merged, None
        total = features.new_zeros(())
        for head, targets in ((self.color, aux_color), (self.shape, aux_shape)):
            targets = targets.to(features.device)
            per_cell = nn.functional.cross_entropy(head(features), targets, ignore_index=IGNORE, reduction="none")
            labelled, objects = targets != IGNORE, targets > 0
            if background_weight is None:
                total = total + _mean(per_cell, labelled)
            else:
                total = total + _mean(per_cell, objects) + background_weight * _mean(per_cell, labelled & ~objects)
        return total


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; zero (not NaN) when nothing is selected."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def attach(model: Any) -> VisionAuxHeads:
    """Add the heads as `model.foveate_aux` (so the optimizer sees them) and capture the merger's output."""
    heads = VisionAuxHeads(model.config.text_config.hidden_size)
    model.foveate_aux = heads

    def keep_merged(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        heads.merged = output

    heads.hook = model.model.visual.merger.register_forward_hook(keep_merged)
    return heads


def detach(model: Any) -> None:
    """Remove the heads and the hook before saving, so the checkpoint is a plain Qwen2-VL model."""
    heads = getattr(model, "foveate_aux", None)
    if heads is not None:
        heads.hook.remove()
        del model.foveate_aux
