"""Calibrating ViCrop for a model: which layer looks at the evidence, and where the confidence gate can sit.

    python -m foveate.agents.vicrop_calibrate --model DIR --task world:small-detail --n 50 [--method grad-att]
    python -m foveate.agents.vicrop_calibrate --task world:large --n 100 --gate

The paper picks its layers by how much attention falls on the ground-truth evidence; `calibrate` measures, per
layer, the share of map mass inside the evidence boxes and how often the chosen crop contains all of the
evidence, on held-out items (world seed 1001: neither training's seeds below 1000 nor the eval's 1000).
`gate_report` tabulates, per confidence threshold, the share of questions the optional gate would answer from the
question pass and how accurate those answers are (see `agents.vicrop`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from foveate.agents.oracle_crop import model_input_side
from foveate.agents.state import FoveateContext
from foveate.agents.vicrop import (
    METHODS,
    load_vicrop_config,
    look_attention,
    look_attention_many,
    look_pure_grad,
    resolve_layer,
    user_turn,
)
from foveate.agents.vicrop_config import ViCropConfig
from foveate.agents.vicrop_thought import answers_as_asked
from foveate.tools.boxes import Box
from foveate.tools.saliency import select_box
from foveate.tools.store import ImageStore


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

    store = store or ImageStore()
    layers = list(range(policy.num_layers)) if layers is None else layers
    rows = [row for row in rows if row.get("boxes")]
    side = model_input_side(policy)
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
                look = look_attention(policy, store, ref, messages, options, layer, 0)
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

    store = store or ImageStore()
    params = FoveateContext(max_new_tokens=max_new_tokens).sampling()
    options = options or load_vicrop_config(method="rel-att")
    # A gate that answers every question: the look step then spends no pass on generic maps or blocks, which only
    # the zoom would use; the confidence it reports is the same.
    options = dataclasses.replace(options, gate=sys.float_info.min)
    layer = resolve_layer(options.layer, policy.num_layers)
    probs, scores = [], []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        images = [load_image(row["image"]) for row in chunk]
        conversations = [user_turn(image, row["question"]) for image, row in zip(images, chunk, strict=True)]
        requests = [(store.put(image), turn, 0) for image, turn in zip(images, conversations, strict=True)]
        looks = look_attention_many(policy, store, requests, options, layer)
        answers = _gate_answers(policy, looks, conversations, params)
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


def _gate_answers(policy: Any, looks: list, conversations: list, params: Any) -> list[str]:
    """What the gate returns for each look, as `agents.vicrop.answer_now_node` does: a look-first reply as it
    stands; else the question pass decoded from its kept cache (`continue_probe`, equal to `chat`); else `chat`.
    Releases the looks' sessions."""
    from foveate.protocol import strip_thought

    texts = [look.thought_call.text if answers_as_asked(look.thought_call, params) else None for look in looks]
    cached = [i for i, look in enumerate(looks) if texts[i] is None and look.session and not look.thought]
    if cached:
        for i, result in zip(cached, policy.continue_probe([looks[i].session for i in cached], params), strict=True):
            texts[i] = result.text
    fresh = [i for i, text in enumerate(texts) if text is None]
    if fresh:
        for i, result in zip(fresh, policy.chat([conversations[i] for i in fresh], params), strict=True):
            texts[i] = result.text
    policy.release_sessions([look.session for look in looks])
    return [strip_thought(text).strip() for text in texts]


def main(argv: list[str]) -> None:
    """``python -m foveate.agents.vicrop_calibrate --model DIR --task world:small-detail --n 50``"""
    import argparse

    from rich.console import Console
    from rich.table import Table

    from foveate.eval.runner import resolve_tasks

    parser = argparse.ArgumentParser(prog="python -m foveate.agents.vicrop_calibrate", description=calibrate.__doc__)
    parser.add_argument("--model", default=None, help="model directory (default: the demo VLM)")
    parser.add_argument("--task", default="world:small-detail", help="world:<preset> or a tasks.jsonl with boxes")
    parser.add_argument("--n", type=int, default=50, help="items to measure on")
    parser.add_argument(
        "--seed", type=int, default=1001, help="world seed: held out from training (<1000) and eval (1000)"
    )
    parser.add_argument("--method", default="rel-att", choices=METHODS)
    parser.add_argument("--max-pixels", type=int, default=None, help="model input pixel budget")
    parser.add_argument("--gate", action="store_true", help="also tabulate confidence-gate thresholds")
    args = parser.parse_args(argv)

    from foveate.api import make_policy
    from foveate.config import load_config

    config = load_config().with_overrides(max_pixels=args.max_pixels)
    policy = make_policy(args.model, config=config)
    tasks = resolve_tasks(args.task, n=args.n, seed=args.seed, home=config.home_dir)
    store = ImageStore(config.home_dir / "images")
    report = calibrate(policy, tasks.rows, method=args.method, store=store)
    table = Table(title=f"ViCrop {args.method} layer calibration on {len(tasks.rows)} items of {args.task}")
    for column in ("layer", "evidence mass", "crop contains evidence", "items"):
        table.add_column(column, justify="right")
    for entry in report:
        table.add_row(str(entry["layer"]), f"{entry['evidence_mass']:.3f}", f"{entry['crop_hit']:.3f}", str(entry["n"]))
    console = Console()
    console.print(table)
    best = max(report, key=lambda e: (e["crop_hit"], e["evidence_mass"]))  # what ViCrop needs: the right crop
    console.print(f"best layer: {best['layer']}  (set `layer: {best['layer']}` in configs/vicrop.yaml)")
    if args.gate:
        gate = Table(title="confidence gate: questions answered from the question pass (direct answers)")
        for column in ("p(answer token) ≥", "share gated", "accuracy gated", "accuracy rest"):
            gate.add_column(column, justify="right")
        for entry in gate_report(policy, tasks.rows, store=store):
            shown = [f"{entry[k]:.3f}" if entry[k] is not None else "–" for k in ("accuracy_gated", "accuracy_rest")]
            gate.add_row(f"{entry['threshold']:g}", f"{entry['gated']:.2f}", *shown)
        console.print(gate)


if __name__ == "__main__":
    main(sys.argv[1:])
