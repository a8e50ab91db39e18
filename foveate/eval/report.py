"""Aggregate item records into result rows, print them as tables, and write the results JSON.

Rows: one per (strategy, family, split), plus per strategy one per split over all families
(``family == "all"``) and one over everything (``family == split == "all"``). Every row has the same keys,
``None`` where a metric does not apply:

    strategy family split n skipped errors accuracy
    precision recall f1 yes_ratio pope_by_subtype     (existence rows: POPE, "yes" is positive)
    mean_iou                                          (grounding rows; accuracy is then IoU >= 0.5)
    object_precision object_recall object_f1 attribute_precision attribute_recall attribute_f1
    hallucination hallucinated_caption caption_words  (caption rows, means per item; accuracy is the object F1;
                                                       hallucination = CHAIR_i, hallucinated_caption = CHAIR_s)
    model_calls completion_tokens prompt_tokens       (means per item, summed over the item's model calls)
    model_latency_s latency_s                         (means per item, seconds)

``completion_tokens`` are the tokens the model generated, ``prompt_tokens`` the tokens it read (image tokens
included). ``model_latency_s`` is the time inside the item's model calls, each the wall time of the batched call
it rode in (shared with the items batched with it); ``latency_s`` is the item's wall time from start to answer,
waits for the micro-batcher and the other concurrent items included, so with 16 items at once it is far above
the run's wall time divided by its items (`print_run_times` prints that: wall time and items per second).

``n`` counts the scored items; ``skipped`` items (an oracle strategy on a row without evidence boxes) are not
in any metric; items that raised count as wrong and are also counted in ``errors``. ``pope_by_subtype`` maps
each POPE subset present (random / popular / adversarial) to ``{n, accuracy, precision, recall, f1,
yes_ratio}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from foveate.eval.metrics import parse_yes_no, pope_metrics

__all__ = ["aggregate", "print_run_times", "print_tables", "results_json", "write_results"]

FAMILY_ORDER = ("attribute", "existence", "counting", "relation", "text", "comparison", "grounding", "caption")
CAPTION_KEYS = (
    "object_precision",
    "object_recall",
    "object_f1",
    "attribute_precision",
    "attribute_recall",
    "attribute_f1",
    "hallucination",
    "hallucinated_caption",
    "caption_words",
)
SPLIT_ORDER = ("small-detail", "mid-detail", "large")
POPE_KEYS = ("precision", "recall", "f1", "yes_ratio")


def _order(value: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(value), "") if value in known else (len(known), value)


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _pope(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    usable = [r for r in records if r.get("answers") and parse_yes_no(r["answers"][0]) is not None]
    if not usable:
        return None
    metrics = pope_metrics([r.get("prediction") or "" for r in usable], [r["answers"][0] for r in usable])
    return {key: round(metrics[key], 4) for key in ("accuracy", *POPE_KEYS)} | {"n": metrics["n"]}


def summarize(records: list[dict[str, Any]], strategy: str, family: str, split: str) -> dict[str, Any]:
    """One result row over ``records`` (all of one strategy)."""
    scored = [r for r in records if not r.get("skipped")]
    row: dict[str, Any] = {
        "strategy": strategy,
        "family": family,
        "split": split,
        "n": len(scored),
        "skipped": len(records) - len(scored),
        "errors": sum(1 for r in scored if r.get("error")),
        "accuracy": _mean([float(r["score"]) for r in scored]),
        **dict.fromkeys(POPE_KEYS),
        "pope_by_subtype": None,
        "mean_iou": None,
        **dict.fromkeys(CAPTION_KEYS),
        "model_calls": _mean([r.get("model_calls", 0) for r in scored]),
        "completion_tokens": _mean([r.get("completion_tokens", 0) for r in scored]),
        # Items recorded before these were kept have none: the mean is over the items that have them.
        "prompt_tokens": _mean([r["prompt_tokens"] for r in scored if "prompt_tokens" in r]),
        "model_latency_s": _mean([r["model_latency_s"] for r in scored if "model_latency_s" in r]),
        "latency_s": _mean([r.get("latency_s", 0.0) for r in scored]),
    }
    if family == "existence":
        overall = _pope(scored)
        if overall:
            row.update({key: overall[key] for key in POPE_KEYS})
        subtypes = sorted({r["subtype"] for r in scored if r.get("subtype")})
        by_subtype = {s: _pope([r for r in scored if r.get("subtype") == s]) for s in subtypes}
        row["pope_by_subtype"] = {s: m for s, m in by_subtype.items() if m} or None
    if family == "grounding":
        row["mean_iou"] = _mean([float(r.get("iou") or 0.0) for r in scored])
    if family == "caption":  # an item that failed counts as an empty caption (zeros)
        row.update({key: _mean([float(r.get(key) or 0.0) for r in scored]) for key in CAPTION_KEYS})
    return row


def aggregate(records: list[dict[str, Any]], strategies: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Result rows for every strategy (in the given order, else order of first appearance)."""
    strategies = list(strategies or dict.fromkeys(r["strategy"] for r in records))
    rows = []
    for strategy in strategies:
        mine = [r for r in records if r["strategy"] == strategy]
        if not mine:
            continue
        splits = sorted({r["split"] for r in mine}, key=lambda s: _order(s, SPLIT_ORDER))
        groups = sorted(
            {(r["family"], r["split"]) for r in mine},
            key=lambda g: (_order(g[0], FAMILY_ORDER), _order(g[1], SPLIT_ORDER)),
        )
        for family, split in groups:
            members = [r for r in mine if r["family"] == family and r["split"] == split]
            rows.append(summarize(members, strategy, family, split))
        for split in splits:
            rows.append(summarize([r for r in mine if r["split"] == split], strategy, "all", split))
        rows.append(summarize(mine, strategy, "all", "all"))
    return rows


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_tables(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """One table per (family, split) with strategies as rows; the all-families tables come last."""
    console = console or Console()
    groups = list(dict.fromkeys((r["family"], r["split"]) for r in rows))
    groups.sort(key=lambda g: (g[0] == "all", g[1] == "all", _order(g[0], FAMILY_ORDER), _order(g[1], SPLIT_ORDER)))
    for family, split in groups:
        members = [r for r in rows if r["family"] == family and r["split"] == split]
        title = f"{family} · {split}" if family != "all" else f"all families · {split}"
        table = Table(title=title, title_justify="left")
        columns = [("strategy", "strategy", False), ("n", "n", False), ("accuracy", "acc %", True)]
        if family == "existence":
            columns += [("precision", "prec %", True), ("recall", "rec %", True), ("f1", "F1 %", True)]
            columns += [("yes_ratio", "yes %", True)]
        if family == "grounding":
            columns += [("mean_iou", "mIoU", False)]
        if family == "caption":
            columns = [c for c in columns if c[0] != "accuracy"]
            columns += [("object_precision", "obj P %", True), ("object_recall", "obj R %", True)]
            columns += [("object_f1", "obj F1 %", True), ("attribute_precision", "attr P %", True)]
            columns += [("attribute_recall", "attr R %", True), ("attribute_f1", "attr F1 %", True)]
            columns += [("hallucination", "CHAIR_i %", True), ("hallucinated_caption", "CHAIR_s %", True)]
            columns += [("caption_words", "words", False)]
        columns += [("model_calls", "calls", False), ("completion_tokens", "gen tok", False)]
        columns += [("prompt_tokens", "prompt tok", False), ("model_latency_s", "model s", False)]
        columns += [("latency_s", "item s", False)]
        for key in ("skipped", "errors"):
            if any(r[key] for r in members):
                columns.append((key, key, False))
        for _, header, _ in columns:
            table.add_column(header, justify="left" if header == "strategy" else "right", no_wrap=True)
        for row in members:
            table.add_row(*(_fmt(row[key], percent) for key, _, percent in columns))
        console.print(table)
        subtypes = {s for r in members for s in (r.get("pope_by_subtype") or {})}
        if subtypes:
            sub = Table(title=f"{title} · POPE subsets", title_justify="left")
            for header in ("strategy", "subset", "n", "acc %", "prec %", "rec %", "F1 %", "yes %"):
                sub.add_column(header, justify="left" if header in ("strategy", "subset") else "right", no_wrap=True)
            for row in members:
                for subtype, m in sorted((row.get("pope_by_subtype") or {}).items()):
                    cells = [_fmt(m[k], True) for k in ("accuracy", *POPE_KEYS)]
                    sub.add_row(row["strategy"], subtype, str(m["n"]), *cells)
            console.print(sub)


COLUMN_NOTE = (
    "per item: calls = model calls; gen tok = tokens generated, prompt tok = tokens read (images included), both "
    "summed over its calls; model s = time inside its model calls (batched calls shared); item s = its wall time, "
    "waits for the batcher and the other concurrent items included"
)


def print_run_times(walls: dict[str, dict[str, float]], console: Console | None = None) -> None:
    """The run's wall time per strategy and its throughput (items this run computed; cached items took none)."""
    console = console or Console()
    table = Table(title="run · wall time", title_justify="left")
    for header in ("strategy", "items run", "wall s", "items/s"):
        table.add_column(header, justify="left" if header == "strategy" else "right", no_wrap=True)
    for strategy, wall in walls.items():
        rate = wall["items"] / wall["wall_s"] if wall["items"] and wall["wall_s"] > 0 else None
        table.add_row(strategy, str(int(wall["items"])), f"{wall['wall_s']:.1f}", _fmt(rate))
    if walls:
        items, seconds = sum(w["items"] for w in walls.values()), sum(w["wall_s"] for w in walls.values())
        table.add_row("all", str(int(items)), f"{seconds:.1f}", _fmt(items / seconds if items and seconds else None))
    console.print(table)
    console.print(COLUMN_NOTE, highlight=False)


def results_json(rows: list[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    """The ``--out`` document: ``{"rows": [...], "task": ..., "model": ..., "n": ..., ...}``."""
    return {"rows": rows, **meta}


def write_results(path: str | Path, document: dict[str, Any]) -> Path:
    """Write the results JSON atomically (a reader never sees half a file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.replace(scratch, target)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return target
