"""What a deeper or wider decoder costs per SFT step of the demo recipe — the price of a larger language model.

    python bench/decoder_size.py            # ≈ 3 min

Every demo model so far has a 3-layer, 192-wide decoder. For each decoder variant (the demo recipe's model,
`configs/demo.yaml`, with the row's depth / width / heads; the vision tower unchanged) and for the data of the
recipe's stage 4 (1-4 objects, a scene's questions as one chat) and stage 5 (the full mix), this times the
forward + backward + AdamW step of prepared batches of 16 examples with the vision aux loss attached, and prints
the median seconds and the ratio to the recipe's own decoder measured in the same run. Batches are collated
before timing, so rendering is not in the numbers; attention supervision (stage 4) is left out of both.

Measured on the 2-core machine (idle; 3 timed steps per cell, so about ± 10 %):

| decoder | M params (no tower) | stage 4 (chats) | stage 5 (full mix) |
|---|---|---|---|
| 3 × 192 (demo) | 1.54 | 1.71 s (1.00×) | 1.86 s (1.00×) |
| 4 × 192 | 1.94 | 1.51 s (0.89×) | 1.94 s (1.05×) |
| 6 × 192 | 2.72 | 1.81 s (1.06×) | 2.45 s (1.32×) |
| 3 × 256 | 2.60 | 1.40 s (0.82×) | 1.80 s (0.97×) |

Three steps are few: a second run with one timed step, beside another job, gave 3 × 256 1.33× on stage 5 and 2.15×
on stage 4. The real build is the better measure: configs/probes/demo-v16.yaml (4 × 256) ran stage 4 in 25 min
against v14's 18 (1.4×, on a machine not always idle), stages 1-3 as fast as v14's.
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

from foveate.rl.sft import build_model, load_recipe  # noqa: E402

# name → (layers, hidden, heads, kv heads, MLP width)
VARIANTS = {
    "3 × 192 (demo)": (3, 192, 6, 2, 512),
    "4 × 192": (4, 192, 6, 2, 512),
    "6 × 192": (6, 192, 6, 2, 512),
    "3 × 256": (3, 256, 8, 2, 704),
}


def parameters(model) -> float:
    """Millions of parameters outside the vision tower."""
    return sum(p.numel() for n, p in model.named_parameters() if ".visual." not in f".{n}") / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=3, help="timed steps per variant and stage")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    stages = recipe.all_stages()
    mixes = {"stage 4 (chats, 1-4 objects)": stages[3].data, "stage 5 (full mix)": stages[4].data}
    rows, baseline = [], {}
    for name, (layers, hidden, heads, kv_heads, mlp) in VARIANTS.items():
        model_config = replace(
            recipe.model,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=mlp,
        )
        model, processor, _ = build_model(replace(recipe, model=model_config), Path(f"/tmp/foveate-decoder/{name}"))
        medians = mix_step_medians(model, processor, mixes, args.batches, max_length=1024)
        baseline = baseline or medians
        rows.append((name, parameters(model), medians))
    table = Table(title="seconds per step of 16 examples (2 threads; ratio to the demo's decoder)")
    table.add_column("decoder")
    table.add_column("M params (no tower)", justify="right")
    for mix_name in mixes:
        table.add_column(mix_name, justify="right")
    for name, millions, medians in rows:
        cells = [f"{medians[m]:.2f} ({medians[m] / baseline[m]:.2f}×)" for m in mixes]
        table.add_row(name, f"{millions:.2f}", *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
