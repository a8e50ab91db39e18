"""An auxiliary objective that makes a from-scratch vision tower informative before the decoder needs it.

Measured on the demo model (configs/demo.yaml): trained on question answering alone, a randomly initialised
Qwen2-VL learns the world's answer priors long before its vision tower carries colour or shape, and then stays
there — its direct accuracy was the same with and without the right crop. Pretrained VLMs never face this
because their vision encoder comes from CLIP-style pretraining; this module stands in for that pretraining
(and `TrainConfig.vision_only` runs it alone, as a vision pretraining stage).

Two linear heads on the merger's output (the tokens the decoder reads), trained with cross-entropy beside the
language loss. Linear on purpose: they ask those tokens to carry the attributes linearly.

- Colour, per cell (`cell_targets`): every merged vision token (one cell of the merge grid, 28×28 input pixels
  in Qwen2-VL) is labelled with the colour of the object covering at least `min_cover` of it (the one drawn last
  wins where objects overlap), "background" only where the cell shows no object pixel at all, and every other
  cell (an object edge, a tiny object covering a sliver) is ignored rather than called background.
- Shape, per object (`object_members`, the default): the max over the cells an object touches, then one
  classification per object. Shape is not a property of a cell: an interior cell shows only fill, an edge cell a
  piece of outline. Labelling every object of a multi-object scene gives about five shape labels per image.
- Shape, per cell (``shape_labels="cell"``, what the shipped demo model v1 was trained with): the colour rule
  with the object's shape as the label. ``"both"`` adds this per-cell head to the per-object one: once a tower
  knows an object's shape (after a per-object stage) it asks every cell of the object to carry it, so the
  decoder's attention, a weighted mean over cells, can read it as easily as colour (with word-aligned heads the
  per-cell head is word-aligned too, so every cell points at the shape word). Measured with a linear per-cell
  head, it does not: after 600 steps of stage 2 from the probe recipe's stage-1 tower, a linear probe of the mean
  over an object's cells names 62 % of held-out shapes with it and 64 % without (`bench/vision_probe.py --frozen
  DIR --frozen-pool mean`), and the decoder's first-token shape accuracy on one-object scenes is 0.38
  (`bench/first_token.py`).
  `python bench/vision_probe.py` compares the two (and mean pooling) on a fresh tower; `--frozen DIR` measures
  what a trained tower carries (configs/probes/demo-vision-pretrain.yaml's stage 1: 74 % on held-out objects).

Word-aligned heads (``aligned="all"``, `TrainConfig.aux_word_aligned`): instead of free linear heads, each class is
scored by the cosine between the token and the decoder's own (tied input/output) embedding of the class's answer
word ("red", "star"; a learned vector for "background"), times a learned scale. The tokens are then asked to point
where the language model's output layer already reads the answer, so answering is a copy of the right token rather
than a new readout the decoder must discover; the gradient moves the embeddings too. The answer words must each be
one token (tokenizers built by `policies.tiny` after bare words were added to its corpus). Measured after stage 2
(600 steps of one-object questions) from the same 336-px tower (configs/probes/demo-v5.yaml), whole-answer shape
accuracy on held-out one-object scenes is 0.76 with word alignment and 0.21 (chance) without (`python
bench/first_token.py DIR --presets single,simple`); colour was still at its prior (0.20) in both, and with every
head aligned it stayed there through stage 3 (0.13: "green" to almost every colour question) while shape fell back
to 0.63. ``aligned="shape"`` aligns the shape head only and keeps a linear colour head: after the same stage 2,
shape 0.69 and colour 0.20, so the shape gain comes from the shape head's alignment alone.

Colour did not stay at its prior for lack of colour in the tokens: after that stage 3 the mean vision token of an
object names its colour word for 0.99 of held-out objects (`python bench/word_readout.py DIR`). The decoder
learns one copy at a time. From that model, 300 steps of colour and shape questions on one-object scenes gave
shape 0.86 and colour 0.20, while 300 steps of colour questions alone (`DataMix.questions`) gave colour 1.00, and
300 more steps of every one-object question then gave colour 1.00 and shape 0.80 (`bench/first_token.py`):
configs/probes/demo-v6.yaml orders its stages that way.

``aligned="question"`` scores every class a second time against the word as a question writes it (" star", a
different token from the answer's "star") and averages the two losses, so the question's words, the answer words
and the objects' tokens point the same way; the hope was that matching a question word to its object would then
need only a near-identity query-key map. Measured, it does not help binding: from configs/probes/demo-v6.yaml's
stage-3 model, 300 steps of 1-4-object questions (its stage 4's data, seed 2) give whole-answer colour 0.56 on
1-4-object scenes and 0.30 on `large` with it, 0.62 and 0.37 without (shape 0.42 / 0.29 and 0.43 / 0.29;
`python bench/first_token.py DIR --presets single,simple,large`, about 80 and 46 questions).

Only the full scene image of an example is labelled (labelling crops too, and per-cell size and box heads, were
tried and removed: the model card says what they measured). The heads exist only during training (`attach` /
`detach`); saved models are plain Qwen2-VL checkpoints.

The `bench/…` diagnostics and `configs/probes/…` recipes cited here measured the demo model while it was built;
they left the tree with the rest of the lab notebook (`git log --diff-filter=D --stat -- bench/ configs/probes/`
lists them; the model card, foveate/assets/models/demo/README.md, sums up what they found).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from foveate.world.scenes import COLORS, SHAPES, Scene, object_mask

IGNORE = -100  # the label of a token no loss reads
COLOR_CLASSES: tuple[str, ...] = ("background", *COLORS)
SHAPE_CLASSES: tuple[str, ...] = SHAPES  # per-object shape labels
CELL_SHAPE_CLASSES: tuple[str, ...] = ("background", *SHAPES)  # per-cell shape labels (shape_labels="cell")
SHAPE_LABELS = ("object", "cell", "both")
ALIGNED_HEADS = ("none", "all", "shape", "question")  # which heads are word-aligned ("question": see VisionAuxHeads)
# What `batch_targets` adds to a batch.
TARGET_KEYS = ("aux_color", "aux_members", "aux_shape", "aux_cell_shape")


def object_index_map(scene: Scene) -> np.ndarray:
    """Per pixel of the scene: the index of the object drawn there (later objects on top), or -1."""
    index = np.full((scene.height, scene.width), -1, dtype=np.int16)
    for number, obj in enumerate(scene.objects):
        x1, y1, x2, y2 = obj.box
        mask = np.asarray(object_mask(obj.shape, x2 - x1, y2 - y1)) >= 128
        index[y1:y2, x1:x2][mask] = number
    return index


def cell_coverage(scene: Scene, grid_h: int, grid_w: int) -> np.ndarray:
    """coverage[k, i, j]: the fraction of cell (i, j) showing object k; k = len(scene.objects) is background."""
    index = object_index_map(scene)
    rows = np.linspace(0, index.shape[0], grid_h + 1).round().astype(int)
    cols = np.linspace(0, index.shape[1], grid_w + 1).round().astype(int)
    n_labels = len(scene.objects) + 1
    # One bincount over (cell, label) pairs: a full-size mask per object (the obvious numpy) costs a pass over the
    # pixels per object, which made the aux targets the dataloader's largest cost on 1344 px scenes.
    cell_of_row = np.repeat(np.arange(grid_h), np.diff(rows))
    cell_of_col = np.repeat(np.arange(grid_w), np.diff(cols))
    label = np.where(index < 0, n_labels - 1, index).astype(np.int64)  # background is the last label
    pair = (cell_of_row[:, None] * grid_w + cell_of_col[None, :]) * n_labels + label
    pixels = np.bincount(pair.ravel(), minlength=grid_h * grid_w * n_labels).reshape(grid_h, grid_w, n_labels)
    return pixels.transpose(2, 0, 1) / np.outer(np.diff(rows), np.diff(cols))


def cell_targets(
    scene: Scene, grid_h: int, grid_w: int, min_cover: float = 0.3, coverage: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Colour and (per-cell) shape class ids, or IGNORE, for each cell of a grid_h × grid_w grid, in raster order.
    ``coverage``: `cell_coverage` of the same grid when the caller has it already."""
    coverage = cell_coverage(scene, grid_h, grid_w) if coverage is None else coverage
    colors = _cell_labels(scene, coverage, min_cover, lambda obj: COLOR_CLASSES.index(obj.color))
    shapes = _cell_labels(scene, coverage, min_cover, lambda obj: CELL_SHAPE_CLASSES.index(obj.shape))
    return colors, shapes


def cell_owners(coverage: np.ndarray, n_objects: int, min_cover: float = 0.3) -> np.ndarray:
    """Per cell of a `cell_coverage` grid, raster order: the index of the object covering the most of it when that
    is at least `min_cover`, else -1 (background, an object edge, a sliver of a tiny object)."""
    if not n_objects:
        return np.full(coverage[0].size, -1)
    objects = coverage[:n_objects].reshape(n_objects, -1)
    return np.where(objects.max(axis=0) >= min_cover, objects.argmax(axis=0), -1)


def _cell_labels(scene: Scene, coverage: np.ndarray, min_cover: float, label_of: Any) -> np.ndarray:
    """Per cell, raster order: ``label_of(obj)`` of its `cell_owners` object, 0 (background) where no object pixel
    shows, IGNORE elsewhere (edges, slivers of tiny objects)."""
    n_objects = len(scene.objects)
    labels = np.full(coverage[0].size, IGNORE, dtype=np.int64)
    labels[coverage[n_objects].ravel() == 1.0] = 0
    owners = cell_owners(coverage, n_objects, min_cover)
    for number, obj in enumerate(scene.objects):
        labels[owners == number] = label_of(obj)
    return labels


def object_members(
    scene: Scene,
    grid_h: int,
    grid_w: int,
    min_cover: float = 0.3,
    member_cover: float = 0.1,
    coverage: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Shape targets per object: (members [n, grid_h·grid_w] bool, shape ids [n]).

    Only objects that cover at least `min_cover` of some cell are labelled (a tiny object is a few input pixels:
    its shape is not there to learn); an object's members are the cells it covers by at least `member_cover`.
    ``coverage``: `cell_coverage` of the same grid when the caller has it already.
    """
    coverage = cell_coverage(scene, grid_h, grid_w) if coverage is None else coverage
    coverage = coverage[: len(scene.objects)].reshape(len(scene.objects), -1)
    keep = [k for k in range(len(scene.objects)) if coverage[k].max() >= min_cover]
    members = coverage[keep] >= member_cover
    shapes = np.array([SHAPE_CLASSES.index(scene.objects[k].shape) for k in keep], dtype=np.int64)
    return members.reshape(len(keep), grid_h * grid_w), shapes


def labelled_images(examples: list[dict[str, Any]], first_image_index: list[int]) -> dict[int, Scene]:
    """Batch image index → scene for every image the aux loss labels: each example's scene image (its first)."""
    return {
        first: example["scene"]
        for first, example in zip(first_image_index, examples, strict=True)
        if example.get("scene") is not None
    }


def batch_targets(
    examples: list[dict[str, Any]],
    scene_image_index: list[int],
    image_grid_thw: torch.Tensor,
    merge_size: int = 2,
) -> dict[str, torch.Tensor]:
    """Targets for every merged token of a batch (images in processor order); unlabelled images get none.

    ``scene_image_index``: each example's first image (its scene).
    ``aux_color`` / ``aux_cell_shape``: one class id (or IGNORE) per merged token; ``aux_members``:
    [objects, merged tokens] bool, the cells of each labelled object; ``aux_shape``: each labelled object's shape id.
    """
    labelled = labelled_images(examples, scene_image_index)
    colors, cell_shapes, object_rows, shapes, offset = [], [], [], [], 0
    n_tokens = int(sum(t * (h // merge_size) * (w // merge_size) for t, h, w in image_grid_thw.tolist()))
    for image, (t, h, w) in enumerate(image_grid_thw.tolist()):
        grid_h, grid_w = h // merge_size, w // merge_size
        if image in labelled:
            scene = labelled[image]
            # One coverage per image, shared by every label kind.
            coverage = cell_coverage(scene, grid_h, grid_w)
            color, cell_shape = cell_targets(scene, grid_h, grid_w, coverage=coverage)
            colors.append(np.tile(color, t))
            cell_shapes.append(np.tile(cell_shape, t))
            members, object_shapes = object_members(scene, grid_h, grid_w, coverage=coverage)
            rows = np.zeros((len(object_shapes), n_tokens), dtype=bool)
            rows[:, offset : offset + grid_h * grid_w] = members  # the first frame's tokens (images have one)
            object_rows.append(rows)
            shapes.append(object_shapes)
        else:
            colors.append(np.full(t * grid_h * grid_w, IGNORE))
            cell_shapes.append(colors[-1])
        offset += t * grid_h * grid_w
    return {
        "aux_color": torch.from_numpy(np.concatenate(colors)),
        "aux_cell_shape": torch.from_numpy(np.concatenate(cell_shapes)),
        "aux_members": torch.from_numpy(np.concatenate(object_rows) if object_rows else np.zeros((0, n_tokens), bool)),
        "aux_shape": torch.from_numpy(np.concatenate(shapes) if shapes else np.zeros(0, np.int64)),
    }


class WordAlignedHead(nn.Module):
    """Class scores = learned scale × cosine(token, the class word's embedding); `None` ids get learned vectors.
    A class word of several tokens (a list of ids) is the mean of their embeddings."""

    def __init__(self, embedding: nn.Embedding, token_ids: list[int | list[int] | None], scale: float = 10.0) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list, so the shared embedding is not registered (and saved) twice
        pieces = [[] if i is None else [i] if isinstance(i, int) else list(i) for i in token_ids]
        width = max(1, *(len(p) for p in pieces))
        self.register_buffer("token_ids", torch.tensor([p + [0] * (width - len(p)) for p in pieces]))
        weights = [[1 / len(p) if k < len(p) else 0.0 for k in range(width)] for p in pieces]  # mean over pieces
        self.register_buffer("piece_weight", torch.tensor(weights))
        self.learned = nn.Parameter(torch.randn(len(token_ids), embedding.embedding_dim) * embedding.weight.std())
        self.register_buffer("is_learned", torch.tensor([i is None for i in token_ids]))
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(scale))))
        self.bias = nn.Parameter(torch.zeros(len(token_ids)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        words = (self._embedding[0].weight[self.token_ids] * self.piece_weight[..., None]).sum(dim=1)
        classes = torch.where(self.is_learned[:, None], self.learned, words)
        cosine = nn.functional.normalize(features, dim=-1) @ nn.functional.normalize(classes, dim=-1).T
        return self.log_scale.exp() * cosine + self.bias


def word_ids(tokenizer: Any, classes: tuple[str, ...]) -> list[int | None]:
    """The single token id of each class word as an answer writes it; None for "background"."""
    ids: list[int | None] = []
    for name in classes:
        if name == "background":
            ids.append(None)
            continue
        pieces = tokenizer(name, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"word-aligned heads need one token per class word; {name!r} is {len(pieces)} tokens")
        ids.append(pieces[0])
    return ids


def question_word_ids(tokenizer: Any, classes: tuple[str, ...]) -> list[list[int] | None]:
    """The token ids of each class word as a question writes it (after a space: " red"); None for "background".
    Some are several tokens (" hexagon"); `WordAlignedHead` takes their mean."""
    return [
        None if name == "background" else tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        for name in classes
    ]


class VisionAuxHeads(nn.Module):
    """Two probes on the merged vision tokens (linear, or word-aligned given the model's embedding and tokenizer);
    `attach` hooks them onto a Qwen2-VL model."""

    def __init__(
        self,
        hidden_size: int,
        shape_labels: str = "object",
        embedding: nn.Embedding | None = None,
        tokenizer: Any = None,
        aligned: str = "none",
    ) -> None:
        super().__init__()
        if shape_labels not in SHAPE_LABELS:
            raise ValueError(f"shape_labels must be one of {SHAPE_LABELS}, got {shape_labels!r}")
        self.shape_labels = shape_labels
        shape_classes = SHAPE_CLASSES if shape_labels != "cell" else CELL_SHAPE_CLASSES
        if aligned not in ALIGNED_HEADS:
            raise ValueError(f"aligned must be one of {ALIGNED_HEADS}, got {aligned!r}")
        if aligned != "none" and (embedding is None or tokenizer is None):
            raise ValueError("word-aligned heads need the model's input embedding and its tokenizer")
        if aligned in ("all", "question"):
            self.color = WordAlignedHead(embedding, word_ids(tokenizer, COLOR_CLASSES))
        else:
            self.color = nn.Linear(hidden_size, len(COLOR_CLASSES))
        if aligned != "none":
            self.shape = WordAlignedHead(embedding, word_ids(tokenizer, shape_classes))
        else:
            self.shape = nn.Linear(hidden_size, len(shape_classes))
        # "question": the same classes scored again against the words as questions write them (" red", " star"),
        # so a question word, the answer word and the object's vision tokens all point the same way.
        self.question_heads = (
            nn.ModuleList(
                [
                    WordAlignedHead(embedding, question_word_ids(tokenizer, COLOR_CLASSES)),
                    WordAlignedHead(embedding, question_word_ids(tokenizer, shape_classes)),
                ]
            )
            if aligned == "question"
            else None
        )
        # "both": a second, per-cell shape head beside the per-object one; word-aligned when the heads are, so every
        # cell of an object points at its shape word (what one attention read, a weighted mean of cells, sees).
        self.cell_shape: nn.Module | None = None
        if shape_labels == "both":
            self.cell_shape = (
                WordAlignedHead(embedding, word_ids(tokenizer, CELL_SHAPE_CLASSES))
                if aligned != "none"
                else nn.Linear(hidden_size, len(CELL_SHAPE_CLASSES))
            )
        self.merged: torch.Tensor | None = None  # the merger output of the latest forward pass

    def loss(
        self,
        aux_color: torch.Tensor,
        aux_members: torch.Tensor,
        aux_shape: torch.Tensor,
        aux_cell_shape: torch.Tensor | None = None,
        background_weight: float | None = None,
    ) -> torch.Tensor:
        """Per-cell colour cross-entropy + shape cross-entropy, per object (max-pooled) or per cell.

        Per-cell terms, ``background_weight=None``: the mean over every labelled cell; a number w: the mean over
        object cells + w × the mean over background cells (about 60 of a scene's 64 cells are background, so the
        plain mean is mostly background and says little about the objects).
        """
        if self.merged is None or self.merged.shape[0] != aux_color.shape[0]:
            raise RuntimeError("vision aux targets do not match the merged tokens of the forward pass")
        features, self.merged = self.merged, None
        targets = (aux_color, aux_members, aux_shape, aux_cell_shape)
        total = self._heads_loss(self.color, self.shape, features, *targets, background_weight)
        if self.question_heads is not None:
            question = self._heads_loss(*self.question_heads, features, *targets, background_weight)
            total = (total + question) / 2
        return total

    def _heads_loss(
        self,
        color_head: nn.Module,
        shape_head: nn.Module,
        features: torch.Tensor,
        aux_color: torch.Tensor,
        aux_members: torch.Tensor,
        aux_shape: torch.Tensor,
        aux_cell_shape: torch.Tensor | None,
        background_weight: float | None,
    ) -> torch.Tensor:
        total = _cell_loss(color_head(features), aux_color.to(features.device), background_weight)
        if self.shape_labels != "object":
            if aux_cell_shape is None:
                raise RuntimeError("per-cell shape labels need aux_cell_shape targets")
            cell_head = shape_head if self.cell_shape is None else self.cell_shape
            total = total + _cell_loss(cell_head(features), aux_cell_shape.to(features.device), background_weight)
            if self.shape_labels == "cell":
                return total
        if aux_shape.numel():
            members = aux_members.to(features.device)
            # [objects, tokens, hidden] would be large; the max over each object's cells, one object at a time.
            pooled = torch.stack([features[row].amax(dim=0) for row in members])
            total = total + nn.functional.cross_entropy(shape_head(pooled), aux_shape.to(features.device))
        return total


def _cell_loss(logits: torch.Tensor, targets: torch.Tensor, background_weight: float | None) -> torch.Tensor:
    """Cross-entropy over labelled cells (class 0 = background), balanced as `VisionAuxHeads.loss` says."""
    per_cell = nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    labelled, objects = targets != IGNORE, targets > 0
    if background_weight is None:
        return _mean(per_cell, labelled)
    return _mean(per_cell, objects) + background_weight * _mean(per_cell, labelled & ~objects)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; zero (not NaN) when nothing is selected."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def attach(
    model: Any,
    shape_labels: str = "object",
    aligned: str = "none",
    tokenizer: Any = None,
) -> VisionAuxHeads:
    """Add the heads as `model.foveate_aux` (so the optimizer sees them) and capture the merger's output.
    ``aligned`` ("all" or "shape", with the model's `tokenizer`): those heads are word-aligned to its embeddings."""
    embedding = model.get_input_embeddings() if aligned != "none" else None
    hidden = model.config.text_config.hidden_size
    heads = VisionAuxHeads(hidden, shape_labels, embedding, tokenizer, aligned)
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
