"""Datasets from the world: on disk (benchmarks) or streamed in memory (training), and the task-file reader.

Layout written by `generate_dataset(out_dir, n, seed, preset)`::

    out_dir/images/<scene_id>.png   one image per scene (several questions may share it)
    out_dir/tasks.jsonl             one question per line (the evaluator's input)
    out_dir/scenes.jsonl            full ground truth per scene (objects, boxes, labels, relations, description)
    out_dir/meta.json               preset, seed, n and the full config, for provenance

`n` counts QUESTIONS. Scenes are drawn one after another; each gets 1-3 questions (`questions_per_scene`), the
last one fewer so exactly `n` come out, and a scene that supports none under the preset's splits is skipped.
Scene ``i`` is seeded from ``(preset, seed, i)`` alone, so a larger `n` extends a dataset without changing its
prefix, and `iter_items` yields exactly what `generate_dataset` writes. Same seed and preset give byte-identical
files (PNG written with fixed options and no metadata; JSON with fixed key order).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from foveate.errors import FoveateError
from foveate.world.presets import WorldConfig, get_preset
from foveate.world.scenes import Scene, render_scene

__all__ = ["REQUIRED_TASK_KEYS", "generate_dataset", "iter_items", "iter_scenes", "load_tasks"]

REQUIRED_TASK_KEYS: tuple[str, ...] = ("id", "image", "question", "answers")
# Defaults for optional keys, so task files from real datasets (which know nothing of the world) load too.
TASK_DEFAULTS: dict[str, Any] = {
    "family": "unknown",
    "subtype": None,
    "split": "unknown",
    "clutter": "unknown",
    "boxes": [],
    "target_size": None,
    "image_size": None,
    "scene_id": None,
    "preset": None,
}


def with_task_defaults(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every optional key the evaluator reads that it lacks (each list default a fresh list)."""
    for key, default in TASK_DEFAULTS.items():
        row.setdefault(key, list(default) if isinstance(default, list) else default)
    return row


_OPTIONAL_ROW_KEYS: tuple[str, ...] = ("reference", "options", "scoring", "objects")


def iter_scenes(seed: int, preset: str | WorldConfig = "default") -> Iterator[tuple[Scene, list[dict[str, Any]]]]:
    """Endless stream of (scene, questions); scenes with no admissible question are skipped."""
    cfg = get_preset(preset)
    i = 0
    while True:
        # A string seed goes through SHA-512 in `random.seed`, so it is stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"foveate-world/{cfg.name}/{seed}/{i}")
        scene, questions = cfg.sample(rng, f"{cfg.name}-{seed}-{i:06d}")
        i += 1
        if questions:
            yield scene, questions


def _row(scene: Scene, q: dict[str, Any], j: int, preset: str) -> dict[str, Any]:
    """A tasks.jsonl row; key order is fixed so files are byte-stable."""
    return {
        "id": f"{scene.id}-q{j}",
        "image": f"images/{scene.id}.png",
        "question": q["question"],
        "answers": q["answers"],
        "family": q["family"],
        "subtype": q["subtype"],
        "split": q["split"],
        "clutter": q["clutter"],
        "boxes": q["boxes"],
        "target_size": q["target_size"],
        "object_ids": q["object_ids"],
        "image_size": [scene.width, scene.height],
        "scene_id": scene.id,
        "preset": preset,
        # Keys only some presets' questions have (zoom: the reference kind, multiple-choice options and scoring;
        # caption: every object, for the metrics); rows of the other presets stay byte-identical.
        **{key: q[key] for key in _OPTIONAL_ROW_KEYS if key in q},
    }


def _stream(n: int | None, seed: int, preset: str | WorldConfig) -> Iterator[tuple[Scene, list[dict[str, Any]]]]:
    """Scenes with their task rows, truncated so exactly `n` rows come out (None: forever)."""
    if n is not None and n < 0:
        raise FoveateError(f"n must be >= 0, got {n}")
    cfg = get_preset(preset)
    left = n
    for scene, questions in iter_scenes(seed, cfg):
        if left is not None and left <= 0:
            return
        take = questions if left is None else questions[:left]
        if left is not None:
            left -= len(take)
        yield scene, [_row(scene, q, j, cfg.name) for j, q in enumerate(take)]


def iter_items(
    n: int | None, seed: int, preset: str | WorldConfig = "default"
) -> Iterator[tuple[Image.Image, Scene, dict[str, Any]]]:
    """Yield (image, scene, task row) in memory, for training without touching disk.

    The rows are exactly those `generate_dataset` would write (``row["image"]`` is the relative path it would
    use). Questions of one scene share one PIL image object: copy it before drawing on it. ``n=None`` streams
    forever.
    """
    for scene, rows in _stream(n, seed, preset):
        image = render_scene(scene)
        for row in rows:
            yield image, scene, row


def _scene_row(scene: Scene, preset: str) -> dict[str, Any]:
    data = scene.to_dict()
    return {"id": data.pop("id"), "image": f"images/{scene.id}.png", "preset": preset, **data}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def generate_dataset(out_dir: str | Path, n: int, seed: int, preset: str | WorldConfig = "default") -> Path:
    """Write `n` questions (with their images and scene ground truth) under `out_dir`; return the tasks.jsonl path."""
    cfg = get_preset(preset)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tasks_path = out / "tasks.jsonl"
    with (
        open(tasks_path, "w", encoding="utf-8", newline="\n") as tasks,
        open(out / "scenes.jsonl", "w", encoding="utf-8", newline="\n") as scenes,
    ):
        for scene, rows in _stream(n, seed, cfg):
            # Fixed PNG options and no pnginfo: Pillow then writes no timestamp, so bytes depend only on pixels.
            render_scene(scene).save(out / "images" / f"{scene.id}.png", format="PNG", optimize=False, compress_level=6)
            scenes.write(_dumps(_scene_row(scene, cfg.name)) + "\n")
            for row in rows:
                tasks.write(_dumps(row) + "\n")
    meta = {"generator": "foveate.world", "preset": cfg.name, "seed": seed, "n": n, "config": dataclasses.asdict(cfg)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return tasks_path


def load_tasks(path: str | Path) -> list[dict[str, Any]]:
    """Read a tasks.jsonl (or a directory holding one) into dicts with ``image`` resolved to an absolute path.

    Relative image paths are resolved against the file's directory, so a dataset folder can be moved. Only
    ``id``, ``image``, ``question`` and ``answers`` are required; other keys get neutral defaults so task files
    converted from real datasets load too. Malformed lines raise `FoveateError` naming the line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "tasks.jsonl"
    if not p.is_file():
        raise FoveateError(f"task file not found: {p}")
    rows: list[dict[str, Any]] = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FoveateError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise FoveateError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in REQUIRED_TASK_KEYS if k not in row]
            if missing:
                raise FoveateError(f"{p}:{lineno}: missing key(s) {', '.join(missing)}")
            # Grounding rows answer with a box: their gold is in `boxes` and `answers` is empty.
            needs_answers = row.get("family") != "grounding"
            if not isinstance(row["answers"], list) or (needs_answers and not row["answers"]):
                raise FoveateError(f"{p}:{lineno}: 'answers' must be a non-empty list of strings")
            image = Path(row["image"])
            row["image"] = str(image if image.is_absolute() else (p.parent / image).resolve())
            rows.append(with_task_defaults(row))
    return rows
