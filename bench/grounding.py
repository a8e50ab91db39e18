"""Grounding accuracy of each `foveate.tools.grounding` backend on `world:grounding` (held-out eval seed).

    python bench/grounding.py                    # demo model, 40 items
    python bench/grounding.py --model DIR --n 200 --detector OWLV2_DIR --layer 1

Each item is "Locate the {phrase}." with one gold box; every backend grounds the phrase (its best region is the
prediction) and the table prints accuracy@0.5 (IoU ≥ 0.5) and mean IoU by target size, plus the wall time per
item. Backends: ``vlm`` (the model's own ``bbox_2d`` answer), ``attention-tight@f`` (rel-att map of "Where is the
{phrase}?", the connected region of cells ≥ f × peak), ``attention-window`` (ViCrop's square window), and
``detector`` when ``--detector`` names a local zero-shot detector directory (none can be had offline here).
Also printed: ``centre-prior``, a fixed square of the median gold side at the image centre: the floor any real
grounder must beat.

Measured with the demo model (v20), `python bench/grounding.py --n 40 [--layer 1]`, one run, 2 idle cores: see
README.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

SIZES = ("tiny", "small", "medium", "large")


def phrase_of(question: str) -> str:
    """ "Locate the red star. Answer with its bounding box." → "red star"."""
    return question.removeprefix("Locate the ").split(". Answer")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VLM directory (default: the demo model)")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--layer", type=int, default=0, help="decoder layer the attention backends read")
    parser.add_argument("--detector", default=None, help="a local zero-shot detector directory (OWLv2, Grounding DINO)")
    args = parser.parse_args()

    from foveate.agents.oracle_crop import model_input_side
    from foveate.api import DEMO_MODEL_DIR
    from foveate.eval.runner import resolve_tasks
    from foveate.policies.transformers_vlm import TransformersVLM
    from foveate.tools.boxes import Box
    from foveate.tools.grounding import AttentionGrounder, DetectorGrounder, VLMGrounder, thresholded_box
    from foveate.tools.images import load_image
    from foveate.tools.saliency import select_box

    policy = TransformersVLM(args.model or DEMO_MODEL_DIR)
    tasks = resolve_tasks("world:grounding", n=args.n)
    backends: dict[str, Any] = {"vlm": VLMGrounder(policy)}
    if args.detector:
        backends["detector"] = DetectorGrounder(args.detector)
    # The attention variants share one map per item (the map is the cost; the box is numpy on it).
    attention = AttentionGrounder(policy, args.layer)
    side = float(model_input_side(policy))
    variants = {
        "attention-tight@0.5": lambda heat, size: thresholded_box(heat, size, 0.5)[0],
        "attention-tight@0.8": lambda heat, size: thresholded_box(heat, size, 0.8)[0],
        "attention-window": lambda heat, size: select_box(heat, size, side).box or thresholded_box(heat, size)[0],
    }
    golds = [Box(*row["boxes"][0]) for row in tasks.rows]
    median_side = statistics.median(max(b.width, b.height) for b in golds)
    ious: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seconds: dict[str, float] = defaultdict(float)
    for row, gold in zip(tasks.rows, golds, strict=True):
        image = load_image(row["image"])
        phrase = phrase_of(row["question"])
        size = row["target_size"]
        for name, grounder in backends.items():
            started = time.perf_counter()
            found = grounder.ground(image, [phrase])[0]
            seconds[name] += time.perf_counter() - started
            ious[name][size].append(found[0].box.iou(gold) if found else 0.0)
        started = time.perf_counter()
        heat = attention.maps(image, [phrase])[0]
        elapsed = time.perf_counter() - started
        for name, make_box in variants.items():
            seconds[name] += elapsed
            ious[name][size].append(make_box(heat, image.size).iou(gold))
        print(f"{len(ious['vlm'][size])} {size} done", flush=True)
        cx, cy = image.size[0] / 2, image.size[1] / 2
        prior = Box(cx - median_side / 2, cy - median_side / 2, cx + median_side / 2, cy + median_side / 2)
        ious["centre-prior"][size].append(prior.iou(gold))

    table = Table(title=f"world:grounding, n={len(tasks.rows)}: accuracy@0.5 % (mean IoU) by target size")
    table.add_column("backend")
    sizes = [s for s in SIZES if any(ious[name][s] for name in ious)]
    for size in [*sizes, "all"]:
        n = sum(len(ious["vlm"][s]) for s in sizes) if size == "all" else len(ious["vlm"][size])
        table.add_column(f"{size} (n={n})", justify="right")
    table.add_column("s/item", justify="right")
    for name, by_size in ious.items():
        cells = []
        for size in [*sizes, "all"]:
            values = [v for s in sizes for v in by_size[s]] if size == "all" else by_size[size]
            accuracy = 100 * sum(v >= 0.5 for v in values) / len(values) if values else 0.0
            cells.append(f"{accuracy:.1f} ({statistics.fmean(values) if values else 0:.3f})")
        per_item = f"{seconds[name] / len(tasks.rows):.2f}" if name in seconds else "–"
        table.add_row(name, *cells, per_item)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
