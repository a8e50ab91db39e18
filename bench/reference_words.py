"""Which words name the target of the world's attribute questions — what a model must bind by, per preset.

    python bench/reference_words.py [--presets large,default,simple] [--scenes 400]   # ≈ 10 s
    python bench/reference_words.py --items results.items.jsonl --tasks TASKS.jsonl     # accuracy by kind

An attribute question names its object by the shortest unique phrase without the asked attribute
(`foveate.world.describe.unique_reference`): a colour question by shape, shape + size or shape + label; a shape
question by colour, colour + size or colour + label. A model whose vision tokens carry colour and shape but not size
can bind only the first kind. This counts the kinds over held-out scenes (seed 999, the evaluator's).

Measured (400 scenes per preset; share of the preset's attribute questions):

| preset | colour by shape | + size | + label | shape by colour | + size | + label |
|---|---|---|---|---|---|---|
| large | 0.20 | 0.23 | 0.07 | 0.27 | 0.17 | 0.06 |
| default | 0.17 | 0.25 | 0.12 | 0.20 | 0.21 | 0.06 |
| simple | 0.44 | 0.06 | 0.01 | 0.42 | 0.05 | 0.01 |

``--items`` breaks an evaluation's attribute accuracy down the same way: the items file `foveate eval --out
results.json` writes beside its results, and the tasks.jsonl it ran (``$FOVEATE_HOME/tasks/<preset>-seed…/``).
The demo model v14 on `world:large` (``FOVEATE_HOME=/tmp/e foveate eval --task world:large --strategies direct
--n 300 --out R.json``; accuracy %, questions): colour by shape 63.2 (19), + size 52.2 (23), + label 0.0 (5); shape
by colour 50.0 (20), + size 21.1 (19), + label 20.0 (5).

So 40 % of `world:large` attribute questions name their target with a size word (a phrase with a label counts
as a label phrase); 11 % of those in `simple` scenes (1-4 medium/large objects, the demo recipe's stage 4) do.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from foveate.world import iter_scenes
from foveate.world.describe import SIZE_WORDS

KINDS = ("plain", "size", "label")


def naming_kind(question: str) -> str:
    """How an attribute question names its target: "label", "size" or "plain" (its other attribute alone)."""
    if " marked " in question:
        return "label"
    return "size" if any(f" {word} " in question for word in SIZE_WORDS.values()) else "plain"


def kinds(preset: str, n_scenes: int) -> tuple[collections.Counter, int]:
    """Counts of (asked attribute, naming kind) over the preset's attribute questions, and their total."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for _scene, rows in itertools.islice(iter_scenes(999, preset), n_scenes):
        for row in rows:
            if row["family"] == "attribute":
                counts[(row["subtype"], naming_kind(row["question"]))] += 1
                total += 1
    return counts, total


def accuracy_by_kind(items_path: str, tasks_path: str) -> Table:
    """Per strategy: attribute accuracy (%, and n) by asked attribute and naming kind."""
    questions = {}
    for line in Path(tasks_path).read_text().splitlines():
        row = json.loads(line)
        questions[row["id"]] = row["question"]
    scores: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
    for line in Path(items_path).read_text().splitlines():
        item = json.loads(line)
        if item["family"] == "attribute" and item.get("score") is not None and item["id"] in questions:
            scores[(item["strategy"], item["subtype"], naming_kind(questions[item["id"]]))].append(item["score"])
    table = Table(title=f"attribute accuracy by how the question names its target ({items_path})")
    table.add_column("strategy")
    for asked in ("color", "shape"):
        for kind in KINDS:
            table.add_column(f"{asked}: {kind}", justify="right")
    for strategy in sorted({key[0] for key in scores}):
        cells = []
        for asked in ("color", "shape"):
            for kind in KINDS:
                values = scores.get((strategy, asked, kind), [])
                cells.append(f"{100 * sum(values) / len(values):.1f} ({len(values)})" if values else "-")
        table.add_row(strategy, *cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="large,default,simple", help="comma-separated world presets")
    parser.add_argument("--scenes", type=int, default=400, help="held-out scenes per preset")
    parser.add_argument("--items", help="an evaluation's items.jsonl: break its attribute accuracy down instead")
    parser.add_argument("--tasks", help="the tasks.jsonl that evaluation ran (with --items)")
    args = parser.parse_args()
    if args.items:
        if not args.tasks:
            parser.error("--items needs --tasks")
        Console().print(accuracy_by_kind(args.items, args.tasks))
        return
    table = Table(title=f"how attribute questions name their target (share; seed 999, {args.scenes} scenes)")
    table.add_column("preset")
    table.add_column("questions", justify="right")
    for asked in ("color", "shape"):
        for kind in KINDS:
            table.add_column(f"{asked}: {kind}", justify="right")
    for preset in args.presets.split(","):
        counts, total = kinds(preset, args.scenes)
        shares = [f"{counts[(asked, kind)] / max(total, 1):.2f}" for asked in ("color", "shape") for kind in KINDS]
        table.add_row(preset, str(total), *shares)
    Console().print(table)


if __name__ == "__main__":
    main()
