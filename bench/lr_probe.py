"""Can a fresh tiny VLM learn to read colour at a given learning rate? The check that found why demo model v0
never looked (its learning rates were too high for a from-scratch model).

    python bench/lr_probe.py --lrs 2e-3,3e-4

Per learning rate: a fresh Qwen2-VL of the demo model's size (`configs/probes/demo-v1.yaml`), one coloured circle of
random size and position on white (8 colours), "What colour is the object?", 250 AdamW steps of 16 examples
through the real training collator (`rl.sft.ChatCollator`, assistant-only labels), no auxiliary loss; then
first-token accuracy on 128 new images (chance 0.125). Seeded.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from foveate.rl.sft import IGNORE, ChatCollator, build_model, load_recipe
from foveate.world.scenes import COLORS

NAMES = list(COLORS)[:8]  # red … pink: none is white, so a white canvas shows them all


def example(rng: random.Random) -> dict:
    color = rng.choice(NAMES)
    image = Image.new("RGB", (672, 672), "white")
    side = rng.randint(80, 250)
    x, y = rng.randint(0, 672 - side), rng.randint(0, 672 - side)
    ImageDraw.Draw(image).ellipse((x, y, x + side, y + side), fill=COLORS[color])
    question = [{"type": "image", "image": image}, {"type": "text", "text": "What colour is the object?"}]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": color}]}


def run(lr: float, steps: int, workdir: Path) -> tuple[float, float, float]:
    """(final training loss, first-token accuracy, seconds) for one learning rate."""
    torch.manual_seed(0)
    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "probes" / "demo-v1.yaml")
    model, processor, _ = build_model(recipe, workdir / f"lr{lr:g}")
    collator = ChatCollator(processor, max_length=512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng, started = random.Random(0), time.perf_counter()
    for _ in range(steps):
        loss = model(**collator([example(rng) for _ in range(16)])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    rng, hits = random.Random(99), 0
    with torch.no_grad():
        for _ in range(8):
            batch = collator([example(rng) for _ in range(16)])
            logits, labels = model(**batch).logits, batch["labels"]
            for row in range(labels.shape[0]):
                first = (labels[row] != IGNORE).nonzero()[0].item()
                hits += logits[row, first - 1].argmax().item() == labels[row, first].item()
    return loss.item(), hits / 128, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", default="2e-3,3e-4", help="comma-separated learning rates")
    parser.add_argument("--steps", type=int, default=250, help="optimiser steps per learning rate")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table = Table(title=f"colour of one object after {args.steps} steps from scratch (chance 0.125)")
    for column in ("learning rate", "final loss", "first-token accuracy", "seconds"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for lr in (float(value) for value in args.lrs.split(",")):
            loss, accuracy, seconds = run(lr, args.steps, Path(tmp))
            table.add_row(f"{lr:g}", f"{loss:.3f}", f"{accuracy:.3f}", f"{seconds:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
