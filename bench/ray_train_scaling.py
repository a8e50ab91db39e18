"""Ray Train: 2 workers vs 1 at the same global batch — the same loss curve within noise, and the throughput ratio.

    python bench/ray_train_scaling.py [--steps 8] [--global-batch 4]

Runs the VisRL DPO recipe (``configs/rl/visrl.yaml``, demo model, stage 1: the box step) on Ray Train (a local Ray
started by the run, gloo on CPU) once with 1 worker at ``per_device_batch = global`` and once with 2 workers at
``global / 2`` each, from the same preference pairs (sampled once, shared by both runs) and the same seed. The
Trainer logs the loss averaged over the ranks. The batches are not the same examples: one worker shuffles with a
RandomSampler, two with a DistributedSampler, so the curves can only agree within batch-to-batch noise; the table
puts the largest difference beside the loss's own range over the run. DPO is used because its loss is a
deterministic function of the batch; a GRPO loss also depends on the rollouts sampled. Throughput is pairs/s from
the Trainer's own ``train_samples_per_second`` (excludes Ray start-up); on a shared machine the two runs see
different neighbours, so read one run's ratio with that in mind.
The preference thresholds accept any box so that a dozen items give enough pairs. Takes several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from foveate.rl.runs import load_config
from foveate.rl.visrl_dpo import PAIRS_DIR, DPORecipe, build_preferences, train


def stage1(run: Path) -> tuple[list[float], float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("stage") == "stage1"]
    losses = [r["loss"] for r in records if "loss" in r]
    speed = next(r["train_samples_per_second"] for r in records if "train_samples_per_second" in r)
    return losses, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=4)
    options = parser.parse_args()
    os.environ.setdefault("FOVEATE_HOME", tempfile.mkdtemp(prefix="foveate-bench-"))
    root = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    base = load_config(
        DPORecipe,
        "configs/rl/visrl.yaml",
        {"data": "world:large", "n_items": 16, "samples": 4, "box_high": 0.0, "box_low": 1.0, "save_steps": 1000},
    )
    base = replace(base, stage1_steps=options.steps, stage2_steps=1)
    shared = root / "pairs"
    build_preferences(base, shared)
    pairs = json.loads((shared / PAIRS_DIR / "summary.json").read_text())["pairs"]
    runs = {}
    for workers in (1, 2):
        run = root / f"workers-{workers}"
        shutil.copytree(shared / PAIRS_DIR, run / PAIRS_DIR)
        recipe = replace(base, output_dir=str(run), ray_workers=workers, batch_size=options.global_batch // workers)
        train(recipe, resume=True)  # resume=True: the run directory already holds the shared preferences
        runs[workers] = stage1(run)
    (one, speed_one), (two, speed_two) = runs[1], runs[2]
    table = Table(title=f"DPO stage 1 on Ray Train, global batch {options.global_batch}, {pairs} pairs")
    for column in ("step", "loss, 1 worker", "loss, 2 workers", "difference"):
        table.add_column(column)
    for step, (a, b) in enumerate(zip(one, two, strict=False), 1):
        table.add_row(str(step), f"{a:.5f}", f"{b:.5f}", f"{b - a:+.5f}")
    Console().print(table)
    spread = max(one) - min(one)
    gap = max(abs(a - b) for a, b in zip(one, two, strict=False))
    summary = Table(title="2 workers vs 1")
    for column in (
        "largest loss difference",
        "loss range over the run (1 worker)",
        "pairs/s 1 worker",
        "pairs/s 2 workers",
        "ratio",
    ):
        summary.add_column(column)
    summary.add_row(
        f"{gap:.5f}", f"{spread:.5f}", f"{speed_one:.3f}", f"{speed_two:.3f}", f"{speed_two / speed_one:.2f}x"
    )
    Console().print(summary)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
