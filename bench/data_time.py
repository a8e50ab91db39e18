"""What the dataloader costs per SFT batch, part by part, beside what the training step itself costs.

    python bench/data_time.py                         # ≈ 1 min; the v1 demo recipe's full-mix stage
    python bench/data_time.py --config configs/probes/demo-v8.yaml --stage 5

On a 2-core machine the dataloader worker and the training step's two torch threads share the cores, so every
CPU second of data preparation per batch slows the step. For a recipe stage (its data mix, aux and attention
targets as the recipe sets them), this renders `--batches` batches of the stage's batch size and times, per batch:
rendering the examples (`rl.sft_data.example_stream`), the collator without targets (chat template, processor,
labels), the vision aux targets (`rl.vision_aux.batch_targets`) and, kept here only as the baseline, the same
targets computed the obvious way (a full-size mask per object per image, summed per cell with `np.add.reduceat`,
which is what `cell_coverage` did before it counted (cell, object) pairs with one `np.bincount`), and the attention
targets. Then it times the forward + backward + AdamW step of a fresh model of the recipe's size on those batches.

Measured on the 2-core machine (idle), `--config configs/probes/demo-v8.yaml --stage 5` (the full mix, crops
labelled), CPU seconds per batch of 16: rendering 0.29, collator without targets 0.65, aux targets 0.24 against
1.37 for the baseline (5.8×), so data preparation 1.18 against 2.31 (2.0×); the training step alone 2.20 s wall.
The worker and the step share two cores, so this is what a real run feels: that stage's settings from a fresh
model for 50 steps (`foveate train sft` on demo-v8.yaml without its `stages` list, `max_steps: 50`) took 167 s
(3.35 s per step) with the bincount and 276 s (5.52 s per step) with the baseline, 1.65× faster, one run after the
other on the idle machine.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import statistics
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from timing import aux_step_seconds, timed  # noqa: E402

from foveate.rl import attention_supervision, vision_aux  # noqa: E402
from foveate.rl.sft import ChatCollator, build_model, load_recipe  # noqa: E402
from foveate.rl.sft_data import example_stream  # noqa: E402


def mask_per_object_coverage(scene, grid_h, grid_w, window=None, index=None):
    """The baseline: `vision_aux.cell_coverage` with one full-size mask per object, summed per cell."""
    # The baseline also rebuilt the object map for every image.
    index, rows, cols = vision_aux.cell_grid(vision_aux.object_index_map(scene), grid_h, grid_w, window)
    one_hot = np.stack([index == k for k in range(len(scene.objects))] + [index == -1]).astype(np.int32)
    pixels = np.add.reduceat(np.add.reduceat(one_hot, rows[:-1], axis=1), cols[:-1], axis=2)
    return pixels / np.outer(np.diff(rows), np.diff(cols))


def data_seconds(examples_per_batch: list[list[dict]], collator: ChatCollator, train) -> dict[str, list[float]]:
    """CPU seconds per batch of each data part (the worker is one process: CPU time is what it takes away).
    Aux targets are timed when the stage trains with them; attention targets likewise."""
    merge = collator.processor.image_processor.merge_size
    image_token = collator.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for examples in examples_per_batch:
        _, cpu, batch = timed(partial(collator, examples))
        parts["collator without targets"].append(cpu)
        first = list(itertools.accumulate([len(_images(e)) for e in examples], initial=0))[:-1]
        grid = batch["image_grid_thw"]
        if train.aux_weight:
            aux = partial(vision_aux.batch_targets, examples, first, grid, merge, train.aux_label_crops)
            _, cpu, targets = timed(aux)
            parts["aux targets"].append(cpu)
            with mock.patch.object(vision_aux, "cell_coverage", mask_per_object_coverage):
                _, cpu, baseline_targets = timed(aux)
            parts["aux targets, baseline"].append(cpu)
            assert all(torch.equal(targets[key], baseline_targets[key]) for key in targets), "the coverages disagree"
        if train.attn_weight:
            attn = partial(
                attention_supervision.batch_targets,
                examples, first, batch["input_ids"], batch["labels"], grid, image_token, merge,
            )  # fmt: skip
            parts["attention targets"].append(timed(attn)[1])
    return parts


def _images(example: dict) -> list:
    return [
        part["image"]
        for message in example["messages"]
        if not isinstance(message["content"], str)
        for part in message["content"]
        if part["type"] == "image"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).parents[1]
    parser.add_argument("--config", default=str(root / "configs" / "probes" / "demo-v1.yaml"), help="an SFT recipe")
    parser.add_argument("--stage", type=int, default=0, help="1-based stage of the recipe; 0 = its last stage")
    parser.add_argument("--batches", type=int, default=6, help="batches to time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training step")
    args = parser.parse_args()
    recipe = load_recipe(args.config)
    stage = recipe.all_stages()[args.stage - 1 if args.stage else -1]
    train = stage.train
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor, _ = build_model(recipe, Path("/tmp/foveate-data-time"))
    stream = example_stream(train.seed, stage.data)
    render = [timed(lambda: list(itertools.islice(stream, train.batch_size))) for _ in range(args.batches)]
    examples_per_batch = [examples for _, _, examples in render]
    collator = ChatCollator(processor, max_length=train.max_length)
    parts = {"render examples": [cpu for _, cpu, _ in render]} | data_seconds(examples_per_batch, collator, train)
    full = ChatCollator(processor, train.max_length, aux_targets=True, label_crops=train.aux_label_crops)
    vision_aux.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = aux_step_seconds(model, optimizer, [full(examples) for examples in examples_per_batch])

    medians = {name: statistics.median(seconds) for name, seconds in parts.items()}
    data_now = sum(seconds for name, seconds in medians.items() if name != "aux targets, baseline")
    table = Table(title=f"{Path(args.config).name} stage {args.stage or len(recipe.all_stages())}: median per batch "
                  f"of {train.batch_size} ({args.batches} batches)")  # fmt: skip
    table.add_column("part")
    table.add_column("seconds", justify="right")
    for name, seconds in medians.items():
        table.add_row(f"{name} (CPU)", f"{seconds:.3f}")
    table.add_row("data preparation, total (CPU)", f"{data_now:.3f}")
    if "aux targets" in medians:
        before = data_now - medians["aux targets"] + medians["aux targets, baseline"]
        table.add_row("… with the baseline aux targets", f"{before:.3f} ({before / data_now:.1f}×)")
    table.add_row(f"training step of the whole model ({args.threads} threads, wall)", f"{statistics.median(step):.3f}")
    Console().print(table)
    if "aux targets" in medians:
        print(f"aux targets: baseline / bincount = {medians['aux targets, baseline'] / medians['aux targets']:.1f}×")


if __name__ == "__main__":
    main()
