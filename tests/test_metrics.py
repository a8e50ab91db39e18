"""Hand-worked cases for every evaluation metric (foveate.eval.metrics)."""

from __future__ import annotations

import doctest
import json

import pytest

from foveate.eval import metrics
from foveate.eval.metrics import (
    box_iou,
    exact_match,
    grounding_accuracy,
    normalize_answer,
    parse_box_answer,
    parse_yes_no,
    pope_metrics,
    score_answer,
    scoring_mode,
    vqa_soft_accuracy,
)
from foveate.tools.boxes import Box


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Red Star.", "red star"),
        ("  yes!! ", "yes"),
        ("Three", "3"),
        ("twenty apples", "20 apples"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("It is 3.", "it is 3"),
        ("an apple", "apple"),
        ("A", "a"),  # a label "A" is an answer, not an article
        ("the A", "a"),
        ("Don't", "dont"),
        ("x-7", "x 7"),
        ("RED\tstar\n", "red star"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Purple.", ["purple", "violet"]) == 1.0
    assert exact_match("violet", ["purple", "violet"]) == 1.0
    assert exact_match("four", ["4", "four"]) == 1.0
    assert exact_match("4 objects", ["4", "four"]) == 0.0  # exact, not containment
    assert exact_match("", ["a"]) == 0.0  # an empty answer never matches a one-letter label
    assert exact_match("A", ["a"]) == 1.0


def test_vqa_soft_accuracy_ten_answers():
    # Ten annotators: 4 × "red", 3 × "dark red", 2 × "maroon", 1 × "brown".
    answers = ["red"] * 4 + ["Dark red"] * 3 + ["maroon"] * 2 + ["brown"]
    assert vqa_soft_accuracy("Red", answers) == 1.0  # min(4/3, 1)
    assert vqa_soft_accuracy("dark red.", answers) == 1.0  # 3/3
    assert vqa_soft_accuracy("maroon", answers) == pytest.approx(2 / 3)
    assert vqa_soft_accuracy("brown", answers) == pytest.approx(1 / 3)
    assert vqa_soft_accuracy("blue", answers) == 0.0
    # Official leave-one-out averaging: "maroon" → (2 subsets × 1/3 + 8 subsets × 2/3) / 10 = 0.6
    assert vqa_soft_accuracy("maroon", answers, leave_one_out=True) == pytest.approx(0.6)
    # "dark red" → (3 subsets × 2/3 + 7 subsets × 1) / 10 = 0.9; "red" keeps ≥ 3 matches in every subset → 1
    assert vqa_soft_accuracy("dark red", answers, leave_one_out=True) == pytest.approx(0.9)
    assert vqa_soft_accuracy("red", answers, leave_one_out=True) == 1.0
    assert vqa_soft_accuracy("two", ["2", "two", "2"] + ["3"] * 7) == 1.0  # number words normalise
    assert vqa_soft_accuracy("x", []) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes, there is a red star.", "yes"),
        ("No.", "no"),
        ("No, there is not.", "no"),
        ("There is no red star.", "no"),
        ("There isn't one.", "no"),
        ("I believe that is true", "yes"),
        ("There is a red star.", None),  # no yes/no word: not guessed
        ("maybe", None),
        ("yes and no", "yes"),  # the first word decides
        ("Well, yes but not quite", None),  # both cues, first word neither
        ("", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_metrics_hand_worked():
    golds = ["yes"] * 5 + ["no"] * 5
    preds = [
        "Yes.",  # TP
        "Yes, there is a red star.",  # TP
        "yes",  # TP
        "No, there is not.",  # FN
        "a red star",  # unparsed on a yes question → FN
        "no",  # TN
        "There is no red star.",  # TN
        "There isn't one.",  # TN
        "Yes",  # FP
        "maybe",  # unparsed on a no question → neither TN nor FP
    ]
    m = pope_metrics(preds, golds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unparsed"], m["n"]) == (3, 1, 3, 2, 2, 10)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))  # = 2/3
    assert m["yes_ratio"] == pytest.approx(4 / 10)


def test_pope_metrics_degenerate():
    m = pope_metrics(["no", "no"], ["yes", "no"])  # never says yes: precision undefined → 0
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    assert pope_metrics([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["red"])


SIZE = (800, 400)  # width, height
EXPECTED = [200.0, 200.0, 600.0, 400.0]


@pytest.mark.parametrize(
    ("text", "convention"),
    [
        ('{"bbox_2d": [250, 500, 750, 1000]}', "thousand"),
        ('<tool_call>{"name": "zoom", "arguments": {"bbox_2d": [250,500,750,1000]}}</tool_call>', "thousand"),
        ("<|box_start|>(250,500),(750,1000)<|box_end|>", "thousand"),
        ("The star is at [0.25, 0.5, 0.75, 1.0].", "normalized"),
        ("[200, 200, 600, 400]", "pixels"),
        ("[200.0, 200.0, 600.0, 400.0] and later [0, 0, 10, 10]", "pixels"),  # the first box wins
    ],
)
def test_parse_box_answer_conventions(text, convention):
    box = parse_box_answer(text, SIZE, convention)
    assert box is not None
    assert box.to_list() == pytest.approx(EXPECTED)


def test_parse_box_answer_clamps_partly_outside():
    box = parse_box_answer("[900, 900, 1100, 1100]", SIZE, "thousand")
    assert box.to_list() == pytest.approx([720.0, 360.0, 800.0, 400.0])


@pytest.mark.parametrize(
    "text",
    [
        "no box here",
        "",
        "[1, 2, 3]",  # three numbers
        "[1, 2, 3, 4, 5]",  # five numbers
        "[x1, y1, x2, y2]",
        "[500, 500, 100, 100]",  # inverted
        "[100, 100, 100, 300]",  # empty
        "[1100, 1100, 1200, 1200]",  # entirely outside in 0-1000
        '{"bbox_2d": [100, 200, 300',  # truncated
    ],
)
def test_parse_box_answer_malformed_is_none(text):
    assert parse_box_answer(text, SIZE, "thousand") is None


def test_parse_box_answer_unknown_convention():
    with pytest.raises(ValueError):
        parse_box_answer("[0, 0, 1, 1]", SIZE, "inches")
    with pytest.raises(ValueError, match="resized_size"):
        parse_box_answer("[0, 0, 1, 1]", SIZE, "resized")  # the resized convention needs the input size


def test_parse_box_answer_resized_convention():
    # Qwen2.5-VL writes pixels of its resized input: an 800×400 image seen at 400×200 halves every coordinate.
    resized = [value / 2 for value in EXPECTED]
    box = parse_box_answer(json.dumps({"bbox_2d": resized}), SIZE, "resized", resized_size=(400, 200))
    assert box.to_list() == pytest.approx(EXPECTED)
    scored = score_answer(
        json.dumps(resized), {"family": "grounding", "answers": [], "boxes": [EXPECTED]}, SIZE, "resized", (400, 200)
    )
    assert scored["score"] == 1.0


def test_box_iou_and_grounding_accuracy():
    assert box_iou(Box(0, 0, 10, 10), [[5, 0, 15, 10]]) == pytest.approx(50 / 150)
    assert box_iou(Box(0, 0, 10, 10), [[50, 50, 60, 60], [0, 0, 10, 10]]) == 1.0  # best gold counts
    assert box_iou(None, [[0, 0, 1, 1]]) == 0.0
    preds = [Box(0, 0, 10, 10), Box(0, 0, 10, 10), None, Box(50, 50, 60, 60)]
    golds = [[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 5, 5], Box(0, 0, 10, 10)]
    # IoUs: 1.0, 0.5 (100 / 200: exactly the threshold counts), miss, 0.0
    assert grounding_accuracy(preds, golds) == 0.5
    assert grounding_accuracy(preds, golds, threshold=0.6) == 0.25
    assert grounding_accuracy([Box(0, 0, 10, 10)], [[[40, 40, 50, 50], [0, 0, 10, 10]]]) == 1.0  # list of golds
    assert grounding_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        grounding_accuracy([None], [])


def test_scoring_modes():
    world = {"answers": ["purple", "violet"], "family": "attribute", "preset": "default"}
    assert scoring_mode(world) == "exact"
    assert score_answer("Violet", world, SIZE)["score"] == 1.0
    textvqa = {"answers": ["stop"] * 2 + ["stop sign"] * 8, "family": "text", "preset": None}
    assert scoring_mode(textvqa) == "vqa"
    assert score_answer("stop", textvqa, SIZE)["score"] == pytest.approx(2 / 3)
    pope = {"answers": ["no"], "family": "existence", "subtype": "adversarial"}
    scored = score_answer("There is no red star.", pope, SIZE)
    assert (scored["mode"], scored["score"], scored["parsed"]) == ("yes_no", 1.0, "no")
    grounding = {"answers": [], "family": "grounding", "boxes": [[200, 200, 600, 400]]}
    hit = score_answer('{"bbox_2d": [250, 500, 750, 1000]}', grounding, SIZE, "thousand")
    assert (hit["mode"], hit["score"], hit["iou"], hit["box"]) == ("grounding", 1.0, 1.0, EXPECTED)
    assert score_answer('{"bbox_2d": [250, 500, 750, 1000]}', grounding, SIZE, "pixels")["score"] == 0.0
    assert score_answer("somewhere on the right", grounding, SIZE)["score"] == 0.0
    forced = {"answers": ["a", "b"], "scoring": "exact"}
    assert score_answer("b", forced, SIZE)["score"] == 1.0
    with pytest.raises(ValueError):
        score_answer("b", {"answers": ["b"], "scoring": "bleu"}, SIZE)
