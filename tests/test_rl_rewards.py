"""DeepEyes' reward functions (rl.rewards): doctests and edge cases on TRL-shaped completions."""

from __future__ import annotations

import doctest

import pytest
from PIL import Image

from foveate.rl import rewards
from foveate.rl.rewards import accuracy_reward, deepeyes_reward, format_reward, tool_reward

ROW = {
    "answers": ["red"],
    "family": "attribute",
    "preset": "small-detail",
    "boxes": [[0, 0, 10, 10]],
    "image_size": [100, 100],
}


def columns(n: int, **extra):
    return {k: [v] * n for k, v in ROW.items()} | extra


def assistant(content: str, thought: str | None = None, tool_calls=None) -> dict:
    message = {"role": "assistant", "content": content}
    if thought is not None:
        message["reasoning_content"] = thought
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


ZOOM_CALL = [
    {"type": "function", "function": {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 500, 500]}}}
]
CROP = {"role": "tool", "name": "image_zoom_in_tool", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))}]}
ERROR = {"role": "tool", "name": "image_zoom_in_tool", "content": "Error: bbox_2d is too small"}


def total(completions, environments=None):
    parts = [
        f([], completions, None, **columns(len(completions)), environments=environments)
        for f in (accuracy_reward, format_reward, tool_reward)
    ]
    return [deepeyes_reward(*p) for p in zip(*parts, strict=True)], parts


def test_doctests():
    assert doctest.testmod(rewards).failed == 0


def test_right_answer_after_a_zoom_gets_everything():
    completion = [assistant("", "small", ZOOM_CALL), CROP, assistant("<answer>Red</answer>", "now visible")]
    reward, parts = total([completion])
    assert [p[0] for p in parts] == [1.0, 0.0, 1.0]
    assert reward == [2.0]


def test_tool_used_with_a_wrong_answer_gets_no_tool_reward():
    completion = [assistant("", "small", ZOOM_CALL), CROP, assistant("<answer>blue</answer>", "hmm")]
    reward, parts = total([completion])
    assert [p[0] for p in parts] == [0.0, 0.0, 0.0]
    assert reward == [0.0]


def test_a_refused_zoom_is_not_a_zoom():
    completion = [assistant("", "small", ZOOM_CALL), ERROR, assistant("<answer>red</answer>", "guess")]
    reward, parts = total([completion])
    assert parts[2] == [0.0] and reward == [0.8]


def test_environment_counts_win_over_the_transcript():
    class Env:
        zooms = 1

    completion = [assistant("<answer>red</answer>", "seen")]
    _, parts = total([completion], environments=[Env()])
    assert parts[2] == [1.0]


@pytest.mark.parametrize(
    "completion",
    [
        [assistant("<answer>red", "x")],  # unclosed answer
        [assistant("red", "x")],  # missing answer
        [assistant("<think>x<answer>red</answer>")],  # unclosed think left in content
        [assistant("</answer>red<answer>")],  # closed before opened
        [assistant("<answer>" + "r" * 1000 + "</answer>")],  # too long
        [assistant("", "x", ZOOM_CALL), CROP, assistant("<tool_call>{", "x")],  # the last turn is a broken call
        [assistant("<answer>red</answer>"), assistant("<think>more</think>")],  # answer not in the last turn
        [],  # nothing at all
    ],
)
def test_format_errors(completion):
    assert format_reward([], [completion]) == [-1.0]


def test_a_right_answer_in_a_broken_format_is_still_right_but_penalised():
    reward, parts = total([[assistant("<think>x<answer>red</answer>")]])  # the thought never closes
    assert [p[0] for p in parts] == [1.0, -1.0, 0.0] and reward == [0.6]


def test_a_well_formed_right_answer_without_a_zoom():
    reward, parts = total([[assistant("<answer>red</answer>", "visible")]])
    assert [p[0] for p in parts] == [1.0, 0.0, 0.0] and reward == [0.8]


def test_plain_text_completion_and_yes_no_rows():
    row = {"answers": ["yes"], "family": "existence", "preset": "default"}
    assert rewards.accuracy("Yes.", row) == 1.0
    assert format_reward([], ["<think>a</think><answer>yes</answer>"]) == [0.0]


def test_tool_reward_logs_the_tool_use_rate():
    logged = {}
    completions = [
        [assistant("", "z", ZOOM_CALL), CROP, assistant("<answer>red</answer>", "v")],
        [assistant("<answer>red</answer>")],
    ]
    tool_reward([], completions, None, **columns(2), log_metric=lambda k, v: logged.setdefault(k, v))
    assert logged == {"tool_use_rate": 0.5}
