"""``foveate data convert``: a real benchmark's local copy → a ``tasks.jsonl`` the evaluator reads.

    foveate data convert vstar /data/vstar_bench --out tasks/vstar
    foveate data convert pope /data/coco_pope_adversarial.json --images /data/coco/val2014 --out tasks/pope-adv
    foveate data convert textvqa /data/TextVQA_0.5.1_val.json --images /data/textvqa/train_images --out tasks/tv
    foveate eval --task tasks/vstar --strategies direct,vicrop-rel

The rows are exactly what ``foveate eval --task NAME:PATH`` reads directly (`foveate.eval.benchmarks`), with
absolute image paths, so a converted file can be cut, filtered or merged with others before evaluating. The main
CLI mounts `data_app` with ``app.add_typer(data_app, name="data")``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.console import Console

__all__ = ["data_app"]

data_app = typer.Typer(help="Real benchmarks in the task format.", no_args_is_help=True)


@data_app.callback()
def _data() -> None:
    """Real benchmarks in the task format."""


@data_app.command()
def convert(
    benchmark: str = typer.Argument(..., help="vstar, pope or textvqa"),
    path: Path = typer.Argument(..., help="the benchmark's folder (vstar) or question file (pope, textvqa)"),
    out: Path = typer.Option(..., "--out", help="output folder; tasks.jsonl is written in it"),
    images: Path = typer.Option(None, "--images", help="image folder (pope: COCO val2014; textvqa: its images)"),
) -> None:
    """Convert a benchmark into tasks.jsonl and print how many questions each family and split got."""
    from foveate.eval.benchmarks import load_benchmark, write_tasks

    rows = load_benchmark(benchmark, path, images)
    target = write_tasks(rows, out)
    counts = Counter((row["family"], row["split"]) for row in rows)
    console = Console()
    for (family, split), count in sorted(counts.items()):
        console.print(f"{family:>20} · {split:<8} {count:>6}")
    console.print(f"{len(rows)} questions written to {target}", highlight=False)
