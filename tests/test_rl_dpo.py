"""VisRL DPO pieces: box scoring, VisRL's keep / chosen / rejected rules, and the DPO rows built from pairs."""

from __future__ import annotations

import doctest
import json

import pytest
from PIL import Image

from foveate.rl import visrl_dpo
from foveate.rl.visrl_dpo import Attempt, box_score, dpo_rows, select_pair
from foveate.tools.boxes import Box


def attempt(acc: float, box: float, name: str = "", usable: bool = True) -> Attempt:
    window = [0.0, 0.0, 50.0, 50.0] if usable else None
    return Attempt(f'{{"bbox_2d": "{name}"}}', window, window, f"answer {name}", box, acc)


def test_doctests():
    assert doctest.testmod(visrl_dpo).failed == 0


@pytest.mark.parametrize(
    "attempts, expected",
    [
        ([attempt(1, 0.9), attempt(0, 0.1)], (0, 1)),
        ([attempt(0, 0.1), attempt(1, 0.9)], (1, 0)),  # order does not matter
        ([attempt(1, 0.8), attempt(0, 0.2)], (0, 1)),  # thresholds are inclusive
        ([attempt(1, 0.79), attempt(0, 0.1)], None),  # chosen's box just below 0.8
        ([attempt(1, 0.9), attempt(0, 0.21)], None),  # rejected's box just above 0.2
        ([attempt(0.7, 0.9), attempt(0, 0.1)], None),  # best accuracy below 0.8: item dropped
        ([attempt(1, 0.9), attempt(0.3, 0.1)], None),  # worst accuracy above 0.2: item dropped
        ([attempt(1, 0.9), attempt(1, 0.95), attempt(0, 0.1)], (1, 2)),  # tie on acc: the better box is chosen
        ([attempt(0, 0.9), attempt(1, 0.5), attempt(0, 0.1)], None),  # the right one has a middling box
        ([attempt(0, 0.15), attempt(1, 0.9), attempt(0, 0.05)], (1, 2)),  # tie on acc: the worse box is rejected
        ([attempt(1, 0.9), attempt(0, 0.9), attempt(1, 0.1)], None),  # the wrong one's box is good: no rejected
        ([], None),
    ],
)
def test_select_pair(attempts, expected):
    assert select_pair(attempts) == expected


def test_an_attempt_without_a_usable_box_is_never_chosen():
    attempts = [attempt(1, 0.0, usable=False), attempt(1, 0.5), attempt(0, 0.0)]
    assert select_pair(attempts, box_high=0.0, box_low=1.0) == (1, 2)
    assert select_pair([attempt(1, 0.0, usable=False), attempt(0, 0.0)], box_high=0.0, box_low=1.0) is None
    # ... but it may be rejected: no box is the worst box
    assert select_pair([attempt(1, 0.9), attempt(0, 0.0, usable=False)]) == (0, 1)


def test_select_pair_thresholds_are_parameters():
    attempts = [attempt(1, 0.3), attempt(0, 0.04)]
    assert select_pair(attempts) is None
    assert select_pair(attempts, box_high=0.15, box_low=0.05) == (0, 1)


def test_box_score_compares_crop_windows():
    evidence = [[500, 500, 530, 530]]
    # A small box centred on the evidence yields the same minimum window (score 1); off-centre, nearly so.
    window = visrl_dpo.focus_window
    assert box_score(window(Box(505, 505, 525, 525), (1344, 1344), 336), evidence, (1344, 1344), 336) == 1.0
    assert 0.95 < box_score(window(Box(505, 505, 520, 520), (1344, 1344), 336), evidence, (1344, 1344), 336) < 1
    whole = Box(0, 0, 1344, 1344)
    assert box_score(whole, evidence, (1344, 1344), 336) == pytest.approx((336 / 1344) ** 2)
    assert box_score(None, evidence, (1344, 1344), 336) == 0.0
    assert box_score(whole, [], (1344, 1344), 336) == 0.0
    # Two evidence boxes: the window of their union.
    two = [[100, 100, 130, 130], [900, 900, 930, 930]]
    assert box_score(Box(100, 100, 930, 930), two, (1344, 1344), 336) == 1.0


def test_dpo_rows_stage_1_and_stage_2(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "i.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "c.png")
    chosen = {"focus_text": '{"bbox_2d": [0, 0, 500, 500]}', "answer_text": "red"}
    rejected = {"focus_text": '{"bbox_2d": [900, 900, 1000, 1000]}', "answer_text": "blue"}
    record = {"question": "What color?", "image": "i.png", "crop": "c.png", "chosen": chosen, "rejected": rejected}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(record) + "\n")
    stage1 = dpo_rows(pairs, 1)
    assert len(stage1) == 1 and len(stage1[0]["images"]) == 1
    assert stage1[0]["chosen"][0]["content"][0]["text"] == chosen["focus_text"]
    assert stage1[0]["prompt"][0]["content"][1]["text"].startswith("What color?\nFirst give the focus box")
    stage2 = dpo_rows(pairs, 2)
    assert len(stage2) == 2  # box step and answer step in equal parts
    answer = stage2[1]
    assert [m["role"] for m in answer["prompt"]] == ["user", "assistant", "user"]
    assert answer["prompt"][1]["content"][0]["text"] == chosen["focus_text"]  # conditioned on the chosen crop
    assert answer["images"][1].size == (32, 32)
    assert answer["chosen"][0]["content"][0]["text"] == "red" and answer["rejected"][0]["content"][0]["text"] == "blue"
