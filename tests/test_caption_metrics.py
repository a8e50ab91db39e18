"""Dense-caption metrics (foveate/eval/captions.py), the world:caption preset, and their rows in the eval report."""

from __future__ import annotations

import io
import random

import pytest
from rich.console import Console

from foveate.eval.captions import Mention, caption_metrics, parse_mentions
from foveate.eval.metrics import score_answer, scoring_mode
from foveate.eval.report import CAPTION_KEYS, aggregate, print_tables

RED_STAR = {"shape": "star", "color": "red", "size": "tiny"}
BLUE_SQUARE = {"shape": "square", "color": "blue", "size": "medium"}


def test_mentions_read_colour_size_number_and_stop_at_punctuation() -> None:
    assert parse_mentions("Three red crosses, a large hexagon; blue. star") == [
        Mention("cross", "red"),
        Mention("cross", "red"),
        Mention("cross", "red"),
        Mention("hexagon", None, "large"),
        Mention("star"),  # "blue." ends its phrase: the star has no colour
    ]
    assert parse_mentions("a plain pale blue background with nothing on it") == []
    assert parse_mentions("a medium-sized green diamond and 2 tiny stars") == [
        Mention("diamond", "green", "medium"),
        Mention("star", None, "tiny"),
        Mention("star", None, "tiny"),
    ]


def test_recall_is_one_to_one_and_precision_counts_consistent_mentions() -> None:
    two_stars = [RED_STAR, dict(RED_STAR)]
    once = caption_metrics("a red star", two_stars)
    assert once["object_recall"] == 0.5 and once["object_precision"] == 1.0 and once["hallucination"] == 0.0
    twice = caption_metrics("a red star and a tiny star", two_stars)
    assert twice["object_recall"] == 1.0 and twice["object_f1"] == 1.0
    # a repeated mention of the only star is not a hallucination; a blue star is
    wrong = caption_metrics("a red star, a red star, a blue star", [RED_STAR])
    assert wrong["object_precision"] == pytest.approx(2 / 3) and wrong["hallucination"] == pytest.approx(1 / 3)
    assert wrong["hallucinated_caption"] == 1.0 and wrong["mentions"] == 3 and wrong["caption_words"] == 9


def test_attribute_triples_are_a_multiset_overlap() -> None:
    metrics = caption_metrics("a tiny red star and a large blue square", [RED_STAR, BLUE_SQUARE])
    # predicted: star/red, star/tiny, square/blue, square/large; reference: also square/medium instead of large
    assert metrics["attribute_precision"] == 0.75 and metrics["attribute_recall"] == 0.75
    assert metrics["object_recall"] == 0.5  # "large blue square" is not consistent with the medium one
    empty = caption_metrics("", [RED_STAR])
    assert empty["object_recall"] == 0.0 and empty["object_precision"] == 0.0 and empty["hallucination"] == 0.0


def test_the_worlds_own_full_description_scores_perfectly_on_every_scene() -> None:
    from foveate.world.scenes import SceneConfig, generate_scene

    for seed in range(20):
        scene = generate_scene(random.Random(seed), SceneConfig(), scene_id=f"s{seed}")
        objects = [o.attrs() for o in scene.objects]
        metrics = caption_metrics(scene.description, objects)
        assert metrics["object_recall"] == 1.0 and metrics["hallucination"] == 0.0, scene.description
        assert metrics["attribute_recall"] == 1.0 and metrics["attribute_precision"] == 1.0


def test_world_caption_rows_carry_their_objects_and_score_as_captions() -> None:
    from foveate.eval.runner import resolve_tasks

    rows = resolve_tasks("world:caption", n=3).rows
    assert [r["family"] for r in rows] == ["caption"] * 3 and len({r["scene_id"] for r in rows}) == 3
    row = rows[0]
    assert row["question"] == "Describe the image in detail." and row["objects"]
    assert {"shape", "color", "size", "label", "box"} <= set(row["objects"][0])
    assert scoring_mode(row) == "caption"
    perfect = score_answer(row["answers"][0], row, row["image_size"])
    assert perfect["mode"] == "caption" and perfect["object_recall"] == 1.0 and perfect["score"] == 1.0
    assert score_answer("nothing to see", row, row["image_size"])["score"] == 0.0


def test_caption_rows_in_the_report() -> None:
    records = [
        {"strategy": "direct", "family": "caption", "split": "large", "score": 0.5, **dict.fromkeys(CAPTION_KEYS, 0.5)},
        {"strategy": "direct", "family": "caption", "split": "large", "score": 1.0, **dict.fromkeys(CAPTION_KEYS, 1.0)},
        {"strategy": "direct", "family": "caption", "split": "large", "score": 0.0, "error": "boom"},
    ]
    rows = aggregate(records)
    caption_row = next(r for r in rows if r["family"] == "caption")
    assert caption_row["object_recall"] == 0.5 and caption_row["errors"] == 1  # the failed item counts as zeros
    overall = next(r for r in rows if r["family"] == "all" and r["split"] == "all")
    assert overall["object_recall"] is None and set(CAPTION_KEYS) <= set(overall)
    out = io.StringIO()
    print_tables(rows, Console(file=out, width=200))
    assert "obj R %" in out.getvalue() and "CHAIR_i %" in out.getvalue()
