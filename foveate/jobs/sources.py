"""What a caption job reads: every input becomes rows of ``id``, ``path`` and ``image`` (encoded bytes or null).

Inputs and their ids (ids key the output and resuming, so they must be unique and stable across runs):

- a **folder**: every file with an image extension (`IMAGE_EXTENSIONS`, any case) below it, hidden files and
  folders skipped; id = the path relative to the folder (``sub/cat.png``), so ``a.png`` and ``a.jpg`` differ.
- a **glob** (``'shots/*.jpg'``, ``'data/**/*'``): every matching file, whatever its extension (a non-image
  becomes an error row); id = the path as matched.
- a **task file** (``tasks.jsonl`` of the eval harness, or any JSON lines with an ``image`` key): each distinct
  image once; id = the image path as written in the file, resolved against the file's folder for reading.
- a **Parquet file**: an ``id`` column (else a ``path`` column serves as id) and an ``image`` column of encoded
  bytes (binary, or a struct with a ``bytes`` field as Hugging Face ``datasets`` writes it), else ``path``.

Paths are made absolute, because Ray workers do not run in the caller's working directory.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from foveate.errors import FoveateError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
INPUT_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("image", pa.binary())])


@dataclass
class ParquetColumns:
    """Which columns of a Parquet input hold the id, the encoded image and the path (None: absent)."""

    id: str
    image: str | None
    path: str | None

    def names(self) -> list[str]:
        return list(dict.fromkeys(name for name in (self.id, self.image, self.path) if name))


@dataclass
class Source:
    """The inputs of a job: ids in input order, plus file paths (file inputs) or a Parquet file."""

    name: str
    ids: list[str]
    paths: dict[str, str]  # id → absolute path (file inputs; Parquet rows with a path column read it later)
    parquet: Path | None = None
    columns: ParquetColumns | None = None

    def limited(self, limit: int | None) -> Source:
        """The first ``limit`` inputs (all when None)."""
        if limit is None:
            return self
        if limit < 1:
            raise FoveateError(f"--limit must be at least 1, got {limit}")
        ids = self.ids[:limit]
        paths = {key: self.paths[key] for key in ids if key in self.paths}
        return Source(self.name, ids, paths, self.parquet, self.columns)

    def file_rows(self, todo: set[str]) -> list[dict[str, str]]:
        """``{"id", "path"}`` for each file input still to do, in input order."""
        return [{"id": key, "path": self.paths[key]} for key in self.ids if key in todo]

    def batches(self, batch_size: int, todo: set[str]) -> Iterator[pa.Table]:
        """Input rows still to do as tables of at most ``batch_size`` rows (`INPUT_SCHEMA`)."""
        if self.parquet is None:
            rows = self.file_rows(todo)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                yield pa.Table.from_pylist([{**row, "image": None} for row in chunk], schema=INPUT_SCHEMA)
            return
        buffered: list[pa.Table] = []
        count = 0
        reader = pq.ParquetFile(self.parquet)
        for record_batch in reader.iter_batches(batch_size=batch_size, columns=self.columns.names()):
            table = parquet_rows(pa.Table.from_batches([record_batch]), self.columns, todo)
            if table.num_rows:
                buffered.append(table)
                count += table.num_rows
            while count >= batch_size:
                merged = pa.concat_tables(buffered)
                yield merged.slice(0, batch_size)
                rest = merged.slice(batch_size)
                buffered, count = ([rest] if rest.num_rows else []), rest.num_rows
        if count:
            yield pa.concat_tables(buffered)


def parquet_rows(table: pa.Table, columns: ParquetColumns, todo: set[str]) -> pa.Table:
    """Rows of a Parquet input in `INPUT_SCHEMA`, keeping only ids in ``todo`` (also a Ray Data stage)."""
    ids = pc.cast(table.column(columns.id), pa.string())
    paths = pc.cast(table.column(columns.path), pa.string()) if columns.path else pa.nulls(table.num_rows, pa.string())
    if columns.image:
        image = table.column(columns.image)
        if pa.types.is_struct(image.type):
            image = pc.struct_field(image, "bytes")
        image = pc.cast(image, pa.binary())
    else:
        image = pa.nulls(table.num_rows, pa.binary())
    rows = pa.Table.from_arrays([ids, paths, image], schema=INPUT_SCHEMA)
    keep = pa.array([key in todo for key in ids.to_pylist()], type=pa.bool_())
    return rows.filter(keep)


def _unique(ids: list[str], where: str) -> list[str]:
    seen: set[str] = set()
    for key in ids:
        if key in seen:
            raise FoveateError(f"{where}: duplicate id {key!r} (ids key the output and resuming)")
        seen.add(key)
    return ids


def _from_folder(folder: Path) -> Source:
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    paths = {path.relative_to(folder).as_posix(): str(path.resolve()) for path in files}
    return Source(str(folder), list(paths), paths)


def _from_glob(pattern: str) -> Source:
    matches = sorted(match for match in glob.glob(pattern, recursive=True) if Path(match).is_file())
    return Source(pattern, matches, {match: str(Path(match).resolve()) for match in matches})


def _from_task_file(file: Path) -> Source:
    paths: dict[str, str] = {}
    with open(file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise FoveateError(f"{file}:{lineno}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise FoveateError(f"{file}:{lineno}: expected a JSON object with an 'image' path")
            paths.setdefault(row["image"], str((file.parent / row["image"]).resolve()))
    return Source(str(file), list(paths), paths)


def _from_parquet(file: Path) -> Source:
    try:
        names = pq.ParquetFile(file).schema_arrow.names
    except (OSError, pa.ArrowException) as error:
        raise FoveateError(f"cannot read Parquet file {file}: {error}") from error
    id_column = "id" if "id" in names else "path" if "path" in names else None
    image = "image" if "image" in names else None
    path = "path" if "path" in names else None
    if id_column is None or (image is None and path is None):
        raise FoveateError(f"{file}: a Parquet input needs an 'id' (or 'path') column and an 'image' or 'path' column")
    columns = ParquetColumns(id=id_column, image=image, path=path)
    ids = [str(key) for key in pq.read_table(file, columns=[id_column]).column(0).to_pylist()]
    return Source(str(file), _unique(ids, str(file)), {}, parquet=file, columns=columns)


def resolve_source(spec: str) -> Source:
    """A folder, a Parquet file, a task file (``.jsonl``/``.json``) or a glob → its `Source`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        source = _from_folder(path)
    elif path.is_file() and path.suffix.lower() == ".parquet":
        source = _from_parquet(path)
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        source = _from_task_file(path)
    elif path.is_file():
        source = Source(spec, [spec], {spec: str(path.resolve())})
    elif glob.has_magic(spec):
        source = _from_glob(spec)
    else:
        raise FoveateError(f"input not found: {spec} (a folder, a glob, a tasks.jsonl or a .parquet file)")
    if not source.ids:
        raise FoveateError(f"no images found in {spec}")
    return source
