"""A per-cell box head on the vision tokens: each cell of an object names the object's four edges.

Why: grounding ("Locate the red star" → ``{"bbox_2d": [x1, y1, x2, y2]}``) needs the box somewhere the decoder
can copy it from, and a Qwen2-VL vision tower has no absolute position embedding (2D rotary only, which moves
attention scores, never values), so tokens trained on colour and shape alone hold no position: a linear edge
head on the frozen tokens of the demo model v14 stays at chance (`python bench/box_readout.py DIR --frozen`).
Trained for it, the tower learns to place its objects from the image borders: 13 minutes of a linear head plus
the tower gave large objects acc@0.5 0.92 and medium ones 0.52 (`bench/box_readout.py --steps 3000 --minutes 13`).

Targets (`cell_boxes`): every cell an object owns by the aux labels' rule (`rl.vision_aux.cell_owners`, covered
by it at least 30 %) is labelled with the object's (x1, y1, x2, y2) as bins of `BOX_STEP` thousandths of the image
side, the resolution the demo recipe's grounding answers are written at (`rl.sft_data.DataMix.box_step`); every
other cell is ignored.

Word-aligned (``aligned=True``): edge e's score for bin b is a learned scale × the cosine between a learned linear
map of the token (one per edge, identity at start) and the decoder's embedding of the coordinate token the answer
writes there (x1 after "[" is bare, "120"; y1, x2 and y2 follow ", " and are space-prefixed, " 340"). One map per
edge because a token must carry four numbers at once, three of them from the same vocabulary; the decoder then
copies a coordinate with one linear map of what it attends to. This needs every coordinate to be one token
(`policies.tiny.TinyConfig.box_tokens`). Unaligned: a linear head with 4 × `BOX_BINS` outputs, as the bench's.

Deviation from published grounding VLMs (Qwen2-VL writes boxes as text and learns them from web-scale grounding
data, no auxiliary head): a from-scratch tower gets the position signal directly, standing in for that data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from foveate.rl.cells import IGNORE, cell_owners

BOX_STEP = 20  # thousandths of the image side per bin
BOX_BINS = 1000 // BOX_STEP + 1  # 0, 20, ..., 1000
EDGES = ("x1", "y1", "x2", "y2")


def snap_thousand(box: list[float], step: int) -> list[int]:
    """A 0-1000 box rounded to multiples of ``step``, kept at least one step wide and tall (a tiny object's edges
    would otherwise round onto each other)."""
    x1, y1, x2, y2 = (int(round(value / step)) * step for value in box)
    if x2 <= x1:
        x1, x2 = (x1, x1 + step) if x1 + step <= 1000 else (x2 - step, x2)
    if y2 <= y1:
        y1, y2 = (y1, y1 + step) if y1 + step <= 1000 else (y2 - step, y2)
    return [x1, y1, x2, y2]


def edge_bins(box: tuple[int, int, int, int], width: int, height: int) -> list[int]:
    """The box's (x1, y1, x2, y2) in pixels as bins of `BOX_STEP` thousandths of the image side."""
    thousand = [1000 * box[0] / width, 1000 * box[1] / height, 1000 * box[2] / width, 1000 * box[3] / height]
    return [value // BOX_STEP for value in snap_thousand(thousand, BOX_STEP)]


def cell_boxes(scene: Any, coverage: np.ndarray, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """[cells, 4]: per cell of a `rl.vision_aux.cell_coverage` grid (raster order), its owner's edge bins, or IGNORE
    where no object owns it. ``window``: the scene pixels the image shows (a crop), None for the whole scene; the
    box is then relative to the window and clipped to it."""
    owner = cell_owners(coverage, len(scene.objects))
    targets = np.full((owner.size, 4), IGNORE, dtype=np.int64)
    x0, y0, x_end, y_end = window if window is not None else (0, 0, scene.width, scene.height)
    for number, obj in enumerate(scene.objects):
        cells = owner == number
        if not cells.any():
            continue
        x1, y1, x2, y2 = obj.box
        clipped = (max(x1, x0) - x0, max(y1, y0) - y0, min(x2, x_end) - x0, min(y2, y_end) - y0)
        targets[cells] = edge_bins(clipped, x_end - x0, y_end - y0)
    return targets


def coordinate_ids(tokenizer: Any) -> list[list[int]]:
    """Per edge, the token id of each bin's coordinate as a box answer writes it (x1 bare, the others after a
    space); a coordinate of several tokens is a clear error naming the fix."""
    ids = []
    for edge in EDGES:
        prefix = "" if edge == "x1" else " "
        row = []
        for value in range(0, 1001, BOX_STEP):
            pieces = tokenizer(prefix + str(value), add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ValueError(
                    f"a word-aligned box head needs one token per coordinate; {prefix + str(value)!r} is "
                    f"{len(pieces)} tokens (build the model with TinyConfig.box_tokens: true)"
                )
            row.append(pieces[0])
        ids.append(row)
    return ids


class BoxHead(nn.Module):
    """Edge-bin scores per cell, [cells, 4, `BOX_BINS`]: word-aligned (see the module docstring) or linear."""

    def __init__(self, hidden_size: int, embedding: nn.Embedding | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.aligned = embedding is not None
        if not self.aligned:
            self.linear = nn.Linear(hidden_size, 4 * BOX_BINS)
            return
        self._embedding = [embedding]  # a list, so the shared embedding is not registered (and saved) twice
        self.register_buffer("token_ids", torch.tensor(coordinate_ids(tokenizer)))
        self.maps = nn.ModuleList([nn.Linear(hidden_size, hidden_size, bias=False) for _ in EDGES])
        for layer in self.maps:
            nn.init.eye_(layer.weight)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))
        self.bias = nn.Parameter(torch.zeros(4, BOX_BINS))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.aligned:
            return self.linear(features).view(-1, 4, BOX_BINS)
        words = nn.functional.normalize(self._embedding[0].weight[self.token_ids], dim=-1)  # [4, bins, hidden]
        mapped = torch.stack([nn.functional.normalize(m(features), dim=-1) for m in self.maps], dim=1)
        return self.log_scale.exp() * torch.einsum("ceh,ebh->ceb", mapped, words) + self.bias

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over every labelled (cell, edge); zero when no cell is labelled."""
        labelled = targets[:, 0] != IGNORE
        if not labelled.any():
            return features.sum() * 0.0
        logits = self(features[labelled])
        return nn.functional.cross_entropy(logits.reshape(-1, BOX_BINS), targets[labelled].reshape(-1))
