"""Batch captioning: any registered strategy over many images, resumable, locally or on Ray Data.

    foveate caption examples/world/images --out caps.jsonl                   # local, one process
    foveate caption 'photos/**/*.jpg' --out caps.parquet --workers 2         # Ray Data, 2 model actors
    foveate caption data.parquet --out caps.parquet --ray-address HOST:6379  # an existing Ray cluster

Two per-batch functions do all the work, whichever runner calls them:

- `decode_batch` reads and fully decodes each input with `foveate.tools.images.load_image` (the pixel limit,
  truncation and not-an-image checks of every other entry point). A bad input becomes an error row with a
  one-line reason; a good one keeps its *encoded* bytes, which travel between Ray stages 10-50× smaller than
  pixels (the captioner decodes them again, cheap next to a model call).
- `Captioner` (a callable class: Ray Data builds one per actor, so the model loads once per actor) runs the
  strategy on every image of a batch at once: one thread per image, with the model calls of all of them merged
  by a `MicroBatcher` into padded batches (concurrency is batching). A strategy that raises on one image gives
  that image an error row; the rest of the batch is unaffected.

Runners (`foveate.jobs.job.run_caption_job` picks one): **local** (`run_local`, no Ray: the default with
``--workers 1`` and no ``--ray-address``; no 4 s Ray start-up and 640 MB of Ray processes for a small job) and
**Ray Data** (`foveate.jobs.ray_caption`, with ``--workers N > 1``, ``--ray-address`` or ``--ray``). Both write
through `foveate.jobs.sinks` from the driver and skip ids already in the output, so a rerun after a kill (or a
finished run) does only what is missing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from foveate import protocol
from foveate.config import FoveateConfig
from foveate.errors import FoveateError
from foveate.jobs.sinks import OUTPUT_SCHEMA
from foveate.jobs.sources import Source

log = logging.getLogger(__name__)

# The wording the world's captions (world:caption) are asked and the demo model was trained on.
DEFAULT_PROMPT = protocol.DESCRIBE_PROMPT
# How long the micro-batcher holds a model call for the rest of the batch's calls. A job cares for throughput,
# not latency: 200 ms is small next to a CPU generation (seconds) and covers each image's decode and store
# write, which the default 5 ms of an interactive server does not (the first image would then run alone).
BATCH_WAIT_MS = 200
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process made a row (Ray actors differ by pid)
DECODED_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("image", pa.binary()), ("error", pa.string())])


@dataclass
class CaptionSpec:
    """Everything a worker needs to build its captioner (picklable: Ray ships it to each actor)."""

    strategy: str = "direct"
    prompt: str = DEFAULT_PROMPT
    options: dict[str, Any] = field(default_factory=dict)  # strategy build options (config's + --option)
    config: FoveateConfig = field(default_factory=FoveateConfig)  # model/endpoint already resolved
    max_new_tokens: int = 128
    threads: int | None = None  # torch intra-op threads per worker (None: leave torch's default)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line: ``"ImageError: image data is truncated …"``."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_batch(batch: pa.Table, max_pixels: int | None) -> pa.Table:
    """Input rows (`foveate.jobs.sources.INPUT_SCHEMA`) → ``id, path, image, error`` (`DECODED_SCHEMA`).

    Rows with bytes keep them; rows with only a path read the file. Every image is fully decoded once here so a
    corrupt, truncated, oversized or non-image input becomes ``error`` (and ``image`` null) before any model sees
    it."""
    from foveate.tools.images import load_image

    out: list[dict[str, Any]] = []
    for row in batch.to_pylist():
        data, error = row.get("image"), None
        try:
            if data is None:
                if not row.get("path"):
                    raise FoveateError("row has neither image bytes nor a path")
                with open(row["path"], "rb") as handle:
                    data = handle.read()
            load_image(data, max_pixels=max_pixels)
        except Exception as failure:  # noqa: BLE001 — any unreadable input is an error row, never a dead job
            data, error = None, one_line(failure)
        out.append({"id": row["id"], "path": row.get("path"), "image": data, "error": error})
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def error_row(row: dict[str, Any], spec: CaptionSpec, error: str, model: str = "") -> dict[str, Any]:
    return {
        "id": row["id"],
        "path": row.get("path"),
        "strategy": spec.strategy,
        "prompt": spec.prompt,
        "caption": None,
        "error": error,
        "model": model,
        "latency_s": 0.0,
        "model_calls": 0,
        "completion_tokens": 0,
        "model_latency_s": 0.0,
        "finished_at": time.time(),
        "worker": WORKER,
    }


class Captioner:
    """Caption decoded batches with one strategy; the model is loaded once, in the constructor."""

    def __init__(self, spec: CaptionSpec) -> None:
        from foveate.agents import get_builder
        from foveate.api import make_policy
        from foveate.tools.store import ImageStore

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.graph = get_builder(spec.strategy, spec.options)()
        self.policy = make_policy(spec.config.model, spec.config.endpoint, config=spec.config, cache=False)
        self.store = ImageStore(spec.config.home_dir / "images")

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Decoded rows (`DECODED_SCHEMA`) → output rows (`foveate.jobs.sinks.OUTPUT_SCHEMA`), same order."""
        from foveate.policies.batching import MicroBatcher

        rows = batch.to_pylist()
        good = [row for row in rows if row["error"] is None]
        results: dict[str, dict[str, Any]] = {}
        if good:
            batcher = MicroBatcher(self.policy, max_batch=len(good), max_wait_ms=BATCH_WAIT_MS)
            try:
                with ThreadPoolExecutor(max_workers=len(good), thread_name_prefix="caption") as pool:
                    for row, result in zip(good, pool.map(lambda r: self._one(r, batcher), good), strict=True):
                        results[row["id"]] = result
            finally:
                batcher.close()
        out = [results.get(row["id"]) or error_row(row, self.spec, row["error"], self.policy.name) for row in rows]
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _one(self, row: dict[str, Any], policy: Any) -> dict[str, Any]:
        from foveate.api import run_strategy
        from foveate.tools.images import load_image

        started = time.perf_counter()
        try:
            image = load_image(row["image"], max_pixels=None)  # checked against the limit in decode_batch
            inputs = {"image": self.store.put(image), "question": self.spec.prompt}
            result = run_strategy(
                self.graph,
                inputs,
                strategy=self.spec.strategy,
                policy=policy,
                store=self.store,
                max_new_tokens=self.spec.max_new_tokens,
            )
        except Exception as failure:  # noqa: BLE001 — one image's failure is its own error row
            log.warning("%s failed on %s: %s", self.spec.strategy, row["id"], failure)
            return error_row(row, self.spec, one_line(failure), self.policy.name)
        calls = [step for step in result.trace.steps if step["kind"] == "model_call"]
        return {
            "id": row["id"],
            "path": row.get("path"),
            "strategy": self.spec.strategy,
            "prompt": self.spec.prompt,
            "caption": result.answer,
            "error": None,
            "model": self.policy.name,
            "latency_s": round(time.perf_counter() - started, 4),
            "model_calls": len(calls),
            "completion_tokens": result.trace.completion_tokens,
            "model_latency_s": round(sum(step.get("latency_s", 0.0) for step in calls), 4),
            "finished_at": time.time(),
            "worker": WORKER,
        }

    def close(self) -> None:
        self.policy.close()


def run_local(source: Source, todo: set[str], spec: CaptionSpec, batch_size: int) -> Iterator[pa.Table]:
    """Caption the ``todo`` ids in this process with the same per-batch functions Ray runs; yields output tables."""
    captioner = Captioner(spec)
    try:
        for batch in source.batches(batch_size, todo):
            yield captioner(decode_batch(batch, spec.config.max_image_pixels))
    finally:
        captioner.close()
