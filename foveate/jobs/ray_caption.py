"""The caption job as a Ray Data pipeline: read → decode → caption on an actor pool → rows back to the driver.

    files:   from_items(id, path)                    ┐
    Parquet: read_parquet → parquet_rows (todo ids)  ┴→ decode_batch (tasks) → Captioner (ActorPoolStrategy(N))

The per-batch functions are those of `foveate.jobs.caption` (the local runner calls the same ones). The driver
iterates the output blocks as they finish (Ray Data streams them) and writes them through a
`foveate.jobs.sinks.Sink`, which is what makes the job resumable and exactly-once: the workers never write.

Choices, after RESEARCH.md §7 (facts verified here on Ray 2.60):
- **CPU accounting.** On 2 CPUs, two 1-CPU actors starve the read/decode tasks and the job hangs silently, so
  actors ask for ``min(0.5, (cluster CPUs - 0.25) / N)`` CPUs and the read/decode tasks for 0.25. Each actor runs
  torch on 1 thread unless ``--threads`` says otherwise: Ray's own convention (``OMP_NUM_THREADS`` = the CPUs a
  worker reserves, at least 1), and a job scales by actors. On this shared 2-core machine torch with 2 threads
  ran ≈ 10× slower than with 1 when the cores were oversubscribed (bench/caption_throughput.py, local vs local-1t).
- **No native checkpointing.** Ray Data's ``CheckpointConfig`` (beta) needs a pipeline that ends in ``write_*``,
  writes one file per block from the workers, and adds a 1-CPU filter actor that hangs a 2-CPU machine; the
  driver-side sink gives exactly-once output in the user's single ``--out`` with no extra actor.
- **A local cluster of our own.** Without ``--ray-address`` the job starts Ray with ``address="local"`` (never
  joining another user's cluster by accident) in a private temp dir, without the dashboard, and shuts it down
  at the end. With ``--ray-address`` it joins that cluster (its workers must see the input paths and the model
  directory, and ``RAY_AUTH_MODE`` must match the cluster's) and only disconnects at the end.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator

import pyarrow as pa

from foveate.jobs.caption import Captioner, CaptionSpec, decode_batch
from foveate.jobs.sources import Source, parquet_rows

log = logging.getLogger(__name__)
TASK_CPUS = 0.25  # read / decode tasks
MAX_ACTOR_CPUS = 0.5


def actor_cpus(cluster_cpus: float, workers: int) -> float:
    """Logical CPUs per caption actor so that N actors still leave room for a read/decode task."""
    share = min(MAX_ACTOR_CPUS, (cluster_cpus - TASK_CPUS) / workers)
    if share <= 0:
        raise ValueError(f"a cluster with {cluster_cpus} CPUs cannot run {workers} caption actors")
    return math.floor(share * 100) / 100


def build_dataset(source: Source, todo: set[str], spec: CaptionSpec, *, workers: int, batch_size: int, cpus: float):
    """The lazy Ray Dataset of output rows for the ``todo`` ids."""
    import ray

    if source.parquet is None:
        rows = [{**row, "image": None} for row in source.file_rows(todo)]
        # At least one block per actor (a small job still spreads over the pool), at most 1000 (each is a task).
        blocks = max(1, min(1000, max(math.ceil(len(rows) / batch_size), min(len(rows), workers))))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    else:
        dataset = (
            ray.data.read_parquet(str(source.parquet), num_cpus=TASK_CPUS)
            .select_columns(source.columns.names())
            .map_batches(
                parquet_rows,
                fn_kwargs={"columns": source.columns, "todo": todo},
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=TASK_CPUS,
            )
        )
    dataset = dataset.map_batches(
        decode_batch,
        fn_kwargs={"max_pixels": spec.config.max_image_pixels},
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=TASK_CPUS,
    )
    return dataset.map_batches(
        Captioner,
        fn_constructor_kwargs={"spec": spec},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=actor_cpus(cpus, workers),
    )


def _quiet_ray_data() -> None:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job draws its own bar from the rows it writes
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we know
    # A job smaller than the pool leaves actors idle; Ray Data warns, but that is the job's size, not a fault.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")


def _connect(address: str | None) -> str | None:
    """Join ``address``, or start a private local Ray; returns the temp dir to remove afterwards (or None)."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return None
    # Ray turns token authentication on for a new local cluster (its default, kept) and warns that it did.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    temp_dir = tempfile.mkdtemp(prefix="fov-ray-")  # short: Ray's socket paths live below it
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=temp_dir,
    )
    return temp_dir


def run_ray(
    source: Source, todo: set[str], spec: CaptionSpec, *, workers: int, batch_size: int, address: str | None = None
) -> Iterator[pa.Table]:
    """Run the pipeline (joining ``address`` or starting a private local Ray, unless this process is already
    connected to one, e.g. a notebook) and yield output tables."""
    import ray

    owned = not ray.is_initialized()
    temp_dir = _connect(address) if owned else None
    try:
        _quiet_ray_data()
        if spec.threads is None:
            spec = CaptionSpec(**{**spec.__dict__, "threads": 1})
        cpus = ray.cluster_resources().get("CPU", 0.0)
        dataset = build_dataset(source, todo, spec, workers=workers, batch_size=batch_size, cpus=cpus)
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    finally:
        if owned:
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
