"""`foveate world ...` commands. The main CLI mounts `world_app` with ``app.add_typer(world_app, name="world")``.

Example::

    foveate world generate --out out/world-small --n 200 --seed 0 --preset small-detail
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from foveate.errors import FoveateError
from foveate.world.dataset import generate_dataset, load_tasks
from foveate.world.presets import PRESETS
from foveate.world.questions import SPLITS

__all__ = ["world_app"]

world_app = typer.Typer(
    help="The seeded synthetic world: scenes and questions with exact ground truth.", no_args_is_help=True
)


@world_app.callback()
def _world() -> None:
    """The seeded synthetic world: scenes and questions with exact ground truth."""
    # An explicit callback keeps `generate` a named sub-command even while it is the only one.


@world_app.command()
def generate(
    out: Path = typer.Option(..., "--out", help="Output directory (images/, tasks.jsonl, scenes.jsonl, meta.json)."),
    n: int = typer.Option(100, "--n", min=1, help="Number of questions (scenes carry 1-3 questions each)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed and preset give byte-identical files."),
    preset: str = typer.Option("default", "--preset", help=f"One of: {', '.join(PRESETS)}."),
) -> None:
    """Generate a benchmark / training set and print how many questions fall in each family and split."""
    console = Console()
    try:
        tasks_path = generate_dataset(out, n=n, seed=seed, preset=preset)
    except FoveateError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    rows = load_tasks(tasks_path)
    counts = Counter((r["family"], r["split"]) for r in rows)
    splits = [s for s in SPLITS if any(k[1] == s for k in counts)]
    table = Table(
        title=f"{len(rows)} questions, {len({r['scene_id'] for r in rows})} scenes, preset {preset}, seed {seed}"
    )
    table.add_column("family")
    for s in splits:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for family in sorted({f for f, _ in counts}):
        cells = [str(counts.get((family, s), 0)) for s in splits]
        table.add_row(family, *cells, str(sum(counts.get((family, s), 0) for s in splits)))
    console.print(table)
    clutter = Counter(r["clutter"] for r in rows)
    console.print(f"clutter: {dict(sorted(clutter.items()))}   written to {tasks_path.parent}")


@world_app.command("presets")
def list_presets() -> None:
    """List the presets and their main settings."""
    console = Console()
    table = Table(title="world presets")
    for col in ("preset", "canvas", "objects", "splits", "clutter prob"):
        table.add_column(col)
    for name, cfg in PRESETS.items():
        canvases = ", ".join(f"{w}x{h}" for w, h in cfg.scene.canvas_sizes)
        lo, hi = cfg.scene.n_objects
        table.add_row(name, canvases, f"{lo}-{hi}", ", ".join(cfg.questions.splits), f"{cfg.scene.clutter_prob:g}")
    console.print(table)
