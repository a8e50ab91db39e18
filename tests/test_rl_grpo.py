"""DeepEyes GRPO pieces: the zoom environment (never crops outside the image, answers malformed calls with an
error turn), the dataset rows, the recipe config; and (slow) a real GRPO batch whose tool tokens are masked."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from foveate.errors import FoveateError
from foveate.rl.deepeyes_grpo import GRPORecipe, environment_factory, prompt_rows
from foveate.rl.runs import load_config

IMAGE = Image.new("RGB", (640, 480), (120, 120, 120))


def env(convention: str = "thousand"):
    environment = environment_factory(convention)()
    environment.reset(image=IMAGE, answers=["red"], prompt=[])
    return environment


def test_a_valid_zoom_returns_the_crop_of_the_original_image():
    environment = env()
    result = environment.image_zoom_in_tool(bbox_2d=[250, 250, 750, 750], label="the red star")
    assert isinstance(result, list) and result[0]["type"] == "image"
    assert result[0]["image"].size == (320, 240)
    assert environment.zooms == 1 and environment.boxes == [[160.0, 120.0, 480.0, 360.0]]


def test_pixel_convention_and_clipping():
    environment = env("pixels")
    result = environment.image_zoom_in_tool(bbox_2d=[600, 400, 900, 900])  # runs off the image: clipped
    assert result[0]["image"].size == (40, 80)
    assert environment.boxes == [[600.0, 400.0, 640.0, 480.0]]


@pytest.mark.parametrize(
    "arguments, reason",
    [
        ({}, "needs bbox_2d"),
        ({"bbox_2d": "left half"}, "bad bbox_2d"),
        ({"bbox_2d": [1, 2, 3]}, "bad bbox_2d"),
        ({"bbox_2d": [500, 500, 100, 100]}, "bad bbox_2d"),  # inverted
        ({"bbox_2d": [1100, 1100, 1200, 1200]}, "bad bbox_2d"),  # entirely outside
        ({"bbox_2d": [0, 0, 30, 30]}, "too small"),  # 19 x 14 px
        ({"bbox_2d": [0, 0, 1000, 50]}, "too small"),  # 640 x 24 px
        ({"bbox_2d": [None, 0, 10, 10]}, "bad bbox_2d"),
        ({"bbox_2d": ["a", "b", "c", "d"]}, "bad bbox_2d"),
    ],
)
def test_malformed_calls_get_an_error_turn(arguments, reason):
    environment = env()
    result = environment.image_zoom_in_tool(**arguments)
    assert isinstance(result, str) and result.startswith("Error: ") and reason in result
    assert environment.zooms == 0 and environment.calls == 1


def test_unknown_arguments_are_ignored():
    result = env().image_zoom_in_tool(bbox_2d=[0, 0, 500, 500], zoom=3)
    assert isinstance(result, list)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5000, 5000)), min_size=4, max_size=4
    )
)
def test_never_crops_outside_the_image(values):
    environment = env("pixels")
    result = environment.image_zoom_in_tool(bbox_2d=values)
    if isinstance(result, str):
        assert result.startswith("Error: ")
        return
    x1, y1, x2, y2 = environment.boxes[-1]
    assert 0 <= x1 < x2 <= IMAGE.width and 0 <= y1 < y2 <= IMAGE.height
    assert all(math.isfinite(v) for v in (x1, y1, x2, y2))
    crop = result[0]["image"]
    assert crop.size == (round(x2 - x1), round(y2 - y1))
    assert min(crop.size) > 30


def test_prompt_rows_use_the_strategy_format():
    rows = prompt_rows(
        [{"image": IMAGE, "question": "What color is the star?", "answers": ["red"], "boxes": [[1, 2, 3, 4]]}]
    )
    text = rows[0]["prompt"][0]["content"][1]["text"]
    assert text.startswith("What color is the star?") and "image_zoom_in_tool" in text
    assert rows[0]["image_size"] == [640, 480] and rows[0]["boxes"] == [[1.0, 2.0, 3.0, 4.0]]


def test_multiple_choice_rows_are_rewarded_by_the_choice_rules():
    """A V*-style row (the zoom preset's) keeps its options: the letter and the option's text are right, another
    option is wrong, whatever its position among the answers."""
    from foveate.rl.rewards import accuracy_reward

    row = {"image": IMAGE, "question": "What shape?\n(A) star\n(B) circle", "answers": ["B", "circle"]}
    rows = prompt_rows([{**row, "options": ["star", "circle"], "scoring": "choice"}])
    columns = {
        key: [rows[0][key]] * 3 for key in ("answers", "family", "preset", "boxes", "image_size", "scoring", "options")
    }
    completions = [[{"role": "assistant", "content": f"<answer>{a}</answer>"}] for a in ("B", "circle", "A")]
    assert accuracy_reward([None] * 3, completions, **columns) == [1.0, 1.0, 0.0]
    assert prompt_rows([row])[0]["scoring"] == "" and prompt_rows([row])[0]["options"] == []


def test_recipe_config_checks(tmp_path):
    recipe = load_config(GRPORecipe, "configs/rl/deepeyes.yaml", {"max_steps": 3})
    assert recipe.max_steps == 3 and recipe.model.endswith("demo") and recipe.learning_rate == 3e-5
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(FoveateError, match="unknown setting"):
        load_config(GRPORecipe, bad)
    with pytest.raises(FoveateError, match="multiple of num_generations"):
        load_config(GRPORecipe, None, {"batch_size": 3, "num_generations": 2})
