"""The `zoom` world preset: unique descriptions, crops holding only the target, options, seeds, held-out eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from foveate.agents.oracle_crop import oracle_window
from foveate.eval.metrics import score_answer
from foveate.eval.runner import DEFAULT_EVAL_SEED
from foveate.tools.boxes import Box
from foveate.world import SHAPES, Scene, generate_dataset, iter_scenes, load_tasks, render_scene
from foveate.world.zoom import LETTERS, MC_INSTRUCTION, position_cell

INPUT_SIDE = 336  # the demo model's input side: the oracle crop's and ViCrop's smallest window
GRID = {
    "in the top left": (0, 0),
    "at the top": (0, 1),
    "in the top right": (0, 2),
    "on the left": (1, 0),
    "in the center": (1, 1),
    "on the right": (1, 2),
    "in the bottom left": (2, 0),
    "at the bottom": (2, 1),
    "in the bottom right": (2, 2),
}
STEM = re.compile(r"What shape is the (?:(?P<color>\w+) object|object (?P<where>.+?))\?")


@pytest.fixture(scope="module")
def items():
    """120 held-out questions with their scenes (ground truth only: nothing is rendered)."""
    out = []
    for scene, questions in iter_scenes(DEFAULT_EVAL_SEED, "zoom"):
        out += [(scene, q) for q in questions]
        if len(out) >= 120:
            return out[:120]


def _matches(scene, row):
    """Every object that fits the question's description."""
    stem = STEM.fullmatch(row["question"].split("\n")[0])
    assert stem, row["question"]
    if stem["color"]:
        return [o for o in scene.objects if o.color == stem["color"]]
    row, col = GRID[stem["where"]]
    if (row == 1) != (col == 1):  # an edge phrase ("at the top", "on the left"): the whole row or column fits
        fits = {(row, c) for c in range(3)} if col == 1 else {(r, col) for r in range(3)}
    else:  # a corner or the centre: that cell
        fits = {(row, col)}
    return [o for o in scene.objects if position_cell(o.box, scene.width, scene.height, 0.0) in fits]


def test_every_target_is_unique_for_its_description(items):
    kinds = set()
    for scene, row in items:
        found = _matches(scene, row)
        assert [o.id for o in found] == row["object_ids"], row["question"]
        target = found[0]
        assert row["boxes"] == [target.box]
        kinds.add((row["reference"], row["family"]))
        if row["reference"] == "position":  # not on a grid line: the position phrase is not a judgement call
            assert position_cell(target.box, scene.width, scene.height, 0.05) is not None
    assert kinds == {("color", "attribute"), ("color", "choice"), ("position", "attribute"), ("position", "choice")}


def test_the_crop_around_the_target_holds_no_other_object(items):
    for scene, row in items:
        target = scene.object(row["object_ids"][0])
        window = oracle_window(Box(*target.box), (scene.width, scene.height), INPUT_SIDE)  # agents/oracle_crop.py
        inside = [o.id for o in scene.objects if Box(*o.box).intersection(window) is not None]
        assert inside == [target.id], (scene.id, inside)
        assert window.width == window.height == INPUT_SIDE  # a full-size crop: the target at 1x


def test_the_asked_detail_is_small_at_input_and_large_in_the_crop(items):
    for scene, row in items:
        target = scene.object(row["object_ids"][0])
        k = INPUT_SIDE / (scene.width * scene.height) ** 0.5  # the processor's scale for a 336^2 pixel budget
        assert target.side * k < 14, "under one 14-px patch at the model's input"
        assert target.side >= 36, "whole in a 336-px crop"
        assert min(scene.width, scene.height) >= 1344


def test_options_hold_the_answer_exactly_once(items):
    multiple_choice = [row for _, row in items if row["family"] == "choice"]
    assert len(multiple_choice) > 30
    letters = []
    for row in multiple_choice:
        options, (letter, shape) = row["options"], row["answers"]
        assert options.count(shape) == 1 and set(options) <= set(SHAPES) and len(set(options)) == len(options)
        assert options[LETTERS.index(letter)] == shape
        lines = row["question"].split("\n")
        assert lines[1:-1] == [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
        assert lines[-1] == MC_INSTRUCTION
        assert row["scoring"] == "choice"
        letters.append(letter)
    assert len(set(letters)) == 4  # the correct letter moves


def test_choice_rows_score_the_letter_or_the_option(items):
    row = next(row for _, row in items if row["family"] == "choice")
    letter, shape = row["answers"]
    wrong = next(o for o in row["options"] if o != shape)
    size = (2048, 2048)
    assert score_answer(letter, row, size)["score"] == 1.0
    assert score_answer(f"({letter}) {shape}", row, size)["score"] == 1.0
    assert score_answer(shape, row, size)["score"] == 1.0
    assert score_answer(wrong, row, size)["score"] == 0.0
    assert score_answer(f"{shape} or {wrong}", row, size)["score"] == 0.0
    open_row = next(row for _, row in items if row["family"] == "attribute")
    assert score_answer(open_row["answers"][0], open_row, size)["score"] == 1.0
    assert "options" not in open_row


def test_seeds_reproduce_and_differ(tmp_path: Path):
    def first(seed: int, n: int = 6):
        out = []
        for scene, questions in iter_scenes(seed, "zoom"):
            out.append((scene.to_dict(), questions))
            if len(out) == n:
                return out

    assert first(5) == first(5)
    assert first(5) != first(6)
    scene = Scene.from_dict(first(5, 1)[0][0])
    assert render_scene(scene).tobytes() == render_scene(Scene.from_dict(scene.to_dict())).tobytes()
    tasks = generate_dataset(tmp_path / "a", n=1, seed=5, preset="zoom")
    assert load_tasks(tasks)[0]["question"] == first(5, 1)[0][1][0]["question"]
    assert json.loads((tmp_path / "a/meta.json").read_text())["config"]["zoom"]["crop_side"] == INPUT_SIDE


def test_other_presets_rows_carry_no_zoom_keys():
    _, rows = next(iter_scenes(0, "small-detail"))
    assert all(not {"options", "scoring", "reference"} & set(row) for row in rows)


def _training_world_seeds() -> set[int]:
    """Every world seed the SFT recipes stream from: stage seed x 16 + dataloader worker (rl/sft.py)."""
    from foveate.rl.sft import load_recipe  # tests may import training code; agents may not

    seeds = set()
    root = Path(__file__).resolve().parent.parent / "configs"
    for path in sorted(root.glob("**/*.yaml")):
        if "output_dir" not in path.read_text(encoding="utf-8"):  # not a training recipe (default, vicrop)
            continue
        for stage in load_recipe(path).all_stages():
            seeds |= {stage.train.seed * 16 + worker for worker in range(max(1, stage.train.dataloader_workers))}
    return seeds


@pytest.mark.slow  # imports the training code (torch, transformers): about 10 s
def test_the_held_out_eval_seed_is_never_a_training_seed():
    seeds = _training_world_seeds()
    assert seeds, "no training configs found"
    assert DEFAULT_EVAL_SEED not in seeds and max(seeds) < DEFAULT_EVAL_SEED
