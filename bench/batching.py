"""Padded batching vs one-at-a-time generation on the tiny model.

    python bench/batching.py

Builds the tiny random Qwen2-VL (``init_std=0.5`` so answers differ by input, seed 0) in a temporary directory and
answers 8 different image conversations greedily with ``max_new_tokens=32``: once as 8 sequential
``chat([conversation])`` calls and once as a single ``chat(conversations)`` call (one left-padded batch). After a
warm-up of both, each is timed 3 times; the table shows wall time and process CPU time for both and the ratio
sequential / batched. CPU time is shown because on a shared machine wall time mostly measures the neighbours.
Takes about a minute on an idle 2-core CPU. Prints only; asserts nothing.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table
from timing import timed  # bench/timing.py

from foveate.policies.base import SamplingParams
from foveate.policies.tiny import TinyConfig, build_tiny_model
from foveate.policies.transformers_vlm import TransformersVLM

REPEATS = 3
PARAMS = SamplingParams(max_new_tokens=32)
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
SIZES = [(224, 224), (300, 900), (900, 300), (160, 120), (640, 480), (96, 96), (1024, 768), (200, 400)]
QUESTIONS = [
    "What color is the square?",
    "How many circles are there?",
    "Where is the star?",
    "Is there a small triangle in the image?",
    "Which shape is on the left?",
    "What is written on the label?",
    "Describe the image.",
    "What color is the object in the top right corner?",
]


def conversations() -> list[list[dict]]:
    """Eight different image conversations (sizes, colours, questions)."""
    items = []
    for color, (width, height), question in zip(COLORS, SIZES, QUESTIONS, strict=True):
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle((width // 8, height // 8, width // 2, height // 2), fill=color)
        draw.ellipse((width // 2, height // 2, width * 7 // 8, height * 7 // 8), fill="black")
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        items.append([{"role": "user", "content": content}])
    return items


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", TinyConfig(init_std=0.5), seed=0)
        policy = TransformersVLM(model_dir)
        items = conversations()

        def sequential():
            return [policy.chat([conversation], PARAMS)[0] for conversation in items]

        def batched():
            return policy.chat(items, PARAMS)

        sequential()  # warm-up: first-call allocations and kernel selection
        batched()
        rows = []
        for _ in range(REPEATS):
            seq_wall, seq_cpu, one_by_one = timed(sequential)
            bat_wall, bat_cpu, together = timed(batched)
            same = [r.text for r in one_by_one] == [r.text for r in together]
            rows.append((seq_wall, bat_wall, seq_cpu, bat_cpu, same, sum(r.completion_tokens for r in together)))

    table = Table(title=f"8 conversations, greedy, max_new_tokens={PARAMS.max_new_tokens} (tiny Qwen2-VL, CPU)")
    columns = ["run", "sequential s", "batched s", "seq / batched", "seq CPU s", "batched CPU s", "CPU ratio"]
    for column in [*columns, "same answers", "generated tokens"]:
        table.add_column(column, justify="right")

    def cells(seq_wall, bat_wall, seq_cpu, bat_cpu) -> list[str]:
        return [
            f"{seq_wall:.2f}",
            f"{bat_wall:.2f}",
            f"{seq_wall / bat_wall:.2f}×",
            f"{seq_cpu:.2f}",
            f"{bat_cpu:.2f}",
            f"{seq_cpu / bat_cpu:.2f}×",
        ]

    for index, (seq_wall, bat_wall, seq_cpu, bat_cpu, same, tokens) in enumerate(rows, start=1):
        table.add_row(str(index), *cells(seq_wall, bat_wall, seq_cpu, bat_cpu), str(same), str(tokens))
    medians = [statistics.median(row[i] for row in rows) for i in range(4)]
    table.add_row("median", *cells(*medians), "", "")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
