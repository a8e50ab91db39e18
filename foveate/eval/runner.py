"""Run strategies over a task set: concurrent items, micro-batched model calls, resumable results.

    >>> tasks = resolve_tasks("world:small-detail", n=50)                          # doctest: +SKIP
    >>> records = run_eval(tasks, ["direct", "oracle-crop"], policy, items_path="r.items.jsonl")  # doctest: +SKIP

Task sets
    ``world:<preset>`` generates (once, cached under ``$FOVEATE_HOME/tasks/<preset>-seed<S>-n<N>/``) a held-out
    set from the synthetic world with the EVAL seed (`DEFAULT_EVAL_SEED` = 1000 unless ``seed`` is given). World
    scene ``i`` is seeded from ``(preset, seed, i)`` alone, so training data must come from other seeds (the
    training recipes use seeds below 1000) to keep the benchmark held out. ``vstar:PATH``, ``pope:PATH`` and
    ``textvqa:PATH`` read a local copy of that benchmark in its published layout (`foveate.eval.benchmarks`;
    ``images`` names the image folder where the layout keeps images elsewhere). Anything else is a path to a
    ``tasks.jsonl`` (or a folder holding one) in the world's row format (``foveate data convert`` writes one).
    Rows may carry several reference answers (VQA soft accuracy, see `foveate.eval.metrics.scoring_mode`) and
    grounding rows may have ``answers: []`` with the gold box in ``boxes``.

Running
    Each strategy runs over every item; items are submitted from a thread pool (``concurrency``) and each one
    is a plain ``graph.invoke`` through `foveate.api.run_strategy`. The policy is wrapped in a `MicroBatcher`,
    so the model calls of concurrent items are merged into padded batches. Every item gets the row's ``boxes``
    as the state key ``evidence_boxes`` (only oracle strategies read it). Strategies whose module sets
    ``REQUIRES_EVIDENCE = True`` skip rows without boxes (recorded as skipped, excluded from the metrics).

Records and resuming
    Each finished item is appended as one JSON line to the items file as soon as it is done. A rerun with the
    same task, model and ``max_new_tokens`` skips every (strategy, id) already recorded without an error, so
    an interrupted run resumes and a finished one recomputes nothing. A truncated last line (a run killed
    mid-write) is cut off and its item recomputed. Items that raised are recorded with ``error`` (score 0, so
    every strategy is scored on the same items) and are retried on the next run.

Latency is the wall time of one item inside the concurrent run (what a client of a busy server would see),
so it depends on ``concurrency`` and ``max_batch``; compare strategies at equal settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from foveate.errors import FoveateError
from foveate.eval.metrics import score_answer
from foveate.policies.base import ChatPolicy

log = logging.getLogger(__name__)

DEFAULT_EVAL_SEED = 1000  # held-out world seed; training uses seeds below it
DEFAULT_WORLD_N = 200  # questions generated for `world:<preset>` when no n is given
ProgressFn = Callable[[str, int, int], None]  # (strategy, items done, items total)


# ---- task sets ----------------------------------------------------------------------------------------------
@dataclass
class TaskSet:
    """The rows of one benchmark and how to name it (``key`` identifies it in items files: no ``n``)."""

    name: str  # what the user asked for, e.g. "world:small-detail" or a path
    key: str  # stable identity for resuming: "world:small-detail@seed1000" or the resolved tasks.jsonl path
    rows: list[dict[str, Any]]
    path: Path  # the tasks.jsonl the rows came from
    seed: int | None = None
    phrasing: str | None = None  # world questions reworded from this pool (`foveate.world.phrasings`), or None


def load_eval_tasks(path: str | Path) -> list[dict[str, Any]]:
    """Read a tasks.jsonl (or a folder holding one) with `foveate.world.load_tasks` (JSON, required keys,
    defaults, image paths), then check what scoring needs: a grounding row without answers has a gold box, and
    ids are unique (results are keyed by id)."""
    from foveate.world import load_tasks

    file = Path(path)
    if file.is_dir():
        file = file / "tasks.jsonl"
    if not file.is_file():
        raise FoveateError(f"task file not found: {file} (pass a tasks.jsonl, its folder, or world:<preset>)")
    rows = load_tasks(file)
    seen: set[str] = set()
    for lineno, row in enumerate(rows, 1):
        if not row["answers"] and not row["boxes"]:
            raise FoveateError(f"{file}: row {lineno}: a grounding row with 'answers: []' needs its gold 'boxes'")
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise FoveateError(f"{file}: row {lineno}: duplicate id {row['id']!r}")
        seen.add(row["id"])
    return rows


def _home() -> Path:
    from foveate.config import load_config

    return load_config().home_dir


def world_task_dir(preset: str, seed: int, n: int, home: Path | None = None) -> Path:
    """Where ``world:<preset>`` with this seed and size is cached."""
    return (home or _home()) / "tasks" / f"{preset}-seed{seed}-n{n}"


def resolve_tasks(
    task: str, n: int | None = None, seed: int | None = None, home: Path | None = None, images: str | None = None
) -> TaskSet:
    """``world:<preset>`` (generated once with the eval seed, then cached), ``<benchmark>:PATH`` (V*, POPE,
    TextVQA) or a tasks.jsonl path; first ``n`` rows."""
    from foveate.eval.benchmarks import BENCHMARKS, load_benchmark

    if n is not None and n < 1:
        raise FoveateError(f"--n must be at least 1, got {n}")
    name, _, rest = task.partition(":")
    if name in BENCHMARKS and rest:
        source = Path(rest).expanduser().resolve()
        rows = load_benchmark(name, source, images)
        key = f"{name}:{source}" + (f"?images={Path(images).resolve()}" if images else "")
        return TaskSet(name=task, key=key, rows=rows[:n] if n else rows, path=source)
    if task.startswith("world:"):
        from foveate.world import generate_dataset, get_preset
        from foveate.world.phrasings import POOLS

        preset, _, pool = task.removeprefix("world:").partition("@")
        if pool and pool not in POOLS:
            raise FoveateError(f"unknown phrasing pool {pool!r} in {task!r}; choose from {', '.join(POOLS)}")
        get_preset(preset)  # unknown presets fail with the list of known ones
        seed = DEFAULT_EVAL_SEED if seed is None else seed
        size = n or DEFAULT_WORLD_N
        target = world_task_dir(preset, seed, size, home)
        if not (target / "meta.json").is_file():  # meta.json is written last: its presence means complete
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                generate_dataset(scratch, n=size, seed=seed, preset=preset)
                try:
                    os.replace(scratch, target)  # atomic: concurrent evaluators never see half a dataset
                except OSError:
                    if not (target / "meta.json").is_file():  # lost a race only if the winner finished
                        raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        rows = load_eval_tasks(target / "tasks.jsonl")[:size]
        if pool:
            rows = _rephrased(rows, pool, target / "scenes.jsonl")
        key = f"world:{preset}@seed{seed}" + (f"@{pool}" if pool else "")
        return TaskSet(name=task, key=key, rows=rows, path=target / "tasks.jsonl", seed=seed, phrasing=pool or None)
    path = Path(task).expanduser()
    rows = load_eval_tasks(path)
    file = (path / "tasks.jsonl" if path.is_dir() else path).resolve()
    return TaskSet(name=task, key=str(file), rows=rows[:n] if n else rows, path=file)


def _rephrased(rows: list[dict[str, Any]], pool: str, scenes: Path) -> list[dict[str, Any]]:
    """The rows in wordings of phrasing `pool`; whole-image wordings for scenes of one object (from scenes.jsonl)."""
    from foveate.world.phrasings import rephrase_rows

    with open(scenes, encoding="utf-8") as handle:
        n_objects = {scene["id"]: len(scene["objects"]) for scene in map(json.loads, handle)}
    return rephrase_rows(rows, pool, n_objects)


# ---- the items file -----------------------------------------------------------------------------------------
class ItemsFile:
    """Append-only JSON lines of finished items; safe against a run killed mid-write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> list[dict[str, Any]]:
        """All complete records; a truncated last line is removed from the file so appends start clean."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        records, offset, good_end = [], 0, 0
        for raw in data.splitlines(keepends=True):
            line_end = offset + len(raw)
            offset = line_end
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if isinstance(record, dict) and raw.endswith(b"\n"):
                records.append(record)
                good_end = line_end
            elif line_end == len(data):  # the last line: a run killed mid-write
                log.warning("ignoring a truncated last line in %s; its item is recomputed", self.path)
            elif raw.strip():
                log.warning("ignoring a malformed line in %s", self.path)
                good_end = line_end
        if good_end < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
        return records

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()


def default_items_path(tasks: TaskSet, model_id: str, home: Path | None = None) -> Path:
    """The items cache used when no ``--out`` is given: ``$FOVEATE_HOME/eval/<task>-<hash>.items.jsonl``."""
    digest = hashlib.sha256(f"{tasks.key}\n{model_id}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", tasks.name.removeprefix("world:"))[-60:].strip("._") or "tasks"
    return (home or _home()) / "eval" / f"{slug}-{digest}.items.jsonl"


def items_path_for(out: str | Path) -> Path:
    """``results.json`` → ``results.items.jsonl`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".items.jsonl") if out.suffix else out.with_name(out.name + ".items.jsonl")


def model_identity(policy: ChatPolicy) -> str:
    """What identifies a backend in items files: the model directory, or endpoint + served name."""
    inner = getattr(policy, "policy", policy)  # look through a MicroBatcher
    if getattr(inner, "model_path", None):
        # A model retrained in place keeps its path; the weights' size and mtime tell the versions apart, so a
        # rerun never resumes from another model's answers.
        weights = sorted(Path(inner.model_path).glob("*.safetensors")) if Path(inner.model_path).is_dir() else []
        stamp = ",".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
        if stamp:
            return f"{inner.model_path}@{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
        return str(inner.model_path)
    if getattr(inner, "endpoint", None):
        return f"{inner.endpoint}#{getattr(inner, 'model', inner.name)}"
    return inner.name


def requires_evidence(strategy: str) -> bool:
    """Whether a strategy needs ground-truth evidence boxes (its module sets ``REQUIRES_EVIDENCE = True``)."""
    from foveate.agents import STRATEGY_MODULES

    return bool(getattr(import_module(f"foveate.agents.{STRATEGY_MODULES[strategy]}"), "REQUIRES_EVIDENCE", False))


# ---- running ------------------------------------------------------------------------------------------------
def run_item(
    graph: Any,
    strategy: str,
    row: dict[str, Any],
    *,
    policy: ChatPolicy,
    store: Any,
    max_new_tokens: int,
    box_convention: str,
    needs_evidence: bool = False,
    wisdom: ChatPolicy | None = None,
) -> dict[str, Any]:
    """Run one strategy on one task row and score it; never raises (errors are recorded)."""
    from foveate.api import run_strategy
    from foveate.tools.images import load_image

    record: dict[str, Any] = {
        "strategy": strategy,
        "id": row["id"],
        "family": row.get("family", "unknown"),
        "subtype": row.get("subtype"),
        "split": row.get("split", "unknown"),
        "clutter": row.get("clutter", "unknown"),
        "answers": row.get("answers", []),
        "prediction": "",
        "score": None,
        "model_calls": 0,
        "completion_tokens": 0,
        "prompt_tokens": 0,
        "latency_s": 0.0,
    }
    if needs_evidence and not row.get("boxes"):
        return {**record, "skipped": "no evidence boxes"}
    started = time.perf_counter()
    try:
        image = load_image(row["image"])
        inputs = {"image": store.put(image), "question": row["question"], "evidence_boxes": row.get("boxes") or []}
        result = run_strategy(
            graph, inputs, strategy=strategy, policy=policy, store=store, max_new_tokens=max_new_tokens, wisdom=wisdom
        )
        resized = policy.resized_size(image.size) if box_convention == "resized" else None
        scored = score_answer(result.answer, row, image.size, box_convention, resized)
    except Exception as error:  # noqa: BLE001 — one bad item must not stop a benchmark
        log.warning("%s failed on %s: %s", strategy, row["id"], error)
        record.update(score=0.0, error=f"{type(error).__name__}: {error}")
    else:
        trace = result.trace
        record.update(
            prediction=result.answer,
            score=scored.pop("score"),
            scoring=scored.pop("mode"),
            **scored,
            model_calls=trace.model_calls,
            completion_tokens=trace.completion_tokens,
            prompt_tokens=sum(s.get("prompt_tokens", 0) for s in trace.steps if s["kind"] == "model_call"),
            # Seconds inside the model calls (each the wall time of the batched call it rode in).
            model_latency_s=round(sum(s.get("latency_s", 0.0) for s in trace.steps if s["kind"] == "model_call"), 4),
            crop_boxes=trace.boxes,
        )
    record["latency_s"] = round(
        time.perf_counter() - started, 4
    )  # the item's wall time, waits for the batcher included
    return record


def run_eval(
    tasks: TaskSet,
    strategies: Sequence[str],
    policy: ChatPolicy,
    *,
    items_path: str | Path,
    store: Any = None,
    model_id: str | None = None,
    max_new_tokens: int = 128,
    max_batch: int = 16,
    concurrency: int = 16,
    progress: ProgressFn | None = None,
    strategy_options: dict[str, dict[str, Any]] | None = None,
    walls: dict[str, dict[str, float]] | None = None,
    wisdom: ChatPolicy | None = None,
) -> list[dict[str, Any]]:
    """Run every strategy on every row (resuming from ``items_path``); return one record per (strategy, row).

    Records come back in (strategy, row) order, cached and new alike, so the report is the same whether a
    run computed everything or nothing. ``strategy_options`` are build options per strategy name (the
    config's); they are part of what a cached record must match to be reused, as is ``wisdom`` (the LLM of
    text-only roles; None = the configured one, else the VLM). ``walls``, when given, gets per strategy
    ``{"items": N, "wall_s": S}``: the items this call ran (cached ones took no time) and the wall time they took
    together, concurrency and batching included.
    """
    from foveate.agents import get_builder
    from foveate.policies.batching import MicroBatcher
    from foveate.tools.store import ImageStore

    if not strategies:
        raise FoveateError("no strategies given")
    options = {name: dict((strategy_options or {}).get(name) or {}) for name in strategies}
    builders = {name: get_builder(name, options[name]) for name in strategies}  # bad names fail before any work
    if concurrency < 1:
        raise FoveateError(f"concurrency must be at least 1, got {concurrency}")
    store = store or ImageStore(_home() / "images")
    model_id = model_id or model_identity(policy)
    identity = {"task": tasks.key, "model": model_id, "max_new_tokens": max_new_tokens}
    if wisdom is None:  # strategies would fall back to the configured wisdom LLM: it belongs to the identity too
        from foveate.api import default_wisdom

        wisdom = default_wisdom()
    # None when there is none: records made before this key existed (no wisdom LLM) match through .get().
    identity["wisdom"] = model_identity(wisdom) if wisdom is not None else None
    items = ItemsFile(items_path)
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for record in items.load():
        same_options = record.get("options", {}) == options.get(record.get("strategy"))
        if all(record.get(key) == value for key, value in identity.items()) and same_options and "error" not in record:
            done[(record["strategy"], str(record["id"]))] = record
    box_convention = policy.box_convention
    batcher: MicroBatcher | None = None
    results: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for strategy in strategies:
            todo = [row for row in tasks.rows if (strategy, row["id"]) not in done]
            finished = len(tasks.rows) - len(todo)
            if progress:
                progress(strategy, finished, len(tasks.rows))
            if not todo:
                continue
            if batcher is None:
                batcher = MicroBatcher(policy, max_batch=max_batch)
            graph = builders[strategy]()
            needs_evidence = requires_evidence(strategy)
            started = time.perf_counter()
            pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"eval-{strategy}")
            try:
                futures = [
                    pool.submit(
                        run_item,
                        graph,
                        strategy,
                        row,
                        policy=batcher,
                        store=store,
                        max_new_tokens=max_new_tokens,
                        box_convention=box_convention,
                        needs_evidence=needs_evidence,
                        wisdom=wisdom,
                    )
                    for row in todo
                ]
                for future in as_completed(futures):
                    record = {**future.result(), **identity, "options": options[strategy]}
                    items.append(record)  # written as soon as it is done: a killed run loses only items in flight
                    results[(strategy, record["id"])] = record
                    finished += 1
                    if progress:
                        progress(strategy, finished, len(tasks.rows))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, queued items never start
            if walls is not None:
                walls[strategy] = {"items": len(todo), "wall_s": round(time.perf_counter() - started, 3)}
    finally:
        if batcher is not None:
            batcher.close()
    return [results.get((s, row["id"])) or done[(s, row["id"])] for s in strategies for row in tasks.rows]
