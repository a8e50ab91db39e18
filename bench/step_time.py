"""What one SFT step costs at each input resolution and patch merge — the price of seeing more pixels.

    python bench/step_time.py            # ≈ 1 min

For each model geometry (a fresh tiny Qwen2-VL of the v1 demo model's size, `configs/probes/demo-v1.yaml`, with the
input side and merge size of the row) and each data mix (the demo recipe's full mix; one-object questions), times
the forward + backward + AdamW step of four prepared batches of 16 examples with the vision aux loss attached, as
`rl.sft` trains, and prints the median seconds per step and its ratio to 224 px with a 2×2 merge measured in the
same run. Batches are collated before timing, so the dataloader's rendering is not in the numbers.

Measured on the 2-core machine (idle):

| geometry | full mix | one-object questions |
|---|---|---|
| 224 px, 2×2 | 0.75 s (1.0×) | 0.33 s (1.0×) |
| 336 px, 3×3 | 1.28 s (1.7×) | 0.86 s (2.6×) |
| 336 px, 2×2 | 1.49 s (2.0×) | 0.90 s (2.7×) |
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from timing import mix_step_medians  # noqa: E402

from foveate.rl.sft import SFTRecipe, build_model, load_recipe  # noqa: E402
from foveate.rl.sft_data import DataMix  # noqa: E402

GEOMETRIES = {"224 px, 2×2": (224 * 224, 2), "336 px, 3×3": (336 * 336, 3), "336 px, 2×2": (336 * 336, 2)}


def time_steps(
    demo: SFTRecipe, max_pixels: int, merge_size: int, mixes: dict[str, DataMix], batches: int
) -> dict[str, float]:
    """Median seconds per optimiser step for each mix, on a fresh model of the demo recipe's size at this geometry."""
    recipe = replace(demo, model=replace(demo.model, max_pixels=max_pixels, merge_size=merge_size))
    model, processor, _ = build_model(recipe, Path(f"/tmp/foveate-step-time/{max_pixels}-{merge_size}"))
    return mix_step_medians(model, processor, mixes, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4, help="timed steps per geometry and mix")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    demo = load_recipe(Path(__file__).parents[1] / "configs" / "probes" / "demo-v1.yaml")
    mixes = {"full mix": demo.data, "one-object questions": DataMix(formats={"qa": 1.0}, presets={"single": 1.0})}
    results = {
        name: time_steps(demo, pixels, merge, mixes, args.batches) for name, (pixels, merge) in GEOMETRIES.items()
    }
    baseline = results["224 px, 2×2"]
    table = Table(title=f"seconds per step of 16 examples ({args.threads} threads; ratio to 224 px, 2×2)")
    table.add_column("geometry")
    for mix in mixes:
        table.add_column(mix, justify="right")
    for name, medians in results.items():
        table.add_row(name, *(f"{medians[mix]:.2f} ({medians[mix] / baseline[mix]:.1f}×)" for mix in mixes))
    Console().print(table)


if __name__ == "__main__":
    main()
