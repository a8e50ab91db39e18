"""tools/grounding.py: the three backends' parsing and post-processing, and their malformed-output behaviour.

The VLM backend's parsing is tested on exact replies (a scripted policy, the only way to get a given reply) and
end to end on the real tiny model; the detector backend on a tiny random OWLv2 built from transformers' own config
classes with a tokenizer built offline; the attention backend on the real tiny white-box model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scripted import Scripted

from foveate.errors import WhiteBoxUnsupported
from foveate.policies.base import ChatPolicy
from foveate.tools.boxes import Box
from foveate.tools.grounding import (
    AttentionGrounder,
    DetectorGrounder,
    Grounder,
    Grounding,
    VLMGrounder,
    parse_grounding_reply,
    thresholded_box,
)

SIZE = (400, 200)  # width, height


# ---- the VLM's boxes ----------------------------------------------------------------------------------------
def test_qwen25_list_format_in_a_fence_after_a_thought_is_read_in_the_model_convention() -> None:
    reply = (
        '<think>two stars</think>```json\n[{"bbox_2d": [0, 0, 500, 500], "label": "star"}, '
        '{"bbox_2d": [500, 500, 1000, 1000], "label": "star"}]\n```'
    )
    result = parse_grounding_reply(reply, "star", SIZE, "thousand")
    assert [g.box.to_list() for g in result.groundings] == [[0, 0, 200, 100], [200, 100, 400, 200]]
    assert result.reason == "" and all(g.phrase == "star" and g.score == 1.0 for g in result.groundings)


def test_demo_single_object_and_resized_convention() -> None:
    single = parse_grounding_reply('{"bbox_2d": [100, 0, 300, 1000]}', "x", SIZE, "thousand")
    assert single.groundings[0].box == Box(40, 0, 120, 200)
    # Qwen2.5-VL: pixels of a 200x100 resized input → original 400x200
    resized = parse_grounding_reply('[{"bbox_2d": [10, 10, 50, 60]}]', "x", SIZE, "resized", (200, 100))
    assert resized.groundings[0].box == Box(20, 20, 100, 120)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("the star is top left", "no JSON in the reply"),
        ('{"answer": "top left"}', "JSON without a bbox_2d"),
        ('[{"bbox_2d": [1, 2, 3, 4', "no JSON in the reply"),
        ('[{"bbox_2d": [500, 500, 100, 100]}]', "box 1: box is inverted"),
        ('[{"bbox_2d": [1200, 1200, 1500, 1500]}]', "box 1: box [1200, 1200, 1500, 1500] (thousand) lies entirely"),
        ('[{"bbox_2d": ["a", 0, 1, 1]}]', "box 1: box value x1 is not a number"),
    ],
)
def test_malformed_replies_give_no_region_and_a_reason(reply: str, reason: str) -> None:
    result = parse_grounding_reply(reply, "star", SIZE, "thousand")
    assert result.groundings == [] and result.reason.startswith(reason) and result.raw == reply


def test_a_bad_box_is_skipped_and_named_while_good_ones_are_kept() -> None:
    reply = json.dumps([{"bbox_2d": [0, 0, 10]}, {"bbox_2d": [0, 0, 1000, 1000]}])
    result = parse_grounding_reply(reply, "star", SIZE)
    assert [g.box for g in result.groundings] == [Box(0, 0, 400, 200)]
    assert result.reason.startswith("box 1: box must have 4 values")


def test_vlm_grounder_batches_phrases_and_never_raises_on_garbage() -> None:
    policy = Scripted(['{"bbox_2d": [0, 0, 500, 1000]}', "no idea"], convention="thousand")
    grounder = VLMGrounder(policy)
    results = grounder.ground_with_reasons(Image.new("RGB", SIZE), ["red star", "blue circle"])
    assert isinstance(grounder, Grounder)
    assert [r.groundings for r in results] == [[Grounding(Box(0, 0, 200, 200), 1.0, "red star")], []]
    assert results[1].reason == "no JSON in the reply"
    assert len(policy.seen) == 2 and "Locate the blue circle." in policy.seen[1][0]["content"][1]["text"]


def test_vlm_grounder_on_the_real_tiny_model(tiny_policy) -> None:
    image = Image.new("RGB", (224, 224), "white")
    found = VLMGrounder(tiny_policy, max_new_tokens=8).ground(image, ["red star", "blue circle"])
    assert len(found) == 2  # whatever a random model writes: boxes inside the image, or nothing
    assert all(0 <= g.box.x1 < g.box.x2 <= 224 and 0 <= g.box.y1 < g.box.y2 <= 224 for r in found for g in r)


# ---- a zero-shot detector ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory) -> str:
    """A random 70 k-parameter OWLv2 saved with a processor (PIL image processor + a CLIP BPE tokenizer whose
    vocabulary is written here: no Hub download). The start token must not have id 0: OWL models mask query
    rows whose first token id is 0 (padding). The box head's last layer is zeroed so boxes are the model's
    per-patch prior boxes (a random head makes them empty)."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=16)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = Owlv2Config(
        text_config={
            **small,
            "vocab_size": len(vocab),
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={**small, "image_size": 64, "patch_size": 16},
        projection_dim=32,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("owlv2")
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():  # random box heads give degenerate boxes; at zero every box is OWLv2's prior: its patch
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def test_detector_loads_through_the_auto_classes_and_scales_boxes_to_the_padded_square(tiny_owlv2: str) -> None:
    from transformers.image_transforms import center_to_corners_format

    grounder = DetectorGrounder(tiny_owlv2, threshold=0.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 400, 3), dtype=np.uint8))
    found = grounder.ground(image, ["red star", "blue circle"])
    assert isinstance(grounder, Grounder) and grounder.model_type == "owlv2" and len(found) == 2
    regions = [g for phrase in found for g in phrase]
    # 4x4 patches of a 64-px input, one prior box each; OWLv2 padded the 400x200 image to a 400x400 square at the
    # bottom, so the lower 8 boxes cover only padding and are dropped; the upper 8 remain, each for its best phrase
    assert len(regions) == 8
    # what the post-processing must give: the model's boxes times the PADDED square side (400), then clipped
    inputs = grounder.processor(
        text=[["red star", "blue circle"]], images=image, return_tensors="pt", padding="max_length"
    )
    with torch.inference_mode():
        outputs = grounder.model(**inputs)
    corners = center_to_corners_format(outputs.pred_boxes[0]) * 400
    best = outputs.logits[0].argmax(-1)
    for index in range(16):
        phrase = ["red star", "blue circle"][int(best[index])]
        x1, y1, x2, y2 = corners[index].tolist()
        inside = min(y2, 200) > max(y1, 0)
        expected = Box(max(x1, 0), max(y1, 0), min(x2, 400), min(y2, 200)) if inside else None
        matches = [g for g in found[["red star", "blue circle"].index(phrase)] if g.box == expected]
        assert matches if inside else not any(g.box.y1 >= 200 for g in regions), (index, expected)
    for phrase_regions in found:
        scores = [g.score for g in phrase_regions]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert all(0 <= g.box.x1 < g.box.x2 <= 400 and 0 <= g.box.y1 < g.box.y2 <= 200 for g in phrase_regions)


def test_detector_threshold_and_empty_phrases(tiny_owlv2: str) -> None:
    grounder = DetectorGrounder(tiny_owlv2, threshold=1.0)
    assert grounder.ground(Image.new("RGB", (64, 64)), ["red star"]) == [[]]
    assert grounder.ground(Image.new("RGB", (64, 64)), []) == []


def test_detector_directory_that_is_not_a_detector_fails_clearly(tmp_path) -> None:
    from foveate.errors import FoveateError

    with pytest.raises(FoveateError, match="cannot load a zero-shot detector"):
        DetectorGrounder(tmp_path)


# ---- attention ----------------------------------------------------------------------------------------------
def test_thresholded_box_is_the_connected_region_around_the_peak() -> None:
    grid = np.zeros((4, 4))
    grid[1, 1], grid[1, 2], grid[3, 3] = 1.0, 0.6, 0.9  # (3, 3) is above threshold but not connected
    box, mass = thresholded_box(grid, (400, 200), 0.5)
    assert box == Box(100, 50, 300, 100) and mass == pytest.approx(1.6 / 2.5)
    assert thresholded_box(np.zeros((2, 2)), (10, 10))[0] == Box(0, 0, 10, 10)  # a flat map: the whole image


def test_attention_grounder_on_the_real_tiny_model(tiny_policy) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    tight = AttentionGrounder(tiny_policy, layer=0).ground(image, ["red star", "blue circle"])
    window = AttentionGrounder(tiny_policy, layer=0, box="window", input_side=224).ground(image, ["red star"])
    assert [len(r) for r in tight] == [1, 1] and tight[0][0].phrase == "red star"
    for grounding in [tight[0][0], tight[1][0], window[0][0]]:
        assert 0 <= grounding.box.x1 < grounding.box.x2 <= 448 and 0 <= grounding.score <= 1
    assert window[0][0].box.width == pytest.approx(window[0][0].box.height)  # ViCrop's square window
    assert window[0][0].box.width >= 224


def test_attention_grounding_needs_a_white_box_backend() -> None:
    class BlackBox(ChatPolicy):
        name = "remote"

    with pytest.raises(WhiteBoxUnsupported, match="attention grounding needs a white-box backend"):
        AttentionGrounder(BlackBox()).ground(Image.new("RGB", (64, 64)), ["star"])
