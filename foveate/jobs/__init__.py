"""Batch jobs over many images: ``foveate caption`` (local or on Ray Data), resumable by image id.

- `foveate.jobs.sources`: what to caption (a folder, a glob, a tasks.jsonl, a Parquet file) as ids + paths/bytes.
- `foveate.jobs.sinks`: the output (JSON lines or a directory of Parquet parts), written incrementally so a
  killed job loses only rows in flight, and read back on a rerun to skip the ids already done.
- `foveate.jobs.caption`: the per-batch functions (decode, caption) and the local runner.
- `foveate.jobs.ray_caption`: the same per-batch functions as a Ray Data pipeline on an actor pool.
"""
