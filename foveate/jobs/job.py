"""One captioning job: skip what the output already holds, run the rest locally or on Ray Data, write as it comes.

`run_caption_job` is what ``foveate caption`` calls; the per-batch work is `foveate.jobs.caption`'s, the Ray
pipeline `foveate.jobs.ray_caption`'s, the outputs `foveate.jobs.sinks`'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from foveate.errors import FoveateError
from foveate.jobs.caption import CaptionSpec, run_local
from foveate.jobs.sinks import Sink
from foveate.jobs.sources import Source


@dataclass
class JobSummary:
    """What a run did: ``total`` inputs, ``skipped`` already in the output, ``done`` new rows, ``errors`` among them."""

    total: int
    skipped: int
    done: int = 0
    errors: int = 0
    seconds: float = 0.0
    mode: str = "local"

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def check_resumable(done: dict[str, dict[str, Any]], spec: CaptionSpec, out: str) -> None:
    """Refuse to mix strategies or prompts in one output (a rerun must mean "finish the same job")."""
    for row in done.values():
        if row.get("strategy") != spec.strategy or row.get("prompt") != spec.prompt:
            raise FoveateError(
                f"{out} holds rows of strategy {row.get('strategy')!r} with prompt {row.get('prompt')!r}; "
                f"this run is {spec.strategy!r} with {spec.prompt!r}: choose another --out"
            )


def run_caption_job(
    source: Source,
    sink: Sink,
    spec: CaptionSpec,
    *,
    workers: int = 1,
    batch_size: int = 8,
    ray_address: str | None = None,
    use_ray: bool | None = None,
    retry_errors: bool = False,
    progress: Any = None,
) -> JobSummary:
    """Caption every input not yet in ``sink``; ``progress(advance_by, summary)`` is called per written batch.

    Ray Data runs when ``use_ray`` is True, or (``use_ray`` None) when ``workers > 1`` or ``ray_address`` is set;
    otherwise the local runner. Returns what was done."""
    if workers < 1 or batch_size < 1:
        raise FoveateError(f"--workers and --batch-size must be at least 1 (got {workers} and {batch_size})")
    use_ray = (workers > 1 or bool(ray_address)) if use_ray is None else use_ray
    done = sink.open(retry_errors=retry_errors)
    try:
        check_resumable(done, spec, str(sink.path))
        todo = {key for key in source.ids if key not in done}
        summary = JobSummary(total=len(source.ids), skipped=len(source.ids) - len(todo))
        summary.mode = f"ray ({workers} worker{'s' if workers > 1 else ''})" if use_ray else "local"
        if progress:
            progress(0, summary)
        if not todo:
            return summary
        started = time.perf_counter()
        if use_ray:
            from foveate.jobs.ray_caption import run_ray

            tables = run_ray(source, todo, spec, workers=workers, batch_size=batch_size, address=ray_address)
        else:
            tables = run_local(source, todo, spec, batch_size)
        try:
            for table in tables:
                rows = [row for row in table.to_pylist() if row["id"] in todo]  # never write an id twice
                todo.difference_update(row["id"] for row in rows)
                sink.write(rows)
                summary.done += len(rows)
                summary.errors += sum(1 for row in rows if row["error"])
                summary.seconds = time.perf_counter() - started
                if progress:
                    progress(len(rows), summary)
        finally:
            close = getattr(tables, "close", None)
            if callable(close):
                close()  # a generator's finally (model and Ray shutdown) runs now, not at garbage collection
        summary.seconds = time.perf_counter() - started
        return summary
    finally:
        sink.close()
