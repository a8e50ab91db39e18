"""``foveate vicrop calibrate``: which layer of a model looks at the evidence, and where the confidence gate can sit.

    foveate vicrop calibrate --model DIR --task world:small-detail --n 50 [--method grad-att] [--no-record]
    foveate vicrop calibrate --task world:large --n 100 --gate

The paper picks its layers by how much attention falls on the ground-truth evidence; `calibrate` measures, per
layer, the share of map mass inside the evidence boxes and how often the chosen crop contains all of the
evidence, on held-out items (world seed 1001: neither training's seeds below 1000 nor the eval's 1000).
`gate_report` tabulates, per confidence threshold, the share of questions the optional gate would answer from the
question pass and how accurate those answers are (see `agents.vicrop`).

The best layer (the one whose crops contain the evidence most often) is recorded where the next ViCrop run on that
model finds it (`agents.vicrop_config.record_layer`: ``foveate_vicrop.json`` in the model's directory, or under
$FOVEATE_HOME keyed by the model's fingerprint when the directory is not writable); ``--no-record`` only prints.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import typer

from foveate.agents.vicrop import (
    METHODS,
    AnswerRequest,
    answer_pass,
    load_vicrop_config,
    look_attention,
    look_pure_grad,
    require_white_box,
    resolve_layer,
    user_turn,
)
from foveate.agents.vicrop_config import ViCropConfig, record_layer
from foveate.policies.base import SamplingParams, WhiteBoxPolicy, answers_as_asked
from foveate.protocol import strip_thought
from foveate.tools.boxes import Box
from foveate.tools.saliency import select_box
from foveate.tools.store import ImageStore

vicrop_app = typer.Typer(help="ViCrop for a model: calibrate its layer and gate.", no_args_is_help=True)


def evidence_mass(values: np.ndarray, image_size: tuple[int, int], boxes: list[list[float]]) -> float:
    """Fraction of a map's (non-negative) mass that falls inside the union of ``boxes`` (original pixels)."""
    grid = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    rows, cols = grid.shape
    width, height = image_size
    inside = np.zeros((rows, cols))
    ys, xs = np.linspace(0, height, rows + 1), np.linspace(0, width, cols + 1)
    for x1, y1, x2, y2 in boxes:
        overlap_y = np.clip(np.minimum(ys[1:], y2) - np.maximum(ys[:-1], y1), 0, None) / np.diff(ys)
        overlap_x = np.clip(np.minimum(xs[1:], x2) - np.maximum(xs[:-1], x1), 0, None) / np.diff(xs)
        inside = np.maximum(inside, np.outer(overlap_y, overlap_x))
    total = grid.sum()
    return float((grid * inside).sum() / total) if total > 0 else 0.0


def calibrate(
    policy: Any,
    rows: list[dict[str, Any]],
    method: str = "rel-att",
    layers: list[int] | None = None,
    store: ImageStore | None = None,
) -> list[dict[str, Any]]:
    """Per layer: mean fraction of map mass inside the evidence boxes, and how often the chosen crop contains
    all of the evidence, over task ``rows`` (held-out items with ``boxes``). The best layer is the one whose crops
    contain the evidence most often (ties: the most mass inside the evidence)."""
    from foveate.tools.images import load_image

    policy = require_white_box(policy)
    store = store or ImageStore()
    layers = list(range(policy.num_layers)) if layers is None else layers
    rows = [row for row in rows if row.get("boxes")]
    side = policy.input_side
    report = []
    for layer in layers:
        options = load_vicrop_config(method=method, layer=layer, cache_generic=False, reuse_prefix=False)
        masses, hits = [], []
        for row in rows:
            image = load_image(row["image"])
            ref = store.put(image)
            messages = user_turn(image, row["question"])
            if method == "pure-grad":
                look = look_pure_grad(policy, store, ref, messages, options, 0)
            else:
                look = look_attention(policy, store, [(ref, messages, 0)], options, layer)[0]
            masses.append(evidence_mass(look.heat, image.size, row["boxes"]))
            chosen = select_box(look.heat, image.size, side, options.ratios).box or Box(0, 0, *image.size)
            evidence = np.asarray(row["boxes"], dtype=float)
            union = Box(*evidence[:, :2].min(axis=0), *evidence[:, 2:].max(axis=0))
            inside = chosen.intersection(union)
            hits.append(inside is not None and inside.area >= union.area * (1 - 1e-6))
        report.append(
            {
                "layer": layer,
                "evidence_mass": float(np.mean(masses)),
                "crop_hit": float(np.mean(hits)),
                "n": len(masses),
            }
        )
    return report


def gate_report(
    policy: Any,
    rows: list[dict[str, Any]],
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    max_new_tokens: int = 16,
    batch: int = 16,
    store: ImageStore | None = None,
    options: ViCropConfig | None = None,
) -> list[dict[str, Any]]:
    """For each gate threshold: the share of ``rows`` the gate would answer from the question pass, and the
    accuracy of those answers and of the rest (direct answers: what the gate returns).

    The confidence is the one ``vicrop-rel-gate`` reads, from the strategy's own look step (``options``, by default
    configs/vicrop.yaml's with rel-att): p(first answer token) at the last prompt token, or, for a look-first model,
    at the answer's position inside its reply (at the last prompt token such a model predicts ``<think>``, with p
    near 1 on every question)."""
    from foveate.eval.metrics import score_answer
    from foveate.tools.images import load_image

    policy = require_white_box(policy)
    store = store or ImageStore()
    params = SamplingParams(max_new_tokens=max_new_tokens)
    options = options or load_vicrop_config(method="rel-att")
    # A gate that answers every question: the look step then spends no pass on generic maps or blocks, which only
    # the zoom would use; the confidence it reports is the same.
    options = dataclasses.replace(options, gate=sys.float_info.min)
    layer = resolve_layer(options.layer, policy)
    probs, scores = [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        images = [load_image(row["image"]) for row in chunk]
        conversations = [user_turn(image, row["question"]) for image, row in zip(images, chunk, strict=True)]
        requests = [(store.put(image), turn, 0) for image, turn in zip(images, conversations, strict=True)]
        looks = look_attention(policy, store, requests, options, layer)
        answers = gated_answers(policy, looks, conversations, params)
        for look, answer, row, image in zip(looks, answers, chunk, images, strict=True):
            probs.append(look.confidence if look.confidence is not None else 0.0)
            scores.append(score_answer(answer, row, image.size)["score"])
    probs_array, scores_array = np.asarray(probs), np.asarray(scores)
    report = []
    for threshold in thresholds:
        gated = probs_array >= threshold
        report.append(
            {
                "threshold": threshold,
                "gated": float(gated.mean()) if len(gated) else 0.0,
                "accuracy_gated": float(scores_array[gated].mean()) if gated.any() else None,
                "accuracy_rest": float(scores_array[~gated].mean()) if (~gated).any() else None,
            }
        )
    return report


def gated_answers(policy: WhiteBoxPolicy, looks: list, conversations: list, params: SamplingParams) -> list[str]:
    """What the gate returns for each look, as the graph's ``answer_now`` does: a look-first reply as it stands,
    else the strategy's answer pass without a crop (from the question pass's cache when kept)."""
    texts = [look.thought_call.text if answers_as_asked(look.thought_call, params) else None for look in looks]
    rest = [i for i, text in enumerate(texts) if text is None]
    requests = [AnswerRequest(conversations[i], looks[i].session, same=not looks[i].thought) for i in rest]
    for i, result in zip(rest, answer_pass(policy, requests, params), strict=True):
        texts[i] = result.text
    policy.release_sessions([looks[i].session for i in range(len(looks)) if i not in rest])
    return [strip_thought(text).strip() for text in texts]


@vicrop_app.command("calibrate")
def calibrate_command(
    model: str = typer.Option(None, "--model", "-m", help="model directory (default: the demo VLM)"),
    task: str = typer.Option("world:small-detail", "--task", help="world:<preset> or a tasks.jsonl with boxes"),
    n: int = typer.Option(50, "--n", help="items to measure on"),
    seed: int = typer.Option(1001, "--seed", help="world seed: held out from training (<1000) and eval (1000)"),
    method: str = typer.Option("rel-att", "--method", help=f"one of {', '.join(METHODS)}"),
    max_pixels: int = typer.Option(None, "--max-pixels", help="model input pixel budget"),
    gate: bool = typer.Option(False, "--gate", help="also tabulate confidence-gate thresholds"),
    record: bool = typer.Option(True, "--record/--no-record", help="record the best layer for the next runs"),
) -> None:
    """Measure, per layer, how much of the map falls on the evidence; record the best layer for this model."""
    from rich.console import Console
    from rich.table import Table

    from foveate.api import make_policy
    from foveate.config import load_config
    from foveate.errors import FoveateError
    from foveate.eval.runner import resolve_tasks

    if method not in METHODS:
        raise FoveateError(f"unknown ViCrop method {method!r}; choose one of: {', '.join(METHODS)}")
    config = load_config().with_overrides(max_pixels=max_pixels)
    policy = require_white_box(make_policy(model, config=config))
    tasks = resolve_tasks(task, n=n, seed=seed, home=config.home_dir)
    store = ImageStore(config.home_dir / "images")
    report = calibrate(policy, tasks.rows, method=method, store=store)
    table = Table(title=f"ViCrop {method} layer calibration on {len(tasks.rows)} items of {task}")
    for column in ("layer", "evidence mass", "crop contains evidence", "items"):
        table.add_column(column, justify="right")
    for entry in report:
        table.add_row(str(entry["layer"]), f"{entry['evidence_mass']:.3f}", f"{entry['crop_hit']:.3f}", str(entry["n"]))
    console = Console()
    console.print(table)
    best = max(report, key=lambda e: (e["crop_hit"], e["evidence_mass"]))  # what ViCrop needs: the right crop
    console.print(f"best layer: {best['layer']}")
    if record:
        how = {"method": method, "task": task, "n": len(tasks.rows), "seed": seed, "per_layer": report}
        console.print(f"recorded in {record_layer(policy, best['layer'], how)} (an explicit `layer` still wins)")
    if gate:
        table = Table(title="confidence gate: questions answered from the question pass (direct answers)")
        for column in ("p(answer token) ≥", "share gated", "accuracy gated", "accuracy rest"):
            table.add_column(column, justify="right")
        for entry in gate_report(policy, tasks.rows, store=store):
            shown = [f"{entry[k]:.3f}" if entry[k] is not None else "–" for k in ("accuracy_gated", "accuracy_rest")]
            table.add_row(f"{entry['threshold']:g}", f"{entry['gated']:.2f}", *shown)
        console.print(table)
