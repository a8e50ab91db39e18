"""VisRL: focus-box parsing and the minimum window, the one-conversation training format, the fallback when the
focus box is unusable, traces, and a run on the real tiny model.

``Scripted`` (a ``ChatPolicy`` replaying given replies) is used ONLY for the control-flow tests, which need a
model that states a given box or a malformed one; the end-to-end test runs the real tiny random-weights model.
"""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw
from scripted import Convention, Scripted

from foveate.agents import get_builder
from foveate.agents.visrl import build, focus_window, parse_focus_box
from foveate.api import run_strategy
from foveate.errors import BoxError
from foveate.protocol import VISRL_ANSWER_PROMPT, VISRL_FOCUS_SUFFIX
from foveate.tools.boxes import Box
from foveate.tools.store import ImageStore

SIZE = (672, 504)
QUESTION = "What color is the small circle?"


@pytest.fixture()
def store(tmp_path):
    return ImageStore(tmp_path / "images")


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    image = Image.new("RGB", SIZE, "white")
    ImageDraw.Draw(image).ellipse((400, 300, 418, 318), fill="red")
    return image


def run(policy, store, image, max_new_tokens=8):
    inputs = {"image": store.put(image), "question": QUESTION}
    return run_strategy(build(), inputs, strategy="visrl", policy=policy, store=store, max_new_tokens=max_new_tokens)


# ---- focus box ----------------------------------------------------------------------------------------------
def test_parse_focus_box_formats_and_conventions():
    thousand = Convention("thousand")
    assert parse_focus_box('{"bbox_2d": [500, 500, 750, 1000]}', SIZE, thousand).to_list() == [336, 252, 504, 504]
    assert parse_focus_box("the box is [500, 500, 750, 1000].", SIZE, thousand).to_list() == [336, 252, 504, 504]
    assert parse_focus_box('{"bbox_2d": [-50, 900, 500, 1200]}', SIZE, thousand).to_list() == [0, 453.6, 336, 504]
    assert parse_focus_box("[0.5, 0.5, 0.75, 1]", SIZE, Convention("normalized")).to_list() == [336, 252, 504, 504]
    assert parse_focus_box("[336, 252, 504, 504]", SIZE, Convention("pixels")).to_list() == [336, 252, 504, 504]
    resized = Convention("resized", resized=(252.0, 168.0))
    assert parse_focus_box("[126, 84, 189, 168]", SIZE, resized).to_list() == [336, 252, 504, 504]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("somewhere on the left", "no box"),
        ('{"bbox_2d": []}', "4 values"),
        ('{"bbox_2d": [1, 2, 3]}', "4 values"),
        ('{"bbox_2d": [a, 2, 3, 4]}', "x1 is not a number"),
        ('{"bbox_2d": [500, 500, 400, 600]}', "inverted"),
        ('{"bbox_2d": [1100, 0, 1200, 100]}', "outside"),
    ],
)
def test_parse_focus_box_errors(text, error):
    with pytest.raises(BoxError, match=error):
        parse_focus_box(text, SIZE, Convention())


def test_focus_window():
    # a tiny box grows to min(input side 224, short side 504 / 2) about its centre
    assert focus_window(Box(400, 300, 418, 318), SIZE, 224).to_list() == [297, 197, 521, 421]
    assert focus_window(Box(0, 0, 10, 10), SIZE, 224).to_list() == [0, 0, 224, 224]  # shifted inside
    assert focus_window(Box(100, 100, 500, 400), SIZE, 224).to_list() == [100, 100, 500, 400]  # large: unchanged
    assert focus_window(Box(10, 10, 20, 20), SIZE, 4000).to_list() == [0, 0, 252, 252]  # huge input side: half
    rng = random.Random(0)
    for _ in range(200):
        x, y = rng.uniform(0, 660), rng.uniform(0, 490)
        window = focus_window(Box(x, y, x + rng.uniform(1, 300), y + rng.uniform(1, 300)), SIZE, 224)
        assert window.x1 >= 0 and window.y1 >= 0 and window.x2 <= SIZE[0] + 1e-9 and window.y2 <= SIZE[1] + 1e-9
        assert min(window.width, window.height) >= 224 - 1e-9


# ---- the graph (scripted replies) ---------------------------------------------------------------------------
def test_focus_crop_answer_in_one_conversation(store, scene):
    policy = Scripted(['{"bbox_2d": [580, 580, 640, 650]}', "red"])
    result = run(policy, store, scene)
    assert result.answer == "red"
    assert [s["kind"] for s in result.trace.steps] == ["model_call", "crop", "model_call", "answer"]
    focus, answer = policy.seen
    assert len(focus) == 1 and focus[0]["role"] == "user"
    assert focus[0]["content"][1] == {"type": "text", "text": QUESTION + VISRL_FOCUS_SUFFIX}
    assert [m["role"] for m in answer] == ["user", "assistant", "user"]
    assert answer[0] == focus[0]  # the same first turn: one conversation
    assert answer[1] == {"role": "assistant", "content": '{"bbox_2d": [580, 580, 640, 650]}'}
    assert answer[2]["content"][1] == {"type": "text", "text": VISRL_ANSWER_PROMPT}
    crop_image = answer[2]["content"][0]["image"]
    focus_step, crop_step, answer_step = result.trace.steps[:3]
    assert focus_step["focus_box"] == pytest.approx([389.76, 292.32, 430.08, 327.6])
    assert focus_step["focus_error"] is None
    assert crop_step["box"] == [297, 197, 522, 422]  # grown to the 224-px minimum window, snapped outward
    assert crop_image.size == (225, 225) and store.ref_for(crop_image) == crop_step["crop"]
    assert crop_image.getpixel((409 - 297, 309 - 197)) == (255, 0, 0)  # the circle is in the crop
    assert crop_step["image"] == result.trace.image and result.trace.boxes == [crop_step["box"]]
    prompt = answer_step["prompt"]
    assert prompt[1] == {"role": "assistant", "content": '{"bbox_2d": [580, 580, 640, 650]}'}
    refs = [p["ref"] for m in (prompt[0], prompt[2]) for p in m["content"] if p.get("type") == "image"]
    assert refs == [result.trace.image, crop_step["crop"]]


def test_malformed_focus_falls_back_to_the_full_image(store, scene):
    policy = Scripted(["<|image_pad|>left side somewhere", "blue"])
    result = run(policy, store, scene)
    assert result.answer == "blue"
    assert [s["kind"] for s in result.trace.steps] == ["model_call", "model_call", "answer"]
    focus_step, fallback_step, _ = result.trace.steps
    assert focus_step["focus_box"] is None and "no box" in focus_step["focus_error"]
    assert "no usable focus box" in fallback_step["fallback"] and fallback_step["node"] == "answer_full"
    fallback = policy.seen[1]
    assert len(fallback) == 1 and fallback[0]["content"][1] == {"type": "text", "text": QUESTION}  # plain question
    assert fallback[0]["content"][0]["image"].size == SIZE
    assert result.trace.boxes == []


def test_matches_the_training_format(tiny_policy, store):
    """Replay a visrl training example's replies: the strategy's conversations render to the training text."""
    from foveate.rl.sft_data import DataMix, visrl
    from foveate.world import iter_scenes, render_scene

    world_scene, row = next((s, r) for s, rows in iter_scenes(1, "small-detail") for r in rows if r["boxes"])
    image = render_scene(world_scene)
    example = visrl(image, row, random.Random(0), DataMix())["messages"]
    policy = Scripted([example[1]["content"], example[3]["content"]])
    run_strategy(
        build(), {"image": store.put(image), "question": row["question"]}, strategy="visrl", policy=policy, store=store
    )
    training_text, _ = tiny_policy.render(example, add_generation_prompt=False)
    focus_text, _ = tiny_policy.render(policy.seen[0])
    answer_text, _ = tiny_policy.render(policy.seen[1])
    assert training_text.startswith(focus_text + example[1]["content"] + "<|im_end|>")
    assert training_text == answer_text + example[3]["content"] + "<|im_end|>\n"


# ---- the real tiny model ------------------------------------------------------------------------------------
def test_real_model_end_to_end(tiny_policy, store, scene):
    result = run(tiny_policy, store, scene, max_new_tokens=6)
    steps = result.trace.steps
    assert steps[0]["node"] == "focus" and steps[-1] == {
        "kind": "answer",
        "node": steps[-2]["node"],
        "text": result.answer,
    }
    assert result.trace.model_calls == 2 and all(
        s["model"] == tiny_policy.name for s in steps if s["kind"] == "model_call"
    )
    if steps[0]["focus_box"] is None:  # the random model rarely states a box: the fallback ran
        assert [s["kind"] for s in steps] == ["model_call", "model_call", "answer"] and steps[1]["fallback"]
    else:
        assert [s["kind"] for s in steps] == ["model_call", "crop", "model_call", "answer"]
    assert get_builder("visrl") is build
