"""Accuracy per wording: a reworded world eval (``world:<preset>@train`` / ``@heldout``) against the templates on the
same items.

    foveate eval --task world:large --n 300 --out plain.json
    foveate eval --task world:large@heldout --n 300 --out heldout.json
    python bench/phrasings.py plain.items.jsonl heldout.items.jsonl [train.items.jsonl]

The first items file is the template run; each other one is a reworded run of the same preset, seed and items. For
each wording (`foveate.world.phrasings` id) it prints the items asked that way, the accuracy in that wording, the
accuracy of the same items asked from the template, and their difference; then one line per pool. Rows are
rebuilt with `foveate.eval.runner.resolve_tasks` (deterministic: the same seed gives the same wordings).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from foveate.eval.runner import resolve_tasks


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path, help="items file of the template run (world:<preset>)")
    parser.add_argument("reworded", type=Path, nargs="+", help="items files of world:<preset>@<pool> runs")
    parser.add_argument("--strategy", default="direct")
    args = parser.parse_args()
    plain = {r["id"]: r["score"] for r in _records(args.template) if r["strategy"] == args.strategy}
    table = Table(title=f"accuracy per wording ({args.strategy}); template = the same items asked from the template")
    for column in ("pool", "wording", "n", "acc %", "template acc %", "diff"):
        table.add_column(column, justify="left" if column in ("pool", "wording") else "right")
    totals = []
    for path in args.reworded:
        records = [r for r in _records(path) if r["strategy"] == args.strategy]
        match = re.fullmatch(r"world:(.+)@seed(\d+)@(train|heldout)", records[0]["task"])
        if not match:
            raise SystemExit(f"{path}: not a reworded world run (task {records[0]['task']!r})")
        preset, seed, pool = match.groups()
        rows = resolve_tasks(f"world:{preset}@{pool}", n=len(records), seed=int(seed)).rows
        wording = {row["id"]: row.get("phrasing", "(unchanged)") for row in rows}
        by = collections.defaultdict(list)
        for r in records:
            if r["id"] in plain:
                by[wording[r["id"]]].append((r["score"], plain[r["id"]]))
        for name, pairs in sorted(by.items()):
            acc, ref = (100 * sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
            table.add_row(pool, name, str(len(pairs)), f"{acc:.1f}", f"{ref:.1f}", f"{acc - ref:+.1f}")
        pairs = [p for group in by.values() for p in group]
        totals.append((pool, pairs))
    for pool, pairs in totals:
        acc, ref = (100 * sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        table.add_row(pool, "ALL", str(len(pairs)), f"{acc:.1f}", f"{ref:.1f}", f"{acc - ref:+.1f}", style="bold")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
