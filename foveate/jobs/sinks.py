"""Where a caption job writes: incrementally, so a kill loses only rows in flight, and readable for resuming.

Exactly once, even after SIGKILL at any point: only the job's driver writes (Ray workers send rows back to it),
one job at a time holds an exclusive lock on the output (``fcntl.flock``, released by the kernel when the
process dies), and a rerun reads the ids already written and never schedules them again. What a kill can leave
behind never counts:

- **JSON lines** (``--format jsonl``, one file): each batch is one ``write`` then ``fsync``. A kill can cut the
  last line; a line without its newline (or not valid JSON) is dropped on the next run and the file truncated
  to the last complete line (the `foveate.eval.runner.ItemsFile` reader), so that image is captioned again.
- **Parquet** (``--format parquet``, a directory like Spark or Ray writes): rows are buffered and written as
  ``part-<run>-<n>.parquet`` via a ``.tmp`` file, ``fsync`` and an atomic ``os.replace``; leftover ``.tmp`` files
  are deleted on the next run. Readers (pyarrow, pandas, Ray ``read_parquet``) take the directory as one dataset.

Error rows (a corrupt image, a failed model call) count as done; ``retry_errors`` rewrites the output without
them (atomically) so the rerun tries those ids again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from foveate.errors import FoveateError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one job per output is then the user's responsibility
    fcntl = None  # type: ignore[assignment]

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("strategy", pa.string()),
        ("prompt", pa.string()),
        ("caption", pa.string()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("latency_s", pa.float64()),
        ("model_calls", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("model_latency_s", pa.float64()),
        ("finished_at", pa.float64()),  # Unix time the row was made (in the worker)
        ("worker", pa.string()),  # host:pid of the process that made it
    ]
)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Lock:
    """An exclusive, non-blocking advisory lock on a file; a second job on the same output fails at once."""

    def __init__(self, path: Path, what: Path) -> None:
        self.path = path
        self.what = what  # the output it guards, for the message
        self.handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a")  # noqa: SIM115 — held open for the job's lifetime
        if fcntl is not None:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                self.handle.close()
                self.handle = None
                message = f"another job is writing {self.what}; wait for it or choose another --out"
                raise FoveateError(message) from error

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None


class Sink:
    """The output of a job: `open` (lock, read what is done), `write` rows, `close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = _Lock(self.lock_path(), self.path)

    def lock_path(self) -> Path:
        raise NotImplementedError

    def open(self, retry_errors: bool = False) -> dict[str, dict[str, Any]]:
        """Take the lock and return the rows already written, by id (without error rows if ``retry_errors``)."""
        self.lock.acquire()
        try:
            rows = self._load()
            if retry_errors and any(row.get("error") for row in rows):
                rows = [row for row in rows if not row.get("error")]
                self._rewrite(rows)
        except BaseException:
            self.lock.release()
            raise
        return {str(row["id"]): row for row in rows}

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.lock.release()

    def _load(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError


class JsonlSink(Sink):
    """One JSON object per line, appended a batch at a time."""

    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    def _load(self) -> list[dict[str, Any]]:
        from foveate.eval.runner import ItemsFile  # its reader drops (and truncates away) a cut last line

        if self.path.is_dir():
            raise FoveateError(f"--out {self.path} is a directory; JSON lines output is a file")
        return [row for row in ItemsFile(self.path).load() if "id" in row]

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        scratch = self.path.with_name(f".{self.path.name}.rewrite.tmp")
        scratch.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        with open(scratch, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(scratch, self.path)
        _fsync_dir(self.path.parent)


class ParquetSink(Sink):
    """A directory of Parquet parts; a part is flushed every ``rows_per_part`` rows or ``seconds`` seconds."""

    def __init__(self, path: str | Path, rows_per_part: int = 1000, seconds: float = 5.0) -> None:
        super().__init__(path)
        self.rows_per_part = rows_per_part
        self.seconds = seconds
        self.run = uuid.uuid4().hex[:8]
        self.parts = 0
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()

    def lock_path(self) -> Path:
        return self.path / ".lock"  # pyarrow and Ray skip files starting with "." or "_" in a dataset folder

    def _load(self) -> list[dict[str, Any]]:
        if self.path.exists() and not self.path.is_dir():
            raise FoveateError(f"--out {self.path} is a file; Parquet output is a directory of parts")
        for leftover in self.path.glob("*.tmp"):
            leftover.unlink()  # a part cut by a kill: its rows are not done
        rows: list[dict[str, Any]] = []
        for part in sorted(self.path.glob("part-*.parquet")):
            rows.extend(pq.read_table(part).to_pylist())
        return rows

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= self.rows_per_part or time.monotonic() - self.last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self._write_part(self.buffer, f"part-{self.run}-{self.parts:05d}.parquet")
            self.parts += 1
            self.buffer = []
        self.last_flush = time.monotonic()

    def _write_part(self, rows: list[dict[str, Any]], name: str) -> None:
        target = self.path / name
        scratch = self.path / f"{name}.tmp"
        columns = OUTPUT_SCHEMA.names
        table = pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows], OUTPUT_SCHEMA)
        pq.write_table(table, scratch)
        with open(scratch, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(scratch, target)
        _fsync_dir(self.path)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            super().close()

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        # Part by part, each replaced atomically under its own name: a kill mid-way leaves every row once.
        for part in sorted(self.path.glob("part-*.parquet")):
            kept = [row for row in pq.read_table(part).to_pylist() if not row.get("error")]
            if not kept:
                part.unlink()
            else:
                self._write_part(kept, part.name)


def make_sink(path: str | Path, fmt: str | None = None) -> Sink:
    """The sink for ``--out`` and ``--format`` (default: parquet when the path ends in .parquet, else jsonl)."""
    target = Path(path).expanduser()
    fmt = fmt or ("parquet" if target.suffix.lower() == ".parquet" else "jsonl")
    if fmt == "jsonl":
        return JsonlSink(target)
    if fmt == "parquet":
        return ParquetSink(target)
    raise FoveateError(f"unknown --format {fmt!r}; choose jsonl or parquet")
