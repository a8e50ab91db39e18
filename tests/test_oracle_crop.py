"""oracle-crop: crops around the ground-truth evidence, feeds the crop as a second image, traces every step."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from foveate.agents import get_builder, strategy_names
from foveate.agents.oracle_crop import DEFAULT_INPUT_SIDE, evidence_union, model_input_side, oracle_window
from foveate.api import run_strategy
from foveate.errors import BoxError, FoveateError
from foveate.policies.base import ChatPolicy
from foveate.policies.batching import MicroBatcher
from foveate.tools.boxes import Box
from foveate.tools.store import ImageStore

IMAGE_SIZE = (672, 504)
EVIDENCE = [[400, 300, 418, 318], [420, 304, 440, 314]]  # a tiny object and its label


@pytest.fixture()
def store(tmp_path):
    return ImageStore(tmp_path / "images")


@pytest.fixture()
def scene():
    image = Image.new("RGB", IMAGE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((400, 300, 418, 318), fill="red")
    draw.text((420, 304), "A", fill="black")
    return image


def _contains(outer: list[float], inner: list[float]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def test_window_rule():
    # side = max(2 × long side, input side); centred on the evidence; shifted inside the image
    assert oracle_window(Box(300, 300, 320, 320), (672, 672), 224).to_list() == [198, 198, 422, 422]
    assert oracle_window(Box(100, 100, 120, 110), (672, 672), 224).to_list() == [0, 0, 224, 224]  # shifted
    assert oracle_window(Box(600, 600, 660, 650), (672, 672), 224).to_list() == [448, 448, 672, 672]
    # evidence long side 200 > 224 / 2 → side 400 about (200, 150), shifted down to y = 0
    assert oracle_window(Box(100, 100, 300, 200), (672, 672), 224).to_list() == [0, 0, 400, 400]
    # a window larger than the image is clamped (and no longer square)
    assert oracle_window(Box(10, 10, 290, 190), (300, 200), 224).to_list() == [0, 0, 300, 200]
    union = evidence_union(EVIDENCE, IMAGE_SIZE)
    assert union.to_list() == [400, 300, 440, 318]


def test_evidence_errors():
    with pytest.raises(FoveateError, match="evidence_boxes"):
        evidence_union([], IMAGE_SIZE)
    with pytest.raises(FoveateError, match="evidence_boxes"):
        evidence_union(None, IMAGE_SIZE)
    with pytest.raises(BoxError, match="evidence box 1"):
        evidence_union([[0, 0, 10, 10], [900, 900, 950, 950]], IMAGE_SIZE)  # outside the image


def test_model_input_side(tiny_policy):
    assert model_input_side(tiny_policy) == 224  # the tiny processor's 224 × 224 pixel budget
    with MicroBatcher(tiny_policy) as batcher:
        assert model_input_side(batcher) == 224  # read through the batcher

    class Fixed(ChatPolicy):
        input_side = 336

    assert model_input_side(Fixed()) == 336
    assert model_input_side(ChatPolicy()) == DEFAULT_INPUT_SIDE


def test_registered():
    assert "oracle-crop" in strategy_names()
    assert callable(get_builder("oracle-crop"))


def test_graph_crops_evidence_and_sends_two_images(tiny_policy, store, scene):
    graph = get_builder("oracle-crop")()
    inputs = {
        "image": store.put(scene),
        "question": "What is written next to the red circle?",
        "evidence_boxes": EVIDENCE,
    }
    result = run_strategy(graph, inputs, strategy="oracle-crop", policy=tiny_policy, store=store, max_new_tokens=4)
    steps = result.trace.steps
    assert [s["kind"] for s in steps] == ["crop", "model_call", "answer"]
    crop = steps[0]
    box = crop["box"]
    for evidence in EVIDENCE:
        assert _contains(box, evidence)
    assert _contains([0, 0, *IMAGE_SIZE], box)
    assert box[2] - box[0] == box[3] - box[1] == 224  # input side of the tiny model (evidence is small)
    stored = store.get(crop["crop"])
    assert stored.size == (224, 224)
    assert stored.getpixel((409 - int(box[0]), 309 - int(box[1]))) == (255, 0, 0)  # the red circle is in the crop
    prompt = steps[1]["prompt"]
    refs = [p["ref"] for m in prompt for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]
    assert refs == [inputs["image"], crop["crop"]]  # original first, then the crop
    assert prompt[-1]["content"][-1] == {"type": "text", "text": inputs["question"]}
    assert result.answer == steps[2]["text"]
    assert result.trace.boxes == [box]


def test_graph_without_evidence_fails_clearly(tiny_policy, store, scene):
    graph = get_builder("oracle-crop")()
    with pytest.raises(FoveateError, match="ground-truth evidence"):
        run_strategy(
            graph,
            {"image": store.put(scene), "question": "What is it?"},
            strategy="oracle-crop",
            policy=tiny_policy,
            store=store,
        )
