"""Real benchmarks in the task format: V* Bench, POPE and TextVQA-style question files, read from a local copy.

    foveate eval --task vstar:/data/vstar_bench --strategies direct,vicrop-rel
    foveate eval --task pope:/data/coco_pope_adversarial.json --images /data/coco/val2014
    foveate eval --task textvqa:/data/TextVQA_0.5.1_val.json --images /data/textvqa/train_images
    foveate data convert textvqa /data/TextVQA_0.5.1_val.json --images /data/textvqa/train_images --out tv/

Each loader returns task rows (`foveate.world.dataset` row format, image paths absolute) that tell the evaluator
how to score them (``scoring``) and how to group them in the report (``family`` and ``split``):

==========  ==============================================================================================
benchmark   layout read, rows made, metric
==========  ==============================================================================================
vstar       V* Bench ("V*: Guided Visual Search as a Core Mechanism in Multimodal LLMs", Wu & Xie 2023). A
            folder holding ``direct_attributes/`` and ``relative_position/``, each with images and one
            ``<image stem>.json`` per image: ``{"question", "options", "target_object", "bbox"}``, the FIRST
            option correct, ``bbox`` a list of ``[x, y, w, h]``. Checked against the benchmark's own evaluation
            script (github.com/penghao-wu/vstar, ``vstar_bench_eval.py``: it walks those two folders, reads
            ``image_path.split('.')[0] + '.json'`` and scores ``option_chosen == 0``; ``get_patch`` reads bbox
            as x, y, w, h). The Hugging Face copy (craigwu/vstar_bench) also ships ``test_questions.jsonl``
            (listed in its file tree; 191 questions, 115 + 76) whose ``text`` is the question with ``(A) ...``
            option lines and "Answer with the option's letter from the given choices directly." (as quoted by
            evalscope's and inspect_evals' V* pages); its other keys (``image``, ``category``,
            ``question_id``, ``label``) are as those harnesses read them, not checked against the file itself.
            When that file is present it is used (its option order and letters are the published ones);
            otherwise options are shuffled per image with a fixed seed (the raw JSON always lists the answer
            first). Rows: family = category, split "vstar", multiple choice (``scoring: choice``: the letter
            or the option's text), evidence boxes from ``bbox`` (oracle-crop works). Metric: accuracy.
pope        POPE (Li et al. 2023): ``coco_pope_{random,popular,adversarial}.json``, one JSON object per line
            ``{"question_id", "image", "text", "label"}`` (a JSON array of those is accepted too); images from
            ``--images`` (COCO val2014). Rows: family "existence", subtype = the subset named in the file
            name, split "pope". Metric: accuracy, precision, recall, F1 and yes-ratio ("yes" positive).
textvqa     TextVQA (Singh et al. 2019) ``TextVQA_0.5.1_val.json``: ``{"data": [{"question_id", "image_id",
            "question", "answers": [10 answers], ...}]}``; images ``<--images>/<image_id>.jpg``. Rows: family
            "text", split "textvqa", ``scoring: vqa_official`` (`foveate.eval.metrics.vqa_official_accuracy`:
            the VQA normalisation, min(#annotators / 3, 1) averaged over the ten leave-one-out subsets).
==========  ==============================================================================================

Bad input fails before any model runs, with a `FoveateError` naming the file and line (or, for an entry of a
JSON document, the line where the entry starts): invalid JSON, a missing key, a label that is not yes/no,
options that do not hold the answer, a missing image.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foveate.errors import FoveateError
from foveate.world.dataset import with_task_defaults

__all__ = ["BENCHMARKS", "load_benchmark", "load_pope", "load_textvqa", "load_vstar", "write_tasks"]

VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_OPTION_LINE = re.compile(r"^\(([A-J])\)\s*(.*)$")


def _row(**values: Any) -> dict[str, Any]:
    """A task row with every key the evaluator reads (neutral values for what a real benchmark does not know)."""
    return with_task_defaults(values)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FoveateError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise FoveateError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise FoveateError(f"cannot read {path}: {e.strerror}") from None


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FoveateError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise FoveateError(f"cannot read {path}: {e.strerror}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise FoveateError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


def _array_lines(text: str, key: str | None) -> list[int]:
    """Line numbers where each element of a JSON array starts (the top-level array, or the one under ``key``).

    Used only to name lines in error messages; an empty list when the array cannot be located.
    """
    decoder = json.JSONDecoder()
    match = re.search(rf'"{re.escape(key)}"\s*:\s*\[', text) if key else re.match(r"\s*\[", text)
    if not match:
        return []
    pos, lines = match.end(), []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return lines


def _require(entry: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise FoveateError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise FoveateError(f"{where}: missing key(s) {', '.join(missing)}")
    return entry


def _image(folder: Path, name: Any, where: str) -> str:
    path = folder / str(name)
    if not path.is_file():
        raise FoveateError(f"{where}: image not found: {path}")
    return str(path.resolve())


# ---- V* Bench -----------------------------------------------------------------------------------------------
def _vstar_question(question: str, options: list[str]) -> str:
    lines = [question.strip()] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join([*lines, VSTAR_INSTRUCTION])


def _xywh_boxes(bbox: Any, where: str) -> list[list[float]]:
    """V*'s ``bbox`` (one ``[x, y, w, h]`` or a list of them) as ``[x1, y1, x2, y2]`` evidence boxes."""
    if not bbox:
        return []
    boxes = bbox if isinstance(bbox[0], (list, tuple)) else [bbox]
    out = []
    for box in boxes:
        if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise FoveateError(f"{where}: bbox entries must be [x, y, w, h] with w, h > 0, got {box!r}")
        x, y, w, h = (float(v) for v in box)
        out.append([x, y, x + w, y + h])
    return out


def _vstar_annotation(json_path: Path) -> dict[str, Any]:
    entry = _require(_read_json(json_path), ("question", "options"), str(json_path))
    options = entry["options"]
    if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) and o for o in options)):
        raise FoveateError(f"{json_path}: 'options' must be a list of at least two non-empty strings")
    return entry


def load_vstar(root: str | Path, images: str | Path | None = None) -> list[dict[str, Any]]:
    """V* Bench from its published folder (see the module docstring); ``images`` is unused (images sit beside)."""
    folder = Path(root)
    if folder.is_file() and folder.name == "test_questions.jsonl":
        folder = folder.parent
    if not folder.is_dir():
        raise FoveateError(f"V* Bench folder not found: {folder}")
    present = [c for c in VSTAR_CATEGORIES if (folder / c).is_dir()]
    if not present:
        raise FoveateError(f"{folder}: no {' or '.join(VSTAR_CATEGORIES)} folder (not a V* Bench copy)")
    questions = folder / "test_questions.jsonl"
    return _vstar_from_jsonl(questions) if questions.is_file() else _vstar_from_folders(folder, present)


def _vstar_from_folders(folder: Path, categories: list[str]) -> list[dict[str, Any]]:
    rows = []
    for category in categories:
        for image in sorted(p for p in (folder / category).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            json_path = image.with_suffix(".json")
            if not json_path.is_file():
                raise FoveateError(f"{image}: no annotation {json_path.name} beside it")
            entry = _vstar_annotation(json_path)
            options = list(entry["options"])
            answer = options[0]  # the published files list the correct option first
            random.Random(f"vstar/{category}/{image.name}").shuffle(options)  # so the letter is not always A
            letter = LETTERS[options.index(answer)]
            rows.append(
                _row(
                    id=f"vstar-{category}-{image.stem}",
                    image=str(image.resolve()),
                    question=_vstar_question(entry["question"], options),
                    answers=[letter, answer],
                    family=category,
                    subtype="choice",
                    split="vstar",
                    boxes=_xywh_boxes(entry.get("bbox"), str(json_path)),
                    options=options,
                    scoring="choice",
                )
            )
    if not rows:
        raise FoveateError(f"{folder}: no images with annotations in {', '.join(categories)}")
    return rows


def _vstar_from_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, entry in _json_lines(path):
        where = f"{path}:{lineno}"
        entry = _require(entry, ("image", "text", "label"), where)
        lines = str(entry["text"]).split("\n")
        parsed = [m for line in lines if (m := _OPTION_LINE.match(line.strip()))]
        options = [m.group(2).strip() for m in parsed]
        if len(options) < 2 or [m.group(1) for m in parsed] != list(LETTERS[: len(options)]):
            raise FoveateError(f"{where}: 'text' must list the options as lines (A) ..., (B) ...")
        label = str(entry["label"]).strip().strip("()").upper()
        if len(label) != 1 or label not in LETTERS[: len(options)]:
            raise FoveateError(f"{where}: 'label' must be one of the option letters, got {entry['label']!r}")
        question = "\n".join(line for line in lines if not _OPTION_LINE.match(line.strip())).strip()
        question = question.removesuffix(VSTAR_INSTRUCTION).strip()
        image = _image(path.parent, entry["image"], where)
        category = str(entry.get("category") or Path(str(entry["image"])).parent.name or "vstar")
        annotation = Path(image).with_suffix(".json")
        bbox = _vstar_annotation(annotation).get("bbox") if annotation.is_file() else None
        rows.append(
            _row(
                id=f"vstar-{entry.get('question_id', lineno)}",
                image=image,
                question=_vstar_question(question, options),
                answers=[label, options[LETTERS.index(label)]],
                family=category,
                subtype="choice",
                split="vstar",
                boxes=_xywh_boxes(bbox, str(annotation)),
                options=options,
                scoring="choice",
            )
        )
    return rows


# ---- POPE ---------------------------------------------------------------------------------------------------
def _pope_subset(path: Path) -> str:
    return next((s for s in ("adversarial", "popular", "random") if s in path.name.lower()), "pope")


def load_pope(path: str | Path, images: str | Path | None = None) -> list[dict[str, Any]]:
    """A POPE question file (JSON lines, or a JSON array) with images from ``images`` (default: beside it)."""
    file = Path(path)
    if not file.is_file():
        raise FoveateError(f"POPE file not found: {file}")
    image_dir = Path(images) if images else file.parent
    text = file.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        entries = _read_json(file)
        lines = _array_lines(text, None)
        numbered = [(lines[i] if i < len(lines) else i + 1, e) for i, e in enumerate(entries)]
    else:
        numbered = _json_lines(file)
    subset, rows, seen = _pope_subset(file), [], set()
    for lineno, entry in numbered:
        where = f"{file}:{lineno}"
        entry = _require(entry, ("question_id", "image", "text", "label"), where)
        label = str(entry["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise FoveateError(f"{where}: 'label' must be yes or no, got {entry['label']!r}")
        qid = f"pope-{subset}-{entry['question_id']}"
        if qid in seen:
            raise FoveateError(f"{where}: duplicate question_id {entry['question_id']!r}")
        seen.add(qid)
        rows.append(
            _row(
                id=qid,
                image=_image(image_dir, entry["image"], where),
                question=str(entry["text"]),
                answers=[label],
                family="existence",
                subtype=subset,
                split="pope",
            )
        )
    if not rows:
        raise FoveateError(f"{file}: no questions")
    return rows


# ---- TextVQA ------------------------------------------------------------------------------------------------
def load_textvqa(path: str | Path, images: str | Path | None = None) -> list[dict[str, Any]]:
    """A TextVQA question file; images ``<images>/<image_id>.jpg`` (default: an ``images`` folder beside it)."""
    file = Path(path)
    if not file.is_file():
        raise FoveateError(f"TextVQA file not found: {file}")
    document = _read_json(file)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise FoveateError(f'{file}: expected {{"data": [...]}} (a TextVQA question file)')
    lines = _array_lines(file.read_text(encoding="utf-8"), "data")
    image_dir = Path(images) if images else file.parent / "images"
    rows = []
    for index, entry in enumerate(document["data"]):
        where = f"{file}:{lines[index]}" if index < len(lines) else f"{file}: data[{index}]"
        entry = _require(entry, ("question_id", "image_id", "question", "answers"), where)
        answers = entry["answers"]
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise FoveateError(f"{where}: 'answers' must be a non-empty list of strings")
        rows.append(
            _row(
                id=f"textvqa-{entry['question_id']}",
                image=_image(image_dir, f"{entry['image_id']}.jpg", where),
                question=str(entry["question"]),
                answers=list(answers),
                family="text",
                subtype=entry.get("set_name"),
                split="textvqa",
                image_size=[entry["image_width"], entry["image_height"]] if "image_width" in entry else None,
                scoring="vqa_official",
            )
        )
    if not rows:
        raise FoveateError(f"{file}: no questions in 'data'")
    return rows


Loader = Callable[[str | Path, str | Path | None], list[dict[str, Any]]]
BENCHMARKS: dict[str, Loader] = {"vstar": load_vstar, "pope": load_pope, "textvqa": load_textvqa}


def load_benchmark(name: str, path: str | Path, images: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of benchmark ``name`` (a key of `BENCHMARKS`) from its local copy at ``path``."""
    if name not in BENCHMARKS:
        raise FoveateError(f"unknown benchmark {name!r}; choose from: {', '.join(BENCHMARKS)}")
    if images is not None and not Path(images).is_dir():
        raise FoveateError(f"images folder not found: {images}")
    return BENCHMARKS[name](Path(path).expanduser(), images)


def write_tasks(rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write rows as ``out_dir/tasks.jsonl`` (image paths stay absolute); return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "tasks.jsonl"
    with open(target, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target
