"""Overhead of the strategy machinery over a raw model call.

    python bench/overhead.py

Compares ``foveate.ask(image, question, strategy="direct", policy=policy)`` — image loading, the content-addressed
image store, building and running the LangGraph graph, and the trace — with a raw ``policy.chat_one`` on the same
image and question, on the tiny random Qwen2-VL (``init_std=0.5``, seed 0) built in a temporary directory.
``FOVEATE_HOME`` points at that directory, so nothing is written to ``~/.cache``. After a warm-up, each of
5 repetitions times both calls (greedy, 16 new tokens); the table shows wall and process CPU time and the ratio
ask / raw. About 20 s on an idle 2-core CPU. Prints only; asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table
from timing import timed  # bench/timing.py

REPEATS = 5
MAX_NEW_TOKENS = 16
QUESTION = "What color is the square?"


def scene() -> Image.Image:
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((80, 60, 300, 260), fill="red")
    draw.ellipse((360, 240, 560, 440), fill="blue")
    return image


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FOVEATE_HOME"] = str(Path(tmp) / "home")
        import foveate
        from foveate.policies.base import SamplingParams
        from foveate.policies.tiny import TinyConfig, build_tiny_model
        from foveate.policies.transformers_vlm import TransformersVLM

        policy = TransformersVLM(build_tiny_model(Path(tmp) / "tiny", TinyConfig(init_std=0.5), seed=0))
        image_path = Path(tmp) / "scene.png"
        scene().save(image_path)
        content = [{"type": "image", "image": scene()}, {"type": "text", "text": QUESTION}]
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)

        def raw() -> str:
            return policy.chat_one([{"role": "user", "content": content}], params).text.strip()

        def ask() -> str:
            result = foveate.ask(image_path, QUESTION, strategy="direct", policy=policy, max_new_tokens=MAX_NEW_TOKENS)
            return result.answer

        raw(), ask()  # warm-up: kernels, graph imports, first store write
        rows = []
        for _ in range(REPEATS):
            raw_wall, raw_cpu, raw_answer = timed(raw)
            ask_wall, ask_cpu, ask_answer = timed(ask)
            rows.append((raw_wall, ask_wall, raw_cpu, ask_cpu, raw_answer == ask_answer))

    title = f"foveate.ask(strategy='direct') vs raw chat_one (tiny Qwen2-VL, 640×480 PNG, {MAX_NEW_TOKENS} tokens)"
    table = Table(title=title)
    columns = ["run", "raw s", "ask s", "ask / raw", "overhead ms", "raw CPU s", "ask CPU s", "CPU ratio"]
    for column in [*columns, "same answer"]:
        table.add_column(column, justify="right")

    def cells(raw_wall, ask_wall, raw_cpu, ask_cpu) -> list[str]:
        return [
            f"{raw_wall:.3f}",
            f"{ask_wall:.3f}",
            f"{ask_wall / raw_wall:.2f}×",
            f"{1000 * (ask_wall - raw_wall):.0f}",
            f"{raw_cpu:.3f}",
            f"{ask_cpu:.3f}",
            f"{ask_cpu / raw_cpu:.2f}×",
        ]

    for index, (raw_wall, ask_wall, raw_cpu, ask_cpu, same) in enumerate(rows, start=1):
        table.add_row(str(index), *cells(raw_wall, ask_wall, raw_cpu, ask_cpu), str(same))
    table.add_row("median", *cells(*[statistics.median(row[i] for row in rows) for i in range(4)]), "")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
